"""C source of a planned program: one native function ``ivit_model_run`` per model.

The source is self-contained: the runtime (``runtime.h``: micro-kernels, fused prologues/epilogues,
attention) is pasted in, then the C99 exporter's helpers and lowerings of the generic ops, then one
``static const`` descriptor per step (shapes, strides, scalar constants and blob offsets as literals)
and the entry point: one OpenMP team for the whole forward pass, a barrier after every step.

``ivit_model_run(pixels, out, B, work, blob, nthreads)`` runs ``B`` images; ``work`` holds
``work_bytes(B, nthreads)`` bytes (64-byte aligned), ``blob`` the constants (``Plan.blob``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...codegen.c.generator import c_comment
from ...codegen.c.helpers import HELPERS, helper_closure
from .plan import ALIGN, MR, Buf, Plan, Step

__all__ = ["generate", "work_bytes", "RUNTIME", "thread_bytes"]

RUNTIME = Path(__file__).with_name("runtime.h")
_COUNTER_SLOTS = 16  # int64 per step (two 64-byte lines: attention uses two counters)
ABLOCK = 384 * 1024  # the runtime's IVIT_ABLOCK

_GEMM_FIELDS = ("M", "K", "N", "a_es", "a_rows", "a_r0", "a_rs", "ln", "ln_m", "ln_s", "ln_o", "ln_q", "w", "bias",
                "epi", "o_es", "o_rows", "o_r0", "o_rs", "em", "es", "qmax", "c64", "vec", "table", "r_es", "rm",
                "rsh", "pos", "ehi", "rhi", "ln_hi")
_ATTN_FIELDS = ("G", "H", "N", "D", "q0", "qg", "qh", "qn", "k0", "kg", "kh", "kn", "v0", "vg", "vh", "vn", "bias",
                "mask", "nwin", "sm", "ssh", "sq", "sc64", "shi", "ohi", "probs", "x0", "n", "rel_m", "dmul", "dsh",
                "qcap", "o_es", "o0", "og", "oh", "on", "orq", "om", "osh", "oq", "oc64", "qb")


def _lit(v: int) -> str:
    v = int(v)
    if -(2**31) < v < 2**31:
        return str(v)
    return f"INT64_C({v})"


def _bufref(prefix: str, b: Buf | None) -> list[str]:
    if b is None:
        return [f".{prefix}_where = 0", f".{prefix}_off = 0", f".{prefix}_img = 0"]
    return [f".{prefix}_where = {b.code}", f".{prefix}_off = {b.offset if b.where == 'arena' else 0}",
            f".{prefix}_img = {b.elems}"]


def _desc(ctype: str, name: str, fields: list[str]) -> str:
    return f"static const {ctype} {name} = {{" + ", ".join(fields) + "};"


def thread_bytes(plan: Plan, isa: int) -> int:
    """Per-thread scratch: the attention's tiles, or a GEMM's A block (up to ``ABLOCK``), partial sums, tile, a row."""
    pw = 64 if isa == 2 else 16
    need = plan.thread_bytes
    for st in plan.steps:
        if st.kind == "gemm":
            k = st.desc["K"]
            kp = -(-k // 4) * 4 if isa == 2 else -(-k // 2) * 2
            tile = MR * kp * (1 if isa == 2 else 2)
            hdr = MR * pw * 4 + -(-k // 64) * 64
            mb = max(2, ABLOCK // tile)
            cb = mb * MR * pw * 4 if -(-kp // (4 if isa == 2 else 2)) > 64 else 0  # K-blocked: partial sums
            need = max(need, hdr + mb * tile + cb + tile)
    return -(-need // ALIGN) * ALIGN


def work_bytes(plan: Plan, isa: int, batch: int, nthreads: int) -> int:
    """Bytes of the work area for ``batch`` images on ``nthreads`` threads."""
    return (len(plan.steps) * _COUNTER_SLOTS * 8 + -(-plan.shared_bytes // ALIGN) * ALIGN
            + nthreads * thread_bytes(plan, isa) + batch * plan.arena_bytes)


def _step_c(i: int, st: Step, tws: int) -> tuple[str, str]:
    """(file-scope descriptor, statement in the parallel region) of step ``i``."""
    d: dict[str, Any] = st.desc
    cnt = f"cx.counters + {i * _COUNTER_SLOTS}"
    if st.kind == "gemm":
        fields = [f".{k} = {_lit(d[k])}" for k in _GEMM_FIELDS]
        fields += _bufref("a", d["a"]) + _bufref("o", d["o"]) + _bufref("r", d["r"])
        fields = [f for f in fields if not f.startswith(".a_img") and not f.startswith(".o_img")
                  and not f.startswith(".r_img")]
        fields += [f".a_img = {d['a'].elems}", f".o_img = {d['o'].elems}",
                   f".r_img = {d['r'].elems if d['r'] is not None else 0}"]
        return (_desc("ivit_gemm_t", f"S{i}", fields), f"ivit_gemm_run(&S{i}, &cx, tid, nth, {cnt}, {tws});")
    if st.kind == "attn":
        fields = [f".{k} = {_lit(d[k])}" for k in _ATTN_FIELDS]
        for p in "qkvo":
            b = d[p]
            fields += [f".{p}_where = {b.code}", f".{p}_off = {b.offset if b.where == 'arena' else 0}",
                       f".{p}_img = {b.elems}"]
        fields.append(f".kv_off = {d['kv'].offset if d['kv'] is not None else 0}")
        return (_desc("ivit_attn_t", f"S{i}", fields), f"ivit_attn_run(&S{i}, &cx, tid, nth, {cnt}, {tws});")
    if st.kind == "gather":
        s, o = d["s"], d["d"]
        fields = [f".s_where = {s.code}", f".s_off = {s.offset if s.where == 'arena' else 0}", f".s_img = {s.elems}",
                  f".d_where = {o.code}", f".d_off = {o.offset if o.where == 'arena' else 0}", f".d_img = {o.elems}"]
        fields += [f".{k} = {_lit(d[k])}" for k in ("es", "rows", "len", "map", "s0", "srs", "elem")]
        return _desc("ivit_gather_t", f"S{i}", fields), f"ivit_gather_run(&S{i}, &cx, tid, nth, {cnt});"
    if st.kind == "ln":
        sb, o = d["src"], d["dst"]
        fields = [f".s_where = {sb.code}", f".s_off = {sb.offset if sb.where == 'arena' else 0}",
                  f".s_img = {sb.elems}", f".d_where = {o.code}", f".d_off = {o.offset if o.where == 'arena' else 0}",
                  f".d_img = {o.elems}"]
        fields += [f".{k} = {_lit(d[k])}" for k in ("s_es", "d_es", "rows", "C", "m", "s", "o", "q", "hi", "vec")]
        return _desc("ivit_ln_t", f"S{i}", fields), f"ivit_ln_run(&S{i}, &cx, tid, nth, {cnt});"
    if st.kind == "fill":
        o = d["d"]
        fields = [f".d_where = {o.code}", f".d_off = {o.offset if o.where == 'arena' else 0}", f".d_img = {o.elems}"]
        fields += [f".{k} = {_lit(d[k])}" for k in ("es", "n", "src", "q")]
        return _desc("ivit_fill_t", f"S{i}", fields), f"ivit_fill_run(&S{i}, &cx, tid, nth, {cnt});"
    call = st.call.replace("@TWS@", str(tws))
    for b in {b.name: b for b in st.reads + st.writes}.values():
        call = call.replace(f"@{b.name}@", str(b.offset if b.where == "arena" else 0))
    # one image per work item (the C99 lowerings are single-threaded here)
    return "", (f"for (int64_t b = ivit_next({cnt}); b < cx.B; b = ivit_next({cnt})) {{ {call} ivit_done({cnt}); }} "
                f"ivit_wait({cnt}, cx.B);")


def generate(plan: Plan, isa: int, header: str) -> str:
    """The C source of ``plan`` for code path ``isa``."""
    tws = thread_bytes(plan, isa)
    nsteps = len(plan.steps)
    shared = -(-plan.shared_bytes // ALIGN) * ALIGN
    out: list[str] = [f"/* {c_comment(header)}",
                      " * Generated by ivit (compiled CPU backend).  Integer arithmetic only. */",
                      f"#define IVIT_ISA {isa}", RUNTIME.read_text(), ""]
    for hn in helper_closure(plan.helpers):
        out += [HELPERS[hn][0], ""]
    out += list(plan.functions.values())
    descs, stmts = [], []
    for i, st in enumerate(plan.steps):
        dsc, stmt = _step_c(i, st, tws)
        if dsc:
            descs.append(f"/* step {i}: {c_comment(st.label)} */\n{dsc}")
        stmts.append(f"        /* {i}: {c_comment(st.label)} */\n        {stmt}")
        stmts.append("        IVIT_STEP_END(" + str(i) + ");")
    out += descs
    out += ["", f"#define IVIT_NSTEPS {nsteps}", "#ifdef IVIT_PROFILE", "#include <time.h>",
            "static int64_t ivit_prof[IVIT_NSTEPS + 1];",
            "static inline int64_t ivit_now(void) { struct timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); "
            "return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec; }",
            "#define IVIT_STEP_END(i) do { if (tid == 0) { const int64_t t1 = ivit_now(); "
            "ivit_prof[i] += t1 - t0; t0 = t1; } } while (0)",
            "int ivit_model_profile(int64_t *dst) { for (int i = 0; i < IVIT_NSTEPS; i++) { dst[i] = ivit_prof[i]; "
            "ivit_prof[i] = 0; } return IVIT_NSTEPS; }",
            "#else", "#define IVIT_STEP_END(i) (void)0",
            "int ivit_model_profile(int64_t *dst) { (void)dst; return 0; }", "#endif", "",
            "int ivit_model_isa(void) { return IVIT_ISA; }",
            f"int64_t ivit_model_thread_bytes(void) {{ return {tws}; }}", "",
            "int ivit_model_run(const uint8_t *pixels, void *out, int64_t B, uint8_t *work, const uint8_t *blob, "
            "int nthreads) {",
            "    ivit_ctx cx;",
            "    if (B < 1 || nthreads < 1 || !pixels || !out || !work || !blob) return 1;",
            f"    memset(work, 0, {nsteps * _COUNTER_SLOTS * 8});",
            "    cx.counters = (int64_t *)work;",
            f"    cx.shared = work + {nsteps * _COUNTER_SLOTS * 8};",
            f"    cx.thread = cx.shared + {shared};",
            f"    cx.arena = cx.thread + (int64_t)nthreads * {tws};",
            "    cx.pixels = pixels; cx.out = (uint8_t *)out; cx.blob = blob; cx.B = B;",
            "#pragma omp parallel num_threads(nthreads)",
            "    {",
            "#ifdef _OPENMP",
            "        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();",
            "#else",
            "        const int tid = 0, nth = 1;",
            "#endif",
            "#ifdef IVIT_PROFILE",
            "        int64_t t0 = ivit_now();",
            "#endif",
            *stmts,
            "        (void)nth;",
            "    }",
            "    return 0;",
            "}", ""]
    return "\n".join(out)
