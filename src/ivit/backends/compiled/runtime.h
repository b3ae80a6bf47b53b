/*
 * Runtime of ivit's compiled CPU backend, included by every generated model.c (ivit.backends.compiled).
 *
 * Integer arithmetic only: no float or double anywhere (the integer-only proof disassembles the built
 * library).  Every kernel computes exactly the integers of the op set's reference (ivit/ops.py):
 *   round_shift(v, s) = (v + 2^(s-1)) >> s   (64-bit product, arithmetic shift: ties toward +inf)
 *
 * Code paths, chosen by the generator (IVIT_ISA, checked against the compiler's macros):
 *   2  AVX-512 VNNI: vpdpbusd (u8 x s8 -> s32, 4 products per lane, wrapping, never saturating).  The
 *      s8 activation is offset to u8 (a ^ 0x80 = a + 128) and 128 * sum_k W[n, k] is folded into the bias.
 *   1  AVX2: activations and weights sign-extended to int16 pairs, vpmaddwd (int16 x int16 -> int32,
 *      pairs summed: |a0 b0 + a1 b1| <= 2 * 128 * 128, exact) + vpaddd.  Never vpmaddubsw (saturating).
 *   0  portable C on the same int16-pair layout.
 * Accumulators are int32 and wrap modulo 2^32 (vpaddd / vpdpbusd); the op set's static bounds keep every
 * true sum inside int32, so the wrapped offset correction gives the exact sum.
 *
 * GEMM: C[m, n] = sum_k A[m, k] W[n, k] + bias[n] over IVIT_MR x (16..64) register tiles; the weight
 * is pre-packed at load ("panels" of IVIT_PW columns, [k-word][column][4 bytes]).  The A rows of a
 * block are packed per thread: gathered through a row map (Swin windows, class token), optionally
 * through I-LayerNorm (the LayerNorm producing the GEMM's input).  The int32 tile stays in L1 and an
 * epilogue writes int8/int16 results: requantize, requantize + 256-entry table (GELU), residual add
 * (add_requantize, through a row scatter map), or the patch embedding (embed).
 *
 * Attention per (image, window, head): K and V packed once, then blocks of query rows: q k^T in VNNI
 * register tiles, + bias, requantize, Shiftmax(-rel) per row in registers, p v in VNNI tiles,
 * attn_normalize and the following requantize fused, written straight to the proj GEMM's input.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef IVIT_ISA
#error "IVIT_ISA must be defined by the generated model"
#endif
#if IVIT_ISA == 2 && !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
                       defined(__AVX512VNNI__) && defined(__AVX512DQ__))
#error "IVIT_ISA 2 needs AVX-512 F/BW/VL/DQ/VNNI"
#endif
#if IVIT_ISA == 1 && !defined(__AVX2__)
#error "IVIT_ISA 1 needs AVX2"
#endif
#if IVIT_ISA >= 1
#include <immintrin.h>
#endif

typedef char ivit_check_asr[((-1) >> 1) == -1 ? 1 : -1];

#define IVIT_MR 6
#if IVIT_ISA == 2
#define IVIT_PW 64 /* columns per weight panel */
#define IVIT_KU 4  /* k per 32-bit word */
typedef uint8_t ivit_a_t;
#else
#define IVIT_PW 16
#define IVIT_KU 2
typedef int16_t ivit_a_t;
#endif
#define IVIT_QB 8 /* attention: query rows per block (at most) */
#ifndef IVIT_ABLOCK
#define IVIT_ABLOCK (384 * 1024) /* GEMM: bytes of packed A rows per block (L2) */
#endif
#ifndef IVIT_TILE_OUTER
#define IVIT_TILE_OUTER (192 * 1024) /* GEMM: weight bytes (per chunk of panels) up to which tiles are the outer loop */
#endif
#ifndef IVIT_PF
#define IVIT_PF 1 /* GEMM: software prefetch of the next tile's output / residual and the next item's A rows */
#endif
#ifndef IVIT_KBW
#define IVIT_KBW 64 /* GEMM: k-words per K block */
#endif

#define IVIT_INLINE static inline __attribute__((always_inline))

/* ------------------------------------------------------------------------------------------------
 * Context of one call
 * ---------------------------------------------------------------------------------------------- */

typedef struct {
    uint8_t *arena;        /* batch-scaled buffers: a buffer of per-image offset o starts at arena + o * B */
    const uint8_t *pixels; /* input (where 1) */
    uint8_t *out;          /* output (where 2) */
    const uint8_t *blob;   /* constants */
    uint8_t *shared;       /* fixed shared scratch */
    uint8_t *thread;       /* per-thread scratch, IVIT_TWS bytes each */
    int64_t *counters;     /* one work counter per step, 64 bytes apart */
    int64_t B;
} ivit_ctx;

IVIT_INLINE uint8_t *ivit_buf(const ivit_ctx *cx, int where, int64_t off) {
    return where == 0 ? cx->arena + off * cx->B : (where == 1 ? (uint8_t *)cx->pixels : cx->out);
}

IVIT_INLINE const void *ivit_k(const ivit_ctx *cx, int64_t off) { return off < 0 ? NULL : cx->blob + off; }

/* Work items of a step: a thread claims the next one (counter[0]) and marks it done (counter[1]); a step
 * ends, for every thread, when all its items are done (ivit_wait).  No barrier: a thread the OS has
 * descheduled while it holds no item delays nobody (the machine may be shared). */
IVIT_INLINE int64_t ivit_next(int64_t *counter) { return __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED); }
IVIT_INLINE void ivit_done(int64_t *counter) { __atomic_fetch_add(counter + 1, 1, __ATOMIC_RELEASE); }
static inline void ivit_wait(int64_t *counter, int64_t items) {
    while (__atomic_load_n(counter + 1, __ATOMIC_ACQUIRE) < items) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    }
}

static inline int64_t ivit_min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t ivit_max64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t ivit_rs64(int64_t v, int64_t s) { return (v + ((int64_t)1 << (s - 1))) >> s; }
static inline int64_t ivr_clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }
static inline int64_t ivr_floordiv64(int64_t a, int64_t b) {
    int64_t q = a / b;
    if ((a % b != 0) && ((a < 0) != (b < 0))) q -= 1;
    return q;
}
static inline int32_t ivr_bitlen32(uint32_t v) { return v ? 32 - __builtin_clz(v) : 0; }

/* floor(sqrt(v)), exact, digit by digit (shifts, adds, compares; branch-free for 32 bits) */
static inline uint32_t ivr_isqrt32(uint32_t v) {
    uint32_t r = 0;
    for (int sh = 30; sh >= 0; sh -= 2) {
        const uint32_t bit = (uint32_t)1 << sh, t = r + bit;
        const uint32_t ge = (uint32_t)0 - (uint32_t)(v >= t);
        v -= t & ge;
        r = (r >> 1) + (bit & ge);
    }
    return r;
}
static inline uint64_t ivr_isqrt64(uint64_t v) {
    uint64_t r = 0, bit = (uint64_t)1 << 62;
    while (bit > v) bit >>= 2;
    while (bit != 0) {
        if (v >= r + bit) {
            v -= r + bit;
            r = (r >> 1) + bit;
        } else {
            r >>= 1;
        }
        bit >>= 2;
    }
    return r;
}

static inline void ivit_store(void *p, int es, int64_t i, int64_t v) {
    if (es == 1) ((int8_t *)p)[i] = (int8_t)v;
    else if (es == 2) ((int16_t *)p)[i] = (int16_t)v;
    else ((int32_t *)p)[i] = (int32_t)v;
}
static inline int64_t ivit_load(const void *p, int es, int64_t i) {
    return es == 1 ? ((const int8_t *)p)[i] : (es == 2 ? ((const int16_t *)p)[i] : ((const int32_t *)p)[i]);
}

/* ------------------------------------------------------------------------------------------------
 * AVX-512: exact round_shift(x * m, s) of 16 int32 lanes (32 x 32 -> 64-bit products, per-lane m, s)
 * ---------------------------------------------------------------------------------------------- */
#if IVIT_ISA == 2
typedef struct {
    __m512i me, mo, se, so, he, ho;
} ivit_rq_t;

/* constants of 16 lanes (lanes outside k: m = 0, s = 1) */
IVIT_INLINE ivit_rq_t ivit_rq_load(const int32_t *m, const int32_t *s, __mmask16 k) {
    ivit_rq_t c;
    const __m512i mv = _mm512_maskz_loadu_epi32(k, m);
    const __m512i sv = _mm512_mask_loadu_epi32(_mm512_set1_epi32(1), k, s);
    const __m512i one = _mm512_set1_epi64(1);
    c.me = mv;
    c.mo = _mm512_srli_epi64(mv, 32);
    c.se = _mm512_and_si512(sv, _mm512_set1_epi64(0xffffffffLL));
    c.so = _mm512_srli_epi64(sv, 32);
    c.he = _mm512_sllv_epi64(one, _mm512_sub_epi64(c.se, one));
    c.ho = _mm512_sllv_epi64(one, _mm512_sub_epi64(c.so, one));
    return c;
}
IVIT_INLINE ivit_rq_t ivit_rq_scalar(int64_t m, int64_t s) {
    ivit_rq_t c;
    c.me = c.mo = _mm512_set1_epi64(m);
    c.se = c.so = _mm512_set1_epi64(s);
    c.he = c.ho = _mm512_set1_epi64((int64_t)1 << (s - 1));
    return c;
}
/* round_shift(x * m, s); with c64 the 64-bit values are clamped to [-q, q] before truncation to 32 bits
 * (without it the caller guarantees |round_shift(x * m, s)| < 2^31). */
IVIT_INLINE __m512i ivit_rq(__m512i x, const ivit_rq_t *c, int c64, int64_t q) {
    __m512i pe = _mm512_mul_epi32(x, c->me);
    __m512i po = _mm512_mul_epi32(_mm512_srli_epi64(x, 32), c->mo);
    pe = _mm512_srav_epi64(_mm512_add_epi64(pe, c->he), c->se);
    po = _mm512_srav_epi64(_mm512_add_epi64(po, c->ho), c->so);
    if (c64) {
        const __m512i lo = _mm512_set1_epi64(-q), hi = _mm512_set1_epi64(q);
        pe = _mm512_min_epi64(_mm512_max_epi64(pe, lo), hi);
        po = _mm512_min_epi64(_mm512_max_epi64(po, lo), hi);
    }
    return _mm512_mask_blend_epi32(0xAAAA, pe, _mm512_slli_epi64(po, 32));
}
/* The same round_shift(x * m, s) from the high halves of the products, when every s >= 33 (mode 1), or after
 * a per-lane pre-shift x << (33 - s) that the static bounds keep inside int32 (mode 2):
 *   round_shift(x m, s) = (hi32(x m) + 2^(s-33)) >> (s - 32)   exactly, for s >= 33
 * (x m = H 2^32 + L with 0 <= L < 2^32; L only adds a fraction below 1 before the floor), and
 *   round_shift(x m, s) = round_shift((x 2^t) m, s + t).  |H| < 2^30: no overflow, no 64-bit clamp. */
typedef struct {
    __m512i me, mo, rnd, sh, pre;
} ivit_rqh_t;

IVIT_INLINE ivit_rqh_t ivit_rqh_load(const int32_t *m, const int32_t *s, __mmask16 k, int mode) {
    ivit_rqh_t c;
    const __m512i mv = _mm512_maskz_loadu_epi32(k, m);
    __m512i sv = _mm512_mask_loadu_epi32(_mm512_set1_epi32(33), k, s);
    const __m512i c33 = _mm512_set1_epi32(33);
    c.pre = mode == 2 ? _mm512_max_epi32(_mm512_sub_epi32(c33, sv), _mm512_setzero_si512()) : _mm512_setzero_si512();
    sv = _mm512_add_epi32(sv, c.pre);
    c.me = mv;
    c.mo = _mm512_srli_epi64(mv, 32);
    c.rnd = _mm512_sllv_epi32(_mm512_set1_epi32(1), _mm512_sub_epi32(sv, c33));
    c.sh = _mm512_sub_epi32(sv, _mm512_set1_epi32(32));
    return c;
}
IVIT_INLINE ivit_rqh_t ivit_rqh_scalar(int64_t m, int64_t s) {
    ivit_rqh_t c;
    const int64_t t = s < 33 ? 33 - s : 0;
    c.me = c.mo = _mm512_set1_epi64(m);
    c.pre = _mm512_set1_epi32((int32_t)t);
    c.rnd = _mm512_set1_epi32(1 << (s + t - 33));
    c.sh = _mm512_set1_epi32((int32_t)(s + t - 32));
    return c;
}
IVIT_INLINE __m512i ivit_rqh(__m512i x, const ivit_rqh_t *c, int mode) {
    if (mode == 2) x = _mm512_sllv_epi32(x, c->pre);
    const __m512i pe = _mm512_mul_epi32(x, c->me);
    const __m512i po = _mm512_mul_epi32(_mm512_srli_epi64(x, 32), c->mo);
    const __m512i hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(pe, 32), po);
    return _mm512_srav_epi32(_mm512_add_epi32(hi, c->rnd), c->sh);
}
IVIT_INLINE __m512i ivit_clamp16(__m512i v, int64_t q) {
    return _mm512_min_epi32(_mm512_max_epi32(v, _mm512_set1_epi32((int32_t)-q)), _mm512_set1_epi32((int32_t)q));
}
IVIT_INLINE void ivit_store16(void *p, int es, __m512i v, __mmask16 k) {
    if (es == 1) _mm_mask_storeu_epi8(p, k, _mm512_cvtepi32_epi8(v));
    else if (es == 2) _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(v));
    else _mm512_mask_storeu_epi32(p, k, v);
}
IVIT_INLINE __mmask16 ivit_lanes(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u); }
#endif

