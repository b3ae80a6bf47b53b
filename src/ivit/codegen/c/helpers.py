"""Shared static C helpers of generated ``model.c`` files, each emitted only when a kernel uses it.

Every helper states its formula, bit widths and rounding; they mirror ``ivit.ops`` exactly (the
integer specification) and use nothing beyond ``<stdint.h>``.  The generated code assumes what gcc,
clang and arm-none-eabi-gcc guarantee: ``>>`` of a negative integer is an arithmetic shift (floor) and
``int`` has at least 32 bits; ``model.c`` checks both at compile time.
"""

from __future__ import annotations

__all__ = ["HELPERS", "helper_closure"]

#: name -> (C code, names of the helpers it uses)
HELPERS: dict[str, tuple[str, tuple[str, ...]]] = {}


def _h(name: str, code: str, deps: tuple[str, ...] = ()) -> None:
    HELPERS[name] = (code.strip("\n"), deps)


_h("ivit_rshift64", """
/* round_shift(v, s) = (v + 2^(s-1)) >> s: v / 2^s rounded half up (1 <= s <= 62, |v| < 2^62). */
static inline int64_t ivit_rshift64(int64_t v, int32_t s) { return (v + ((int64_t)1 << (s - 1))) >> s; }
""")

_h("ivit_clamp64", """
static inline int64_t ivit_clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }
""")

_h("ivit_clamp32", """
static inline int32_t ivit_clamp32(int32_t v, int32_t lo, int32_t hi) { return v < lo ? lo : (v > hi ? hi : v); }
""")

_h("ivit_floordiv64", """
/* floor(a / b) (C's / truncates toward zero). */
static inline int64_t ivit_floordiv64(int64_t a, int64_t b) {
    int64_t q = a / b;
    if ((a % b != 0) && ((a < 0) != (b < 0))) q -= 1;
    return q;
}
""")

_h("ivit_floordiv32", """
/* floor(a / b) (C's / truncates toward zero). */
static inline int32_t ivit_floordiv32(int32_t a, int32_t b) {
    int32_t q = a / b;
    if ((a % b != 0) && ((a < 0) != (b < 0))) q -= 1;
    return q;
}
""")

_h("ivit_isqrt64", """
/* floor(sqrt(v)), exact, digit by digit (shifts, adds and compares only). */
static uint64_t ivit_isqrt64(uint64_t v) {
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
""")

_h("ivit_isqrt32", """
/* floor(sqrt(v)), exact, digit by digit (shifts, adds and compares only). */
static uint32_t ivit_isqrt32(uint32_t v) {
    uint32_t r = 0, bit = (uint32_t)1 << 30;
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
""")

_h("ivit_bitlen32", """
/* Number of bits of v (0 for 0). */
static inline int32_t ivit_bitlen32(uint32_t v) {
    int32_t n = 0;
    while (v != 0) {
        n++;
        v >>= 1;
    }
    return n;
}
""")

_h("ivit_shift_exp", """
/* ShiftExp (ops.shift_exp), 64-bit: integer exp(S * x) for x <= 0, exp(0) -> |x0| * 2^n (x0 <= -1):
 *   xp = max(x + (x >> 1) - (x >> 4), n * x0);  q = floor(xp / x0) in [0, n];  r = xp - q * x0;
 *   E = ((r >> 1) - x0) << (n - q)   (0 < E <= |x0| * 2^n <= 2^62) */
static inline int64_t ivit_shift_exp(int64_t x, int64_t x0, int32_t n) {
    int64_t xp = x + (x >> 1) - (x >> 4);
    if (xp < n * x0) xp = n * x0;
    const int64_t q = (-xp) / (-x0); /* floor(xp / x0): both <= 0 */
    const int64_t r = xp - q * x0;
    return ((r >> 1) - x0) << (n - (int32_t)q);
}
""")

