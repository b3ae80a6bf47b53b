"""This CPU's int8 ``vpdpbusd`` peak on one core: the yardstick for the GOPS of ``compiled_profile.py``.

Compiles, with the compiled backend's compiler and ``-march`` (``ivit.backends.compiled.build``), a loop of
``--chains`` independent 512-bit ``vpdpbusd`` accumulator chains (64 multiply-accumulates each, 2 int8 ops per
multiply-accumulate), runs it ``--runs`` times and prints the best and the median rate in int8 GOPS, one
thread.  Needs the backend's AVX-512 VNNI code path.

Example::

    python benchmarks/vnni_peak.py --runs 16
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from ivit.backends.compiled import build

SOURCE = r"""
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
int main(void) {
    __m512i acc[CHAINS];
    __m512i x = _mm512_set1_epi8(3), y = _mm512_set1_epi8(5);
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_epi32(i);
    const long n = 400000000L / CHAINS;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long k = 0; k < n; k++) {
#pragma GCC unroll 32
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], x, y);
        __asm__ volatile("" : "+v"(x)); /* x is opaque each iteration: nothing is hoisted */
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    const double s = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    int r = 0;
    for (int i = 0; i < CHAINS; i++) r += _mm512_reduce_add_epi32(acc[i]);
    printf("%.3f %d\n", (double)n * CHAINS * 64 * 2 / s / 1e9, r & 1);
    return 0;
}
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chains", type=int, default=16, help="independent accumulators (1-30)")
    p.add_argument("--runs", type=int, default=16, help="runs; the best and the median are printed")
    a = p.parse_args()
    if not 1 <= a.chains <= 30 or a.runs < 1:
        raise SystemExit("vnni_peak: --chains must be 1-30 and --runs at least 1")
    if not build.available():
        raise SystemExit(f"vnni_peak: no working C compiler ({build.cc()})")
    if build.detect_isa() != 2:
        raise SystemExit(f"vnni_peak: {build.cc()} -march={build.march()} has no AVX-512 VNNI code path here")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "peak.c", Path(tmp) / "peak"
        src.write_text(SOURCE)
        cmd = [build.cc(), "-O2", f"-march={build.march()}", f"-DCHAINS={a.chains}", str(src), "-o", str(exe)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise SystemExit(f"vnni_peak: the compiler failed: {(r.stderr.strip().splitlines() or ['no message'])[-1]}")
        rates = []
        for _ in range(a.runs):
            out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
            if out.returncode != 0:
                raise SystemExit(f"vnni_peak: the loop failed, exit {out.returncode}")
            rates.append(float(out.stdout.split()[0]))
    rates.sort()
    print(
        f"vpdpbusd zmm, {a.chains} chains, one thread: best {rates[-1]:.0f} int8 GOPS, "
        f"median {rates[len(rates) // 2]:.0f} ({a.runs} runs)"
    )


if __name__ == "__main__":
    main()