/* ------------------------------------------------------------------------------------------------
 * I-LayerNorm of one row to int8 (the input of a GEMM)
 * ---------------------------------------------------------------------------------------------- */

/* ops.ilayernorm32: mean = floor((sum + floor(C/2)) / C); y = x - mean; k = max(0, bitlen(max|y|) - BC);
 * y = y' 2^k + r; V = sum y'^2 + ((2 sum y' r + (sum r^2 >> k)) >> k); std' = isqrt(V);
 * F = floor((2^31-1) / max(std', 1)) >> k; z = round_shift(y F, 11);
 * out = clamp(round_shift(z mult[c], shift[c]) + offset[c], -q, q). */
static void ivit_ln32_row(const void *x, int es, int64_t C, const int32_t *mult, const int32_t *shift,
                          const int32_t *offset, int64_t q, void *out, int oes) {
    const int32_t bc = (31 - ivr_bitlen32((uint32_t)(C - 1))) / 2;
#if IVIT_ISA == 2
    if (es == 2) {
        /* pass 1: sum, max, min and sum of squares (V = floor(sum y^2 / 4^k) exactly, from sum x^2 in int64) */
        const int16_t *xs = (const int16_t *)x;
        const __m512i ones = _mm512_set1_epi16(1);
        __m512i vs = _mm512_setzero_si512(), vq = vs;
        __m512i vmx = _mm512_set1_epi16(INT16_MIN), vmn = _mm512_set1_epi16(INT16_MAX);
        for (int64_t c = 0; c < C; c += 32) {
            const __mmask32 k = C - c >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (C - c)) - 1u);
            const __m512i v = _mm512_maskz_loadu_epi16(k, xs + c);
            vs = _mm512_add_epi32(vs, _mm512_madd_epi16(v, ones));
            const __m512i sq = _mm512_madd_epi16(v, v); /* x0^2 + x1^2 < 2^31 (|x| <= 32767) */
            vq = _mm512_add_epi64(vq, _mm512_cvtepu32_epi64(_mm512_castsi512_si256(sq)));
            vq = _mm512_add_epi64(vq, _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(sq, 1)));
            vmx = _mm512_mask_max_epi16(vmx, k, vmx, v);
            vmn = _mm512_mask_min_epi16(vmn, k, vmn, v);
        }
        const int64_t s = _mm512_reduce_add_epi32(vs), q2 = _mm512_reduce_add_epi64(vq);
        const __m512i mx32 = _mm512_max_epi32(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(vmx)),
                                              _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(vmx, 1)));
        const __m512i mn32 = _mm512_min_epi32(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(vmn)),
                                              _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(vmn, 1)));
        const int32_t mean = (int32_t)ivr_floordiv64(s + (C >> 1), C);
        const int32_t hi = _mm512_reduce_max_epi32(mx32) - mean, lo = mean - _mm512_reduce_min_epi32(mn32);
        int32_t kk = ivr_bitlen32((uint32_t)(hi > lo ? hi : lo)) - bc;
        kk = kk < 0 ? 0 : kk;
        const int64_t sy2 = q2 - 2 * (int64_t)mean * s + C * (int64_t)mean * mean; /* sum (x - mean)^2 */
        const uint32_t var = (uint32_t)(sy2 >> (2 * kk));
        const uint32_t sd = ivr_isqrt32(var);
        const int32_t f = (int32_t)(2147483647u / (sd < 1 ? 1 : sd)) >> kk;
        /* pass 2 */
        const ivit_rq_t zc = ivit_rq_scalar(f, 11);
        const __m512i vm = _mm512_set1_epi32(mean);
        for (int64_t c = 0; c < C; c += 16) {
            const __mmask16 k = ivit_lanes(C - c);
            const __m512i y = _mm512_sub_epi32(_mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(k, xs + c)), vm);
            const __m512i z = ivit_rq(y, &zc, 0, 0); /* |z| <= 2^21 */
            const ivit_rq_t oc = ivit_rq_load(mult + c, shift + c, k);
            __m512i o = _mm512_add_epi32(ivit_rq(z, &oc, 0, 0), _mm512_maskz_loadu_epi32(k, offset + c));
            o = ivit_clamp16(o, q);
            ivit_store16((uint8_t *)out + c * oes, oes, o, k);
        }
        return;
    }
#endif
    int64_t s = 0;
    for (int64_t c = 0; c < C; c++) s += ivit_load(x, es, c);
    const int32_t mean = (int32_t)ivr_floordiv64(s + (C >> 1), C);
    int32_t amax = 0;
    for (int64_t c = 0; c < C; c++) {
        int32_t y = (int32_t)ivit_load(x, es, c) - mean;
        y = y < 0 ? -y : y;
        amax = y > amax ? y : amax;
    }
    int32_t k = ivr_bitlen32((uint32_t)amax) - bc;
    k = k < 0 ? 0 : k;
    uint32_t v2 = 0;
    int32_t ar = 0, qq = 0;
    for (int64_t c = 0; c < C; c++) {
        const int32_t y = (int32_t)ivit_load(x, es, c) - mean;
        const int32_t yp = y >> k;
        const int32_t r = (int32_t)((uint32_t)y & (((uint32_t)1 << k) - 1u));
        v2 += (uint32_t)(yp * yp);
        ar += yp * r;
        qq += r * r;
    }
    const uint32_t var = v2 + (uint32_t)((2 * ar + (qq >> k)) >> k);
    const uint32_t sd = ivr_isqrt32(var);
    const int32_t f = (int32_t)(2147483647u / (sd < 1 ? 1 : sd)) >> k;
    for (int64_t c = 0; c < C; c++) {
        const int32_t z = (int32_t)ivit_rs64((int64_t)((int32_t)ivit_load(x, es, c) - mean) * f, 11);
        const int64_t v = (int32_t)ivit_rs64((int64_t)z * mult[c], shift[c]) + offset[c];
        ivit_store(out, oes, c, ivr_clamp64(v, -q, q));
    }
}

#if IVIT_ISA == 2
/* ivit_ln32_row for nr <= 8 int16 rows at once, written as GEMM A rows (u8 = int8 ^ 0x80): the per-row
 * statistics of the rows interleave (their latency chains overlap) and the per-channel constants of pass 2
 * are loaded once for all rows. */
static void ivit_ln32_group(const int16_t *const *xs, int nr, int64_t C, const int32_t *mult, const int32_t *shift,
                            const int32_t *offset, int64_t q, uint8_t *const *out, int hi, int oes) {
    const int32_t bc = (31 - ivr_bitlen32((uint32_t)(C - 1))) / 2;
    int64_t s[8], q2[8];
    int32_t mx[8], mn[8], mean[8], kk[8];
    uint32_t var[8];
    const __m512i ones = _mm512_set1_epi16(1);
    for (int r = 0; r < nr; r++) {
        __m512i vs = _mm512_setzero_si512(), vq = vs;
        __m512i vmx = _mm512_set1_epi16(INT16_MIN), vmn = _mm512_set1_epi16(INT16_MAX);
        for (int64_t c = 0; c < C; c += 32) {
            const __mmask32 k = C - c >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (C - c)) - 1u);
            const __m512i v = _mm512_maskz_loadu_epi16(k, xs[r] + c);
            vs = _mm512_add_epi32(vs, _mm512_madd_epi16(v, ones));
            const __m512i sq = _mm512_madd_epi16(v, v); /* x0^2 + x1^2 < 2^31 (|x| <= 32767) */
            vq = _mm512_add_epi64(vq, _mm512_cvtepu32_epi64(_mm512_castsi512_si256(sq)));
            vq = _mm512_add_epi64(vq, _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(sq, 1)));
            vmx = _mm512_mask_max_epi16(vmx, k, vmx, v);
            vmn = _mm512_mask_min_epi16(vmn, k, vmn, v);
        }
        s[r] = _mm512_reduce_add_epi32(vs);
        q2[r] = _mm512_reduce_add_epi64(vq);
        mx[r] = _mm512_reduce_max_epi32(_mm512_max_epi32(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(vmx)),
                                                         _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(vmx, 1))));
        mn[r] = _mm512_reduce_min_epi32(_mm512_min_epi32(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(vmn)),
                                                         _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(vmn, 1))));
    }
    for (int r = 0; r < nr; r++) {
        mean[r] = (int32_t)ivr_floordiv64(s[r] + (C >> 1), C);
        const int32_t hi = mx[r] - mean[r], lo = mean[r] - mn[r];
        int32_t k = ivr_bitlen32((uint32_t)(hi > lo ? hi : lo)) - bc;
        kk[r] = k < 0 ? 0 : k;
        const int64_t sy2 = q2[r] - 2 * (int64_t)mean[r] * s[r] + C * (int64_t)mean[r] * mean[r]; /* sum (x - mean)^2 */
        var[r] = (uint32_t)(sy2 >> (2 * kk[r]));                                              /* < 2^31 */
    }
    /* isqrt of the rows side by side (independent chains) */
    uint32_t rt[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int sh = 30; sh >= 0; sh -= 2) {
        const uint32_t bit = (uint32_t)1 << sh;
        for (int r = 0; r < 8; r++) {
            const uint32_t t = rt[r] + bit, ge = (uint32_t)0 - (uint32_t)(var[r] >= t);
            var[r] -= t & ge;
            rt[r] = (rt[r] >> 1) + (bit & ge);
        }
    }
    __m512i fh[8], fl[8], mv[8];
    for (int r = 0; r < nr; r++) {
        const int32_t f = (int32_t)(2147483647u / (rt[r] < 1 ? 1 : rt[r])) >> kk[r];
        fh[r] = _mm512_set1_epi32(f >> 11);
        fl[r] = _mm512_set1_epi32(f & 2047);
        mv[r] = _mm512_set1_epi32(mean[r]);
    }
    const __m512i h10 = _mm512_set1_epi32(1 << 10), flip = _mm512_set1_epi32(0x80);
    for (int64_t c = 0; c < C; c += 16) {
        const __mmask16 k = ivit_lanes(C - c);
        const __m512i off = _mm512_maskz_loadu_epi32(k, offset + c);
        ivit_rq_t oc;
        ivit_rqh_t oh;
        if (hi) oh = ivit_rqh_load(mult + c, shift + c, k, hi);
        else oc = ivit_rq_load(mult + c, shift + c, k);
        for (int r = 0; r < nr; r++) {
            const __m512i y = _mm512_sub_epi32(_mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(k, xs[r] + c)), mv[r]);
            /* z = round_shift(y F, 11) = y Fh + ((y Fl + 2^10) >> 11), F = Fh 2^11 + Fl: |y F| < 2^32, so
             * |y Fh| < 2^21 and |y Fl| < 2^27 are exact in int32 */
            const __m512i z = _mm512_add_epi32(_mm512_mullo_epi32(y, fh[r]),
                                               _mm512_srai_epi32(_mm512_add_epi32(_mm512_mullo_epi32(y, fl[r]), h10), 11));
            const __m512i t = hi ? ivit_rqh(z, &oh, hi) : ivit_rq(z, &oc, 0, 0);
            const __m512i o = ivit_clamp16(_mm512_add_epi32(t, off), q);
            if (oes == 0) _mm_mask_storeu_epi8(out[r] + c, k, _mm512_cvtepi32_epi8(_mm512_xor_si512(o, flip)));
            else ivit_store16(out[r] + c * oes, oes, o, k); /* int8 / int16 output of a LayerNorm step */
        }
    }
}
#endif