_h("ivit_shiftmax_row", """
/* Shiftmax of one row (ops.shiftmax), in place: e holds the N scores on entry, the probabilities
 * min(round_shift(E * floor((2^62 - 1) / sum(E)), 63 - k_out), 2^(k_out-1) - 1) on return, with
 * E = shift_exp(min(x - max(x), 0)).  Masked positions (mask[j] != 0) are filled with -2^40 before the
 * maximum and get E = 0.  64-bit: sum(E) <= N * |x0| * 2^n <= 2^62, E * factor <= 2^62 - 1. */
static void ivit_shiftmax_row(int64_t *e, int32_t N, const uint8_t *mask, int64_t x0, int32_t n, int32_t k_out) {
    int64_t mx = INT64_MIN, sum = 0, factor, half, qm;
    int32_t j, sh;
    for (j = 0; j < N; j++) {
        if (mask != NULL && mask[j] != 0) e[j] = -((int64_t)1 << 40);
        if (e[j] > mx) mx = e[j];
    }
    for (j = 0; j < N; j++) {
        int64_t d = e[j] - mx;
        if (d > 0) d = 0;
        e[j] = (mask != NULL && mask[j] != 0) ? 0 : ivit_shift_exp(d, x0, n);
        sum += e[j];
    }
    factor = INT64_C(4611686018427387903) / (sum < 1 ? 1 : sum); /* floor((2^62 - 1) / sum) */
    sh = 63 - k_out;
    half = (int64_t)1 << (sh - 1);
    qm = ((int64_t)1 << (k_out - 1)) - 1;
    for (j = 0; j < N; j++) {
        const int64_t v = (e[j] * factor + half) >> sh;
        e[j] = v > qm ? qm : v;
    }
}
""", ("ivit_shift_exp",))

_h("ivit_shiftmax_rel_row", """
/* Shiftmax-rel of one row (ops.shiftmax_rel), 32-bit: s holds N scores (|s| < 2^24), p gets
 *   d = min(s - max(s), 0);  xp = max(d + (d >> 1) - (d >> 4), 9 * x0);  q = floor(xp / x0) in [0, 9];
 *   r = xp - q * x0;  e = (r >> 1) - x0;  p = min(round_shift(e * M, 22 + q), 255),  M = floor(255 * 2^22 / |x0|)
 * (the maximum of unmasked positions; masked positions (mask[j] != 0) get 0).  Returns P = sum(p) <= 255 * N.
 * Every intermediate fits int32: |xp| < 2^26, e * M <= 255 * 2^22 < 2^30, 22 + q <= 31. */
static int32_t ivit_shiftmax_rel_row(const int32_t *s, uint8_t *p, int32_t N, const uint8_t *mask, int32_t x0,
                                     int32_t M) {
    int32_t mx = INT32_MIN, total = 0, any = 0, j;
    for (j = 0; j < N; j++) {
        if (mask != NULL && mask[j] != 0) continue;
        if (s[j] > mx) mx = s[j];
        any = 1;
    }
    for (j = 0; j < N; j++) {
        int32_t d, xp, q, r, e, sh, v;
        if (!any || (mask != NULL && mask[j] != 0)) {
            p[j] = 0;
            continue;
        }
        d = s[j] - mx;
        if (d > 0) d = 0;
        xp = d + (d >> 1) - (d >> 4);
        if (xp < 9 * x0) xp = 9 * x0;
        q = (-xp) / (-x0); /* floor(xp / x0): both <= 0 */
        r = xp - q * x0;
        e = (r >> 1) - x0;
        sh = 22 + q;
        v = (e * M + ((int32_t)1 << (sh - 1))) >> sh;
        v = v > 255 ? 255 : v;
        p[j] = (uint8_t)v;
        total += v;
    }
    return total;
}
""")


def helper_closure(names: set[str]) -> list[str]:
    """``names`` and every helper they use, in definition order (dependencies first)."""
    need: set[str] = set()

    def add(n: str) -> None:
        if n in need:
            return
        need.add(n)
        for d in HELPERS[n][1]:
            add(d)

    for n in names:
        add(n)
    return [n for n in HELPERS if n in need]
