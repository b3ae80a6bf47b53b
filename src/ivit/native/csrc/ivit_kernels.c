/*
 * Fast CPU kernels of the ivit integer engine.  Plain C (no torch headers), compiled on first use
 * with `cc -O3 -march=native -fopenmp -shared` and called through ctypes.
 *
 * Every kernel computes exactly the integers of its reference twin in ivit/ops.py (tests compare
 * them with torch.equal); only integer arithmetic is used.  Conventions shared with ops.py:
 *   round_shift(v, s) = (v + 2^(s-1)) >> s      (arithmetic shift, ties toward +inf), 1 <= s <= 62
 *   floor division where ops.py uses rounding_mode="floor"
 * Tensors are passed as raw pointers; a row stride (in elements) lets kernels read slices of the
 * last dimension (e.g. q/k/v chunks of the qkv accumulator) without a copy.
 */
#include <stdint.h>
#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#endif

static inline int64_t round_shift(int64_t v, int64_t s) { return (v + ((int64_t)1 << (s - 1))) >> s; }

static inline int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

static inline int64_t floor_div(int64_t a, int64_t b) {
    int64_t q = a / b;
    if ((a % b != 0) && ((a < 0) != (b < 0))) q -= 1;
    return q;
}

/* Per-channel constants widened once per call: multiplier, rounding half 2^(s-1), shift.
 * Returns nonzero on allocation failure (the caller then leaves `out` untouched). */
static int expand_consts(const int32_t *mult, const int32_t *shift, int64_t n, int64_t **m, int64_t **h,
                         int64_t **s) {
    *m = malloc(n * sizeof(int64_t));
    *h = malloc(n * sizeof(int64_t));
    *s = malloc(n * sizeof(int64_t));
    if (!*m || !*h || !*s) {
        free(*m); free(*h); free(*s);
        return 1;
    }
    for (int64_t c = 0; c < n; c++) {
        (*m)[c] = mult[c];
        (*s)[c] = shift[c];
        (*h)[c] = (int64_t)1 << (shift[c] - 1);
    }
    return 0;
}

/* Exact floor(sqrt(v)) by the digit-by-digit (shift/subtract) method: integer ops only. */
static inline int64_t isqrt64(int64_t v0) {
    uint64_t v = (uint64_t)v0, r = 0, bit = (uint64_t)1 << 62;
    while (bit > v) bit >>= 2;
    while (bit) {
        if (v >= r + bit) {
            v -= r + bit;
            r = (r >> 1) + bit;
        } else {
            r >>= 1;
        }
        bit >>= 2;
    }
    return (int64_t)r;
}


/* requantize: out[r, c] = clamp(round_shift(x[r, c] * mult[c], shift[c]), -qmax, qmax).
 * mult/shift have `nch` entries (1 = per tensor, else = cols). */