/* ops.ilayernorm (format-1 programs): mean = floor((2 sum + C) / 2C); var = sum y^2 (int64);
 * factor = floor((2^31-1) / max(isqrt(var), 1)); z = (y factor) >> 11;
 * out = clamp(round_shift(z mult[c], shift[c]) + offset[c], -q, q) (64-bit). */
static void ivit_ln64_row(const void *x, int es, int64_t C, const int32_t *mult, const int32_t *shift,
                          const int32_t *offset, int64_t q, int8_t *out) {
    int64_t s = 0, var = 0;
    for (int64_t c = 0; c < C; c++) s += ivit_load(x, es, c);
    const int64_t mean = ivr_floordiv64(2 * s + C, 2 * C);
    for (int64_t c = 0; c < C; c++) {
        const int64_t y = ivit_load(x, es, c) - mean;
        var += y * y;
    }
    const int64_t sd = (int64_t)ivr_isqrt64((uint64_t)var);
    const int64_t factor = 2147483647LL / (sd < 1 ? 1 : sd);
    for (int64_t c = 0; c < C; c++) {
        const int64_t z = ((ivit_load(x, es, c) - mean) * factor) >> 11;
        out[c] = (int8_t)ivr_clamp64(ivit_rs64(z * mult[c], shift[c]) + offset[c], -q, q);
    }
}

/* ------------------------------------------------------------------------------------------------
 * GEMM with fused prologue and epilogue
 * ---------------------------------------------------------------------------------------------- */

enum { IVIT_E_I32 = 0, IVIT_E_RQ = 1, IVIT_E_TAB = 2, IVIT_E_ADD = 3, IVIT_E_EMB = 4 };

typedef struct {
    int64_t M, K, N;                  /* rows per image, inner size, columns */
    int a_where; int64_t a_off, a_img; /* A source buffer; a_img = elements per image */
    int a_es;                          /* bytes per A element: 1, or 2 (int16 LayerNorm input) */
    int64_t a_rows, a_r0, a_rs;       /* row starts (elements): blob int32 [M] (-1 = zero row), or r0 + m * rs */
    int ln;                            /* 0 none, 1 layernorm32, 2 layernorm (64-bit) */
    int64_t ln_m, ln_s, ln_o, ln_q;   /* per-channel constants (K int32 each), qmax */
    int64_t w, bias;                   /* packed weight panels, bias (+ offset correction), Npad int32 */
    int epi; int o_es;                 /* epilogue kind, output element bytes */
    int o_where; int64_t o_off, o_img;
    int64_t o_rows, o_r0, o_rs;       /* dest row starts (elements) */
    int64_t em, es;                    /* per-column mult, shift (N int32) */
    int64_t qmax; int c64; int vec;    /* clamp; 64-bit clamp needed; vector epilogue allowed */
    int ehi, rhi, ln_hi;               /* ivit_rqh modes (0: 64-bit products) of em/es, rm/rsh, the LayerNorm */
    int64_t table;                     /* int8[256] */
    int r_where; int64_t r_off, r_img; int r_es; int64_t rm, rsh; /* add: the other branch (same layout as out) */
    int64_t pos;                       /* embed: int32 (M, N) */
} ivit_gemm_t;

/* -------- micro-kernels: tile[r][0 .. 16 NV) = init + sum_g a_r[g] . bp[g][.] -------- */
#if IVIT_ISA == 2
#define IVIT_MK512(NV)                                                                                    \
    __attribute__((noinline)) static void ivit_mk_##NV(const uint8_t *const *a, const int32_t *bp, int64_t kg, const int32_t *init,  \
                             int64_t is, int32_t *tile) {                                                 \
        __m512i c0[NV], c1[NV], c2[NV], c3[NV], c4[NV], c5[NV];                                           \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) {                                            \
            c0[v] = _mm512_loadu_si512((const void *)(init + 16 * v));                                    \
            c1[v] = _mm512_loadu_si512((const void *)(init + is + 16 * v));                               \
            c2[v] = _mm512_loadu_si512((const void *)(init + 2 * is + 16 * v));                           \
            c3[v] = _mm512_loadu_si512((const void *)(init + 3 * is + 16 * v));                           \
            c4[v] = _mm512_loadu_si512((const void *)(init + 4 * is + 16 * v));                           \
            c5[v] = _mm512_loadu_si512((const void *)(init + 5 * is + 16 * v));                           \
        }                                                                                                 \
        const uint8_t *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3], *a4 = a[4], *a5 = a[5];             \
        for (int64_t g = 0; g < kg; g++) {                                                                \
            __m512i b[NV];                                                                                \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++)                                          \
                b[v] = _mm512_load_si512((const void *)(bp + 16 * v));                                   \
            bp += 16 * NV;                                                                                \
            int32_t w0, w1, w2, w3, w4, w5;                                                               \
            memcpy(&w0, a0 + 4 * g, 4); memcpy(&w1, a1 + 4 * g, 4); memcpy(&w2, a2 + 4 * g, 4);           \
            memcpy(&w3, a3 + 4 * g, 4); memcpy(&w4, a4 + 4 * g, 4); memcpy(&w5, a5 + 4 * g, 4);           \
            __m512i av = _mm512_set1_epi32(w0);                                                           \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) c0[v] = _mm512_dpbusd_epi32(c0[v], av, b[v]); \
            av = _mm512_set1_epi32(w1);                                                                   \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) c1[v] = _mm512_dpbusd_epi32(c1[v], av, b[v]); \
            av = _mm512_set1_epi32(w2);                                                                   \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) c2[v] = _mm512_dpbusd_epi32(c2[v], av, b[v]); \
            av = _mm512_set1_epi32(w3);                                                                   \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) c3[v] = _mm512_dpbusd_epi32(c3[v], av, b[v]); \
            av = _mm512_set1_epi32(w4);                                                                   \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) c4[v] = _mm512_dpbusd_epi32(c4[v], av, b[v]); \
            av = _mm512_set1_epi32(w5);                                                                   \
            _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) c5[v] = _mm512_dpbusd_epi32(c5[v], av, b[v]); \
        }                                                                                                 \
        _Pragma("GCC unroll 4") for (int v = 0; v < NV; v++) {                                            \
            _mm512_store_si512((void *)(tile + 0 * IVIT_PW + 16 * v), c0[v]);                             \
            _mm512_store_si512((void *)(tile + 1 * IVIT_PW + 16 * v), c1[v]);                             \
            _mm512_store_si512((void *)(tile + 2 * IVIT_PW + 16 * v), c2[v]);                             \
            _mm512_store_si512((void *)(tile + 3 * IVIT_PW + 16 * v), c3[v]);                             \
            _mm512_store_si512((void *)(tile + 4 * IVIT_PW + 16 * v), c4[v]);                             \
            _mm512_store_si512((void *)(tile + 5 * IVIT_PW + 16 * v), c5[v]);                             \
        }                                                                                                 \
    }
IVIT_MK512(1)
IVIT_MK512(2)
IVIT_MK512(3)
IVIT_MK512(4)

/* tile[r][.] = init[r * is + .] (is = 0: one row for all) + the products over kg k-words */
static void ivit_mk(const uint8_t *const *a, const int32_t *bp, int64_t kg, int nv, const int32_t *init, int64_t is,
                    int32_t *tile) {
    switch (nv) {
    case 1: ivit_mk_1(a, bp, kg, init, is, tile); break;
    case 2: ivit_mk_2(a, bp, kg, init, is, tile); break;
    case 3: ivit_mk_3(a, bp, kg, init, is, tile); break;
    default: ivit_mk_4(a, bp, kg, init, is, tile); break;
    }
}
#elif IVIT_ISA == 1
static void ivit_mk(const int16_t *const *a, const int32_t *bp, int64_t kg, int nv, const int32_t *init, int64_t is,
                    int32_t *tile) {
    (void)nv; /* one 16-column panel */
    __m256i c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
#define IVIT_LD1(r)                                                                                       \
    c##r##0 = _mm256_loadu_si256((const __m256i *)(init + r * is));                                       \
    c##r##1 = _mm256_loadu_si256((const __m256i *)(init + r * is + 8));
    IVIT_LD1(0) IVIT_LD1(1) IVIT_LD1(2) IVIT_LD1(3) IVIT_LD1(4) IVIT_LD1(5)
#undef IVIT_LD1
    for (int64_t g = 0; g < kg; g++) {
        const __m256i b0 = _mm256_loadu_si256((const __m256i *)bp), b1 = _mm256_loadu_si256((const __m256i *)(bp + 8));
        bp += 16;
        int32_t w;
#define IVIT_ROW1(r)                                                                                      \
    memcpy(&w, a[r] + 2 * g, 4);                                                                          \
    c##r##0 = _mm256_add_epi32(c##r##0, _mm256_madd_epi16(_mm256_set1_epi32(w), b0));                     \
    c##r##1 = _mm256_add_epi32(c##r##1, _mm256_madd_epi16(_mm256_set1_epi32(w), b1));
        IVIT_ROW1(0) IVIT_ROW1(1) IVIT_ROW1(2) IVIT_ROW1(3) IVIT_ROW1(4) IVIT_ROW1(5)
#undef IVIT_ROW1
    }
#define IVIT_ST1(r)                                                                                       \
    _mm256_storeu_si256((__m256i *)(tile + r * IVIT_PW), c##r##0);                                        \
    _mm256_storeu_si256((__m256i *)(tile + r * IVIT_PW + 8), c##r##1);
    IVIT_ST1(0) IVIT_ST1(1) IVIT_ST1(2) IVIT_ST1(3) IVIT_ST1(4) IVIT_ST1(5)
#undef IVIT_ST1
}
#else
static void ivit_mk(const int16_t *const *a, const int32_t *bp, int64_t kg, int nv, const int32_t *init, int64_t is,
                    int32_t *tile) {
    (void)nv;
    uint32_t acc[IVIT_MR][16];
    for (int r = 0; r < IVIT_MR; r++)
        for (int j = 0; j < 16; j++) acc[r][j] = (uint32_t)init[r * is + j];
    for (int64_t g = 0; g < kg; g++) {
        for (int r = 0; r < IVIT_MR; r++) {
            const int32_t a0 = a[r][2 * g], a1 = a[r][2 * g + 1];
            for (int j = 0; j < 16; j++) {
                const int16_t *bw = (const int16_t *)(bp + j);
                acc[r][j] += (uint32_t)(a0 * (int32_t)bw[0] + a1 * (int32_t)bw[1]); /* exact in int32 */
            }
        }
        bp += 16;
    }
    for (int r = 0; r < IVIT_MR; r++)
        for (int j = 0; j < 16; j++) tile[r * IVIT_PW + j] = (int32_t)acc[r][j];
}
#endif

/* row start (elements) of row ml of a row map, or -1 */
IVIT_INLINE int64_t ivit_row(const ivit_ctx *cx, int64_t rows, int64_t r0, int64_t rs, int64_t ml) {
    return rows >= 0 ? ((const int32_t *)(cx->blob + rows))[ml] : r0 + ml * rs;
}

/* pack rows m0 .. m0 + nr of A (global row index over the batch) into abuf (row stride kp elements) */
static void ivit_pack_a(const ivit_gemm_t *g, const ivit_ctx *cx, int64_t m0, int64_t nr, ivit_a_t *abuf,
                        int64_t kp, int8_t *tmp) {
    const uint8_t *base = ivit_buf(cx, g->a_where, g->a_off);
    const int32_t *lm = (const int32_t *)ivit_k(cx, g->ln_m), *ls = (const int32_t *)ivit_k(cx, g->ln_s);
    const int32_t *lo = (const int32_t *)ivit_k(cx, g->ln_o);
#if IVIT_ISA == 2
    if (g->ln == 1 && g->a_es == 2) { /* LayerNorm of groups of rows straight into the A block */
        for (int64_t i0 = 0; i0 < nr; i0 += 8) {
            const int16_t *xs[8];
            uint8_t *ds[8];
            int n = 0;
            for (int64_t i = i0; i < ivit_min64(nr, i0 + 8); i++) {
                const int64_t m = m0 + i, b = m / g->M, ml = m - b * g->M;
                const int64_t st = ivit_row(cx, g->a_rows, g->a_r0, g->a_rs, ml);
                uint8_t *dst = abuf + i * kp;
                memset(dst + g->K, 0, (size_t)(kp - g->K));
                if (st < 0) {
                    memset(dst, 0x80, (size_t)g->K); /* int8 0 */
                    continue;
                }
                xs[n] = (const int16_t *)(base + (b * g->a_img + st) * 2);
                ds[n++] = dst;
            }
            if (n) ivit_ln32_group(xs, n, g->K, lm, ls, lo, g->ln_q, ds, g->ln_hi, 0);
        }
        return;
    }
#endif
    for (int64_t i = 0; i < nr; i++) {
        const int64_t m = m0 + i, b = m / g->M, ml = m - b * g->M;
        const int64_t st = ivit_row(cx, g->a_rows, g->a_r0, g->a_rs, ml);
        ivit_a_t *dst = abuf + i * kp;
        const int8_t *src;
        if (st < 0) {
            memset(tmp, 0, (size_t)g->K);
            src = tmp;
        } else {
            const uint8_t *row = base + (b * g->a_img + st) * g->a_es;
            if (g->ln == 1) {
                ivit_ln32_row(row, g->a_es, g->K, lm, ls, lo, g->ln_q, tmp, 1);
                src = tmp;
            } else if (g->ln == 2) {
                ivit_ln64_row(row, g->a_es, g->K, lm, ls, lo, g->ln_q, tmp);
                src = tmp;
            } else {
                src = (const int8_t *)row;
            }
        }
#if IVIT_ISA == 2
        int64_t c = 0;
        const __m512i flip = _mm512_set1_epi8((char)0x80);
        for (; c + 64 <= g->K; c += 64)
            _mm512_storeu_si512((void *)(dst + c), _mm512_xor_si512(_mm512_loadu_si512((const void *)(src + c)), flip));
        if (c < g->K) {
            const __mmask64 k = ((__mmask64)1 << (g->K - c)) - 1;
            _mm512_mask_storeu_epi8(dst + c, k, _mm512_xor_si512(_mm512_maskz_loadu_epi8(k, src + c), flip));
        }
#elif IVIT_ISA == 1
        int64_t c = 0;
        for (; c + 16 <= g->K; c += 16)
            _mm256_storeu_si256((__m256i *)(dst + c), _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(src + c))));
        for (; c < g->K; c++) dst[c] = src[c];
#else
        for (int64_t c = 0; c < g->K; c++) dst[c] = src[c];
#endif
        for (int64_t c = g->K; c < kp; c++) dst[c] = 0;
    }
}

