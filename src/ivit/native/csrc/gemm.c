/*
 * Exact int8 GEMMs of the ivit integer engine (integer instructions only: no float or double anywhere).
 *
 *   ivit_gemm_s8s8s32:  C[m, n] = sum_k A[m, k] * B[n, k] (+ bias[n])   A int8,  B int8 (N, K) row-major
 *   ivit_gemm_u8s8s32:  the same with A uint8 (values 0..255)
 *   ivit_gemm_batched:  a batch of either (no bias), B stored (N, K) or (K, N)
 *
 * B is a weight matrix in PyTorch's (out_features, in_features) layout.  Both operands are re-laid out
 * inside the call (B can be a weight that changes every training step) as "k-group words": one uint32
 * holds KU consecutive k of one row (KU = 2 int16 halves, or KU = 4 bytes), zero padded to whole words.
 *   A: row-major rows of words (a converted copy: sign/zero-extended to int16, or offset to u8);
 *   B: panels of NR columns, word-major ([k-group][column], via 8x8 SIMD transposes).
 * An MR x NR register-blocked micro-kernel broadcasts one A word per row and multiplies it with NR
 * columns of B words.  K is split into blocks whose B sub-panel (16 KB) stays in L1 while the A rows of
 * an M block (~192 KB, in L2) stream past it; OpenMP splits (M block x N block) tiles over `nthreads`.
 *
 * Code paths, chosen at compile time from the compiler's ISA macros (the library is built with
 * -march=native by default; IVIT_NATIVE_MARCH=x86-64-v3 / x86-64 builds the AVX2 / scalar paths):
 *   avx512vnni  vpdpbusd (zmm; u8 x s8 -> s32, 4 products per lane, NON-saturating).  u8 A is exact as
 *               is; s8 A is offset to unsigned (a + 128 = a xor 0x80) and 128 * sum_k B[n, k] is
 *               subtracted per column: sum (a + 128) b - 128 sum b = sum a b.
 *   avxvnni     the same with the VEX encoded ymm vpdpbusd (Alder Lake and later without AVX-512).
 *   avx2        A and B sign-extended (u8 A: zero-extended) to int16 pairs, vpmaddwd (int16 x int16 ->
 *               int32, pairs summed) + vpaddd: exact, since |a0 b0 + a1 b1| <= 2 * 255 * 128 < 2^31.
 *               Never vpmaddubsw: it sums pairs into a SATURATING int16 (127*127 + 127*127 > 32767),
 *               which is what makes oneDNN's int8 GEMM inexact on CPUs without VNNI.
 *   scalar      portable C on the same int16-pair words, uint32 (modular) accumulators.
 *
 * Exactness bounds.  Every product fits easily (|a b| <= 255 * 128 = 32640).  The true sum satisfies
 *   s8 x s8:  |acc| <= K * 128 * 128 = K * 2^14,  < 2^31 for K < 2^17 (and K * 128 * 127 < 2^31 for
 *             K <= 2^17: the ops.int_linear bound, weights in [-127, 127]);
 *   u8 x s8:  |acc| <= K * 255 * 128 = K * 32640, < 2^31 for K <= 2^16 (the ops.int_matmul bound);
 * plus |bias| (ops.int_linear assumes |bias| < 2^30).  Within those bounds every int32 partial sum is
 * the exact integer.  Beyond them the result is still bit-identical to the int64 reference cast to int32
 * (torch .to(torch.int32) keeps the low 32 bits): all accumulation here is modular 2^32 (vpaddd and
 * vpdpbusd wrap, never saturate; vpmaddwd pair sums cannot overflow; scalar code adds in uint32), so
 * C = (exact sum) mod 2^32 in every path, including the s8 offset correction and the bias.
 *
 * Return value: 0 on success; 1 when a buffer cannot be allocated or the sizes are unrepresentable
 * (C is then left untouched: all buffers are allocated before anything is written).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define IVIT_GEMM_PATH 3
#elif defined(__AVX2__) && defined(__AVXVNNI__)
#define IVIT_GEMM_PATH 2
#elif defined(__AVX2__)
#define IVIT_GEMM_PATH 1
#else
#define IVIT_GEMM_PATH 0
#endif

#if IVIT_GEMM_PATH > 0
#include <immintrin.h>
#endif

#if IVIT_GEMM_PATH == 3
#define KU 4
#define MR 8
#define NR 32
#define PATH_NAME "avx512vnni"
#elif IVIT_GEMM_PATH == 2
#define KU 4
#define MR 6
#define NR 16
#define PATH_NAME "avxvnni"
#elif IVIT_GEMM_PATH == 1
#define KU 2
#define MR 6
#define NR 16
#define PATH_NAME "avx2"
#else
#define KU 2
#define MR 4
#define NR 16
#define PATH_NAME "scalar"
#endif

/* k-group words per K block: one B sub-panel (NR x KCW words) is 16 KB and stays in L1 */
#define KCW_MAX (16384 / (NR * 4))
/* bytes of A rows (one K block) kept hot in L2 per M block */
#define A_BLOCK_BYTES (192 * 1024)
/* below this many multiply-adds a GEMM runs on one thread (fork/join would cost more) */
#define PAR_MIN_MACS ((int64_t)1 << 20)

