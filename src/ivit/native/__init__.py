"""Native integer kernels: build, cache and load the C library, and prove it has no floating point.

All ``csrc/*.c`` files are compiled together with the system C compiler into one shared library
(``cc -O3 -march=native -fopenmp -fPIC -shared``), cached per machine, source and flags under
``$IVIT_CACHE`` (default ``~/.cache/ivit``), and called through ``ctypes``.  Modules that wrap C
functions declare their ctypes signatures with ``register_signatures``.

Environment:
    ``IVIT_NO_CKERNELS=1``   no native library (every caller falls back to exact torch ops);
    ``IVIT_NATIVE_MARCH``    ``-march`` value (default ``native``); e.g. ``x86-64-v3`` builds the
                             AVX2 code paths a CPU without VNNI runs, to test them on any machine;
    ``CC``                   the C compiler.

``fp_instructions(path)`` disassembles a built library and lists every floating-point arithmetic or
conversion instruction in it; the integer-only proof requires that list to be empty.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

__all__ = [
    "library",
    "available",
    "library_path",
    "register_signatures",
    "build_library",
    "fp_instructions",
    "cpu_flags",
    "set_threads",
]

CSRC = Path(__file__).parent / "csrc"

_P = ctypes.c_void_p
_SIGNATURES: dict[str, tuple[list[Any], Any]] = {
    "ivit_set_num_threads": ([ctypes.c_int], None),
    "ivit_num_threads": ([], ctypes.c_int),
    "ivit_has_vnni": ([], ctypes.c_int),
}
_LIB: ctypes.CDLL | None = None
_LIB_PATH: Path | None = None
_FAILED = False


def register_signatures(sigs: dict[str, tuple[list[Any], Any]]) -> None:
    """Declare ``name -> (argtypes, restype)`` of C functions; applied when the library loads."""
    _SIGNATURES.update(sigs)
    if _LIB is not None:
        _apply(_LIB, sigs)


def _apply(lib: ctypes.CDLL, sigs: dict[str, tuple[list[Any], Any]]) -> None:
    for name, (argtypes, restype) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = restype


def cache_dir() -> Path:
    base = os.environ.get("IVIT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                        "ivit")
    return Path(base)


def cpu_flags() -> set[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _flags() -> list[str]:
    march = os.environ.get("IVIT_NATIVE_MARCH", "native")
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", march):
        raise ValueError(f"bad IVIT_NATIVE_MARCH {march!r}")
    return ["-O3", f"-march={march}", "-fopenmp", "-fPIC", "-shared", "-std=c11", "-fno-math-errno"]


def build_library(sources: list[Path], flags: list[str], name: str, cc: str | None = None) -> Path:
    """Compile ``sources`` into a shared library cached by content, flags and machine; returns its path.

    Raises ``OSError``/``subprocess.SubprocessError`` when the compiler is missing or fails."""
    cc = cc or os.environ.get("CC", "cc")
    h = hashlib.sha256()
    for s in sorted(sources):
        h.update(s.name.encode() + b"\0" + s.read_bytes())
    h.update(" ".join([cc, *flags]).encode())
    h.update(f"{platform.machine()}|{sorted(cpu_flags())}".encode())
    out = cache_dir() / f"{name}-{h.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *flags, "-o", tmp, *map(str, sorted(sources))], check=True, capture_output=True,
                       timeout=300)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def library() -> ctypes.CDLL | None:
    """The loaded kernel library (built on first use), or None without a working C compiler."""
    global _LIB, _LIB_PATH, _FAILED
    if _LIB is not None or _FAILED:
        return _LIB
    if os.environ.get("IVIT_NO_CKERNELS") == "1":
        _FAILED = True
        return None
    try:
        path = build_library(sorted(CSRC.glob("*.c")), _flags(), "ivit_kernels")
        lib = ctypes.CDLL(str(path))
        _apply(lib, _SIGNATURES)
    except (OSError, subprocess.SubprocessError, AttributeError, ValueError) as e:
        _FAILED = True
        msg = e.stderr.decode(errors="replace")[:300] if isinstance(e, subprocess.CalledProcessError) else str(e)
        warnings.warn(f"ivit: C kernels unavailable ({msg.strip()}); the fast backend uses exact torch ops only",
                      RuntimeWarning, stacklevel=2)
        return None
    _LIB, _LIB_PATH = lib, path
    return lib


def available() -> bool:
    return library() is not None


def library_path() -> Path | None:
    """Path of the loaded library (None if not loaded)."""
    library()
    return _LIB_PATH


def set_threads(n: int) -> None:
    """Number of OpenMP threads of the native kernels (torch's intra-op count is used by callers)."""
    lib = library()
    if lib is not None:
        lib.ivit_set_num_threads(int(n))


# ---------------------------------------------------------------------------------------------
# Integer-only proof of machine code
# ---------------------------------------------------------------------------------------------

#: x86 floating-point arithmetic / conversion / compare instructions (scalar and packed, SSE/AVX/
#: AVX-512, and x87).  Integer SIMD (``vp*``) and bit-pattern moves, logic and shuffles that compilers
#: also use for integer data (``vmovups``, ``vxorps``, ``vshufps``, ``vbroadcastss`` ...) are allowed:
#: they do no floating-point arithmetic.
_FP_ARITH = re.compile(
    r"^v?(add|sub|mul|div|sqrt|min|max|rcp|rsqrt|round|fmadd|fmsub|fnmadd|fnmsub|fmaddsub|fmsubadd|"
    r"getexp|getmant|scalef|reduce|range|fixupimm|dp|hadd|hsub|addsub|rcp14|rsqrt14|rcp28|rsqrt28|exp2)"
    r"(\d{3})?(ss|sd|ps|pd|sh|ph|bf16)$"
    r"|^v?(u?comis[sd]|cmp\w*(ss|sd|ps|pd|ph)|cvt\w*|vcvt\w*)$"
    r"|^vfn?m(add|sub)\w*(ss|sd|ps|pd|ph)$"
    r"|^f(add|sub|subr|mul|div|divr|ld|st|stp|ild|ist|istp|isttp|sqrt|sin|cos|sincos|com|comp|compp|ucom|"
    r"ucomp|ucompp|comi|comip|ucomi|ucomip|abs|chs|rndint|scale|xtract|prem|prem1|ptan|patan|yl2x|yl2xp1|"
    r"2xm1|ldz|ld1|ldpi|ldl2e|ldl2t|ldlg2|ldln2|xch|cmov\w*|iadd|isub|isubr|imul|idiv|idivr|icom|icomp|"
    r"addp|subp|subrp|mulp|divp|divrp|free|bld|bstp|tst|xam|init|ninit|ldcw|stcw|nstcw|ldenv|stenv|"
    r"nstenv|save|nsave|rstor|wait|nop|incstp|decstp)$"
)
_PREFIXES = frozenset({"lock", "rep", "repz", "repnz", "repe", "repne", "data16", "data32", "addr32", "addr16",
                       "notrack", "bnd", "cs", "ds", "ss", "es", "fs", "gs", "xacquire", "xrelease", "rex", "rex.w"})
#: integer conversions that share the ``cvt`` prefix but never touch a float register value
_INT_CVT = re.compile(r"^(cltq|cqto|cwtl|cbtw|cltd|cwtd|cdqe|cdq|cqo|cwd|cbw|cwde)$")


def fp_instructions(path: str | os.PathLike[str]) -> list[str]:
    """Floating-point instructions in the machine code of ``path`` as ``"function: mnemonic"`` lines.

    Disassembles every executable section with ``objdump -d`` (binutils).  Raises ``RuntimeError``
    when ``objdump`` is missing or fails (the proof is then not available, never silently passed)."""
    objdump = shutil.which(os.environ.get("OBJDUMP", "objdump"))
    if objdump is None:
        raise RuntimeError("objdump (binutils) not found: cannot disassemble the native kernels")
    res = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(path)], capture_output=True, text=True,
                         timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"objdump failed on {path}: {res.stderr.strip()[:200]}")
    found: list[str] = []
    func = "?"
    for line in res.stdout.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if m:
            func = m.group(1)
            continue
        parts = line.split("\t")
        if len(parts) < 2 or not re.match(r"^\s*[0-9a-f]+:$", parts[0]):
            continue
        # the mnemonic: the first token that is not an encoding hint ({vex}, {evex}) or an instruction prefix
        tokens = [t for t in parts[1].split() if not t.startswith("{") and t not in _PREFIXES]
        mnem = tokens[0].split("{")[0] if tokens else ""
        if _INT_CVT.match(mnem):
            continue
        if _FP_ARITH.match(mnem):
            found.append(f"{func}: {mnem}")
    return found