/* epilogue, scalar: tile rows [0, mr) of global rows m0.., columns n0 .. n0 + nc */
static void ivit_epi_scalar(const ivit_gemm_t *g, const ivit_ctx *cx, const int32_t *tile, int64_t m0, int64_t mr,
                            int64_t n0, int64_t nc) {
    uint8_t *obase = ivit_buf(cx, g->o_where, g->o_off);
    const int32_t *em = (const int32_t *)ivit_k(cx, g->em), *es = (const int32_t *)ivit_k(cx, g->es);
    const int8_t *table = (const int8_t *)ivit_k(cx, g->table);
    const int32_t *rm = (const int32_t *)ivit_k(cx, g->rm), *rsh = (const int32_t *)ivit_k(cx, g->rsh);
    const int32_t *pos = (const int32_t *)ivit_k(cx, g->pos);
    const uint8_t *rbase = g->epi == IVIT_E_ADD ? ivit_buf(cx, g->r_where, g->r_off) : NULL;
    for (int64_t r = 0; r < mr; r++) {
        const int64_t m = m0 + r, b = m / g->M, ml = m - b * g->M;
        const int64_t dst = b * g->o_img + ivit_row(cx, g->o_rows, g->o_r0, g->o_rs, ml);
        const int32_t *t = tile + r * IVIT_PW;
        for (int64_t j = 0; j < nc; j++) {
            const int64_t n = n0 + j, acc = t[j];
            int64_t v;
            switch (g->epi) {
            case IVIT_E_I32: v = acc; break;
            case IVIT_E_RQ: v = ivr_clamp64(ivit_rs64(acc * em[n], es[n]), -g->qmax, g->qmax); break;
            case IVIT_E_TAB:
                v = table[ivr_clamp64(ivit_rs64(acc * em[n], es[n]), -127, 127) + 128];
                break;
            case IVIT_E_ADD: {
                const int64_t a = ivit_load(rbase, g->r_es, dst + n);
                v = ivr_clamp64(ivit_rs64(a * rm[n], rsh[n]) + ivit_rs64(acc * em[n], es[n]), -g->qmax, g->qmax);
                break;
            }
            default: /* embed */
                v = ivr_clamp64(ivit_rs64(acc * em[n], es[n]) + pos[ml * g->N + n], -g->qmax, g->qmax);
                break;
            }
            ivit_store(obase, g->o_es, dst + n, v);
        }
    }
}

#if IVIT_ISA == 2
#ifdef __AVX512VBMI__
IVIT_INLINE __m128i ivit_lut(const __m512i *t, __m512i v /* int32 in [-127, 127] */) {
    const __m512i idx = _mm512_castsi128_si512(_mm512_cvtepi32_epi8(_mm512_add_epi32(v, _mm512_set1_epi32(128))));
    const __m512i lo = _mm512_permutex2var_epi8(t[0], idx, t[1]);
    const __m512i hi = _mm512_permutex2var_epi8(t[2], idx, t[3]);
    return _mm512_castsi512_si128(_mm512_mask_blend_epi8(_mm512_movepi8_mask(idx), lo, hi));
}
#endif

/* epilogue, AVX-512: the same integers as ivit_epi_scalar */
static void ivit_epi_512(const ivit_gemm_t *gp, const ivit_ctx *cx, const int32_t *tile, int64_t m0, int64_t mr,
                         int64_t n0, int64_t nc) {
    const ivit_gemm_t gl = *gp, *g = &gl; /* a local copy: the stores below cannot alias it */
    uint8_t *obase = ivit_buf(cx, g->o_where, g->o_off);
    const int32_t *em = (const int32_t *)ivit_k(cx, g->em), *es = (const int32_t *)ivit_k(cx, g->es);
    const int32_t *rm = (const int32_t *)ivit_k(cx, g->rm), *rsh = (const int32_t *)ivit_k(cx, g->rsh);
    const int32_t *pos = (const int32_t *)ivit_k(cx, g->pos);
    const uint8_t *rbase = g->epi == IVIT_E_ADD ? ivit_buf(cx, g->r_where, g->r_off) : NULL;
    int64_t dst[IVIT_MR], mls[IVIT_MR];
    for (int64_t r = 0; r < mr; r++) {
        const int64_t m = m0 + r, b = m / g->M, ml = m - b * g->M;
        mls[r] = ml;
        dst[r] = b * g->o_img + ivit_row(cx, g->o_rows, g->o_r0, g->o_rs, ml);
    }
#ifdef __AVX512VBMI__
    __m512i lut[4];
    if (g->epi == IVIT_E_TAB) {
        const int8_t *table = (const int8_t *)ivit_k(cx, g->table);
        for (int i = 0; i < 4; i++) lut[i] = _mm512_loadu_si512((const void *)(table + 64 * i));
    }
#endif
    const int oes = g->o_es;
    for (int64_t j = 0; j < nc; j += 16) {
        const __mmask16 k = ivit_lanes(nc - j);
        const int64_t n = n0 + j;
        if (g->epi == IVIT_E_I32) {
            for (int64_t r = 0; r < mr; r++)
                _mm512_mask_storeu_epi32(obase + (dst[r] + n) * 4, k, _mm512_load_si512((const void *)(tile + r * IVIT_PW + j)));
            continue;
        }
        const int eh = g->ehi;
        ivit_rq_t c;
        ivit_rqh_t ch;
        if (eh) ch = ivit_rqh_load(em + n, es + n, k, eh);
        else c = ivit_rq_load(em + n, es + n, k);
#define IVIT_ERQ(x, c64, q) (eh ? ivit_rqh((x), &ch, eh) : ivit_rq((x), &c, (c64), (q)))
        if (g->epi == IVIT_E_RQ) {
            for (int64_t r = 0; r < mr; r++) {
                __m512i v = IVIT_ERQ(_mm512_load_si512((const void *)(tile + r * IVIT_PW + j)), g->c64, g->qmax);
                ivit_store16(obase + (dst[r] + n) * oes, oes, ivit_clamp16(v, g->qmax), k);
            }
        } else if (g->epi == IVIT_E_TAB) {
            for (int64_t r = 0; r < mr; r++) {
                __m512i v = IVIT_ERQ(_mm512_load_si512((const void *)(tile + r * IVIT_PW + j)), g->c64, 127);
                v = ivit_clamp16(v, 127);
#ifdef __AVX512VBMI__
                _mm_mask_storeu_epi8(obase + dst[r] + n, k, ivit_lut(lut, v));
#else
                int32_t tmp[16];
                const int8_t *table = (const int8_t *)ivit_k(cx, g->table);
                _mm512_storeu_si512((void *)tmp, v);
                for (int64_t i = 0; i < 16 && j + i < nc; i++) ((int8_t *)obase)[dst[r] + n + i] = table[tmp[i] + 128];
#endif
            }
        } else if (g->epi == IVIT_E_ADD) {
            const int rh = g->rhi;
            ivit_rq_t ca;
            ivit_rqh_t cah;
            if (rh) cah = ivit_rqh_load(rm + n, rsh + n, k, rh);
            else ca = ivit_rq_load(rm + n, rsh + n, k);
            for (int64_t r = 0; r < mr; r++) {
                const uint8_t *ap = rbase + (dst[r] + n) * g->r_es;
                const __m512i a = g->r_es == 2 ? _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(k, ap))
                                  : (g->r_es == 1 ? _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, ap))
                                                  : _mm512_maskz_loadu_epi32(k, ap));
                /* each branch within +-2^30 (validated), so the int32 sum is exact */
                __m512i v = _mm512_add_epi32(rh ? ivit_rqh(a, &cah, rh) : ivit_rq(a, &ca, 0, 0),
                                             IVIT_ERQ(_mm512_load_si512((const void *)(tile + r * IVIT_PW + j)), 0, 0));
                ivit_store16(obase + (dst[r] + n) * oes, oes, ivit_clamp16(v, g->qmax), k);
            }
        } else { /* embed (vec only when |round_shift(acc m, s)| + |pos| < 2^31) */
            for (int64_t r = 0; r < mr; r++) {
                __m512i v = IVIT_ERQ(_mm512_load_si512((const void *)(tile + r * IVIT_PW + j)), 0, 0);
                v = _mm512_add_epi32(v, _mm512_maskz_loadu_epi32(k, pos + mls[r] * g->N + n));
                ivit_store16(obase + (dst[r] + n) * oes, oes, ivit_clamp16(v, g->qmax), k);
            }
        }
#undef IVIT_ERQ
    }
}
#endif

/* prefetch (for writing) the output lines of tile rows m0 .. m0 + mr, columns n0 .. n0 + nc (and the residual) */
static inline void ivit_gemm_prefetch_out(const ivit_gemm_t *g, const ivit_ctx *cx, int64_t m0, int64_t mr, int64_t n0,
                                          int64_t nc) {
    uint8_t *obase = ivit_buf(cx, g->o_where, g->o_off);
    const uint8_t *rbase = g->epi == IVIT_E_ADD ? ivit_buf(cx, g->r_where, g->r_off) : NULL;
    for (int64_t r = 0; r < mr; r++) {
        const int64_t m = m0 + r, b = m / g->M, ml = m - b * g->M;
        const int64_t dst = b * g->o_img + ivit_row(cx, g->o_rows, g->o_r0, g->o_rs, ml) + n0;
        for (int64_t o = 0; o < nc * g->o_es; o += 64) __builtin_prefetch(obase + dst * g->o_es + o, 1, 2);
        if (rbase)
            for (int64_t o = 0; o < nc * g->r_es; o += 64) __builtin_prefetch(rbase + dst * g->r_es + o, 0, 2);
    }
}

/* prefetch the source row of global A row m */
static inline void ivit_gemm_prefetch_a(const ivit_gemm_t *g, const ivit_ctx *cx, int64_t m) {
    const int64_t b = m / g->M, ml = m - b * g->M;
    const int64_t st = ivit_row(cx, g->a_rows, g->a_r0, g->a_rs, ml);
    if (st < 0) return;
    const uint8_t *row = ivit_buf(cx, g->a_where, g->a_off) + (b * g->a_img + st) * g->a_es;
    for (int64_t o = 0; o < g->K * g->a_es; o += 64) __builtin_prefetch(row + o, 0, 2);
}