/* The compiled code path: "avx512vnni", "avxvnni", "avx2" or "scalar". */
const char *ivit_gemm_isa(void) { return PATH_NAME; }

/* Micro-kernel geometry of the compiled path: which = 0 -> MR, 1 -> NR, 2 -> KU. */
int ivit_gemm_block(int which) { return which == 0 ? MR : (which == 1 ? NR : KU); }

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* ---------------------------------------------------------------------------------------------------
 * k-group words
 * ------------------------------------------------------------------------------------------------- */

/* One word of the n <= KU values x[0..n) (the rest zero).  kind: 0 = s8 (bytes as is, or sign-extended
 * int16 halves), 1 = u8 (zero-extended halves), 2 = s8 offset to u8 (xor 0x80; byte words only). */
static inline uint32_t word_of(const uint8_t *x, int64_t n, int kind) {
    uint32_t w = 0;
#if KU == 4
    for (int64_t i = 0; i < n; i++) w |= (uint32_t)(kind == 2 ? x[i] ^ 0x80u : x[i]) << (8 * i);
#else
    for (int64_t i = 0; i < n; i++)
        w |= (kind == 1 ? (uint32_t)x[i] : (uint32_t)(uint16_t)(int16_t)(int8_t)x[i]) << (16 * i);
#endif
    return w;
}

/* A row x[0..K) -> kg words dst[0..kg). */
static void convert_row(const uint8_t *x, int64_t K, int64_t kg, int kind, uint32_t *dst) {
    int64_t g = 0;
#if IVIT_GEMM_PATH == 3
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (; (g + 16) * 4 <= K; g += 16) {
        __m512i v = _mm512_loadu_si512((const void *)(x + g * 4));
        if (kind == 2) v = _mm512_xor_si512(v, flip);
        _mm512_storeu_si512((void *)(dst + g), v);
    }
#elif IVIT_GEMM_PATH == 2
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    for (; (g + 8) * 4 <= K; g += 8) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(x + g * 4));
        if (kind == 2) v = _mm256_xor_si256(v, flip);
        _mm256_storeu_si256((__m256i *)(dst + g), v);
    }
#elif IVIT_GEMM_PATH == 1
    for (; (g + 8) * 2 <= K; g += 8) {
        const __m128i v = _mm_loadu_si128((const __m128i *)(x + g * 2));
        _mm256_storeu_si256((__m256i *)(dst + g), kind == 1 ? _mm256_cvtepu8_epi16(v) : _mm256_cvtepi8_epi16(v));
    }
#endif
    for (; g < kg; g++) dst[g] = word_of(x + g * KU, min64(KU, K - g * KU), kind);
}

/* Columns n0 .. n0 + NR of B (rows of the (N, K) matrix; rows >= N read as `zero`, K zero bytes)
 * -> one panel dst[g * NR + c]. */