#define DEF_REQUANT(NAME, TIN, TOUT)                                                              \
    void NAME(const TIN *x, TOUT *out, int64_t rows, int64_t cols, int64_t in_stride,             \
              const int32_t *mult, const int32_t *shift, int64_t nch, int64_t qmax, int nt) {     \
        int64_t *m64 = 0, *h64 = 0, *s64 = 0;                                                     \
        if (nch > 1 && expand_consts(mult, shift, nch, &m64, &h64, &s64)) return;                 \
        _Pragma("omp parallel for schedule(static)") for (int64_t r = 0; r < rows; r++) {         \
            const TIN *restrict xr = x + r * in_stride;                                                    \
            TOUT *restrict o = out + r * cols;                                                             \
            if (nch == 1) {                                                                       \
                const int64_t m = mult[0], s = shift[0]; const int64_t h = (int64_t)1 << (s - 1);               \
                for (int64_t c = 0; c < cols; c++) {                                              \
                    int64_t v = ((int64_t)xr[c] * m + h) >> s;                                    \
                    o[c] = (TOUT)clamp64(v, -qmax, qmax);                                         \
                }                                                                                 \
            } else {                                                                              \
                const int64_t *restrict mm = m64, *restrict hh = h64, *restrict ss = s64;         \
                for (int64_t c = 0; c < cols; c++) {                                              \
                    int64_t v = ((int64_t)xr[c] * mm[c] + hh[c]) >> ss[c];                        \
                    o[c] = (TOUT)clamp64(v, -qmax, qmax);                                         \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        free(m64); free(h64); free(s64);                                                          \
        (void)nt;                                                                                 \
    }

DEF_REQUANT(requant_i32_i8, int32_t, int8_t)
DEF_REQUANT(requant_i32_i16, int32_t, int16_t)
DEF_REQUANT(requant_i16_i8, int16_t, int8_t)
DEF_REQUANT(requant_i16_i16, int16_t, int16_t)

/* residual add: out = clamp(round_shift(a*ma, sa) + round_shift(b*mb[c], sb[c]), -qmax, qmax);
 * a: int16 (rows, C), b: int32 (rows, C); constants per tensor (1 entry) or per channel (C). */
void add_requant_i16_i32_i16(const int16_t *a, const int32_t *b, int16_t *out, int64_t rows, int64_t cols,
                             const int32_t *ma, const int32_t *sa, int64_t nch_a,
                             const int32_t *mb, const int32_t *sb, int64_t nch_b, int64_t qmax, int nt) {
    int32_t *cst = malloc(4 * cols * sizeof(int32_t));
    int64_t *e[6] = {0};
    if (!cst) return;
    for (int64_t c = 0; c < cols; c++) {
        cst[c] = ma[nch_a == 1 ? 0 : c];
        cst[cols + c] = sa[nch_a == 1 ? 0 : c];
        cst[2 * cols + c] = mb[nch_b == 1 ? 0 : c];
        cst[3 * cols + c] = sb[nch_b == 1 ? 0 : c];
    }
    if (expand_consts(cst, cst + cols, cols, &e[0], &e[1], &e[2]) ||
        expand_consts(cst + 2 * cols, cst + 3 * cols, cols, &e[3], &e[4], &e[5])) {
        for (int i = 0; i < 6; i++) free(e[i]);
        free(cst);
        return;
    }
    const int64_t *restrict m1 = e[0], *restrict h1 = e[1], *restrict s1 = e[2];
    const int64_t *restrict m2 = e[3], *restrict h2 = e[4], *restrict s2 = e[5];
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const int16_t *restrict ar = a + r * cols;
        const int32_t *restrict br = b + r * cols;
        int16_t *restrict o = out + r * cols;
        for (int64_t c = 0; c < cols; c++) {
            int64_t v = (((int64_t)ar[c] * m1[c] + h1[c]) >> s1[c]) + (((int64_t)br[c] * m2[c] + h2[c]) >> s2[c]);
            o[c] = (int16_t)clamp64(v, -qmax, qmax);
        }
    }
    for (int i = 0; i < 6; i++) free(e[i]);
    free(cst);
    (void)nt;
}

/* I-LayerNorm (ops.ilayernorm): int16 rows of C -> int8/int16 out. */
#define LN_Z_SHIFT 11 /* 31 - LN_Z_BITS */
#define DEF_LN(NAME, TOUT)                                                                         \
    void NAME(const int16_t *x, TOUT *out, int64_t rows, int64_t C, const int32_t *mult,           \
              const int32_t *shift, const int32_t *offset, int64_t qmax, int nt) {                 \
        int64_t *m64 = 0, *h64 = 0, *s64 = 0;                                                      \
        if (expand_consts(mult, shift, C, &m64, &h64, &s64)) return;                               \
        _Pragma("omp parallel for schedule(static)") for (int64_t r = 0; r < rows; r++) {          \
            const int16_t *restrict xr = x + r * C;                                                         \
            TOUT *restrict o = out + r * C;                                                                 \
            int64_t s = 0;                                                                         \
            for (int64_t c = 0; c < C; c++) s += xr[c];                                            \
            int64_t mean = floor_div(2 * s + C, 2 * C);                                            \
            int64_t var = 0;                                                                       \
            for (int64_t c = 0; c < C; c++) {                                                      \
                int64_t y = xr[c] - mean;                                                          \
                var += y * y;                                                                      \
            }                                                                                      \
            int64_t sd = isqrt64(var);                                                             \
            int64_t factor = 2147483647LL / (sd < 1 ? 1 : sd);                                     \
            const int64_t *restrict mm = m64, *restrict hh = h64, *restrict ss = s64;              \
            for (int64_t c = 0; c < C; c++) {                                                      \
                int64_t z = ((xr[c] - mean) * factor) >> LN_Z_SHIFT;                               \
                int64_t v = ((z * mm[c] + hh[c]) >> ss[c]) + offset[c];                            \
                o[c] = (TOUT)clamp64(v, -qmax, qmax);                                              \
            }                                                                                      \
        }                                                                                          \
        free(m64); free(h64); free(s64);                                                           \
        (void)nt;                                                                                  \
    }

DEF_LN(layernorm_i16_i8, int8_t)

static inline int64_t bitlen64(uint64_t v) { return v ? 64 - __builtin_clzll(v) : 0; }

/* I-LayerNorm with 32-bit intermediates (ops.ilayernorm32): int16 rows of C (C <= 8192) -> int8. */
void layernorm32_i16_i8(const int16_t *x, int8_t *out, int64_t rows, int64_t C, const int32_t *mult,
                        const int32_t *shift, const int32_t *offset, int64_t qmax, int nt) {
    int64_t *m64 = 0, *h64 = 0, *s64 = 0;
    if (expand_consts(mult, shift, C, &m64, &h64, &s64)) return;
    const int64_t bc = (31 - bitlen64((uint64_t)(C - 1))) / 2;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const int16_t *restrict xr = x + r * C;
        int8_t *restrict o = out + r * C;
        int64_t s = 0;
        for (int64_t c = 0; c < C; c++) s += xr[c];
        const int64_t mean = floor_div(s + (C >> 1), C);
        int64_t amax = 0;
        for (int64_t c = 0; c < C; c++) {
            int64_t y = xr[c] - mean;
            y = y < 0 ? -y : y;
            amax = y > amax ? y : amax;
        }
        int64_t k = bitlen64((uint64_t)amax) - bc;
        k = k < 0 ? 0 : k;
        /* V = floor(sum(y^2) / 4^k) exactly, from y = y' 2^k + r: sum y'^2 + ((2 sum y' r + (sum r^2 >> k)) >> k) */
        int64_t v2 = 0, a = 0, q = 0;
        for (int64_t c = 0; c < C; c++) {
            int64_t y = xr[c] - mean;
            int64_t yp = y >> k, r = y - (yp << k);
            v2 += yp * yp;
            a += yp * r;
            q += r * r;
        }
        const int64_t var = v2 + ((2 * a + (q >> k)) >> k);
        const int64_t sd = isqrt64(var);
        const int64_t f = (2147483647LL / (sd < 1 ? 1 : sd)) >> k;
        const int64_t *restrict mm = m64, *restrict hh = h64, *restrict ss = s64;
        for (int64_t c = 0; c < C; c++) {
            int64_t z = ((xr[c] - mean) * f + (1 << 10)) >> 11;
            int64_t v = ((z * mm[c] + hh[c]) >> ss[c]) + offset[c];
            o[c] = (int8_t)clamp64(v, -qmax, qmax);
        }
    }
    free(m64); free(h64); free(s64);
    (void)nt;
}

/* ShiftExp of I <= 0 (ops.shift_exp). */
/* q = floor(a / d) for 0 <= a <= 63 * d, 1 <= d < 2^52, without a division (vectorizable):
 * with inv = floor(2^58 / d) + 1, (a * inv) >> 58 is q or q + 1 (the excess a / 2^58 < 1) and
 * a * inv < 64 * 2^58 + a fits in uint64; one compare fixes the + 1. */
static inline int64_t udiv_small(int64_t a, int64_t d, uint64_t inv) {
    int64_t q = (int64_t)(((uint64_t)a * inv) >> 58);
    q -= (q * d > a);
    return q;
}

static inline int64_t shift_exp(int64_t x, int64_t x0, int64_t n, uint64_t inv) {
    int64_t xp = x + (x >> 1) - (x >> 4);
    if (xp < n * x0) xp = n * x0;
    int64_t q = udiv_small(-xp, -x0, inv); /* == floor(xp / x0): xp <= 0, x0 < 0 */
    int64_t r = xp - q * x0;
    return ((r >> 1) - x0) << (n - q);
}

#define DIV_NUM 4611686018427387903LL /* 2^62 - 1 */

/* Shiftmax of one row (ops.shiftmax): e holds the N input values on entry and is scratch after.
 * Masked positions (mr[j] != 0) are left out of the max and get probability 0.  Written as simple
 * separate loops so that each one vectorizes. */
static inline void shiftmax_row(int64_t *restrict e, int8_t *restrict p, int64_t N, int64_t x0, int64_t n,
                                uint64_t inv, int64_t k_out, const uint8_t *restrict mr) {
    if (mr)
        for (int64_t j = 0; j < N; j++) e[j] = mr[j] ? -((int64_t)1 << 40) : e[j];
    int64_t mx = INT64_MIN;
    for (int64_t j = 0; j < N; j++) mx = e[j] > mx ? e[j] : mx;
    for (int64_t j = 0; j < N; j++) {
        int64_t d = e[j] - mx;
        d = d > 0 ? 0 : d;
        e[j] = shift_exp(d, x0, n, inv);
    }
    if (mr)
        for (int64_t j = 0; j < N; j++) e[j] = mr[j] ? 0 : e[j];
    int64_t sum = 0;
    for (int64_t j = 0; j < N; j++) sum += e[j];
    const int64_t factor = DIV_NUM / (sum < 1 ? 1 : sum);
    const int64_t sh = 63 - k_out, half = (int64_t)1 << (sh - 1), qm = ((int64_t)1 << (k_out - 1)) - 1;
    for (int64_t j = 0; j < N; j++) {
        int64_t v = (e[j] * factor + half) >> sh;
        p[j] = (int8_t)(v > qm ? qm : v);
    }
}

/* Shiftmax over rows of N (ops.shiftmax); optional mask (uint8, (nW, N, N)), where row r of the
 * (B*nW, H, N, N) score tensor uses mask[(r / (H*N)) % nW][r % N][:]. Scratch: N int64 per thread. */
#define DEF_SHIFTMAX(NAME, TIN)                                                                    \
    int NAME(const TIN *x, int8_t *out, int64_t rows, int64_t N, int64_t x0, int64_t n,           \
              int64_t k_out, const uint8_t *mask, int64_t n_win, int64_t heads, int nt) {           \
        const uint64_t inv = ((uint64_t)1 << 58) / (uint64_t)(-x0) + 1;                             \
        int failed = 0;                                                                            \
        _Pragma("omp parallel") {                                                                  \
            int64_t *e = malloc(N * sizeof(int64_t));                                              \
            if (!e) {                                                                              \
                _Pragma("omp atomic write") failed = 1;                                            \
            }                                                                                      \
            _Pragma("omp barrier")                                                                 \
            if (!failed) {                                                                         \
                _Pragma("omp for schedule(static)") for (int64_t r = 0; r < rows; r++) {           \
                    const TIN *restrict xr = x + r * N;                                            \
                    const uint8_t *mr = 0;                                                         \
                    if (mask) mr = mask + (((r / (heads * N)) % n_win) * N + (r % N)) * N;         \
                    for (int64_t j = 0; j < N; j++) e[j] = xr[j];                                  \
                    shiftmax_row(e, out + r * N, N, x0, n, inv, k_out, mr);                        \
                }                                                                                  \
            }                                                                                      \
            free(e);                                                                               \
        }                                                                                          \
        (void)nt;                                                                                  \
        return failed;                                                                             \
    }

DEF_SHIFTMAX(shiftmax_i16, int16_t)
DEF_SHIFTMAX(shiftmax_i32, int32_t)

/* Shiftmax-rel of one row (ops.shiftmax_rel) in int32 lanes: s holds the N scores (|s| < 2^24), p gets
 * uint8 probabilities relative to the row maximum, the return value is their sum P.  M = floor(255 * 2^22 /
 * |x0|), |x0| <= 2^27.  Every intermediate fits int32 (see ops.shiftmax_rel): e' * M <= 255 * 2^22 and the
 * rounding half is at most 2^30.  q = floor(I_p / x0) in [0, 9] is counted with compares (no division), so
 * the loop vectorizes.  A fully masked row gives p = 0, P = 0. */
static inline int64_t shiftmax_rel_row(const int32_t *restrict s, uint8_t *restrict p, int64_t N, int32_t x0,
                                       int32_t M, const uint8_t *restrict mr) {
    int32_t mx = INT32_MIN;
    if (mr) {
        for (int64_t j = 0; j < N; j++) {
            int32_t v = mr[j] ? INT32_MIN : s[j];
            mx = v > mx ? v : mx;
        }
        if (mx == INT32_MIN) mx = 0; /* every position masked: all outputs become 0 below */
    } else {
        for (int64_t j = 0; j < N; j++) mx = s[j] > mx ? s[j] : mx;
    }
    const int32_t lo = 9 * x0;
    int32_t total = 0;
    for (int64_t j = 0; j < N; j++) {
        int32_t d = s[j] - mx;
        d = d > 0 ? 0 : d;
        int32_t xp = d + (d >> 1) - (d >> 4);
        xp = xp < lo ? lo : xp;
        int32_t q = 0;
        for (int32_t t = 1; t <= 9; t++) q += xp <= t * x0; /* floor(xp / x0) */
        int32_t r = xp - q * x0;
        int32_t e = (r >> 1) - x0;
        int32_t sh = 22 + q;
        int32_t v = (e * M + ((int32_t)1 << (sh - 1))) >> sh;
        v = v > 255 ? 255 : v;
        if (mr) v = mr[j] ? 0 : v;
        p[j] = (uint8_t)v;
        total += v;
    }
    return total;
}

/* Standalone shiftmax_rel over rows of N (mask as in shiftmax_i16). Returns nonzero on allocation failure. */
#define DEF_SHIFTMAX_REL(NAME, TIN)                                                                \
    int NAME(const TIN *x, uint8_t *out, int64_t rows, int64_t N, int64_t x0, const uint8_t *mask,  \
             int64_t n_win, int64_t heads, int nt) {                                               \
        const int32_t M = (int32_t)(((int64_t)255 << 22) / (-x0));                                 \
        int failed = 0;                                                                            \
        _Pragma("omp parallel") {                                                                  \
            int32_t *e = malloc(N * sizeof(int32_t));                                              \
            if (!e) {                                                                              \
                _Pragma("omp atomic write") failed = 1;                                            \
            }                                                                                      \
            _Pragma("omp barrier")                                                                 \
            if (!failed) {                                                                         \
                _Pragma("omp for schedule(static)") for (int64_t r = 0; r < rows; r++) {           \
                    const TIN *restrict xr = x + r * N;                                            \
                    const uint8_t *mr = 0;                                                         \
                    if (mask) mr = mask + (((r / (heads * N)) % n_win) * N + (r % N)) * N;         \
                    for (int64_t j = 0; j < N; j++) e[j] = (int32_t)xr[j];                         \
                    shiftmax_rel_row(e, out + r * N, N, (int32_t)x0, M, mr);                       \
                }                                                                                  \
            }                                                                                      \
            free(e);                                                                               \
        }                                                                                          \
        (void)nt;                                                                                  \
        return failed;                                                                             \
    }

DEF_SHIFTMAX_REL(shiftmax_rel_i16, int16_t)
DEF_SHIFTMAX_REL(shiftmax_rel_i32, int32_t)

/* attn_normalize (ops.attn_normalize): out[r, c] = round_shift(acc[r, c] * floor(2^30 / max(P_r, 1)), 14)
 * with P_r = sum_j p[r, j]; acc (rows, d) int32, p (rows, N) uint8. */
void attn_normalize_i32(const int32_t *acc, const uint8_t *p, int32_t *out, int64_t rows, int64_t d, int64_t N,
                        int nt) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        int64_t total = 0;
        for (int64_t j = 0; j < N; j++) total += p[r * N + j];
        const int64_t R = ((int64_t)1 << 30) / (total < 1 ? 1 : total);
        for (int64_t c = 0; c < d; c++) out[r * d + c] = (int32_t)(((int64_t)acc[r * d + c] * R + (1 << 13)) >> 14);
    }
    (void)nt;
}

