"""The C generator: a validated program -> ``model.h``, ``model.c``, ``model_weights.h``, ``model_weights.c``.

Steps (``lower_program``):

1. apply the passes (fusions with reference semantics: ``fuse_attention``, ``fold_gelu_table``) and
   validate; shapes are the concrete shapes of ``validate(prog).types`` for a fixed batch per call;
2. lower every node with the lowering of its op (``lowerings.LOWERINGS``, or the target's override):
   a ``View`` aliases its input's memory, a ``Kernel`` becomes one static C function (identical
   functions, e.g. the same ``linear`` in every block, are emitted once);
3. plan the arena: every buffer (node output or kernel scratch) lives from its definition to its last
   use (through views); buffers are placed greedily, largest first, at the lowest 8-aligned offset not
   overlapping a buffer alive at the same time; the program output is written straight into the
   caller's ``logits`` when it is an int32 buffer of its own;
4. emit the files: constants as ``const`` arrays of their exact C types in ``model_weights.c`` (so
   they can stay in flash), the kernels and one entry point ``ivit_run`` in ``model.c``.

The generated code is C99, integer only, with no allocation and nothing from libc beyond
``<stdint.h>``, ``<stddef.h>`` and ``<string.h>`` (``memcpy``/``memset``).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ...errors import IvitError
from ...ir.opset import OPSET
from ...ir.passes import apply_passes
from ...ir.program import Node, Program
from ...ir.types import TType
from ...ir.validate import validate
from .helpers import HELPERS, helper_closure
from .lowerings import LOWERINGS, Kernel, View
from .target import MCU, Target

__all__ = ["generate", "lower_program", "lower_graph", "CModule", "NodeCtx", "Operand", "CTYPES",
           "DEFAULT_PASSES", "plan_arena", "c_comment"]

#: passes applied before lowering (same integers; fewer, larger kernels and no (B, H, N, N) buffers)
DEFAULT_PASSES = ("fuse_attention", "fold_gelu_table")
ALIGN = 8

CTYPES: dict[torch.dtype, str] = {torch.uint8: "uint8_t", torch.int8: "int8_t", torch.int16: "int16_t",
                                  torch.int32: "int32_t", torch.int64: "int64_t", torch.bool: "uint8_t"}
_C_KEYWORDS = frozenset("auto break case char const continue default do double else enum extern float for goto if "
                        "inline int long register restrict return short signed sizeof static struct switch typedef "
                        "union unsigned void volatile while".split())
_ESIZE = {"uint8_t": 1, "int8_t": 1, "int16_t": 2, "int32_t": 4, "int64_t": 8}


@dataclass(frozen=True)
class Operand:
    """A value as a kernel sees it: C type, concrete shape, value interval."""

    name: str
    ctype: str
    shape: tuple[int, ...]
    lo: int
    hi: int

    @property
    def amax(self) -> int:
        return max(abs(self.lo), abs(self.hi))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _ESIZE[self.ctype]


class NodeCtx:
    """What a lowering sees of one node (see ``lowerings``).  Registers the parameters it uses."""

    def __init__(self, node: Node, index: int, target: Target, inputs: list[Operand], out: Operand,
                 consts: dict[str, Tensor], input_params: Sequence[str]) -> None:
        self.node = node
        self.index = index
        self.target = target
        self.x = inputs
        self.out = out
        self._consts = consts
        self.I = target.index_type
        self.params: list[tuple[str, str, Any]] = []  # (C declaration, kind, reference)
        self._names: set[str] = set()
        for p, op in zip(input_params, inputs, strict=True):
            self._param(f"const {op.ctype} *{target.restrict} {p}", p, "input", len(self._names))
        self.helpers: set[str] = set()
        self.libc: set[str] = set()

    def _param(self, decl: str, name: str, kind: str, ref: Any) -> str:
        if name not in self._names:
            self._names.add(name)
            self.params.append((decl, kind, ref))
        return name

    @property
    def pragma(self) -> str:
        return self.target.outer_pragma

    def attr(self, name: str, default: Any = None) -> Any:
        v = self.node.attrs.get(name, default)
        return int(v) if isinstance(v, bool) else v

    def const(self, name: str) -> Tensor | None:
        return self._consts.get(name)

    def array(self, name: str) -> str:
        """Pass constant ``name`` as an array parameter of that name (``name_`` for a C keyword); returns it."""
        t = self._consts[name]
        p = f"{name}_" if name in _C_KEYWORDS else name
        return self._param(f"const {CTYPES[t.dtype]} *{self.target.restrict} {p}", p, "const", name)

    def scalar(self, name: str) -> int | None:
        t = self._consts[name]
        return int(t.reshape(-1)[0]) if t.numel() == 1 else None

    def chan(self, name: str, idx: str) -> str:
        """C expression of constant ``name`` at channel ``idx`` (a literal for per-tensor constants)."""
        from .lowerings import lit

        v = self.scalar(name)
        return lit(v) if v is not None else f"{self.array(name)}[{idx}]"

    def amax(self, name: str) -> int:
        t = self._consts[name]
        return 0 if t.numel() == 0 else int(t.to(torch.int64).abs().max())

    def min(self, name: str) -> int:
        return int(self._consts[name].to(torch.int64).min())

    def scratch(self, ctype: str, count: int, name: str) -> str:
        """A scratch array of ``count`` elements (in the arena, alive during this node only)."""
        p = f"scratch_{name}"
        return self._param(f"{ctype} *{self.target.restrict} {p}", p, "scratch", (p, count * _ESIZE[ctype], ctype))

    def use(self, helper: str) -> str:
        if helper not in HELPERS:
            raise KeyError(helper)
        self.helpers.add(helper)
        return helper

    def use_libc(self, fn: str) -> None:
        self.libc.add(fn)


@dataclass
class _Buf:
    id: str
    nbytes: int
    first: int
    last: int
    offset: int = -1
    external: str | None = None  # bound to an entry-point parameter


@dataclass
class _Val:
    op: Operand
    buf: str
    offset: int  # elements


@dataclass
class CModule:
    """Generated files and the facts about them."""

    files: dict[str, str]
    arena_bytes: int
    peak_bytes: int
    const_bytes: int
    program: Program | None = None
    prefix: str = "ivit_"
    entry: str = "ivit_run"
    inputs: list[Operand] = field(default_factory=list)
    output: Operand | None = None
    kernels: int = 0
    nodes: int = 0
    views: int = 0
    ops: dict[str, int] = field(default_factory=dict)

    @property
    def macro(self) -> str:
        return self.prefix.upper()


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _place(order: list[_Buf]) -> dict[str, int]:
    """Greedy placement in ``order``: each buffer at the lowest aligned offset free during its lifetime."""
    placed: list[tuple[_Buf, int]] = []
    offs: dict[str, int] = {}
    for b in order:
        size = _aligned(b.nbytes)
        off = 0
        for p, po in sorted(((p, po) for p, po in placed if p.first <= b.last and b.first <= p.last),
                            key=lambda t: t[1]):
            if off + size <= po:
                break
            off = max(off, po + _aligned(p.nbytes))
        offs[b.id] = off
        placed.append((b, off))
    return offs


def plan_arena(bufs: list[_Buf], tries: int = 200) -> tuple[int, int]:
    """Give every non-external buffer an offset; returns (arena bytes, peak of live bytes).

    Buffers alive at the same time never overlap.  Greedy placement in three orders (largest first,
    longest-lived first, first-defined first), then in up to ``tries`` seeded random orders, keeping
    the smallest arena and stopping as soon as it equals the peak of live bytes (no arena can be
    smaller).  The result is deterministic."""
    inner = [b for b in bufs if b.external is None]
    steps = sorted({b.first for b in inner})
    peak = max((sum(_aligned(b.nbytes) for b in inner if b.first <= t <= b.last) for t in steps), default=0)
    orders = [sorted(inner, key=lambda b: (-b.nbytes, b.first, b.id)),
              sorted(inner, key=lambda b: (b.first - b.last, -b.nbytes, b.id)),
              sorted(inner, key=lambda b: (b.first, -b.nbytes, b.id))]
    rng = random.Random(0)
    best: dict[str, int] = {}
    best_size = -1
    for k in range(3 + tries):
        if k >= 3:
            order = list(orders[0])
            rng.shuffle(order)
        else:
            order = orders[k]
        offs = _place(order)
        size = max((offs[b.id] + _aligned(b.nbytes) for b in inner), default=0)
        if best_size < 0 or size < best_size:
            best, best_size = offs, size
        if best_size <= peak:
            break
    for b in inner:
        b.offset = best[b.id]
    return max(best_size, ALIGN), peak


def _cident(s: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", s)


def c_comment(s: str) -> str:
    """``s`` made inert inside a C block comment, whatever it holds (names and metadata come from files anyone can
    edit): printable ASCII only (no newline), no backslash (line splice) or ``?`` (trigraphs), and no ``*/`` or
    ``/*`` (the end of the comment, or a nested one that ``-Wcomment`` rejects)."""
    s = "".join(ch if " " <= ch <= "~" and ch not in "\\?" else "_" for ch in s)
    while "*/" in s or "/*" in s:
        s = s.replace("*/", "* /").replace("/*", "/ *")
    # nor at either end, where it could join the text around it into one
    return (" " if s[:1] in ("*", "/") else "") + s + (" " if s[-1:] in ("*", "/") else "")


def _shape(op: Operand) -> str:
    return "(" + ", ".join(str(s) for s in op.shape) + ")"


def _operand(name: str, t: TType, batch: int) -> Operand:
    return Operand(name, CTYPES[t.dtype], t.concrete(batch), t.lo, t.hi)


def lower_graph(nodes: Sequence[Node], consts: dict[str, Tensor], types: dict[str, TType], inputs: Sequence[str],
                output: str, *, batch: int = 1, target: Target = MCU, input_params: Sequence[str] | None = None,
                output_param: str = "out", output_ctype: str | None = None, header: str = "",
                macros: dict[str, int] | None = None) -> CModule:
    """Lower a straight-line graph (``nodes`` over ``types``) to C: see the module docstring.

    ``inputs`` are the values passed to the entry point (``const`` pointers named ``input_params``);
    the output is written to ``output_param`` as ``output_ctype`` (default: its own type)."""
    pre = target.prefix
    mac = pre.upper()
    input_params = list(input_params or [f"in{i}" for i in range(len(inputs))])
    lowerings = {**LOWERINGS, **dict(target.overrides)}
    vals: dict[str, _Val] = {}
    bufs: dict[str, _Buf] = {}
    for v, p in zip(inputs, input_params, strict=True):
        bufs[f"in:{v}"] = _Buf(f"in:{v}", 0, -1, -1, external=p)
        vals[v] = _Val(_operand(v, types[v], batch), f"in:{v}", 0)

    kernels: dict[tuple[str, str], str] = {}  # (signature, body) -> function name
    func_text: dict[str, str] = {}
    func_nodes: dict[str, list[int]] = {}
    calls: list[tuple[int, Node, str | None, list[tuple[str, Any]]]] = []
    helpers: set[str] = set()
    const_used: dict[str, str] = {}  # const key -> C symbol
    ops_count: dict[str, int] = {}
    n_views = 0
    for i, node in enumerate(nodes):
        spec = OPSET[node.op]
        low = lowerings.get(node.op)
        if low is None:
            raise IvitError(f"c export: no lowering for op {node.op}")
        ins = [vals[v].op for v in node.inputs]
        out = _operand(node.output, types[node.output], batch)
        ctx = NodeCtx(node, i, target, ins, out, {c: consts[k] for c, k in node.consts.items()}, spec.inputs)
        res = low(ctx)
        ops_count[node.op] = ops_count.get(node.op, 0) + 1
        if isinstance(res, View):
            src = vals[node.inputs[res.source]]
            vals[node.output] = _Val(out, src.buf, src.offset + res.offset)
            calls.append((i, node, None, []))
            n_views += 1
            continue
        assert isinstance(res, Kernel)
        bid = f"v:{node.output}"
        bufs[bid] = _Buf(bid, out.nbytes, i, i)
        vals[node.output] = _Val(out, bid, 0)
        decls = [d for d, _, _ in ctx.params] + [f"{out.ctype} *{target.restrict} out"]
        sig = ", ".join(decls)
        key = (sig, res.body)
        name = kernels.get(key)
        if name is None:
            name = f"{_cident(node.op)}_{i}"
            kernels[key] = name
            func_nodes[name] = []
            body = "\n".join("    " + ln for ln in res.body.split("\n") if ln.strip())
            shapes = ", ".join(f"{p} {op.ctype[:-2]}{_shape(op)}" for p, op in zip(spec.inputs, ins, strict=True))
            func_text[name] = (f"/* {node.op}: {c_comment(res.formula)}\n"
                               f" * {shapes} -> out {out.ctype[:-2]}{_shape(out)}@NODES@ */\n"
                               f"static void {name}({sig}) {{\n{body}\n}}")
        func_nodes[name].append(i)
        helpers |= ctx.helpers
        args: list[tuple[str, Any]] = []
        for _, kind, ref in ctx.params:
            if kind == "input":
                args.append(("value", node.inputs[ref]))
            elif kind == "const":
                k = node.consts[ref]
                if k not in const_used:
                    const_used[k] = f"{pre}k{len(const_used)}"
                args.append(("const", k))
            else:
                sid = f"s:{i}:{ref[0]}"
                bufs[sid] = _Buf(sid, ref[1], i, i)
                args.append(("scratch", (sid, ref[2])))
        args.append(("value", node.output))
        calls.append((i, node, name, args))
    # liveness through views; the output lives to the end
    for i, node in enumerate(nodes):
        for v in node.inputs:
            b = bufs[vals[v].buf]
            b.last = max(b.last, i)
    ov = vals[output]
    out_ctype = output_ctype or ov.op.ctype
    obuf = bufs[ov.buf]
    obuf.last = len(nodes)
    direct = (obuf.external is None and ov.offset == 0 and ov.op.ctype == out_ctype and obuf.nbytes == ov.op.nbytes)
    if direct:
        obuf.external = output_param
    arena, peak = plan_arena(list(bufs.values()))
    const_bytes = sum(consts[k].numel() * _ESIZE[CTYPES[consts[k].dtype]] for k in const_used)

    def ptr(kind: str, ref: Any) -> str:
        if kind == "const":
            return const_used[ref]
        if kind == "scratch":
            return f"({ref[1]} *)(a + {bufs[ref[0]].offset})"
        val = vals[ref]
        b = bufs[val.buf]
        ct = val.op.ctype
        if b.external is not None:
            base = b.external
            if b.id.startswith("in:"):
                base = b.external if val.op.ctype == vals[b.id[3:]].op.ctype else f"(const {ct} *){b.external}"
            return f"{base} + {val.offset}" if val.offset else base
        return f"({ct} *)(a + {b.offset + val.offset * _ESIZE[ct]})"

    run_lines: list[str] = []
    for i, node, fname, args in calls:
        outv = vals[node.output]
        ins_s = ", ".join(node.inputs)
        where = "view of " + bufs[outv.buf].id.split(":", 1)[1] if fname is None else (
            bufs[outv.buf].external or f"arena + {bufs[outv.buf].offset}")
        run_lines.append("    /* " + c_comment(f"{i} {node.op}({ins_s}) -> {node.output}: "
                                           f"{outv.op.ctype[:-2]}{_shape(outv.op)}, {where}") + " */")
        if fname is None:
            continue
        run_lines.append(f"    {fname}({', '.join(ptr(k, r) for k, r in args)});")
    if not direct:
        n = ov.op.numel
        run_lines.append(f"    /* copy the output {c_comment(output)} to {output_param} */")
        run_lines.append(f"    for ({target.index_type} i = 0; i < {n}; i++) "
                         f"{output_param}[i] = ({out_ctype})({ptr('value', output)})[i];")

    entry = f"{pre}run"
    in_decl = ", ".join(f"const {vals[v].op.ctype} *{p}" for v, p in zip(inputs, input_params, strict=True))
    proto = f"int {entry}({in_decl}, {out_ctype} *{output_param}, void *arena)"
    used_helpers = helper_closure(helpers)
    libc = "memcpy/memset" if any("memcpy" in t or "memset" in t for t in func_text.values()) else "none"

    # ---- model.h
    macros = dict(macros or {})
    h = [f"/* model.h: {c_comment(header)} */",
         f"#ifndef {mac}MODEL_H", f"#define {mac}MODEL_H", "", "#include <stddef.h>", "#include <stdint.h>", "",
         "#ifdef __cplusplus", 'extern "C" {', "#endif", ""]
    defs = {"OUTPUT_SIZE": ov.op.numel, **macros, "ARENA_BYTES": arena, "CONST_BYTES": const_bytes}
    notes = {"BATCH": "images per call", "IN_CHANNELS": "pixels: uint8 (BATCH, C, H, W), row-major",
             "INPUT_BYTES": "pixel bytes per call", "OUTPUT_SIZE": "int32 logits per image (BATCH of them per call)",
             "ARENA_BYTES": "RAM for every activation (the static plan's size)",
             "CONST_BYTES": "bytes of the constant arrays (flash)"}
    for k, v in defs.items():
        h.append(f"#define {mac}{k} {v}" + (f" /* {notes[k]} */" if k in notes else ""))
    h += ["", f"#define {mac}OK 0", f"#define {mac}ERR_NULL 1 /* a NULL pointer argument */",
          f"#define {mac}ERR_ALIGN 2 /* arena not 8-byte aligned */", "",
          f"/* Runs the model: 0 ({mac}OK) or an error code.  arena: {mac}ARENA_BYTES bytes, 8-byte aligned,",
          " * e.g. static uint64_t arena[(" + mac + "ARENA_BYTES + 7) / 8]; it holds every activation (buffers",
          " * reused; nothing else is allocated) and may be reused between calls.  Inputs and outputs must not",
          " * overlap the arena. */", proto + ";", "", "#ifdef __cplusplus", "}", "#endif", "",
          f"#endif /* {mac}MODEL_H */", ""]

    # ---- model_weights.h / .c
    wh = [f"/* model_weights.h: constants of the model, {const_bytes} bytes in {len(const_used)} arrays. */",
          f"#ifndef {mac}MODEL_WEIGHTS_H", f"#define {mac}MODEL_WEIGHTS_H", "", "#include <stdint.h>", ""]
    wc = [f"/* model_weights.c: constants of the model ({const_bytes} bytes), const so that they can stay",
          f" * in flash.  Define {mac}WEIGHTS_ATTR (e.g. __attribute__((section(\".rodata.ivit\")))) to place them. */",
          '#include "model_weights.h"', "", f"#ifndef {mac}WEIGHTS_ATTR", f"#define {mac}WEIGHTS_ATTR",
          "#endif", ""]
    for k, sym in const_used.items():
        t = consts[k]
        ct = CTYPES[t.dtype]
        numel = t.numel()
        desc = f"{c_comment(k)}: {'bool' if t.dtype == torch.bool else ct[:-2]} {tuple(t.shape)}"
        wh.append(f"extern const {ct} {sym}[{max(numel, 1)}]; /* {desc} */")
        wc.append(f"/* {desc} */")
        wc.append(f"{mac}WEIGHTS_ATTR const {ct} {sym}[{max(numel, 1)}] = {{")
        wc.extend(_array_lines(t))
        wc.append("};")
    wh += ["", f"#endif /* {mac}MODEL_WEIGHTS_H */", ""]
    wc.append("")

    # ---- model.c
    c = [f"/* model.c: {c_comment(header)}",
         f" * Generated by ivit for target '{target.name}', {batch} image(s) per {entry}() call.",
         " * Integer arithmetic only: no floating point, no allocation; from libc only <string.h> "
         f"({libc}).",
         " * Formulas: ivit.ops (the integer specification); >> is an arithmetic (floor) shift,",
         " * round_shift(v, s) = (v + 2^(s-1)) >> s rounds half up. */",
         "#include <stddef.h>", "#include <stdint.h>", "#include <string.h>", ""]
    c += [f"#include {hd}" if hd.startswith("<") else f'#include "{hd}"' for hd in target.headers]
    c += ['#include "model.h"', '#include "model_weights.h"', "",
          "/* what the code relies on, checked at compile time: arithmetic >> of negative values, int >= 32 bits */",
          f"typedef char {pre}check_asr[((-1) >> 1) == -1 ? 1 : -1];",
          f"typedef char {pre}check_int[sizeof(int) >= 4 ? 1 : -1];", ""]
    for hn in used_helpers:
        c += [HELPERS[hn][0], ""]
    for name, text in func_text.items():
        idx = func_nodes[name]
        note = "" if len(idx) == 1 else f"\n * used by nodes {', '.join(map(str, idx))}"
        c += [text.replace("@NODES@", note), ""]
    null = " || ".join(f"{p} == NULL" for p in [*input_params, output_param, "arena"])
    c += [proto + " {", "    uint8_t *a;", f"    if ({null}) return {mac}ERR_NULL;",
          f"    if (((uintptr_t)arena & {ALIGN - 1}u) != 0u) return {mac}ERR_ALIGN;",
          "    a = (uint8_t *)arena;", "    (void)a;"]
    c += run_lines
    c += [f"    return {mac}OK;", "}", ""]
    files = {"model.h": "\n".join(h), "model.c": "\n".join(c), "model_weights.h": "\n".join(wh),
             "model_weights.c": "\n".join(wc)}
    return CModule(files=files, arena_bytes=arena, peak_bytes=peak, const_bytes=const_bytes, prefix=pre, entry=entry,
                   inputs=[vals[v].op for v in inputs], output=ov.op, kernels=len(func_text), nodes=len(nodes),
                   views=n_views, ops=ops_count)