static void pack_panel(const int8_t *B, int64_t ldb, int64_t N, int64_t K, int64_t n0, int64_t kg,
                       const uint8_t *zero, uint32_t *restrict dst) {
    for (int64_t c0 = 0; c0 < NR; c0 += 8) {
        const uint8_t *p[8];
        for (int r = 0; r < 8; r++) p[r] = n0 + c0 + r < N ? (const uint8_t *)(B + (n0 + c0 + r) * ldb) : zero;
        int64_t g = 0;
#if KU == 4 && IVIT_GEMM_PATH >= 2
        /* 8 rows x 8 words: 8x8 transpose of 32-bit elements */
        for (; (g + 8) * 4 <= K; g += 8) {
            __m256i x0 = _mm256_loadu_si256((const __m256i *)(p[0] + g * 4));
            __m256i x1 = _mm256_loadu_si256((const __m256i *)(p[1] + g * 4));
            __m256i x2 = _mm256_loadu_si256((const __m256i *)(p[2] + g * 4));
            __m256i x3 = _mm256_loadu_si256((const __m256i *)(p[3] + g * 4));
            __m256i x4 = _mm256_loadu_si256((const __m256i *)(p[4] + g * 4));
            __m256i x5 = _mm256_loadu_si256((const __m256i *)(p[5] + g * 4));
            __m256i x6 = _mm256_loadu_si256((const __m256i *)(p[6] + g * 4));
            __m256i x7 = _mm256_loadu_si256((const __m256i *)(p[7] + g * 4));
            __m256i t0 = _mm256_unpacklo_epi32(x0, x1), t1 = _mm256_unpackhi_epi32(x0, x1);
            __m256i t2 = _mm256_unpacklo_epi32(x2, x3), t3 = _mm256_unpackhi_epi32(x2, x3);
            __m256i t4 = _mm256_unpacklo_epi32(x4, x5), t5 = _mm256_unpackhi_epi32(x4, x5);
            __m256i t6 = _mm256_unpacklo_epi32(x6, x7), t7 = _mm256_unpackhi_epi32(x6, x7);
            __m256i s0 = _mm256_unpacklo_epi64(t0, t2), s1 = _mm256_unpackhi_epi64(t0, t2);
            __m256i s2 = _mm256_unpacklo_epi64(t1, t3), s3 = _mm256_unpackhi_epi64(t1, t3);
            __m256i s4 = _mm256_unpacklo_epi64(t4, t6), s5 = _mm256_unpackhi_epi64(t4, t6);
            __m256i s6 = _mm256_unpacklo_epi64(t5, t7), s7 = _mm256_unpackhi_epi64(t5, t7);
            uint32_t *d = dst + g * NR + c0;
            _mm256_storeu_si256((__m256i *)(d + 0 * NR), _mm256_permute2x128_si256(s0, s4, 0x20));
            _mm256_storeu_si256((__m256i *)(d + 1 * NR), _mm256_permute2x128_si256(s1, s5, 0x20));
            _mm256_storeu_si256((__m256i *)(d + 2 * NR), _mm256_permute2x128_si256(s2, s6, 0x20));
            _mm256_storeu_si256((__m256i *)(d + 3 * NR), _mm256_permute2x128_si256(s3, s7, 0x20));
            _mm256_storeu_si256((__m256i *)(d + 4 * NR), _mm256_permute2x128_si256(s0, s4, 0x31));
            _mm256_storeu_si256((__m256i *)(d + 5 * NR), _mm256_permute2x128_si256(s1, s5, 0x31));
            _mm256_storeu_si256((__m256i *)(d + 6 * NR), _mm256_permute2x128_si256(s2, s6, 0x31));
            _mm256_storeu_si256((__m256i *)(d + 7 * NR), _mm256_permute2x128_si256(s3, s7, 0x31));
        }
#elif KU == 2 && IVIT_GEMM_PATH == 1
        /* 8 rows x 8 byte pairs: 8x8 transpose of 16-bit elements, then sign-extend to int16 pairs */
        for (; (g + 8) * 2 <= K; g += 8) {
            __m128i x0 = _mm_loadu_si128((const __m128i *)(p[0] + g * 2));
            __m128i x1 = _mm_loadu_si128((const __m128i *)(p[1] + g * 2));
            __m128i x2 = _mm_loadu_si128((const __m128i *)(p[2] + g * 2));
            __m128i x3 = _mm_loadu_si128((const __m128i *)(p[3] + g * 2));
            __m128i x4 = _mm_loadu_si128((const __m128i *)(p[4] + g * 2));
            __m128i x5 = _mm_loadu_si128((const __m128i *)(p[5] + g * 2));
            __m128i x6 = _mm_loadu_si128((const __m128i *)(p[6] + g * 2));
            __m128i x7 = _mm_loadu_si128((const __m128i *)(p[7] + g * 2));
            __m128i t0 = _mm_unpacklo_epi16(x0, x1), t1 = _mm_unpackhi_epi16(x0, x1);
            __m128i t2 = _mm_unpacklo_epi16(x2, x3), t3 = _mm_unpackhi_epi16(x2, x3);
            __m128i t4 = _mm_unpacklo_epi16(x4, x5), t5 = _mm_unpackhi_epi16(x4, x5);
            __m128i t6 = _mm_unpacklo_epi16(x6, x7), t7 = _mm_unpackhi_epi16(x6, x7);
            __m128i s0 = _mm_unpacklo_epi32(t0, t2), s1 = _mm_unpackhi_epi32(t0, t2);
            __m128i s2 = _mm_unpacklo_epi32(t1, t3), s3 = _mm_unpackhi_epi32(t1, t3);
            __m128i s4 = _mm_unpacklo_epi32(t4, t6), s5 = _mm_unpackhi_epi32(t4, t6);
            __m128i s6 = _mm_unpacklo_epi32(t5, t7), s7 = _mm_unpackhi_epi32(t5, t7);
            uint32_t *d = dst + g * NR + c0;
            _mm256_storeu_si256((__m256i *)(d + 0 * NR), _mm256_cvtepi8_epi16(_mm_unpacklo_epi64(s0, s4)));
            _mm256_storeu_si256((__m256i *)(d + 1 * NR), _mm256_cvtepi8_epi16(_mm_unpackhi_epi64(s0, s4)));
            _mm256_storeu_si256((__m256i *)(d + 2 * NR), _mm256_cvtepi8_epi16(_mm_unpacklo_epi64(s1, s5)));
            _mm256_storeu_si256((__m256i *)(d + 3 * NR), _mm256_cvtepi8_epi16(_mm_unpackhi_epi64(s1, s5)));
            _mm256_storeu_si256((__m256i *)(d + 4 * NR), _mm256_cvtepi8_epi16(_mm_unpacklo_epi64(s2, s6)));
            _mm256_storeu_si256((__m256i *)(d + 5 * NR), _mm256_cvtepi8_epi16(_mm_unpackhi_epi64(s2, s6)));
            _mm256_storeu_si256((__m256i *)(d + 6 * NR), _mm256_cvtepi8_epi16(_mm_unpacklo_epi64(s3, s7)));
            _mm256_storeu_si256((__m256i *)(d + 7 * NR), _mm256_cvtepi8_epi16(_mm_unpackhi_epi64(s3, s7)));
        }
#endif
        for (; g < kg; g++) {
            const int64_t n = min64(KU, K - g * KU);
            for (int r = 0; r < 8; r++) dst[g * NR + c0 + r] = word_of(p[r] + g * KU, n, 0);
        }
    }
}