/* Table lookup: out[i] = lut[x[i] + 128] for int8 x (elementwise ops of an 8-bit input). */
void lut_i8_i32(const int8_t *x, int32_t *out, int64_t n, const int32_t *lut, int nt) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) out[i] = lut[(int)x[i] + 128];
}

void lut_i8_i8(const int8_t *x, int8_t *out, int64_t n, const int8_t *lut, int nt) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) out[i] = lut[(int)x[i] + 128];
}

/* requantize int32 per channel to int8, then an int8 -> int8 table (fc1 -> act_in -> GELU -> act_out). */
void requant_lut_i32_i8(const int32_t *x, int8_t *out, int64_t rows, int64_t cols, const int32_t *mult,
                        const int32_t *shift, int64_t nch, int64_t qmax, const int8_t *lut, int nt) {
    int32_t *cst = malloc(2 * cols * sizeof(int32_t));
    int64_t *m64 = 0, *h64 = 0, *s64 = 0;
    if (!cst) return;
    for (int64_t c = 0; c < cols; c++) {
        cst[c] = mult[nch == 1 ? 0 : c];
        cst[cols + c] = shift[nch == 1 ? 0 : c];
    }
    if (expand_consts(cst, cst + cols, cols, &m64, &h64, &s64)) {
        free(cst);
        return;
    }
    const int64_t *restrict mm = m64, *restrict hh = h64, *restrict ss = s64;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const int32_t *restrict xr = x + r * cols;
        int8_t *restrict o = out + r * cols;
        for (int64_t c = 0; c < cols; c++) /* vectorized requantization, biased to 0..255 */
            o[c] = (int8_t)(clamp64(((int64_t)xr[c] * mm[c] + hh[c]) >> ss[c], -qmax, qmax) + 128);
        for (int64_t c = 0; c < cols; c++) o[c] = lut[(uint8_t)o[c]];
    }
    free(m64); free(h64); free(s64); free(cst);
    (void)nt;
}