static void ivit_gemm_run(const ivit_gemm_t *g, const ivit_ctx *cx, int tid, int nt, int64_t *counter,
                          int64_t tws) {
    const int64_t Mt = cx->B * g->M;
    const int64_t tiles = (Mt + IVIT_MR - 1) / IVIT_MR;
    const int64_t kg = (g->K + IVIT_KU - 1) / IVIT_KU, kp = kg * IVIT_KU;
    const int64_t npad = (g->N + 15) / 16 * 16, np = (npad + IVIT_PW - 1) / IVIT_PW;
    /* K blocks of at most 64 k-words (ISA 2: 256 bytes of K, a 16 KB weight sub-panel that stays in L1 while
     * the tiles of the block pass); partial sums then wait in cbuf (int32, L1) until the last K block */
    const int64_t nkb = (kg + IVIT_KBW - 1) / IVIT_KBW, kcw = (kg + nkb - 1) / nkb;
    /* thread scratch: [tile 6 x PW int32][tmp row K][cbuf mb x 6 x PW int32][A block mb x 6 x kp] */
    uint8_t *ts = cx->thread + (int64_t)tid * tws;
    int32_t *tile = (int32_t *)ts;
    int8_t *tmp = (int8_t *)(ts + IVIT_MR * IVIT_PW * 4);
    const int64_t hdr = IVIT_MR * IVIT_PW * 4 + (g->K + 63) / 64 * 64;
    const int64_t tile_bytes = IVIT_MR * kp * (int64_t)sizeof(ivit_a_t), cb_bytes = nkb > 1 ? IVIT_MR * IVIT_PW * 4 : 0;
    int64_t mb = (tws - hdr) / (tile_bytes + cb_bytes); /* tiles per block: what the scratch holds */
    const int64_t cap = IVIT_ABLOCK / tile_bytes; /* the A block stays in L2; each block streams the weights once */
    mb = ivit_min64(mb, ivit_max64(cap, 1));
    if (nt > 1) mb = ivit_min64(mb, ivit_max64(1, (tiles + 4 * nt - 1) / (4 * nt)));
    mb = ivit_max64(1, ivit_min64(mb, tiles));
    int32_t *cbuf = (int32_t *)(ts + hdr);
    ivit_a_t *abuf = (ivit_a_t *)(ts + hdr + mb * cb_bytes);
    const int64_t nblk = (tiles + mb - 1) / mb;
    int64_t nch = 1;
    if (nt > 1 && nblk < 4 * nt) nch = ivit_min64(np, (4 * nt + nblk - 1) / nblk);
    const int64_t ppc = (np + nch - 1) / nch; /* panels per chunk */
    const int64_t items = nblk * nch;
    const int32_t *bias = (const int32_t *)ivit_k(cx, g->bias);
    const uint8_t *w = (const uint8_t *)ivit_k(cx, g->w);
    /* loop order: tiles outside panels when the chunk's weights fit in L2 next to the A block (a residual add or
     * a wide output then reads and writes whole rows once), else panels outside (a panel stays in L1) */
    const int tile_outer = ppc * IVIT_PW * kg * 4 <= IVIT_TILE_OUTER;
    for (int64_t it = ivit_next(counter); it < items; it = ivit_next(counter)) {
        const int64_t blk = it / nch, ch = it % nch;
        const int64_t t0 = blk * mb, t1 = ivit_min64(tiles, t0 + mb);
        const int64_t r0 = t0 * IVIT_MR, nr = ivit_min64(Mt, t1 * IVIT_MR) - r0;
        const int64_t p0 = ch * ppc, p1 = ivit_min64(np, p0 + ppc);
        { /* the first panel streams in (to L2) while the A block is packed */
            const uint8_t *pf = w + p0 * IVIT_PW * kg * 4;
            const int64_t bytes = ivit_min64(IVIT_PW, npad - p0 * IVIT_PW) * kg * 4;
            for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(pf + o, 0, 2);
        }
        ivit_pack_a(g, cx, r0, nr, abuf, kp, tmp);
        /* rows of the item this thread likely takes next (it + nt) */
        int64_t na0 = 0, na_rows = 0;
        if (it + nt < items && (it + nt) / nch != blk) {
            const int64_t nt0 = ((it + nt) / nch) * mb;
            na0 = nt0 * IVIT_MR;
            na_rows = ivit_min64(Mt, ivit_min64(tiles, nt0 + mb) * IVIT_MR) - na0;
            na_rows = ivit_min64(na_rows, ivit_max64(1, (32 * 1024) / (g->K * g->a_es))); /* the first 32 KB */
        }
        if (tile_outer) { /* the chunk's weights stay in L2: whole output rows per tile (residual, output lines once) */
            for (int64_t t = t0; t < t1; t++) {
                const int64_t m0 = t * IVIT_MR, mr = ivit_min64(IVIT_MR, Mt - m0);
                if (IVIT_PF && t + 1 < t1)
                    ivit_gemm_prefetch_out(g, cx, (t + 1) * IVIT_MR, ivit_min64(IVIT_MR, Mt - (t + 1) * IVIT_MR), p0 * IVIT_PW,
                                           ivit_min64(g->N, p1 * IVIT_PW) - p0 * IVIT_PW);
                const ivit_a_t *a[IVIT_MR];
                for (int64_t r = 0; r < IVIT_MR; r++) a[r] = abuf + (m0 - r0 + (r < mr ? r : mr - 1)) * kp;
                for (int64_t p = p0; p < p1; p++) {
                    const int64_t n0 = p * IVIT_PW, wp = ivit_min64(IVIT_PW, npad - n0);
                    ivit_mk(a, (const int32_t *)(w + n0 * kg * 4), kg, (int)(wp / 16), bias + n0, 0, tile);
#if IVIT_ISA == 2
                    if (g->vec) ivit_epi_512(g, cx, tile, m0, mr, n0, ivit_min64(wp, g->N - n0));
                    else ivit_epi_scalar(g, cx, tile, m0, mr, n0, ivit_min64(wp, g->N - n0));
#else
                    ivit_epi_scalar(g, cx, tile, m0, mr, n0, ivit_min64(wp, g->N - n0));
#endif
                }
            }
            ivit_done(counter);
            continue;
        }
        for (int64_t p = p0; p < p1; p++) {
            const int64_t n0 = p * IVIT_PW, wp = ivit_min64(IVIT_PW, npad - n0);
            const int32_t *bp = (const int32_t *)(w + n0 * kg * 4);
            const int64_t nc = ivit_min64(wp, g->N - n0);
            const int nv = (int)(wp / 16);
            /* the next panel streams in while this one is used: a share of its lines per tile */
            const uint8_t *nxt = p + 1 < p1 ? w + (n0 + IVIT_PW) * kg * 4 : NULL;
            const int64_t nxt_bytes = nxt ? ivit_min64(IVIT_PW, npad - n0 - IVIT_PW) * kg * 4 : 0;
            const int64_t per_tile = (nxt_bytes / 64 + (t1 - t0) - 1) / (t1 - t0) * 64;
            for (int64_t kb = 0; kb < nkb; kb++) {
                const int64_t g0 = kb * kcw, kc = ivit_min64(kcw, kg - g0);
                const int last = kb == nkb - 1;
                for (int64_t t = t0; t < t1; t++) {
                    if (last) {
                        for (int64_t o = (t - t0) * per_tile; o < ivit_min64(nxt_bytes, (t - t0 + 1) * per_tile); o += 64)
                            __builtin_prefetch(nxt + o, 0, 2);
                        if (IVIT_PF && t + 1 < t1)
                            ivit_gemm_prefetch_out(g, cx, (t + 1) * IVIT_MR, ivit_min64(IVIT_MR, Mt - (t + 1) * IVIT_MR), n0, nc);
                        if (IVIT_PF && p + 1 == p1 && na_rows > 0) { /* the next item's A rows, a share per tile */
                            const int64_t per = (na_rows + (t1 - t0) - 1) / (t1 - t0);
                            for (int64_t i = (t - t0) * per; i < ivit_min64(na_rows, (t - t0 + 1) * per); i++)
                                ivit_gemm_prefetch_a(g, cx, na0 + i);
                        }
                    }
                    const int64_t m0 = t * IVIT_MR, mr = ivit_min64(IVIT_MR, Mt - m0);
                    const ivit_a_t *a[IVIT_MR];
                    for (int64_t r = 0; r < IVIT_MR; r++)
                        a[r] = abuf + (m0 - r0 + (r < mr ? r : mr - 1)) * kp + g0 * IVIT_KU;
                    int32_t *acc = nkb > 1 ? cbuf + (t - t0) * IVIT_MR * IVIT_PW : tile;
                    if (kb == 0) ivit_mk(a, bp + g0 * wp, kc, nv, bias + n0, 0, acc);
                    else ivit_mk(a, bp + g0 * wp, kc, nv, acc, IVIT_PW, acc);
                    if (!last) continue;
#if IVIT_ISA == 2
                    if (g->vec) ivit_epi_512(g, cx, acc, m0, mr, n0, nc);
                    else ivit_epi_scalar(g, cx, acc, m0, mr, n0, nc);
#else
                    ivit_epi_scalar(g, cx, acc, m0, mr, n0, nc);
#endif
                }
            }
        }
        ivit_done(counter);
    }
    ivit_wait(counter, items);
    (void)nt;
}

/* ------------------------------------------------------------------------------------------------
 * Attention
 * ---------------------------------------------------------------------------------------------- */

typedef struct {
    int64_t G, H, N, D;                 /* groups (windows) per image, heads, tokens, head dim */
    int q_where, k_where, v_where;
    int64_t q_off, k_off, v_off, q_img, k_img, v_img; /* element offsets, elements per image */
    int64_t q0, qg, qh, qn, k0, kg, kh, kn, v0, vg, vh, vn; /* start, strides of (group, head, token) */
    int64_t bias, mask, nwin;          /* blob offsets (-1: none): bias int32 (H, N, N), mask uint8 (nW, N, N) */
    int64_t sm, ssh, sq; int sc64;     /* score requantization: mult, shift, qmax; 64-bit clamp */
    int shi, ohi;                      /* ivit_rqh modes of the score and the output requantization */
    int probs; int64_t x0, n;          /* 1: shiftmax_rel + attn_normalize; 0: legacy shiftmax (k_out 8) */
    int64_t rel_m, dmul, dsh;          /* rel8: M = floor(255 * 2^22 / -x0); floor(u / -x0) = (u * dmul) >> dsh */
    int qcap;                          /* rel8: the largest q = floor(xp / x0) the score bound allows */
    int o_where; int64_t o_off, o_img; int o_es;
    int64_t o0, og, oh, on;            /* output start, strides of (group, head, token) */
    int orq; int64_t om, osh, oq; int oc64; /* fused requantize: per (h * D + c) mult/shift (int32), qmax */
    int64_t kv_off;                    /* arena offset of the packed K/V (ISA 2) */
    int qb;                            /* query rows per block (<= IVIT_QB) */
} ivit_attn_t;

/* packed K/V of one (image, group, head), ISA 2: kp [D4/4][N16][4] s8, ksum [N16] int32 (128 sum_c k),
 * vp [N4/4][D16][4] s8 */
#define IVIT_N16(a) (((a)->N + 15) / 16 * 16)
#define IVIT_N4(a) (((a)->N + 3) / 4 * 4)
#define IVIT_D4(a) (((a)->D + 3) / 4 * 4)
#define IVIT_D16(a) (((a)->D + 15) / 16 * 16)
IVIT_INLINE int64_t ivit_kv_bytes(const ivit_attn_t *a) {
    const int64_t kb = IVIT_D4(a) * IVIT_N16(a), sb = IVIT_N16(a) * 4, vb = IVIT_N4(a) * IVIT_D16(a);
    return (kb + sb + vb + 63) / 64 * 64;
}