/* The same panel from B stored (K, N) row-major (b[k * ldb + n]: the right operand of a @ b). */
static void pack_panel_kn(const int8_t *B, int64_t ldb, int64_t N, int64_t K, int64_t n0, int64_t kg,
                          uint32_t *restrict dst) {
    for (int64_t g = 0; g < kg; g++) {
        const int64_t k0 = g * KU, nk = min64(KU, K - k0);
        uint32_t *d = dst + g * NR;
#if IVIT_GEMM_PATH >= 1
        if (nk == KU && n0 + NR <= N) {
            for (int64_t c0 = 0; c0 < NR; c0 += 16) {
                const int8_t *p = B + k0 * ldb + n0 + c0;
                const __m128i r0 = _mm_loadu_si128((const __m128i *)p);
                const __m128i r1 = _mm_loadu_si128((const __m128i *)(p + ldb));
#if KU == 4
                const __m128i r2 = _mm_loadu_si128((const __m128i *)(p + 2 * ldb));
                const __m128i r3 = _mm_loadu_si128((const __m128i *)(p + 3 * ldb));
                const __m128i t0 = _mm_unpacklo_epi8(r0, r1), t1 = _mm_unpackhi_epi8(r0, r1);
                const __m128i t2 = _mm_unpacklo_epi8(r2, r3), t3 = _mm_unpackhi_epi8(r2, r3);
                _mm_storeu_si128((__m128i *)(d + c0), _mm_unpacklo_epi16(t0, t2));
                _mm_storeu_si128((__m128i *)(d + c0 + 4), _mm_unpackhi_epi16(t0, t2));
                _mm_storeu_si128((__m128i *)(d + c0 + 8), _mm_unpacklo_epi16(t1, t3));
                _mm_storeu_si128((__m128i *)(d + c0 + 12), _mm_unpackhi_epi16(t1, t3));
#else
                _mm256_storeu_si256((__m256i *)(d + c0), _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(r0, r1)));
                _mm256_storeu_si256((__m256i *)(d + c0 + 8), _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(r0, r1)));
#endif
            }
            continue;
        }
