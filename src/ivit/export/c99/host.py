"""Build and run generated C on the host: the strict compile flags, an object cache and a harness.

``HOST_FLAGS`` are the issue's proof flags: ``-std=c99 -O2 -Wall -Wextra -Werror -pedantic`` plus
``-mgeneral-regs-only`` (x86-64 and AArch64), with which gcc refuses any floating-point or vector
code.  Compiled objects are cached by the hash of compiler, flags and sources (``IVIT_C99_CACHE``,
default a folder under the system temporary directory), so tests and benchmarks rebuild only what
changed.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ...errors import IvitError

__all__ = ["STRICT_FLAGS", "HOST_FLAGS", "host_cc", "compile_c", "link", "cache_dir", "HOST_HARNESS",
           "build_host_harness", "run_host_harness", "time_host_harness"]

STRICT_FLAGS = ("-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic")


def _no_fpu_flags() -> tuple[str, ...]:
    return ("-mgeneral-regs-only",) if platform.machine().lower() in ("x86_64", "amd64", "aarch64", "arm64") else ()


#: flags of every host build of generated code (the harness included)
HOST_FLAGS = STRICT_FLAGS + _no_fpu_flags()


def host_cc() -> str | None:
    """The system C compiler (``$CC`` or ``cc``), or None."""
    return shutil.which(os.environ.get("CC", "cc"))


def cache_dir() -> Path:
    d = Path(os.environ.get("IVIT_C99_CACHE") or Path(tempfile.gettempdir()) / f"ivit-c99-cache-{os.getuid()}")
    d.mkdir(parents=True, exist_ok=True)
    return d


def compile_c(cc: str, source: Path, flags: Sequence[str], headers: Sequence[Path] = (),
              cache: Path | None = None) -> Path:
    """Compile one C file to an object (cached by compiler, flags, source and the given headers).

    Raises ``IvitError`` with the compiler's first lines when it fails (a warning fails too: -Werror)."""
    cache = cache or cache_dir()
    h = hashlib.sha256()
    h.update(cc.encode() + b"\0" + "\0".join(flags).encode())
    for p in (source, *sorted(headers)):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    obj = cache / f"{source.stem}-{h.hexdigest()[:24]}.o"
    if obj.exists():
        return obj
    tmp = obj.with_suffix(f".{os.getpid()}.tmp.o")
    r = subprocess.run([cc, *flags, "-I", str(source.parent), "-c", str(source), "-o", str(tmp)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise IvitError(f"{Path(cc).name} failed on {source.name}: " + " | ".join(msg[:6]))
    os.replace(tmp, obj)
    return obj


def link(cc: str, objects: Sequence[Path], out: Path, flags: Sequence[str] = ()) -> Path:
    r = subprocess.run([cc, *flags, *map(str, objects), "-o", str(out)], capture_output=True, text=True)
    if r.returncode != 0:
        raise IvitError(f"linking {out.name} failed: " + " | ".join((r.stderr or r.stdout).strip().splitlines()[:6]))
    return out


#: host harness: ``harness IN OUT`` runs every image of IN (raw uint8, IVIT_INPUT_BYTES per call) and
#: writes the int32 logits to OUT; ``harness IN - REPEAT`` times REPEAT calls on the first input and prints
#: ``min_ns median_ns``.
HOST_HARNESS = r"""
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "model.h"

static uint64_t arena[(IVIT_ARENA_BYTES + 7) / 8];

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + (long long)t.tv_nsec;
}

int main(int argc, char **argv) {
    FILE *f;
    long size, n, i;
    uint8_t *pix;
    int32_t *out;
    if (argc < 3) {
        fprintf(stderr, "usage: %s IN OUT | %s IN - REPEAT\n", argv[0], argv[0]);
        return 2;
    }
    f = fopen(argv[1], "rb");
    if (f == NULL) return 3;
    fseek(f, 0, SEEK_END);
    size = ftell(f);
    fseek(f, 0, SEEK_SET);
    n = size / IVIT_INPUT_BYTES;
    if (n < 1 || n * IVIT_INPUT_BYTES != size) return 4;
    pix = (uint8_t *)malloc((size_t)size);
    out = (int32_t *)malloc((size_t)n * IVIT_BATCH * IVIT_OUTPUT_SIZE * sizeof(int32_t));
    if (pix == NULL || out == NULL || fread(pix, 1, (size_t)size, f) != (size_t)size) return 5;
    fclose(f);
    if (strcmp(argv[2], "-") == 0) {
        long reps = argc > 3 ? atol(argv[3]) : 100, r, j;
        long long *t = (long long *)malloc((size_t)reps * sizeof(long long));
        if (t == NULL || reps < 1) return 6;
        for (r = 0; r < 3; r++) ivit_run(pix, out, arena);
        for (r = 0; r < reps; r++) {
            long long t0 = now_ns();
            if (ivit_run(pix, out, arena) != IVIT_OK) return 7;
            t[r] = now_ns() - t0;
        }
        for (r = 1; r < reps; r++)
            for (j = r; j > 0 && t[j - 1] > t[j]; j--) {
                long long s = t[j];
                t[j] = t[j - 1];
                t[j - 1] = s;
            }
        printf("%lld %lld\n", t[0], t[reps / 2]);
        return 0;
    }
    for (i = 0; i < n; i++) {
        int rc = ivit_run(pix + i * IVIT_INPUT_BYTES, out + i * IVIT_BATCH * IVIT_OUTPUT_SIZE, arena);
        if (rc != IVIT_OK) {
            fprintf(stderr, "ivit_run returned %d\n", rc);
            return 8;
        }
    }
    f = fopen(argv[2], "wb");
    if (f == NULL) return 9;
    if (fwrite(out, sizeof(int32_t), (size_t)(n * IVIT_BATCH * IVIT_OUTPUT_SIZE), f)
            != (size_t)(n * IVIT_BATCH * IVIT_OUTPUT_SIZE)) return 10;
    fclose(f);
    return 0;
}
"""


def _headers(d: Path) -> list[Path]:
    return sorted(d.glob("*.h"))


def build_host_harness(module_dir: Path, work: Path, cc: str | None = None, flags: Sequence[str] = HOST_FLAGS,
                       link_flags: Sequence[str] = ()) -> Path:
    """Compile ``model.c``, ``model_weights.c`` and the harness with ``flags`` and link ``work/harness``."""
    cc = cc or host_cc()
    if cc is None:
        raise IvitError("no C compiler found (install gcc or set CC)")
    module_dir = Path(module_dir)
    work.mkdir(parents=True, exist_ok=True)
    hdr = _headers(module_dir)
    harness = module_dir / "harness_host.c"
    if not harness.exists():
        harness = work / "harness_host.c"
        harness.write_text(HOST_HARNESS)
        shutil.copy(module_dir / "model.h", work / "model.h")
    objs = [compile_c(cc, module_dir / n, flags, hdr) for n in ("model.c", "model_weights.c")]
    objs.append(compile_c(cc, harness, flags, hdr))
    return link(cc, objs, work / "harness", link_flags)


def run_host_harness(exe: Path, pixels: Tensor, work: Path, timeout: float = 600) -> Tensor:
    """Run the harness on uint8 ``pixels`` (N, C, H, W), N a multiple of the batch; returns int32 logits (N, K)."""
    inp, outp = work / "pixels.bin", work / "logits.bin"
    inp.write_bytes(pixels.contiguous().numpy().tobytes())
    r = subprocess.run([str(exe), str(inp), str(outp)], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise IvitError(f"C harness failed (exit {r.returncode}): {r.stderr.strip()[:300]}")
    data = np.frombuffer(outp.read_bytes(), dtype=np.int32).copy()
    return torch.from_numpy(data).reshape(pixels.shape[0], -1)


def time_host_harness(exe: Path, pixels: Tensor, work: Path, repeat: int = 200) -> tuple[float, float]:
    """(min, median) seconds of one ``ivit_run`` call on the first input of ``pixels``."""
    inp = work / "pixels_time.bin"
    inp.write_bytes(pixels.contiguous().numpy().tobytes())
    r = subprocess.run([str(exe), str(inp), "-", str(repeat)], capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise IvitError(f"C harness failed (exit {r.returncode}): {r.stderr.strip()[:300]}")
    lo, med = (int(v) for v in r.stdout.split())
    return lo / 1e9, med / 1e9


def write_files(files: Mapping[str, str], d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)