/* the legacy Shiftmax of one row (ops.shiftmax, k_out = 8), 64-bit, e: N requantized scores in, scratch out */
static inline int64_t ivit_udiv_small(int64_t a, int64_t d, uint64_t inv) {
    int64_t q = (int64_t)(((uint64_t)a * inv) >> 58);
    q -= (q * d > a);
    return q;
}
static void ivit_shiftmax8_row(int64_t *e, uint8_t *p, int64_t N, int64_t x0, int64_t n, const uint8_t *mr) {
    const uint64_t inv = ((uint64_t)1 << 58) / (uint64_t)(-x0) + 1;
    if (mr)
        for (int64_t j = 0; j < N; j++) e[j] = mr[j] ? -((int64_t)1 << 40) : e[j];
    int64_t mx = INT64_MIN;
    for (int64_t j = 0; j < N; j++) mx = e[j] > mx ? e[j] : mx;
    int64_t sum = 0;
    for (int64_t j = 0; j < N; j++) {
        int64_t d = e[j] - mx;
        d = d > 0 ? 0 : d;
        int64_t xp = d + (d >> 1) - (d >> 4);
        if (xp < n * x0) xp = n * x0;
        const int64_t q = ivit_udiv_small(-xp, -x0, inv);
        const int64_t r = xp - q * x0;
        int64_t v = ((r >> 1) - x0) << (n - q);
        if (mr && mr[j]) v = 0;
        e[j] = v;
        sum += v;
    }
    const int64_t factor = 4611686018427387903LL / (sum < 1 ? 1 : sum);
    for (int64_t j = 0; j < N; j++) {
        const int64_t v = (e[j] * factor + ((int64_t)1 << 54)) >> 55;
        p[j] = (uint8_t)(v > 127 ? 127 : v);
    }
}

/* Shiftmax-rel of one row (ops.shiftmax_rel) of requantized scores s; returns P = sum(p).  mx: the row maximum
 * over unmasked positions (INT32_MIN: none, compute it).  qn: the largest q = floor(xp / x0) the score bound
 * allows (<= 3: compares; else the exact multiply floor(u / |x0|) = (u * dmul) >> dsh, Granlund-Montgomery). */
static int32_t ivit_smrel_row(const int32_t *s, uint8_t *p, int64_t N, const uint8_t *mr, int32_t x0, int32_t M,
                              uint32_t dmul, int dsh, int32_t mx, int qn) {
#if IVIT_ISA == 2
    if (mx == INT32_MIN) {
        __m512i vmx = _mm512_set1_epi32(INT32_MIN);
        for (int64_t j = 0; j < N; j += 16) {
            __mmask16 k = ivit_lanes(N - j);
            if (mr) k &= _mm_cmpeq_epi8_mask(_mm_maskz_loadu_epi8(k, mr + j), _mm_setzero_si128());
            vmx = _mm512_mask_max_epi32(vmx, k, vmx, _mm512_maskz_loadu_epi32(k, s + j));
        }
        mx = _mm512_reduce_max_epi32(vmx);
    }
    if (mx == INT32_MIN) mx = 0; /* every position masked: all p are 0 below */
    const __m512i vm = _mm512_set1_epi32(mx), zero = _mm512_setzero_si512(), lo = _mm512_set1_epi32(9 * x0);
    const __m512i vd = _mm512_set1_epi32(-x0), vM = _mm512_set1_epi32(M), one = _mm512_set1_epi32(1);
    const __m512i vdm = _mm512_set1_epi64((int64_t)dmul), c22 = _mm512_set1_epi32(22);
    const __m512i c255 = _mm512_set1_epi32(255);
    __m512i tot = zero;
    for (int64_t j = 0; j < N; j += 16) {
        __mmask16 k = ivit_lanes(N - j);
        if (mr) k &= _mm_cmpeq_epi8_mask(_mm_maskz_loadu_epi8(k, mr + j), _mm_setzero_si128());
        __m512i d = _mm512_min_epi32(_mm512_sub_epi32(_mm512_maskz_loadu_epi32(k, s + j), vm), zero);
        __m512i xp = _mm512_sub_epi32(_mm512_add_epi32(d, _mm512_srai_epi32(d, 1)), _mm512_srai_epi32(d, 4));
        xp = _mm512_max_epi32(xp, lo);
        const __m512i u = _mm512_sub_epi32(zero, xp); /* 0 <= u <= 9 |x0| < 2^31 */
        __m512i r, sh;
        if (qn <= 3) { /* q = #{t <= qn : u >= t |x0|}; r = xp + q |x0|; sh = 22 + q */
            r = xp;
            sh = c22;
            __m512i th = vd;
            for (int t = 1; t <= qn; t++) {
                const __mmask16 ge = _mm512_cmpge_epi32_mask(u, th);
                r = _mm512_mask_add_epi32(r, ge, r, vd);
                sh = _mm512_mask_add_epi32(sh, ge, sh, one);
                th = _mm512_add_epi32(th, vd);
            }
        } else {
            const __m512i qe = _mm512_srli_epi64(_mm512_mul_epu32(u, vdm), dsh);
            const __m512i qo = _mm512_srli_epi64(_mm512_mul_epu32(_mm512_srli_epi64(u, 32), vdm), dsh);
            const __m512i q = _mm512_mask_blend_epi32(0xAAAA, qe, _mm512_slli_epi64(qo, 32)); /* floor(xp / x0) */
            r = _mm512_add_epi32(xp, _mm512_mullo_epi32(q, vd));
            sh = _mm512_add_epi32(q, c22);
        }
        const __m512i e = _mm512_add_epi32(_mm512_srai_epi32(r, 1), vd);
        __m512i v = _mm512_add_epi32(_mm512_mullo_epi32(e, vM), _mm512_sllv_epi32(one, _mm512_sub_epi32(sh, one)));
        v = _mm512_min_epi32(_mm512_srav_epi32(v, sh), c255);
        v = _mm512_maskz_mov_epi32(k, v);
        tot = _mm512_add_epi32(tot, v);
        _mm_storeu_si128((__m128i *)(p + j), _mm512_cvtepi32_epi8(v));
    }
    return _mm512_reduce_add_epi32(tot);
#else
    (void)dmul; (void)dsh; (void)mx; (void)qn;
    int32_t total = 0, any = 0;
    mx = INT32_MIN;
    for (int64_t j = 0; j < N; j++) {
        if (mr && mr[j]) continue;
        if (s[j] > mx) mx = s[j];
        any = 1;
    }
    for (int64_t j = 0; j < N; j++) {
        if (!any || (mr && mr[j])) {
            p[j] = 0;
            continue;
        }
        int32_t d = s[j] - mx;
        d = d > 0 ? 0 : d;
        int32_t xp = d + (d >> 1) - (d >> 4);
        if (xp < 9 * x0) xp = 9 * x0;
        const int32_t q = (-xp) / (-x0);
        const int32_t r = xp - q * x0, e = (r >> 1) - x0, sh = 22 + q;
        int32_t v = (e * M + ((int32_t)1 << (sh - 1))) >> sh;
        v = v > 255 ? 255 : v;
        p[j] = (uint8_t)v;
        total += v;
    }
    return total;
#endif
}

/* final value of one output element: attn_normalize (probs 1) then the fused requantize */
IVIT_INLINE int64_t ivit_attn_out(const ivit_attn_t *a, const int32_t *om, const int32_t *osh, int64_t acc, int64_t R,
                                  int64_t ch) {
    int64_t v = a->probs == 1 ? (acc * R + (1 << 13)) >> 14 : acc;
    if (a->orq) v = ivr_clamp64(ivit_rs64(v * om[ch], osh[ch]), -a->oq, a->oq);
    return v;
}

/* scalar attention of one (image, group, head) and query rows [i0, i1) (ISA 0/1, or any shape) */
static void ivit_attn_scalar(const ivit_attn_t *a, const ivit_ctx *cx, int64_t b, int64_t gi, int64_t h, int64_t i0,
                             int64_t i1, uint8_t *ts) {
    const int8_t *q = (const int8_t *)ivit_buf(cx, a->q_where, a->q_off) + b * a->q_img + a->q0 + gi * a->qg + h * a->qh;
    const int8_t *k = (const int8_t *)ivit_buf(cx, a->k_where, a->k_off) + b * a->k_img + a->k0 + gi * a->kg + h * a->kh;
    const int8_t *v = (const int8_t *)ivit_buf(cx, a->v_where, a->v_off) + b * a->v_img + a->v0 + gi * a->vg + h * a->vh;
    uint8_t *o = ivit_buf(cx, a->o_where, a->o_off);
    const int64_t obase = b * a->o_img + a->o0 + gi * a->og + h * a->oh;
    const int32_t *bias = (const int32_t *)ivit_k(cx, a->bias);
    const uint8_t *mask = (const uint8_t *)ivit_k(cx, a->mask);
    const int32_t *om = (const int32_t *)ivit_k(cx, a->om), *osh = (const int32_t *)ivit_k(cx, a->osh);
    const int64_t N = a->N, D = a->D;
    int32_t *s = (int32_t *)ts;
    int64_t *e = (int64_t *)(ts + (N * 4 + 63) / 64 * 64);
    uint8_t *p = (uint8_t *)(ts + (N * 4 + 63) / 64 * 64 + N * 8);
    for (int64_t i = i0; i < i1; i++) {
        const int8_t *qi = q + i * a->qn;
        for (int64_t j = 0; j < N; j++) {
            int32_t acc = 0;
            for (int64_t c = 0; c < D; c++) acc += (int32_t)qi[c] * (int32_t)k[j * a->kn + c];
            if (bias) acc = (int32_t)((int64_t)acc + bias[(h * N + i) * N + j]);
            s[j] = (int32_t)ivr_clamp64(ivit_rs64((int64_t)acc * a->sm, a->ssh), -a->sq, a->sq);
        }
        const uint8_t *mr = mask ? mask + ((gi % a->nwin) * N + i) * N : NULL;
        int64_t R = 0;
        if (a->probs == 1) {
            const int32_t tot = ivit_smrel_row(s, p, N, mr, (int32_t)a->x0, (int32_t)a->rel_m, (uint32_t)a->dmul,
                                               (int)a->dsh, INT32_MIN, 9);
            R = ((int64_t)1 << 30) / (tot < 1 ? 1 : tot);
        } else {
            for (int64_t j = 0; j < N; j++) e[j] = s[j];
            ivit_shiftmax8_row(e, p, N, a->x0, a->n, mr);
        }
        for (int64_t c = 0; c < D; c++) {
            int32_t acc = 0;
            for (int64_t j = 0; j < N; j++) acc += (int32_t)p[j] * (int32_t)v[j * a->vn + c];
            ivit_store(o, a->o_es, obase + i * a->on + c, ivit_attn_out(a, om, osh, acc, R, h * D + c));
        }
    }
}

static int64_t ivit_attn_scratch(const ivit_attn_t *a) {
    return (a->N * 4 + 63) / 64 * 64 + a->N * 8 + a->N + 64;
}

#if IVIT_ISA == 2
static void ivit_attn_pack(const ivit_attn_t *a, const ivit_ctx *cx, int64_t b, int64_t gi, int64_t h, uint8_t *kv) {
    const int8_t *k = (const int8_t *)ivit_buf(cx, a->k_where, a->k_off) + b * a->k_img + a->k0 + gi * a->kg + h * a->kh;
    const int8_t *v = (const int8_t *)ivit_buf(cx, a->v_where, a->v_off) + b * a->v_img + a->v0 + gi * a->vg + h * a->vh;
    const int64_t N = a->N, D = a->D, n16 = IVIT_N16(a), n4 = IVIT_N4(a), d4 = IVIT_D4(a), d16 = IVIT_D16(a);
    uint8_t *kp = kv;
    int32_t *ks = (int32_t *)(kv + d4 * n16);
    uint8_t *vp = kv + d4 * n16 + n16 * 4;
    const __m512i ones = _mm512_set1_epi8(1);
    /* K: kp[g][j] = the 4 bytes k[j][4g .. 4g+3]; ks[j] = 128 sum_c k[j][c] */
    for (int64_t j = 0; j < N; j++) {
        const int8_t *kj = k + j * a->kn;
        __m512i acc = _mm512_setzero_si512();
        for (int64_t c = 0; c < d4; c += 64) {
            const int64_t n = ivit_min64(64, D - c);
            const __mmask64 m = n >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << n) - 1);
            const __m512i row = _mm512_maskz_loadu_epi8(m, kj + c);
            acc = _mm512_dpbusd_epi32(acc, ones, row);
            int32_t w[16];
            _mm512_storeu_si512((void *)w, row);
            const int64_t gn = ivit_min64(16, (d4 - c) / 4);
            for (int64_t g = 0; g < gn; g++) memcpy(kp + ((c / 4 + g) * n16 + j) * 4, &w[g], 4);
        }
        ks[j] = _mm512_reduce_add_epi32(acc) * 128;
    }
    for (int64_t j = N; j < n16; j++) {
        ks[j] = 0;
        for (int64_t g = 0; g < d4 / 4; g++) memset(kp + (g * n16 + j) * 4, 0, 4);
    }
    /* V: vp[g][c] = the 4 bytes v[4g .. 4g+3][c] (keys >= N are 0) */
    for (int64_t g = 0; g < n4 / 4; g++) {
        const int8_t *r[4];
        for (int t = 0; t < 4; t++) r[t] = 4 * g + t < N ? v + (4 * g + t) * a->vn : NULL;
        for (int64_t c = 0; c < d16; c += 16) {
            const __mmask16 m = c >= D ? 0 : ivit_lanes(D - c);
            __m128i x[4];
            for (int t = 0; t < 4; t++) x[t] = r[t] ? _mm_maskz_loadu_epi8(m, r[t] + c) : _mm_setzero_si128();
            const __m128i t0 = _mm_unpacklo_epi8(x[0], x[1]), t1 = _mm_unpackhi_epi8(x[0], x[1]);
            const __m128i t2 = _mm_unpacklo_epi8(x[2], x[3]), t3 = _mm_unpackhi_epi8(x[2], x[3]);
            uint8_t *d = vp + (g * d16 + c) * 4;
            _mm_storeu_si128((__m128i *)d, _mm_unpacklo_epi16(t0, t2));
            _mm_storeu_si128((__m128i *)(d + 16), _mm_unpackhi_epi16(t0, t2));
            _mm_storeu_si128((__m128i *)(d + 32), _mm_unpacklo_epi16(t1, t3));
            _mm_storeu_si128((__m128i *)(d + 48), _mm_unpackhi_epi16(t1, t3));
        }
    }
}