#endif
        for (int64_t c = 0; c < NR; c++) {
            uint8_t x[KU] = {0};
            if (n0 + c < N)
                for (int64_t t = 0; t < nk; t++) x[t] = (uint8_t)B[(k0 + t) * ldb + n0 + c];
            d[c] = word_of(x, nk, 0);
        }
    }
}

/* sum_k b[k] exactly (|sum| <= 128 K) */
static int64_t row_sum(const int8_t *b, int64_t K) {
    int64_t s = 0;
    for (int64_t k0 = 0; k0 < K; k0 += 65536) { /* int32 partial sums: |partial| <= 2^23 */
        const int64_t k1 = min64(K, k0 + 65536);
        int32_t p = 0;
        for (int64_t k = k0; k < k1; k++) p += b[k];
        s += p;
    }
    return s;
}

/* ---------------------------------------------------------------------------------------------------
 * Micro-kernels: for the MR x NR tile
 *   c[r, j] = init[r, j] + sum_{g < kc} dot(a_r[g], bp[g * NR + j])
 * a_r = a + min(r, mr - 1) * lda (rows >= mr repeat the last valid row: computed, never stored by the
 * caller); init = the NR column offsets for every row when ldi == 0, else rows init + r * ldi (partial
 * sums of the previous K blocks; init may equal c).  c gets all MR rows.
 * ------------------------------------------------------------------------------------------------- */

#define AROWS                                                                                              \
    const int32_t *ar[MR];                                                                                 \
    for (int r = 0; r < MR; r++) ar[r] = a + (r < mr ? r : mr - 1) * lda

#if IVIT_GEMM_PATH == 3

#define INIT(r)                                                                                            \
    do {                                                                                                   \
        if (ldi) {                                                                                         \
            c##r##0 = _mm512_loadu_si512((const void *)(init + (r) * ldi));                                \
            c##r##1 = _mm512_loadu_si512((const void *)(init + (r) * ldi + 16));                           \
        } else {                                                                                           \
            c##r##0 = _mm512_loadu_si512((const void *)init);                                              \
            c##r##1 = _mm512_loadu_si512((const void *)(init + 16));                                       \
        }                                                                                                  \
    } while (0)
#define ROW(r)                                                                                             \
    do {                                                                                                   \
        const __m512i av = _mm512_set1_epi32(ar[r][g]);                                                    \
        c##r##0 = _mm512_dpbusd_epi32(c##r##0, av, b0);                                                    \
        c##r##1 = _mm512_dpbusd_epi32(c##r##1, av, b1);                                                    \
    } while (0)