int ivit_num_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

void ivit_set_num_threads(int n) {
#ifdef _OPENMP
    omp_set_num_threads(n);
#else
    (void)n;
#endif
}

/* ------------------------------------------------------------------------------------------------
 * Fused integer attention for one program pattern:
 *   scores = q @ k^T (int32) [+ bias (H, N, N) int32] -> requantize to int16 (per tensor)
 *   -> Shiftmax (k_out = 8, optional (nW, N, N) mask) -> ctx = probs @ v (int32)
 * q, k, v: int8 (BH, N, d) addressed as base + b*sB + h*sH + i*sN (d contiguous), BH = B * heads;
 * ctx: int32 written at ctx + b*oB + h*oH + i*oN.  Exactly the integers of the unfused ops.
 * With AVX-512 VNNI the two products use vpdpbusd (u8 x s8): q is offset to unsigned (q + 128) and
 * the offset removed with 128 * sum_k k[j, k]; probabilities are already in [0, 127].
 * ------------------------------------------------------------------------------------------------ */
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define IVIT_VNNI 1
#else
#define IVIT_VNNI 0
#endif

int ivit_has_vnni(void) { return IVIT_VNNI; }

static inline void softmax_row(const int32_t *restrict s, int8_t *restrict p, int64_t N, int64_t m, int64_t sh,
                               int64_t sq, int64_t x0, int64_t n, uint64_t inv, const uint8_t *restrict mr,
                               int64_t *restrict e) {
    /* requantize to the score width (sq = its qmax), then the same Shiftmax as shiftmax_i16 */
    const int64_t half = (int64_t)1 << (sh - 1);
    for (int64_t j = 0; j < N; j++) e[j] = clamp64(((int64_t)s[j] * m + half) >> sh, -sq, sq);
    shiftmax_row(e, p, N, x0, n, inv, 8, mr);
}