/* S[r][j] = requantize(q_r . k_j (+ bias)) for IVIT_QB query rows (nr valid), keys j0 .. j0 + 16 NJ */
#define IVIT_SCORES(NJ)                                                                                    \
    __attribute__((noinline)) static void ivit_scores_##NJ(const ivit_attn_t *a, const uint8_t *qu, int64_t d4,       \
                                                    const uint8_t *kb, int64_t n16, const int32_t *ks,    \
                                                    const int32_t *bias_rows, int64_t nr, int32_t *S, int64_t j,   \
                                                    const uint8_t *mrows, __m512i *rmax_out) {                    \
        const ivit_attn_t al = *a; /* a local copy: the stores below cannot alias it */                    \
        a = &al;                                                                                           \
        __m512i rmax[IVIT_QB];                                                                             \
        _Pragma("GCC unroll 8") for (int r = 0; r < IVIT_QB; r++) rmax[r] = rmax_out[r];                    \
        __m512i acc[IVIT_QB][NJ];                                                                          \
        _Pragma("GCC unroll 2") for (int u = 0; u < NJ; u++) {                                             \
            const __m512i init = _mm512_sub_epi32(_mm512_setzero_si512(),                                  \
                                                  _mm512_loadu_si512((const void *)(ks + j + 16 * u)));    \
            _Pragma("GCC unroll 8") for (int r = 0; r < IVIT_QB; r++) acc[r][u] = init;                    \
        }                                                                                                  \
        const int64_t kw = d4 / 4;                                                                         \
        for (int64_t g = 0; g < kw; g++) {                                                                 \
            __m512i kk[NJ];                                                                                \
            _Pragma("GCC unroll 2") for (int u = 0; u < NJ; u++)                                           \
                kk[u] = _mm512_loadu_si512((const void *)(kb + (g * n16 + 16 * u) * 4));                   \
            _Pragma("GCC unroll 8") for (int r = 0; r < IVIT_QB; r++) {                                    \
                int32_t w;                                                                                 \
                memcpy(&w, qu + r * d4 + 4 * g, 4);                                                        \
                const __m512i qv = _mm512_set1_epi32(w);                                                   \
                _Pragma("GCC unroll 2") for (int u = 0; u < NJ; u++)                                       \
                    acc[r][u] = _mm512_dpbusd_epi32(acc[r][u], qv, kk[u]);                                 \
            }                                                                                              \
        }                                                                                                  \
        __m512i t[IVIT_QB * NJ]; /* copied out with static indices: the accumulators stay in registers above */ \
        _Pragma("GCC unroll 8") for (int r = 0; r < IVIT_QB; r++)                                          \
            _Pragma("GCC unroll 2") for (int u = 0; u < NJ; u++) t[r * NJ + u] = acc[r][u];                \
        const ivit_rq_t sc = ivit_rq_scalar(a->sm, a->ssh);                                                \
        const ivit_rqh_t sch = ivit_rqh_scalar(a->sm, a->ssh);                                             \
        for (int64_t r = 0; r < nr; r++) {                                                                 \
            _Pragma("GCC unroll 2") for (int u = 0; u < NJ; u++) {                                         \
                const int64_t jj = j + 16 * u;                                                             \
                __m512i x = t[r * NJ + u];                                                                 \
                if (bias_rows && jj < a->N)                                                                \
                    x = _mm512_add_epi32(x, _mm512_maskz_loadu_epi32(ivit_lanes(a->N - jj), bias_rows + r * a->N + jj)); \
                x = ivit_clamp16(a->shi ? ivit_rqh(x, &sch, a->shi) : ivit_rq(x, &sc, a->sc64, a->sq), a->sq); \
                _mm512_storeu_si512((void *)(S + r * n16 + jj), x);                                        \
                if (jj < a->N) { /* running maximum of the unmasked positions (lanes) */                   \
                    __mmask16 km = ivit_lanes(a->N - jj);                                                  \
                    if (mrows) km &= _mm_cmpeq_epi8_mask(_mm_maskz_loadu_epi8(km, mrows + r * a->N + jj), _mm_setzero_si128()); \
                    rmax[r] = _mm512_mask_max_epi32(rmax[r], km, rmax[r], x);                              \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
        _Pragma("GCC unroll 8") for (int r = 0; r < IVIT_QB; r++) rmax_out[r] = rmax[r];                    \
    }
IVIT_SCORES(1)
IVIT_SCORES(2)

static void ivit_attn_scores(const ivit_attn_t *a, const uint8_t *qu, int64_t d4, const uint8_t *kp, const int32_t *ks,
                             const int32_t *bias_rows, int64_t nr, int32_t *S, int64_t n16, const uint8_t *mrows,
                             int32_t *rmax) {
    int64_t j = 0;
    __m512i vmax[IVIT_QB];
    for (int64_t r = 0; r < IVIT_QB; r++) vmax[r] = _mm512_set1_epi32(INT32_MIN);
    for (; j + 32 <= n16; j += 32) ivit_scores_2(a, qu, d4, kp + j * 4, n16, ks, bias_rows, nr, S, j, mrows, vmax);
    if (j < n16) ivit_scores_1(a, qu, d4, kp + j * 4, n16, ks, bias_rows, nr, S, j, mrows, vmax);
    for (int64_t r = 0; r < nr; r++) rmax[r] = _mm512_reduce_max_epi32(vmax[r]);
}

/* O[r][c] = sum_j P[r][j] v[j][c] for IVIT_QB rows (nr valid) and columns c0 .. c0 + 16 NV, then the output */
#define IVIT_PV(NV)                                                                                        \
    __attribute__((noinline)) static void ivit_pv_##NV(const ivit_attn_t *a, const ivit_ctx *cx, const uint8_t *P,   \
                                                int64_t n16, const uint8_t *vp, int64_t nr, const int64_t *R, \
                                                uint8_t *o, const int64_t *orow, int64_t h, int64_t c0) {  \
        const ivit_attn_t al = *a; /* a local copy: the stores below cannot alias it */                    \
        a = &al;                                                                                           \
        const int64_t n4 = IVIT_N4(a), d16 = IVIT_D16(a), D = a->D;                                        \
        __m512i acc[IVIT_QB][NV];                                                                          \
        _Pragma("GCC unroll 8") for (int r = 0; r < IVIT_QB; r++)                                          \
            _Pragma("GCC unroll 2") for (int v = 0; v < NV; v++) acc[r][v] = _mm512_setzero_si512();       \
        for (int64_t g = 0; g < n4 / 4; g++) {                                                             \
            const uint8_t *vb = vp + (g * d16 + c0) * 4;                                                   \
            __m512i vv[NV];                                                                                \
            _Pragma("GCC unroll 2") for (int v = 0; v < NV; v++) vv[v] = _mm512_loadu_si512((const void *)(vb + 64 * v)); \
            _Pragma("GCC unroll 8") for (int r = 0; r < IVIT_QB; r++) {                                    \
                int32_t w;                                                                                 \
                memcpy(&w, P + r * n16 + 4 * g, 4);                                                        \
                const __m512i pw = _mm512_set1_epi32(w);                                                   \
                _Pragma("GCC unroll 2") for (int v = 0; v < NV; v++) acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], pw, vv[v]); \
            }                                                                                              \
        }                                                                                                  \
        __m512i t[IVIT_QB * NV];                                                                           \
        _Pragma("GCC unroll 8") for (int r = 0; r < IVIT_QB; r++)                                          \
            _Pragma("GCC unroll 2") for (int v = 0; v < NV; v++) t[r * NV + v] = acc[r][v];                \
        const int32_t *om = (const int32_t *)ivit_k(cx, a->om), *osh = (const int32_t *)ivit_k(cx, a->osh); \
        for (int64_t r = 0; r < nr; r++) {                                                                 \
            const ivit_rq_t nc = ivit_rq_scalar(R[r], 14);                                                 \
            _Pragma("GCC unroll 2") for (int v = 0; v < NV; v++) {                                         \
                const int64_t c = c0 + 16 * v;                                                             \
                if (c >= D) break;                                                                         \
                const __mmask16 k = ivit_lanes(D - c);                                                     \
                __m512i x = t[r * NV + v];                                                                 \
                if (a->probs == 1) x = ivit_rq(x, &nc, 0, 0); /* attn_normalize, |acc R| <= 2^37 */        \
                if (a->orq && a->ohi) {                                                                    \
                    const ivit_rqh_t oc = ivit_rqh_load(om + h * D + c, osh + h * D + c, k, a->ohi);       \
                    x = ivit_clamp16(ivit_rqh(x, &oc, a->ohi), a->oq);                                      \
                } else if (a->orq) {                                                                       \
                    const ivit_rq_t oc = ivit_rq_load(om + h * D + c, osh + h * D + c, k);                 \
                    x = ivit_clamp16(ivit_rq(x, &oc, a->oc64, a->oq), a->oq);                               \
                }                                                                                          \
                ivit_store16(o + (orow[r] + c) * a->o_es, a->o_es, x, k);                                  \
            }                                                                                              \
        }                                                                                                  \
    }
IVIT_PV(1)
IVIT_PV(2)

static void ivit_attn_pv(const ivit_attn_t *a, const ivit_ctx *cx, const uint8_t *P, int64_t n16, const uint8_t *vp,
                         int64_t nr, const int64_t *R, uint8_t *o, const int64_t *orow, int64_t h) {
    const int64_t d16 = IVIT_D16(a);
    int64_t c0 = 0;
    for (; c0 + 32 <= d16; c0 += 32) ivit_pv_2(a, cx, P, n16, vp, nr, R, o, orow, h, c0);
    if (c0 < d16) ivit_pv_1(a, cx, P, n16, vp, nr, R, o, orow, h, c0);
}
#endif

/* phase 1 (ISA 2): pack K/V of every (image, group, head); phase 2: blocks of query rows.  A barrier
 * separates them (all threads call this). */