#define STORE(r)                                                                                           \
    do {                                                                                                   \
        _mm512_storeu_si512((void *)(c + (r) * ldc), c##r##0);                                             \
        _mm512_storeu_si512((void *)(c + (r) * ldc + 16), c##r##1);                                        \
    } while (0)

static void ukernel(const int32_t *a, int64_t lda, int64_t mr, const int32_t *restrict bp, int64_t kc,
                    const int32_t *init, int64_t ldi, int32_t *c, int64_t ldc) {
    AROWS;
    __m512i c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51, c60, c61, c70, c71;
    INIT(0); INIT(1); INIT(2); INIT(3); INIT(4); INIT(5); INIT(6); INIT(7);
    for (int64_t g = 0; g < kc; g++) {
        const __m512i b0 = _mm512_load_si512((const void *)bp), b1 = _mm512_load_si512((const void *)(bp + 16));
        ROW(0); ROW(1); ROW(2); ROW(3); ROW(4); ROW(5); ROW(6); ROW(7);
        bp += NR;
    }
    STORE(0); STORE(1); STORE(2); STORE(3); STORE(4); STORE(5); STORE(6); STORE(7);
}

#elif IVIT_GEMM_PATH == 2 || IVIT_GEMM_PATH == 1

#if IVIT_GEMM_PATH == 2
#define MAC(acc, x, y) acc = _mm256_dpbusd_avx_epi32(acc, x, y)
#else
#define MAC(acc, x, y) acc = _mm256_add_epi32(acc, _mm256_madd_epi16(x, y))
#endif
#define INIT(r)                                                                                            \
    do {                                                                                                   \
        if (ldi) {                                                                                         \
            c##r##0 = _mm256_loadu_si256((const __m256i *)(init + (r) * ldi));                             \
            c##r##1 = _mm256_loadu_si256((const __m256i *)(init + (r) * ldi + 8));                         \
        } else {                                                                                           \
            c##r##0 = _mm256_loadu_si256((const __m256i *)init);                                           \
            c##r##1 = _mm256_loadu_si256((const __m256i *)(init + 8));                                     \
        }                                                                                                  \
    } while (0)
#define ROW(r)                                                                                             \
    do {                                                                                                   \
        const __m256i av = _mm256_set1_epi32(ar[r][g]);                                                    \
        MAC(c##r##0, av, b0);                                                                              \
        MAC(c##r##1, av, b1);                                                                              \
    } while (0)
#define STORE(r)                                                                                           \
    do {                                                                                                   \
        _mm256_storeu_si256((__m256i *)(c + (r) * ldc), c##r##0);                                          \
        _mm256_storeu_si256((__m256i *)(c + (r) * ldc + 8), c##r##1);                                      \
    } while (0)

static void ukernel(const int32_t *a, int64_t lda, int64_t mr, const int32_t *restrict bp, int64_t kc,
                    const int32_t *init, int64_t ldi, int32_t *c, int64_t ldc) {
    AROWS;
    __m256i c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
    INIT(0); INIT(1); INIT(2); INIT(3); INIT(4); INIT(5);
    for (int64_t g = 0; g < kc; g++) {
        const __m256i b0 = _mm256_load_si256((const __m256i *)bp), b1 = _mm256_load_si256((const __m256i *)(bp + 8));
        ROW(0); ROW(1); ROW(2); ROW(3); ROW(4); ROW(5);
        bp += NR;
    }
    STORE(0); STORE(1); STORE(2); STORE(3); STORE(4); STORE(5);
}

#else /* portable scalar */

static void ukernel(const int32_t *a, int64_t lda, int64_t mr, const int32_t *restrict bp, int64_t kc,
                    const int32_t *init, int64_t ldi, int32_t *c, int64_t ldc) {
    AROWS;
    uint32_t acc[MR][NR];
    for (int r = 0; r < MR; r++)
        for (int j = 0; j < NR; j++) acc[r][j] = (uint32_t)init[r * ldi + j];
    for (int64_t g = 0; g < kc; g++) {
        int16_t blo[NR], bhi[NR];
        for (int j = 0; j < NR; j++) {
            const uint32_t w = (uint32_t)bp[j];
            blo[j] = (int16_t)(uint16_t)(w & 0xffffu);
            bhi[j] = (int16_t)(uint16_t)(w >> 16);
        }
        for (int r = 0; r < MR; r++) {
            const uint32_t w = (uint32_t)ar[r][g];
            const int32_t a0 = (int16_t)(uint16_t)(w & 0xffffu), a1 = (int16_t)(uint16_t)(w >> 16);
            /* |a0 b0 + a1 b1| <= 2 * 255 * 128: exact in int32 */
            for (int j = 0; j < NR; j++) acc[r][j] += (uint32_t)(a0 * blo[j] + a1 * bhi[j]);
        }
        bp += NR;
    }
    for (int r = 0; r < MR; r++)
        for (int j = 0; j < NR; j++) c[r * ldc + j] = (int32_t)acc[r][j];
}

#endif

/* ---------------------------------------------------------------------------------------------------
 * Driver
 * ------------------------------------------------------------------------------------------------- */

static void *alloc64(uint64_t bytes) {
    bytes = (bytes + 63) / 64 * 64;
    if (bytes == 0) bytes = 64;
    if (bytes > (uint64_t)SIZE_MAX) return NULL;
    return aligned_alloc(64, (size_t)bytes);
}

/* b_kn: B is stored (K, N) (b[k * ldb + n]) instead of (N, K) */
static int gemm(const uint8_t *A, int a_unsigned, int64_t lda, const int8_t *B, int b_kn, int64_t ldb, int32_t *C,
                int64_t ldc, int64_t M, int64_t N, int64_t K, const int32_t *bias, int nthreads) {
    if (M <= 0 || N <= 0) return 0;
    if (K <= 0) { /* empty sum */
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++) C[m * ldc + n] = bias ? bias[n] : 0;
        return 0;
    }
    if (M > ((int64_t)1 << 40) || N > ((int64_t)1 << 40) || K > ((int64_t)1 << 40)) return 1;
    int nt = nthreads;
#ifdef _OPENMP
    if (nt <= 0) nt = omp_get_max_threads();
#endif
    if (nt <= 0) nt = 1;
    const uint64_t macs = (uint64_t)M * (uint64_t)N * (uint64_t)K;
    if (macs < (uint64_t)PAR_MIN_MACS) nt = 1;

    const int64_t kg = (K + KU - 1) / KU; /* words per row */
    const int64_t np = (N + NR - 1) / NR; /* B panels */
    const int64_t mp = (M + MR - 1) / MR; /* A row panels */
    const uint64_t bwords = (uint64_t)np * NR * (uint64_t)kg, awords = (uint64_t)M * (uint64_t)kg;
    if (bwords > ((uint64_t)1 << 58) || awords > ((uint64_t)1 << 58)) return 1;
    uint32_t *Bp = alloc64(bwords * 4), *Aw = alloc64(awords * 4);
    int32_t *off = alloc64((uint64_t)np * NR * 4);
    uint8_t *zero = alloc64((uint64_t)K + 64);
    if (!Bp || !Aw || !off || !zero) {
        free(Bp); free(Aw); free(off); free(zero);
        return 1;
    }
    memset(zero, 0, (size_t)K + 64);
    /* s8 A on a byte (VNNI) path is offset by +128: subtract 128 * sum_k B[n, k] per column */
    const int a_kind = a_unsigned ? 1 : (KU == 4 ? 2 : 0);
    const int correct = !a_unsigned && KU == 4;

    /* K blocks of kcw words, M blocks of mcp row panels, N blocks of ncp column panels */
    const int64_t nkb = (kg + KCW_MAX - 1) / KCW_MAX, kcw = (kg + nkb - 1) / nkb;
    int64_t mcp = A_BLOCK_BYTES / (MR * 4 * kcw);
    if (mcp < 1) mcp = 1;
    if (mcp > mp) mcp = mp;
    const int64_t nmb = (mp + mcp - 1) / mcp;
    int64_t ncp = np; /* split N only when the M blocks alone cannot feed the threads */
    if (nt > 1 && nmb < 4 * (int64_t)nt) {
        int64_t want = (4 * (int64_t)nt + nmb - 1) / nmb;
        if (want > np) want = np;
        ncp = (np + want - 1) / want;
    }
    const int64_t nnb = (np + ncp - 1) / ncp;
    const int64_t items = nmb * nnb;

#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#pragma omp for schedule(static) nowait
        for (int64_t j = 0; j < np; j++) {
            const int64_t n0 = j * NR, nr = min64(NR, N - n0);
            int64_t sums[NR] = {0};
            if (b_kn) {
                pack_panel_kn(B, ldb, N, K, n0, kg, Bp + j * NR * kg);
                if (correct) /* |sum| <= 128 K */
                    for (int64_t k = 0; k < K; k++)
                        for (int64_t c = 0; c < nr; c++) sums[c] += B[k * ldb + n0 + c];
            } else {
                pack_panel(B, ldb, N, K, n0, kg, zero, Bp + j * NR * kg);
                if (correct)
                    for (int64_t c = 0; c < nr; c++) sums[c] = row_sum(B + (n0 + c) * ldb, K);
            }
            for (int64_t c = 0; c < NR; c++) {
                uint32_t o = 0;
                if (c < nr) {
                    if (bias) o = (uint32_t)bias[n0 + c];
                    o -= (uint32_t)(uint64_t)(sums[c] * 128); /* zero unless correct */
                }
                off[j * NR + c] = (int32_t)o;
            }
        }
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) convert_row(A + m * lda, K, kg, a_kind, Aw + m * kg);
        /* (implicit barrier: B panels and A rows are complete) */

#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < items; t++) {
            const int64_t ib = t / nnb, jb = t % nnb;
            const int64_t i0 = ib * mcp, i1 = min64(i0 + mcp, mp);
            const int64_t j0 = jb * ncp, j1 = min64(j0 + ncp, np);
            _Alignas(64) int32_t tmp[MR * NR];
            for (int64_t kb = 0; kb < nkb; kb++) {
                const int64_t g0 = kb * kcw, kc = min64(kcw, kg - g0);
                for (int64_t j = j0; j < j1; j++) {
                    const int32_t *bp = (const int32_t *)(Bp + j * NR * kg + g0 * NR);
                    const int64_t n0 = j * NR, nr = min64(NR, N - n0);
                    for (int64_t i = i0; i < i1; i++) {
                        const int64_t m0 = i * MR, mr = min64(MR, M - m0);
                        const int32_t *a = (const int32_t *)(Aw + m0 * kg + g0);
                        int32_t *c = C + m0 * ldc + n0;
                        if (mr == MR && nr == NR) {
                            if (kb == 0) ukernel(a, kg, mr, bp, kc, off + n0, 0, c, ldc);
                            else ukernel(a, kg, mr, bp, kc, c, ldc, c, ldc);
                        } else {
                            if (kb == 0) {
                                ukernel(a, kg, mr, bp, kc, off + n0, 0, tmp, NR);
                            } else {
                                for (int64_t r = 0; r < mr; r++) memcpy(tmp + r * NR, c + r * ldc, (size_t)nr * 4);
                                ukernel(a, kg, mr, bp, kc, tmp, NR, tmp, NR);
                            }
                            for (int64_t r = 0; r < mr; r++) memcpy(c + r * ldc, tmp + r * NR, (size_t)nr * 4);
                        }
                    }
                }
            }
        }
    }
    free(Bp); free(Aw); free(off); free(zero);
    return 0;
}

int ivit_gemm_s8s8s32(const int8_t *A, int64_t lda, const int8_t *B, int64_t ldb, int32_t *C, int64_t ldc,
                      int64_t M, int64_t N, int64_t K, const int32_t *bias, int nthreads) {
    return gemm((const uint8_t *)A, 0, lda, B, 0, ldb, C, ldc, M, N, K, bias, nthreads);
}

int ivit_gemm_u8s8s32(const uint8_t *A, int64_t lda, const int8_t *B, int64_t ldb, int32_t *C, int64_t ldc,
                      int64_t M, int64_t N, int64_t K, const int32_t *bias, int nthreads) {
    return gemm(A, 1, lda, B, 0, ldb, C, ldc, M, N, K, bias, nthreads);
}

/* Batched: for b < batch, C_b = A_b B_b^T, or A_b B_b when b_kn (B_b stored (K, N)), with operand b at
 * base + b * stride (elements); a_unsigned selects u8 A.  Batches are split across threads (one
 * single-threaded GEMM each) when there are at least as many as threads, else each GEMM uses all
 * threads.  Returns nonzero on allocation failure (some C_b may then be written). */
int ivit_gemm_batched(int a_unsigned, const void *A, int64_t sa, int64_t lda, const int8_t *B, int b_kn, int64_t sb,
                      int64_t ldb, int32_t *C, int64_t sc, int64_t ldc, int64_t batch, int64_t M, int64_t N,
                      int64_t K, int nthreads) {
    int nt = nthreads;
#ifdef _OPENMP
    if (nt <= 0) nt = omp_get_max_threads();
#endif
    if (nt <= 0) nt = 1;
    const uint64_t macs = (uint64_t)(batch > 0 ? batch : 0) * (uint64_t)(M > 0 ? M : 0) * (uint64_t)(N > 0 ? N : 0) *
                          (uint64_t)(K > 0 ? K : 0);
    int failed = 0;
    if (batch >= nt && nt > 1 && macs >= (uint64_t)PAR_MIN_MACS) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) reduction(| : failed)
        for (int64_t b = 0; b < batch; b++)
            failed |= gemm((const uint8_t *)A + b * sa, a_unsigned, lda, B + b * sb, b_kn, ldb, C + b * sc, ldc, M, N,
                           K, NULL, 1);
    } else {
        for (int64_t b = 0; b < batch; b++)
            failed |= gemm((const uint8_t *)A + b * sa, a_unsigned, lda, B + b * sb, b_kn, ldb, C + b * sc, ldc, M, N,
                           K, NULL, nt);
    }
    return failed;
}