int attention_i8(const int8_t *q, const int8_t *k, const int8_t *v, int32_t *ctx, int64_t B, int64_t H,
                  int64_t N, int64_t d, int64_t qB, int64_t qH, int64_t qN, int64_t kB, int64_t kH, int64_t kN,
                  int64_t vB, int64_t vH, int64_t vN, int64_t oB, int64_t oH, int64_t oN, const int32_t *bias,
                  int64_t s_mult, int64_t s_shift, int64_t s_qmax, int64_t x0, int64_t n, const uint8_t *mask,
                  int64_t n_win, int64_t mode, int nt) {
    const uint64_t inv = ((uint64_t)1 << 58) / (uint64_t)(-x0) + 1;
    const int32_t rel_m = mode == 1 ? (int32_t)(((int64_t)255 << 22) / (-x0)) : 0;
    const int64_t n16 = (N + 15) / 16 * 16, n4 = (N + 3) / 4 * 4;
    int failed = 0;
#pragma omp parallel
    {
        int32_t *srow = malloc(n16 * sizeof(int32_t));
        int64_t *e = malloc(N * sizeof(int64_t));
        uint8_t *prow = malloc(n4 + 64);
        int8_t *kp = malloc(d * n16 + 64);   /* [d/4][n16][4] */
        int32_t *ksum = malloc(n16 * sizeof(int32_t));
        int8_t *vp = malloc(n4 * d + 64);    /* [n4/4][d][4] */
        uint8_t *qu = malloc(d + 64);
        int ok = srow && e && prow && kp && ksum && vp && qu;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (int64_t bh = 0; bh < B * H; bh++) {
                const int64_t b = bh / H, h = bh % H;
                const int8_t *qb = q + b * qB + h * qH, *kb = k + b * kB + h * kH, *vb = v + b * vB + h * vH;
                int32_t *ob = ctx + b * oB + h * oH;
                const uint8_t *mb = mask ? mask + ((b % n_win) * N) * N : 0;
                const int32_t *biasb = bias ? bias + h * N * N : 0;
                /* pack k and v */
                for (int64_t j = 0; j < n16; j++) {
                    int32_t acc = 0;
                    for (int64_t c = 0; c < d; c++) {
                        int8_t kv = j < N ? kb[j * kN + c] : 0;
                        kp[((c >> 2) * n16 + j) * 4 + (c & 3)] = kv;
                        acc += kv;
                    }
                    ksum[j] = acc * 128;
                }
                for (int64_t j = 0; j < n4; j++)
                    for (int64_t c = 0; c < d; c++) vp[((j >> 2) * d + c) * 4 + (j & 3)] = j < N ? vb[j * vN + c] : 0;
                for (int64_t i = 0; i < N; i++) {
                    const int8_t *qi = qb + i * qN;
#if IVIT_VNNI
                    for (int64_t c = 0; c < d; c++) qu[c] = (uint8_t)(qi[c] + 128);
                    for (int64_t jb = 0; jb < n16; jb += 16) {
                        __m512i acc = _mm512_setzero_si512();
                        for (int64_t c = 0; c < d; c += 4) {
                            uint32_t w;
                            __builtin_memcpy(&w, qu + c, 4);
                            __m512i kv = _mm512_loadu_si512((const void *)(kp + ((c >> 2) * n16 + jb) * 4));
                            acc = _mm512_dpbusd_epi32(acc, _mm512_set1_epi32((int)w), kv);
                        }
                        acc = _mm512_sub_epi32(acc, _mm512_loadu_si512((const void *)(ksum + jb)));
                        _mm512_storeu_si512((void *)(srow + jb), acc);
                    }
#else
                    for (int64_t j = 0; j < N; j++) {
                        int32_t acc = 0;
                        for (int64_t c = 0; c < d; c++) acc += (int32_t)qi[c] * (int32_t)kb[j * kN + c];
                        srow[j] = acc;
                    }
#endif
                    if (biasb)
                        for (int64_t j = 0; j < N; j++)
                            srow[j] = (int32_t)((int64_t)srow[j] + (int64_t)biasb[i * N + j]);
                    int64_t total = 0;
                    if (mode == 1) {
                        const int64_t half = (int64_t)1 << (s_shift - 1);
                        for (int64_t j = 0; j < N; j++) /* requantize in place to the score width */
                            srow[j] = (int32_t)clamp64(((int64_t)srow[j] * s_mult + half) >> s_shift, -s_qmax, s_qmax);
                        total = shiftmax_rel_row(srow, prow, N, (int32_t)x0, rel_m, mb ? mb + i * N : 0);
                    } else {
                        softmax_row(srow, (int8_t *)prow, N, s_mult, s_shift, s_qmax, x0, n, inv,
                                    mb ? mb + i * N : 0, e);
                    }
                    const int64_t R = ((int64_t)1 << 30) / (total < 1 ? 1 : total);
                    for (int64_t j = N; j < n4; j++) prow[j] = 0;
                    int32_t *oi = ob + i * oN;
#if IVIT_VNNI
                    if (d % 16 == 0) {
                        for (int64_t cb = 0; cb < d; cb += 16) {
                            __m512i acc = _mm512_setzero_si512();
                            for (int64_t j = 0; j < n4; j += 4) {
                                uint32_t w;
                                __builtin_memcpy(&w, prow + j, 4);
                                __m512i vv = _mm512_loadu_si512((const void *)(vp + ((j >> 2) * d + cb) * 4));
                                acc = _mm512_dpbusd_epi32(acc, _mm512_set1_epi32((int)w), vv);
                            }
                            _mm512_storeu_si512((void *)(oi + cb), acc);
                        }
                    } else
#endif
                    {
                        for (int64_t c = 0; c < d; c++) {
                            int32_t acc = 0;
                            for (int64_t j = 0; j < N; j++) acc += (int32_t)prow[j] * (int32_t)vb[j * vN + c];
                            oi[c] = acc;
                        }
                    }
                    if (mode == 1) /* ops.attn_normalize: round_shift(acc * floor(2^30 / P), 14) */
                        for (int64_t c = 0; c < d; c++) oi[c] = (int32_t)(((int64_t)oi[c] * R + (1 << 13)) >> 14);
                }
            }
        }
        free(srow); free(e); free(prow); free(kp); free(ksum); free(vp); free(qu);
    }
    (void)nt;
    return failed;
}