def _array_lines(t: Tensor, per_line: int = 24) -> list[str]:
    if t.numel() == 0:
        return ["    0"]
    vals = t.reshape(-1).to(torch.int64).tolist()
    out = []
    for i in range(0, len(vals), per_line):
        chunk = vals[i:i + per_line]
        out.append("    " + ", ".join("(-2147483647 - 1)" if v == -(2**31) else str(v) for v in chunk) + ",")
    return out


def lower_program(program: Program, batch: int = 1, target: Target = MCU,
                  passes: Sequence[str] = DEFAULT_PASSES) -> CModule:
    """Lower a program (validated, after ``passes``) for ``batch`` images per ``ivit_run`` call."""
    if not isinstance(batch, int) or batch < 1:
        raise IvitError(f"batch must be a positive integer, got {batch!r}")
    validate(program)
    prog = apply_passes(program, list(passes))
    info = validate(prog)
    c, h, w = prog.input_shape
    meta = prog.meta
    nc = int(meta.get("num_classes") or 0)
    out_t = info.types[prog.output]
    header = (f"model {meta.get('model', '?')} ({meta.get('family', '?')}), input uint8 ({batch}, {c}, {h}, {w}), "
              f"logits int32 ({batch}, {out_t.shape[1]}); float logits = logits * {meta.get('logit_scale', 1.0)!r}")
    macros = {"BATCH": batch, "IN_CHANNELS": c, "IN_HEIGHT": h, "IN_WIDTH": w, "INPUT_BYTES": batch * c * h * w,
              "NUM_CLASSES": nc or out_t.shape[1], "OUTPUT_SIZE": out_t.shape[1]}
    mod = lower_graph(prog.nodes, prog.consts, info.types, [prog.input], prog.output, batch=batch, target=target,
                      input_params=["pixels"], output_param="logits", output_ctype="int32_t", header=header,
                      macros=macros)
    mod.program = prog
    return mod


def generate(program: Program, batch: int = 1, target: Target = MCU,
             passes: Sequence[str] = DEFAULT_PASSES) -> dict[str, str]:
    """``{filename: text}`` of the C library of ``program`` (see ``lower_program``)."""
    return lower_program(program, batch, target, passes).files
