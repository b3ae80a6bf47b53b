"""Build, cache and load a generated model library.

The source is compiled with the system C compiler (``cc -O3 -march=native -fopenmp -shared``) into
``$IVIT_CACHE`` (``ivit.native.build_library``: the file name hashes the source, the flags and the CPU's
feature flags, so a machine builds each model once).  ``IVIT_NATIVE_MARCH`` sets ``-march`` (e.g.
``x86-64-v3`` builds the exact AVX2 path a CPU without VNNI runs; ``x86-64`` the portable C path).

The code path (``isa``: 2 AVX-512 VNNI, 1 AVX2, 0 portable) is what the compiler's predefined macros say
for those flags; the weights are packed for it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

from ... import native

__all__ = ["cc", "march", "flags", "detect_isa", "build", "load", "available", "ISA_NAMES"]

ISA_NAMES = {2: "avx512vnni", 1: "avx2", 0: "portable"}
_ISA2 = ("__AVX512F__", "__AVX512BW__", "__AVX512VL__", "__AVX512DQ__", "__AVX512VNNI__")


def cc() -> str:
    return os.environ.get("CC", "cc")


def march() -> str:
    m = os.environ.get("IVIT_NATIVE_MARCH", "native")
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", m):
        raise ValueError(f"bad IVIT_NATIVE_MARCH {m!r}")
    return m


def flags(profile: bool = False) -> list[str]:
    f = ["-O3", f"-march={march()}", "-fopenmp", "-fPIC", "-shared", "-std=gnu11", "-fno-math-errno",
         "-fno-strict-aliasing"]
    return [*f, "-DIVIT_PROFILE"] if profile else f


@functools.lru_cache(maxsize=8)
def _macros(compiler: str, arch: str) -> frozenset[str]:
    res = subprocess.run([compiler, f"-march={arch}", "-dM", "-E", "-x", "c", os.devnull], capture_output=True,
                         text=True, timeout=60, check=True)
    return frozenset(ln.split()[1] for ln in res.stdout.splitlines() if ln.startswith("#define "))


def detect_isa() -> int:
    """The code path the compiler builds with the current flags: 2, 1 or 0."""
    m = _macros(cc(), march())
    if all(x in m for x in _ISA2):
        return 2
    if "__AVX2__" in m:
        return 1
    return 0


@functools.lru_cache(maxsize=1)
def _compiler_works() -> bool:
    if shutil.which(cc()) is None:
        return False
    try:
        detect_isa()
    except (OSError, subprocess.SubprocessError, ValueError):
        return False
    return True


def available() -> bool:
    """Whether a C compiler with OpenMP is here (checked once)."""
    return _compiler_works()


def build(source: str, profile: bool = False) -> Path:
    """Compile ``source`` (cached by content, flags and CPU); returns the shared library's path."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    d = native.cache_dir() / "compiled"
    d.mkdir(parents=True, exist_ok=True)
    src = d / f"model-{digest}.c"
    if not src.exists():
        tmp = src.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        os.replace(tmp, src)
    try:
        return native.build_library([src], flags(profile), f"ivit_model{'_prof' if profile else ''}", cc())
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"compiled backend: cc failed on {src}: {e.stderr.decode(errors='replace')[:2000]}") from e
    except (OSError, subprocess.SubprocessError) as e:  # no compiler any more, a timeout
        raise RuntimeError(f"compiled backend: cc failed on {src}: {e}") from e


_LIBS: dict[Path, ctypes.CDLL] = {}


def load(path: Path) -> ctypes.CDLL:
    lib = _LIBS.get(path)
    if lib is None:
        lib = ctypes.CDLL(str(path))
        lib.ivit_model_run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                       ctypes.c_void_p, ctypes.c_int]
        lib.ivit_model_run.restype = ctypes.c_int
        lib.ivit_model_isa.restype = ctypes.c_int
        lib.ivit_model_thread_bytes.restype = ctypes.c_int64
        lib.ivit_model_profile.argtypes = [ctypes.c_void_p]
        lib.ivit_model_profile.restype = ctypes.c_int
        _LIBS[path] = lib
    return lib
