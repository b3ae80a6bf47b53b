"""This CPU's int8 ``vpdpbusd`` peak on one core: the yardstick for the GOPS of ``compiled_profile.py``.

Compiles (``cc -O2 -march=native``) and runs a loop of ``--chains`` independent 512-bit ``vpdpbusd``
accumulator chains (64 multiply-accumulates each, 2 int8 ops per multiply-accumulate) and prints the best
of ``--runs`` runs in int8 GOPS, one thread.  Needs a C compiler and a CPU with AVX-512 VNNI.

Example::

    python benchmarks/vnni_peak.py --runs 16
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

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
    p.add_argument("--runs", type=int, default=16, help="runs; the best is printed")
    a = p.parse_args()
    if not 1 <= a.chains <= 30 or a.runs < 1:
        raise SystemExit("vnni_peak: --chains must be 1-30 and --runs at least 1")
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("vnni_peak: no C compiler (cc or gcc) on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "peak.c", Path(tmp) / "peak"
        src.write_text(SOURCE)
        r = subprocess.run(
            [cc, "-O2", "-march=native", "-mavx512f", "-mavx512vnni", f"-DCHAINS={a.chains}", str(src), "-o", str(exe)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise SystemExit(f"vnni_peak: the compiler failed: {(r.stderr.strip().splitlines() or ['no message'])[-1]}")
        best = []
        for _ in range(a.runs):
            out = subprocess.run([str(exe)], capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"vnni_peak: the loop did not run (no AVX-512 VNNI here?), exit {out.returncode}")
            best.append(float(out.stdout.split()[0]))
    best.sort()
    print(
        f"vpdpbusd zmm, {a.chains} chains, one thread: best {best[-1]:.0f} int8 GOPS, "
        f"median {best[len(best) // 2]:.0f} ({a.runs} runs)"
    )


if __name__ == "__main__":
    main()