static void ivit_attn_run(const ivit_attn_t *a, const ivit_ctx *cx, int tid, int nt, int64_t *counters, int64_t tws) {
    const int64_t GH = a->G * a->H, bgh = cx->B * GH;
    const int64_t nblk = (a->N + a->qb - 1) / a->qb;
    int64_t nch = 1;
    if (bgh < 4 * nt) nch = ivit_min64(nblk, (4 * nt + bgh - 1) / bgh);
    const int64_t bpc = (nblk + nch - 1) / nch;
    uint8_t *ts = cx->thread + (int64_t)tid * tws;
#if IVIT_ISA == 2
    const int64_t kvb = ivit_kv_bytes(a);
    uint8_t *kvbase = cx->arena + a->kv_off * cx->B;
    /* one work item per (image, group, head): its K/V are packed by the thread that uses them (in L1/L2);
     * heads split over query chunks (few heads): packed once for all threads first */
    const int local = nch == 1;
    if (!local) {
        for (int64_t it = ivit_next(counters); it < bgh; it = ivit_next(counters)) {
            const int64_t b = it / GH, gi = (it % GH) / a->H, h = it % a->H;
            ivit_attn_pack(a, cx, b, gi, h, kvbase + it * kvb);
            ivit_done(counters);
        }
        ivit_wait(counters, bgh);
    }
    const int64_t n16 = IVIT_N16(a), d4 = IVIT_D4(a), N = a->N;
    uint8_t *qu = ts;                                              /* [QB][d4] */
    int32_t *S = (int32_t *)(ts + (IVIT_QB * d4 + 63) / 64 * 64);  /* [QB][n16] */
    uint8_t *P = (uint8_t *)S + IVIT_QB * n16 * 4;                 /* [QB][n16] */
    int64_t *e = (int64_t *)(P + IVIT_QB * n16);                   /* [N] (legacy) */
    uint8_t *kvl = (uint8_t *)e + (N * 8 + 63) / 64 * 64;          /* [kvb] (local packing) */
    uint8_t *o = ivit_buf(cx, a->o_where, a->o_off);
    const int32_t *bias = (const int32_t *)ivit_k(cx, a->bias);
    const uint8_t *mask = (const uint8_t *)ivit_k(cx, a->mask);
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int64_t it = ivit_next(counters + 8); it < bgh * nch; it = ivit_next(counters + 8)) {
        const int64_t bi = it / nch, ch = it % nch;
        const int64_t b = bi / GH, gi = (bi % GH) / a->H, h = bi % a->H;
        const uint8_t *kv = kvbase + bi * kvb;
        if (local) {
            ivit_attn_pack(a, cx, b, gi, h, kvl);
            kv = kvl;
        }
        const uint8_t *kp = kv, *vp = kv + d4 * n16 + n16 * 4;
        const int32_t *ks = (const int32_t *)(kv + d4 * n16);
        const int8_t *q = (const int8_t *)ivit_buf(cx, a->q_where, a->q_off) + b * a->q_img + a->q0 + gi * a->qg + h * a->qh;
        const int64_t obase = b * a->o_img + a->o0 + gi * a->og + h * a->oh;
        /* the rows of the item this thread likely takes next stream into L2 meanwhile (a share per block) */
        const int64_t nx = it + nt < bgh * nch ? it + nt : -1;
        const int8_t *pq = NULL, *pk = NULL, *pv = NULL;
        uint8_t *po = NULL;
        if (nx >= 0) {
            const int64_t nbi = nx / nch, nb = nbi / GH, ng = (nbi % GH) / a->H, nh = nbi % a->H;
            pq = (const int8_t *)ivit_buf(cx, a->q_where, a->q_off) + nb * a->q_img + a->q0 + ng * a->qg + nh * a->qh;
            pk = (const int8_t *)ivit_buf(cx, a->k_where, a->k_off) + nb * a->k_img + a->k0 + ng * a->kg + nh * a->kh;
            pv = (const int8_t *)ivit_buf(cx, a->v_where, a->v_off) + nb * a->v_img + a->v0 + ng * a->vg + nh * a->vh;
            po = o + (nb * a->o_img + a->o0 + ng * a->og + nh * a->oh) * a->o_es;
        }
        const int64_t b0 = ch * bpc, b1 = ivit_min64(nblk, (ch + 1) * bpc), per = (N + (b1 - b0) - 1) / ivit_max64(1, b1 - b0);
        for (int64_t blk = b0; blk < b1; blk++) {
            if (nx >= 0)
                for (int64_t j = (blk - b0) * per; j < ivit_min64(N, (blk - b0 + 1) * per); j++)
                    for (int64_t l = 0; l < a->D; l += 64) {
                        __builtin_prefetch(pk + j * a->kn + l, 0, 2);
                        __builtin_prefetch(pv + j * a->vn + l, 0, 2);
                        __builtin_prefetch(pq + j * a->qn + l, 0, 2);
                        __builtin_prefetch(po + (j * a->on + l) * a->o_es, 1, 2);
                    }
            const int64_t i0 = blk * a->qb, nr = ivit_min64(a->qb, N - i0);
            for (int64_t r = 0; r < IVIT_QB; r++) {
                const int8_t *qi = q + (i0 + (r < nr ? r : nr - 1)) * a->qn;
                const __mmask64 km = a->D >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << a->D) - 1);
                for (int64_t c = 0; c < d4; c += 64) {
                    const __mmask64 kc = c + 64 <= a->D ? ~(__mmask64)0 : (c < a->D ? (((__mmask64)1 << (a->D - c)) - 1) : 0);
                    const __mmask64 ks4 = c + 64 <= d4 ? ~(__mmask64)0 : (((__mmask64)1 << (d4 - c)) - 1);
                    (void)km;
                    _mm512_mask_storeu_epi8(qu + r * d4 + c, ks4, _mm512_xor_si512(_mm512_maskz_loadu_epi8(kc, qi + c), flip));
                }
            }
            int32_t rmax[IVIT_QB];
            const uint8_t *mrows = mask ? mask + ((gi % a->nwin) * N + i0) * N : NULL;
            ivit_attn_scores(a, qu, d4, kp, ks, bias ? bias + (h * N + i0) * N : NULL, nr, S, n16, mrows, rmax);
            int64_t R[IVIT_QB];
            for (int64_t r = 0; r < nr; r++) {
                const uint8_t *mr = mask ? mask + ((gi % a->nwin) * N + i0 + r) * N : NULL;
                uint8_t *pr = P + r * n16;
                if (a->probs == 1) {
                    const int32_t tot = ivit_smrel_row(S + r * n16, pr, N, mr, (int32_t)a->x0, (int32_t)a->rel_m,
                                                       (uint32_t)a->dmul, (int)a->dsh, rmax[r], a->qcap);
                    R[r] = ((int64_t)1 << 30) / (tot < 1 ? 1 : tot);
                } else {
                    for (int64_t j = 0; j < N; j++) e[j] = S[r * n16 + j];
                    ivit_shiftmax8_row(e, pr, N, a->x0, a->n, mr);
                    R[r] = 0;
                }
                for (int64_t j = N; j < n16; j++) pr[j] = 0;
            }
            for (int64_t r = nr; r < IVIT_QB; r++) memset(P + r * n16, 0, (size_t)n16);
            int64_t orow[IVIT_QB];
            for (int64_t r = 0; r < IVIT_QB; r++) orow[r] = obase + (i0 + r) * a->on;
            ivit_attn_pv(a, cx, P, n16, vp, nr, R, o, orow, h);
        }
        ivit_done(counters + 8);
    }
#else
    for (int64_t it = ivit_next(counters + 8); it < bgh * nch; it = ivit_next(counters + 8)) {
        const int64_t bi = it / nch, ch = it % nch;
        const int64_t b = bi / GH, gi = (bi % GH) / a->H, h = bi % a->H;
        const int64_t i0 = ch * bpc * a->qb, i1 = ivit_min64(a->N, (ch + 1) * bpc * a->qb);
        if (i0 < i1) ivit_attn_scalar(a, cx, b, gi, h, i0, i1, ts);
        ivit_done(counters + 8);
    }
#endif
    ivit_wait(counters + 8, bgh * nch);
    (void)nt;
}

/* ------------------------------------------------------------------------------------------------
 * I-LayerNorm as a step of its own (layernorm32: int8/int16 rows -> int8/int16, e.g. Swin's patch norm)
 * ---------------------------------------------------------------------------------------------- */

typedef struct {
    int s_where; int64_t s_off, s_img; int s_es;
    int d_where; int64_t d_off, d_img; int d_es;
    int64_t rows, C, m, s, o, q; int hi;  /* rows per image, channels, per-channel constants (C int32), qmax */
    int vec;                              /* |x| <= 32767: the AVX-512 path (int16 squares in vpmaddwd pairs) */
} ivit_ln_t;

static void ivit_ln_run(const ivit_ln_t *l, const ivit_ctx *cx, int tid, int nt, int64_t *counter) {
    const uint8_t *src = ivit_buf(cx, l->s_where, l->s_off);
    uint8_t *dst = ivit_buf(cx, l->d_where, l->d_off);
    const int32_t *m = (const int32_t *)ivit_k(cx, l->m), *sh = (const int32_t *)ivit_k(cx, l->s);
    const int32_t *o = (const int32_t *)ivit_k(cx, l->o);
    const int64_t total = cx->B * l->rows, chunk = 32, items = (total + chunk - 1) / chunk;
    for (int64_t it = ivit_next(counter); it < items; it = ivit_next(counter)) {
        for (int64_t r0 = it * chunk; r0 < ivit_min64(total, (it + 1) * chunk); r0 += 8) {
            const int64_t n = ivit_min64(8, ivit_min64(total, (it + 1) * chunk) - r0);
#if IVIT_ISA == 2
            if (l->s_es == 2 && l->vec) {
                const int16_t *xs[8];
                uint8_t *ds[8];
                for (int64_t i = 0; i < n; i++) {
                    const int64_t t = r0 + i, b = t / l->rows, r = t - b * l->rows;
                    xs[i] = (const int16_t *)(src + (b * l->s_img + r * l->C) * 2);
                    ds[i] = dst + (b * l->d_img + r * l->C) * l->d_es;
                }
                ivit_ln32_group(xs, (int)n, l->C, m, sh, o, l->q, ds, l->hi, l->d_es);
                continue;
            }
#endif
            for (int64_t i = 0; i < n; i++) {
                const int64_t t = r0 + i, b = t / l->rows, r = t - b * l->rows;
                ivit_ln32_row(src + (b * l->s_img + r * l->C) * l->s_es, l->s_es, l->C, m, sh, o, l->q,
                              dst + (b * l->d_img + r * l->C) * l->d_es, l->d_es);
            }
        }
        ivit_done(counter);
    }
    ivit_wait(counter, items);
    (void)tid; (void)nt;
}

/* ------------------------------------------------------------------------------------------------
 * Data movement: rows (row starts in elements; -1 = a zero row) or elements (-1 = zero)
 * ---------------------------------------------------------------------------------------------- */

typedef struct {
    int s_where; int64_t s_off, s_img;
    int d_where; int64_t d_off, d_img;
    int es; int64_t rows, len;          /* rows of len elements per image */
    int64_t map;                        /* blob int32 [rows] row starts, or [rows * len] element indices */
    int64_t s0, srs;                    /* affine rows when map < 0: s0 + r * srs */
    int elem;                           /* 1: map holds element indices */
} ivit_gather_t;

static void ivit_gather_run(const ivit_gather_t *g, const ivit_ctx *cx, int tid, int nt, int64_t *counter) {
    const uint8_t *src = ivit_buf(cx, g->s_where, g->s_off);
    uint8_t *dst = ivit_buf(cx, g->d_where, g->d_off);
    const int32_t *map = (const int32_t *)ivit_k(cx, g->map);
    const int64_t total = cx->B * g->rows, chunk = 256, items = (total + chunk - 1) / chunk;
    for (int64_t it = ivit_next(counter); it < items; it = ivit_next(counter)) {
    for (int64_t t = it * chunk; t < ivit_min64(total, (it + 1) * chunk); t++) {
        const int64_t b = t / g->rows, r = t - b * g->rows;
        uint8_t *d = dst + (b * g->d_img + r * g->len) * g->es;
        const uint8_t *s = src + b * g->s_img * g->es;
        if (g->elem) {
            const int32_t *mi = map + r * g->len;
            for (int64_t c = 0; c < g->len; c++) {
                if (mi[c] < 0) memset(d + c * g->es, 0, (size_t)g->es);
                else memcpy(d + c * g->es, s + (int64_t)mi[c] * g->es, (size_t)g->es);
            }
        } else {
            const int64_t st = map ? map[r] : g->s0 + r * g->srs;
            if (st < 0) memset(d, 0, (size_t)(g->len * g->es));
            else memcpy(d, s + st * g->es, (size_t)(g->len * g->es));
        }
    }
        ivit_done(counter);
    }
    ivit_wait(counter, items);
    (void)tid; (void)nt;
}

/* rows [0, rows) of every image <- a constant (int32 values clamped to [-q, q]) */
typedef struct {
    int d_where; int64_t d_off, d_img; int es; int64_t n; int64_t src; int64_t q;
} ivit_fill_t;

static void ivit_fill_run(const ivit_fill_t *f, const ivit_ctx *cx, int tid, int nt, int64_t *counter) {
    uint8_t *dst = ivit_buf(cx, f->d_where, f->d_off);
    const int32_t *src = (const int32_t *)ivit_k(cx, f->src);
    for (int64_t b = ivit_next(counter); b < cx->B; b = ivit_next(counter)) {
        for (int64_t i = 0; i < f->n; i++) ivit_store(dst, f->es, b * f->d_img + i, ivr_clamp64(src[i], -f->q, f->q));
        ivit_done(counter);
    }
    ivit_wait(counter, cx->B);
    (void)tid; (void)nt;
}
