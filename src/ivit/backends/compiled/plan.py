"""Planning a program for the compiled backend: fusions, memory and the steps of the native function.

Every value of the executed program (after ``fold_gelu_table`` and ``fuse_attention``) gets a *location*: a
buffer and, for views, a per-image *address map* (``amap``: for every element of the value, its element
index in the buffer's per-image chunk; ``-1`` is a zero).  Data movement (``reshape``, ``permute``,
``slice``, ``select``, ``roll``, ``pad``) only transforms address maps (computed with the op's own
reference semantics on an index tensor), so it costs nothing at run time; a consumer that needs another
layout gets a gather step.

Fusions (codegen-internal; the program and the op set are unchanged):

* ``linear`` + its consumers -> one GEMM step whose epilogue writes int8/int16 directly: ``requantize``
  (also of column ``slice``\\ s: the q/k/v split), ``requantize_table`` (GELU), ``add_requantize`` (the
  residual, through a row scatter map: Swin's window reverse and roll), ``embed`` (patch embedding).
  No int32 activation tensor reaches memory.
* ``layernorm``/``layernorm32`` whose only consumer is one ``linear`` (through row-preserving views: Swin's
  roll and window partition, the class-token select) -> the GEMM's prologue normalizes the rows it
  packs; the LayerNorm output never exists.
* ``attention`` reads q, k, v through strides of the GEMM output and writes the following ``requantize``
  (through the inverse of the permute/reshape) straight into the next GEMM's input.

Every other op runs the C99 exporter's lowering of that op (``ivit.codegen.c.lowerings``) once per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ... import ops
from ...codegen.c.generator import CTYPES, NodeCtx, Operand, c_comment
from ...codegen.c.lowerings import LOWERINGS, Kernel
from ...codegen.c.target import Target
from ...errors import IvitError
from ...ir.opset import OPSET, PROBS_REL8
from ...ir.program import Node, Program
from ...ir.types import TType

__all__ = ["Plan", "Buf", "Step", "Unsupported", "plan_program", "TARGET", "VIEW_OPS"]

#: the C99 lowerings' flavour inside the compiled model: 64-bit indexing; one image per work item
TARGET = Target(name="ivit-compiled", index_type="int64_t", restrict="restrict", outer_pragma="", prefix="ivit_m_")
VIEW_OPS = frozenset({"reshape", "permute", "slice", "select", "roll", "pad"})
#: views that keep whole rows (the last dimension) intact, in the order they are allowed in row chains
ROW_VIEWS = frozenset({"reshape", "permute", "roll", "select", "slice"})
INT32_LIMIT = 2**31 - 1
ALIGN = 64
MR = 6
QB = 8
_ESIZE = {torch.uint8: 1, torch.int8: 1, torch.int16: 2, torch.int32: 4, torch.bool: 1}


class Unsupported(IvitError):
    """The program has a form the compiled backend does not plan (the caller falls back)."""


def _round(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


@dataclass(eq=False)
class Buf:
    """A buffer: per-image ``elems`` elements of ``dtype`` in the arena (or the input, the output, or a
    deferred LayerNorm that never exists: ``where == "ln"``)."""

    name: str
    dtype: torch.dtype
    elems: int
    where: str = "arena"
    first: int = -1
    last: int = -1
    offset: int = -1
    ln_node: int | None = None
    fixed: bool = False  # not batch-scaled

    @property
    def esize(self) -> int:
        return _ESIZE[self.dtype]

    @property
    def nbytes(self) -> int:
        return _round(self.elems * self.esize)

    @property
    def code(self) -> int:
        return {"arena": 0, "pixels": 1, "out": 2}[self.where]


@dataclass
class Loc:
    """Where a value lives: ``buf`` and, for a view, the per-image address map (None: contiguous)."""

    buf: Buf
    amap: Tensor | None
    shape: tuple[int, ...]

    def addresses(self) -> Tensor:
        if self.amap is not None:
            return self.amap
        return torch.arange(math.prod(self.shape), dtype=torch.int64).reshape(self.shape)


@dataclass
class Step:
    """One step of the native function (all threads take part; a barrier follows)."""

    kind: str  # gemm | attn | gather | fill | generic
    desc: dict[str, Any]
    label: str
    node: int
    reads: list[Buf] = field(default_factory=list)
    writes: list[Buf] = field(default_factory=list)
    call: str = ""  # generic: C statements
    parallel: bool = True
    macs: int = 0  # multiply-accumulates per image (GEMMs and attention), for the profile


@dataclass
class Plan:
    steps: list[Step]
    bufs: list[Buf]
    blob: Blob
    functions: dict[str, str]
    helpers: set[str]
    output: Buf
    arena_bytes: int = 0
    shared_bytes: int = 0
    thread_bytes: int = 0
    fusions: dict[str, int] = field(default_factory=dict)


class Blob:
    """The constants of a compiled model: one byte blob, every entry 64-byte aligned."""

    def __init__(self) -> None:
        self.parts: list[Tensor] = []
        self.size = 0
        self._memo: dict[Any, int] = {}

    def add(self, t: Tensor, key: Any = None) -> int:
        if key is not None and key in self._memo:
            return self._memo[key]
        if t.dtype == torch.bool:
            t = t.to(torch.uint8)
        b = t.detach().contiguous().reshape(-1).view(torch.uint8)
        off = self.size
        self.parts.append(b)
        pad = _round(b.numel()) - b.numel()
        if pad:
            self.parts.append(torch.zeros(pad, dtype=torch.uint8))
        self.size += b.numel() + pad
        if key is not None:
            self._memo[key] = off
        return off

    def tensor(self) -> Tensor:
        out = torch.empty(max(self.size, ALIGN), dtype=torch.uint8)
        if self.parts:
            torch.cat(self.parts, out=out[: self.size])
        return out


def _i32(t: Tensor, n: int) -> Tensor:
    """A per-tensor or per-channel integer constant as int32 ``(n,)``."""
    t = t.reshape(-1).to(torch.int64)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise Unsupported(f"constant of {t.numel()} entries for {n} channels")
    return t.to(torch.int32).contiguous()


def _rs_bound(amax: int, m: Tensor, s: Tensor) -> int:
    """max over channels of ``|round_shift(x * m, s)|`` for ``|x| <= amax``."""
    m = m.reshape(-1).to(torch.int64).abs()
    s = s.reshape(-1).to(torch.int64)
    if s.numel() == 1 and m.numel() > 1:
        s = s.expand(m.numel())
    if m.numel() == 1 and s.numel() > 1:
        m = m.expand(s.numel())
    best = 0
    for mi, si in zip(m.tolist(), s.tolist(), strict=True):
        best = max(best, (amax * mi + (1 << (si - 1))) >> si)
    return best


def hi_mode(amax: int, shift: Tensor | int) -> int:
    """The runtime's ``ivit_rqh`` mode for ``round_shift(x * m, s)`` with ``|x| <= amax``: 1 when every
    ``s >= 33``, 2 when the pre-shift ``x << (33 - s)`` stays inside int32, else 0 (64-bit products)."""
    smin = int(shift) if isinstance(shift, int) else int(shift.reshape(-1).to(torch.int64).min())
    if smin >= 33:
        return 1
    return 2 if (amax << (33 - smin)) <= INT32_LIMIT else 0


def _rows_of(amap: Tensor, width: int) -> Tensor | None:
    """Row starts of an address map whose last dim (``width``) is a contiguous run in every row (-1: zero row)."""
    if amap.shape[-1] != width:
        return None
    rows = amap.reshape(-1, width)
    base = rows[:, 0]
    ar = torch.arange(width, dtype=torch.int64)
    ok = (rows == base[:, None] + ar[None, :]) & (base[:, None] >= 0)
    zero = (rows < 0).all(dim=1)
    if not bool((ok.all(dim=1) | zero).all()):
        return None
    return torch.where(zero, torch.full_like(base, -1), base)


def _affine(v: Tensor) -> tuple[int, int] | None:
    """``(v0, step)`` when ``v[i] = v0 + i * step`` for all i (and no -1)."""
    if v.numel() == 0 or bool((v < 0).any()):
        return None
    v0 = int(v[0])
    st = int(v[1] - v[0]) if v.numel() > 1 else 0
    if bool((v == v0 + st * torch.arange(v.numel(), dtype=torch.int64)).all()):
        return v0, st
    return None


def _affine4(amap: Tensor) -> tuple[int, int, int, int] | None:
    """``(a0, sG, sH, sN)`` with ``amap[g, h, i, c] = a0 + g sG + h sH + i sN + c``."""
    if amap.dim() != 4 or bool((amap < 0).any()):
        return None
    g, h, n, d = amap.shape
    a0 = int(amap[0, 0, 0, 0])
    sg = int(amap[1, 0, 0, 0]) - a0 if g > 1 else 0
    sh = int(amap[0, 1, 0, 0]) - a0 if h > 1 else 0
    sn = int(amap[0, 0, 1, 0]) - a0 if n > 1 else 0
    ar = [torch.arange(s, dtype=torch.int64) for s in (g, h, n, d)]
    want = (a0 + ar[0].view(-1, 1, 1, 1) * sg + ar[1].view(1, -1, 1, 1) * sh + ar[2].view(1, 1, -1, 1) * sn
            + ar[3].view(1, 1, 1, -1))
    return (a0, sg, sh, sn) if bool((amap == want).all()) else None


def _apply_view(node: Node, amap: Tensor) -> Tensor:
    """The address map after a data-movement node (its reference semantics on the index tensor)."""
    if node.op == "pad":
        return torch.nn.functional.pad(amap, list(node.attrs["pads"]), value=-1)
    return OPSET[node.op].reference(amap, **node.attrs)


class _Planner:
    def __init__(self, prog: Program, types: dict[str, TType], isa: int) -> None:
        self.prog = prog
        self.nodes = prog.nodes
        self.types = types
        self.isa = isa
        self.consts = prog.consts
        self.blob = Blob()
        self.steps: list[Step] = []
        self.bufs: list[Buf] = []
        self.locs: dict[str, Loc] = {}
        self.absorbed: set[int] = set()
        self.functions: dict[str, str] = {}
        self._fn_keys: dict[tuple[str, str], str] = {}
        self.helpers: set[str] = set()
        self.shared_bytes = 0
        self.thread_bytes = 0
        self.fusions: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for i, n in enumerate(self.nodes):
            for v in n.inputs:
                self.consumers.setdefault(v, []).append(i)
        # values sharing memory through views: union-find over data-movement nodes; the last reader of a class
        parent: dict[str, str] = {}

        def find(v: str) -> str:
            while parent.get(v, v) != v:
                v = parent[v]
            return v

        for n in self.nodes:
            if n.op in VIEW_OPS:
                parent[find(n.output)] = find(n.inputs[0])
        self.alias_root = find
        self.class_last: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            for v in n.inputs:
                r = find(v)
                self.class_last[r] = max(self.class_last.get(r, -1), i)
        self.class_last[find(prog.output)] = len(self.nodes)
        for v, t in types.items():
            if v != "__output__" and t.batch_axis != 0:
                raise Unsupported(f"value {v} has batch axis {t.batch_axis} (the compiled backend needs axis 0)")

    # ---------------------------------------------------------------------------------------- basics

    def shape(self, v: str) -> tuple[int, ...]:
        return self.types[v].concrete(1)

    def new_buf(self, v: str, dtype: torch.dtype, elems: int) -> Buf:
        where = "out" if v == self.prog.output else "arena"
        if where == "out" and dtype != self.types[self.prog.output].dtype:
            where = "arena"
        b = Buf(f"b{len(self.bufs)}_{v}", dtype, elems, where)
        self.bufs.append(b)
        return b

    def add_step(self, st: Step) -> Step:
        idx = len(self.steps)
        for b in st.reads:
            b.last = max(b.last, idx)
            if b.first < 0:
                b.first = idx
        for b in st.writes:
            if b.first < 0:
                b.first = idx
            b.last = max(b.last, idx)
        self.steps.append(st)
        return st

    def fused(self, what: str) -> None:
        self.fusions[what] = self.fusions.get(what, 0) + 1

    def single_use(self, v: str) -> int | None:
        cs = self.consumers.get(v, [])
        if len(cs) == 1 and v != self.prog.output:
            return cs[0]
        return None

    def chain(self, v: str, allowed: frozenset[str]) -> tuple[list[int], str, int | None]:
        """Follow single-use data-movement nodes from ``v``: (their indices, the last value, its consumer)."""
        idx: list[int] = []
        cur = v
        while True:
            j = self.single_use(cur)
            if j is None:
                return idx, cur, None
            n = self.nodes[j]
            if n.op in allowed and n.inputs[0] == cur:
                idx.append(j)
                cur = n.output
                continue
            return idx, cur, j

    def chain_map(self, v: str, idx: list[int]) -> Tensor:
        amap = torch.arange(math.prod(self.shape(v)), dtype=torch.int64).reshape(self.shape(v))
        for j in idx:
            amap = _apply_view(self.nodes[j], amap)
        return amap

    # ----------------------------------------------------------------------------------- gathering

    def materialize(self, loc: Loc, v: str, node: int, dst: Buf | None = None) -> Loc:
        """A contiguous copy of a view (a gather step), or ``loc`` itself when it already is one."""
        if loc.amap is None and loc.buf.where != "ln" and dst is None:
            return loc
        if loc.buf.where == "ln":
            raise Unsupported("a deferred LayerNorm cannot be materialized")
        elems = math.prod(loc.shape)
        out = dst or Buf(f"b{len(self.bufs)}_g_{v}", loc.buf.dtype, elems)
        if dst is None:
            self.bufs.append(out)
        amap = loc.addresses()
        width = loc.shape[-1] if loc.shape else 1
        rows = _rows_of(amap, width)
        if rows is None:  # rows made of contiguous segments (Swin's patch merging): gather segments
            for seg in range(width // 2, 1, -1):
                if width % seg == 0:
                    rows = _rows_of(amap.reshape(-1, seg), seg)
                    if rows is not None:
                        width = seg
                        break
        desc: dict[str, Any] = dict(s=loc.buf, d=out, es=loc.buf.esize, len=width, elem=0, map=-1, s0=0, srs=0)
        if rows is not None:
            desc["rows"] = rows.numel()
            aff = _affine(rows)
            if aff is not None:
                desc["s0"], desc["srs"] = aff
            else:
                desc["map"] = self.blob.add(rows.to(torch.int32))
        else:
            desc["rows"] = amap.numel() // width
            desc["elem"] = 1
            desc["map"] = self.blob.add(amap.reshape(-1).to(torch.int32))
        self.add_step(Step("gather", desc, f"gather {v}", node, reads=[loc.buf], writes=[out]))
        return Loc(out, None, loc.shape)

    # ----------------------------------------------------------------------------------------- run

    def run(self) -> Plan:
        prog = self.prog
        pix = Buf("pixels", torch.uint8, math.prod(self.shape(prog.input)), "pixels")
        self.bufs.append(pix)
        self.locs[prog.input] = Loc(pix, None, self.shape(prog.input))
        for i, node in enumerate(self.nodes):
            if i in self.absorbed:
                continue
            if node.op in VIEW_OPS:
                x = self.locs[node.inputs[0]]
                self.locs[node.output] = Loc(x.buf, _apply_view(node, x.addresses()), self.shape(node.output))
            elif node.op == "linear":
                self.linear(i, node)
            elif node.op == "attention":
                self.attention(i, node)
            elif node.op in ("layernorm", "layernorm32") and self.defer_layernorm(i, node):
                pass
            elif node.op == "layernorm32" and self.types[node.output].dtype in (torch.int8, torch.int16) \
                    and self.types[node.inputs[0]].dtype in (torch.int8, torch.int16):
                self.layernorm_step(i, node)
            else:
                self.generic(i, node)
        out_loc = self.locs[prog.output]
        odt = self.types[prog.output].dtype
        if out_loc.buf.where == "out" and out_loc.amap is None:
            out = out_loc.buf
        else:
            out = Buf("out", odt, math.prod(self.shape(prog.output)), "out")
            self.bufs.append(out)
            if out_loc.buf.dtype != odt:
                raise Unsupported("the output value has another dtype than its buffer")
            self.materialize(out_loc, prog.output, len(self.nodes), dst=out)
        return Plan(self.steps, self.bufs, self.blob, self.functions, self.helpers, out,
                    shared_bytes=self.shared_bytes, thread_bytes=self.thread_bytes, fusions=self.fusions)

    # ------------------------------------------------------------------------------------ LayerNorm

    def defer_layernorm(self, i: int, node: Node) -> bool:
        """Keep a LayerNorm whose only consumer is one GEMM (through row views) for that GEMM's prologue."""
        t = self.types[node.output]
        if t.dtype != torch.int8 or self.types[node.inputs[0]].dtype not in (torch.int8, torch.int16) \
                or self.types[node.inputs[0]].amax > 32767:
            return False
        c = t.shape[-1]
        idx, last, j = self.chain(node.output, ROW_VIEWS)
        if j is None or self.nodes[j].op != "linear" or self.nodes[j].inputs[0] != last:
            return False
        rows = _rows_of(self.chain_map(node.output, idx), c)
        if rows is None or bool((rows[rows >= 0] % c != 0).any()):
            return False
        buf = Buf(f"ln{i}", torch.int8, math.prod(self.shape(node.output)), "ln", ln_node=i)
        self.locs[node.output] = Loc(buf, None, self.shape(node.output))
        return True

    def layernorm_step(self, i: int, node: Node) -> None:
        """A LayerNorm whose output is a value of its own (Swin's patch norm, int16 out): the runtime's kernel."""
        x = self.materialize(self.locs[node.inputs[0]], node.inputs[0], i)
        t = self.types[node.output]
        c = t.shape[-1]
        y = self.new_buf(node.output, t.dtype, math.prod(self.shape(node.output)))
        cs = {k: self.consts[kk] for k, kk in node.consts.items()}
        desc = dict(src=x.buf, dst=y, s_es=x.buf.esize, d_es=y.esize, rows=math.prod(self.shape(node.output)[:-1]), C=c,
                    m=self.blob.add(_i32(cs["mult"], c), ("i32", node.consts["mult"], c)),
                    s=self.blob.add(_i32(cs["shift"], c), ("i32", node.consts["shift"], c)),
                    o=self.blob.add(_i32(cs["offset"], c), ("i32", node.consts["offset"], c)),
                    q=ops.qmax(int(node.attrs["bits"])), hi=hi_mode(2**21 + 1, cs["shift"]),
                    vec=int(self.types[node.inputs[0]].amax <= 32767))
        self.add_step(Step("ln", desc, f"layernorm32 {node.output} ({desc['rows']}x{c})", i, reads=[x.buf], writes=[y]))
        self.locs[node.output] = Loc(y, None, self.shape(node.output))

    # --------------------------------------------------------------------------------------- linear

    def prologue(self, i: int, x: Loc, k: int, v: str) -> dict[str, Any]:
        d: dict[str, Any] = {"ln": 0, "ln_m": -1, "ln_s": -1, "ln_o": -1, "ln_q": 0, "ln_hi": 0}
        if x.buf.where == "ln":
            j = x.buf.ln_node
            assert j is not None
            ln = self.nodes[j]
            base = _rows_of(x.addresses(), k)
            if base is None:
                raise Unsupported("LayerNorm rows do not reach the GEMM whole")
            lnrows = torch.where(base >= 0, base // k, base)
            y = self.locs[ln.inputs[0]]
            ybase = _rows_of(y.addresses(), k)
            if ybase is None or bool((ybase < 0).any()):
                y = self.materialize(y, ln.inputs[0], i)
                ybase = torch.arange(math.prod(y.shape[:-1]), dtype=torch.int64) * k
            src = torch.where(lnrows >= 0, ybase[lnrows.clamp(min=0)], lnrows)
            cs = {c: self.consts[kk] for c, kk in ln.consts.items()}
            d.update(ln=1 if ln.op == "layernorm32" else 2, ln_q=ops.qmax(int(ln.attrs["bits"])),
                     ln_hi=hi_mode(2**21 + 1, cs["shift"]),
                     ln_m=self.blob.add(_i32(cs["mult"], k), ("i32", ln.consts["mult"], k)),
                     ln_s=self.blob.add(_i32(cs["shift"], k), ("i32", ln.consts["shift"], k)),
                     ln_o=self.blob.add(_i32(cs["offset"], k), ("i32", ln.consts["offset"], k)))
            self.fused("layernorm->gemm prologue")
            abuf = y.buf
        else:
            base = _rows_of(x.addresses(), k) if x.amap is not None else None
            if x.amap is not None and base is None:
                x = self.materialize(x, v, i)
            if base is None:
                base = torch.arange(math.prod(x.shape[:-1]), dtype=torch.int64) * k
            src = base
            abuf = x.buf
        d.update(a=abuf, a_es=abuf.esize)
        aff = _affine(src)
        if aff is not None:
            d.update(a_rows=-1, a_r0=aff[0], a_rs=aff[1])
        else:
            d.update(a_rows=self.blob.add(src.to(torch.int32)), a_r0=0, a_rs=0)
        return d

    def pack_weight(self, key: str, w: Tensor, bias: Tensor | None) -> tuple[int, int]:
        n, k = w.shape
        npad = _round(n, 16)
        w64 = w.to(torch.int64)
        if self.isa == 2:
            kp = _round(k, 4)
            wp = torch.zeros(npad, kp, dtype=torch.int8)
            wp[:n, :k] = w
            panels = [wp[p:p + min(64, npad - p)].reshape(-1, kp // 4, 4).permute(1, 0, 2).reshape(-1)
                      for p in range(0, npad, 64)]
            corr = 128 * w64.sum(dim=1)
        else:
            kp = _round(k, 2)
            wp = torch.zeros(npad, kp, dtype=torch.int16)
            wp[:n, :k] = w.to(torch.int16)
            panels = [wp[p:p + 16].reshape(16, kp // 2, 2).permute(1, 0, 2).reshape(-1) for p in range(0, npad, 16)]
            corr = torch.zeros(n, dtype=torch.int64)
        b = torch.zeros(npad, dtype=torch.int64)
        b[:n] = (bias.to(torch.int64) if bias is not None else 0) - corr
        # two's complement wrap: accumulators are modular, the corrected sum is the exact one
        b = ((b + 2**31) % 2**32) - 2**31
        wo = self.blob.add(torch.cat(panels), ("w", key, self.isa))
        bo = self.blob.add(b.to(torch.int32), ("bias", key, self.isa))
        return wo, bo

    def linear(self, i: int, node: Node) -> None:
        v = node.output
        t = self.types[v]
        k = self.types[node.inputs[0]].shape[-1]
        n = t.shape[-1]
        m = math.prod(self.shape(v)[:-1])
        d = self.prologue(i, self.locs[node.inputs[0]], k, node.inputs[0])
        w = self.consts[node.consts["weight"]]
        bias = self.consts[node.consts["bias"]] if "bias" in node.consts else None
        d["w"], d["bias"] = self.pack_weight(node.consts["weight"] + "|" + node.consts.get("bias", ""), w, bias)
        d.update(M=m, K=k, N=n, em=-1, es=-1, qmax=0, c64=0, vec=1, table=-1, r=None, r_es=0, rm=-1, rsh=-1,
                 pos=-1, o_rows=-1, o_r0=0, o_rs=n, ehi=0, rhi=0)
        extra: list[Step] = []
        self.epilogue(i, node, t, m, n, d, extra)
        reads = [d["a"]] + ([d["r"]] if d["r"] is not None else [])
        st = self.add_step(Step("gemm", d, f"linear {v} ({m}x{k}x{n}, {d['label']})", i, reads=reads,
                                writes=[d["o"]], macs=m * k * n))
        del st.desc["label"]
        for e in extra:
            self.add_step(e)

    def epilogue(self, i: int, node: Node, t: TType, m: int, n: int, d: dict[str, Any], extra: list[Step]) -> None:
        v = node.output
        cs = self.consumers.get(v, [])
        amax = t.amax
        # requantize of the whole output or of column slices (q/k/v)
        reqs: list[tuple[int, int | None, int, int]] = []
        ok = v != self.prog.output and bool(cs)
        for j in cs:
            c = self.nodes[j]
            if c.op == "requantize" and c.inputs[0] == v:
                reqs.append((j, None, 0, n))
            elif (c.op == "slice" and int(c.attrs["dim"]) % t.rank == t.rank - 1
                  and self.single_use(c.output) is not None
                  and self.nodes[self.single_use(c.output)].op == "requantize"):  # type: ignore[index]
                reqs.append((self.single_use(c.output), j, int(c.attrs["start"]), int(c.attrs["end"])))  # type: ignore[arg-type]
            else:
                ok = False
        if ok and reqs:
            bits = {int(self.nodes[r].attrs["bits"]) for r, _, _, _ in reqs}
            cover = torch.zeros(n, dtype=torch.int64)
            for _, _, a, b in reqs:
                cover[a:b] += 1
            if len(bits) == 1 and int(cover.max()) <= 1:
                bits_v = bits.pop()
                dt = ops.storage_dtype(bits_v)
                direct = [r for r, s, _, _ in reqs if s is None]
                y = self.new_buf(self.nodes[direct[0]].output if direct else v + "_rq", dt, m * n)
                em = torch.zeros(n, dtype=torch.int32)
                es = torch.full((n,), 33, dtype=torch.int32)  # uncovered columns: 0 (m = 0)
                c64 = False
                for r, s, a, b in reqs:
                    rq = self.nodes[r]
                    mult, shift = self.consts[rq.consts["mult"]], self.consts[rq.consts["shift"]]
                    em[a:b] = _i32(mult, b - a)
                    es[a:b] = _i32(shift, b - a)
                    c64 |= _rs_bound(amax, mult, shift) > INT32_LIMIT
                    self.absorbed.add(r)
                    if s is None:
                        self.locs[rq.output] = Loc(y, None, self.shape(rq.output))
                    else:
                        self.absorbed.add(s)
                        full = torch.arange(m * n, dtype=torch.int64).reshape(self.shape(v))
                        self.locs[rq.output] = Loc(y, full[..., a:b], self.shape(rq.output))
                d.update(epi=1, o=y, o_es=y.esize, em=self.blob.add(em), es=self.blob.add(es), ehi=hi_mode(amax, es),
                         qmax=ops.qmax(bits_v), c64=int(c64), label="requantize" if len(reqs) == 1 else
                         f"{len(reqs)}x requantize")
                self.fused("gemm+requantize")
                return
        j = self.single_use(v)
        if j is not None and self.nodes[j].op == "requantize_table" and self.nodes[j].inputs[0] == v:
            rq = self.nodes[j]
            mult, shift = self.consts[rq.consts["mult"]], self.consts[rq.consts["shift"]]
            y = self.new_buf(rq.output, torch.int8, m * n)
            d.update(epi=2, o=y, o_es=1, em=self.blob.add(_i32(mult, n)), es=self.blob.add(_i32(shift, n)), qmax=127,
                     ehi=hi_mode(amax, shift),
                     c64=int(_rs_bound(amax, mult, shift) > INT32_LIMIT),
                     table=self.blob.add(self.consts[rq.consts["table"]], ("t", rq.consts["table"])),
                     label="requantize+table")
            self.absorbed.add(j)
            self.locs[rq.output] = Loc(y, None, self.shape(rq.output))
            self.fused("gemm+requantize_table")
            return
        if j is not None and self.nodes[j].op == "embed" and self.nodes[j].inputs[0] == v:
            em_node = self.nodes[j]
            cc = {c: self.consts[kk] for c, kk in em_node.consts.items()}
            bits_v = int(em_node.attrs["bits"])
            dt = ops.storage_dtype(bits_v)
            out_shape = self.shape(em_node.output)
            y = self.new_buf(em_node.output, dt, math.prod(out_shape))
            npre = int(cc["prefix"].shape[0]) if "prefix" in cc else 0
            bound = _rs_bound(amax, cc["mult"], cc["shift"]) + int(cc["pos"].to(torch.int64).abs().max())
            d.update(epi=4, o=y, o_es=y.esize, em=self.blob.add(_i32(cc["mult"], n)),
                     es=self.blob.add(_i32(cc["shift"], n)), qmax=ops.qmax(bits_v), vec=int(bound <= INT32_LIMIT),
                     ehi=hi_mode(amax, cc["shift"]),
                     pos=self.blob.add(cc["pos"].to(torch.int32)), o_r0=npre * n, o_rs=n, label="embed")
            if npre:
                pre = self.blob.add(cc["prefix"].to(torch.int32))
                extra.append(Step("fill", dict(d=y, es=y.esize, n=npre * n, src=pre, q=ops.qmax(bits_v)),
                                  f"embed prefix {em_node.output}", j, writes=[y]))
            self.absorbed.add(j)
            self.locs[em_node.output] = Loc(y, None, out_shape)
            self.fused("gemm+embed")
            return
        # residual add through row views (Swin: window reverse, roll)
        idx, last, j = self.chain(v, frozenset({"reshape", "permute", "roll"}))
        if j is not None and self.nodes[j].op == "add_requantize":
            add = self.nodes[j]
            if add.inputs.count(last) == 1:
                p = add.inputs.index(last)
                rows = _rows_of(self.chain_map(v, idx), n)
                nrows = m
                if rows is not None and rows.numel() == nrows and not bool((rows < 0).any()) \
                        and bool((rows % n == 0).all()):
                    src = rows // n  # add row r comes from linear row src[r]
                    if bool((torch.sort(src).values == torch.arange(nrows)).all()):
                        dest = torch.empty(nrows, dtype=torch.int64)
                        dest[src] = torch.arange(nrows, dtype=torch.int64)
                        other = add.inputs[1 - p]
                        ol = self.materialize(self.locs[other], other, i)
                        cc = {c: self.consts[kk] for c, kk in add.consts.items()}
                        mine, theirs = ("a", "b") if p == 0 else ("b", "a")
                        bits_v = int(add.attrs["bits"])
                        odt = ops.storage_dtype(bits_v)
                        # in place: the residual's memory takes the sum when nothing reads it afterwards
                        inplace = (ol.buf.where == "arena" and ol.buf.dtype == odt and ol.buf.elems == m * n
                                   and add.output != self.prog.output
                                   and (ol is not self.locs[other]
                                        or self.class_last.get(self.alias_root(other), 1 << 30) <= j)
                                   and ol.buf is not d["a"])
                        y = ol.buf if inplace else self.new_buf(add.output, odt, m * n)
                        if inplace:
                            self.fused("gemm+add_requantize in place")
                        d.update(epi=3, o=y, o_es=y.esize, em=self.blob.add(_i32(cc[f"mult_{mine}"], n)),
                                 es=self.blob.add(_i32(cc[f"shift_{mine}"], n)), qmax=ops.qmax(bits_v), r=ol.buf,
                                 r_es=ol.buf.esize, rm=self.blob.add(_i32(cc[f"mult_{theirs}"], n)),
                                 rsh=self.blob.add(_i32(cc[f"shift_{theirs}"], n)), label="add_requantize",
                                 ehi=hi_mode(amax, cc[f"shift_{mine}"]),
                                 rhi=hi_mode(self.types[other].amax, cc[f"shift_{theirs}"]))
                        aff = _affine(dest * n)
                        if aff is not None:
                            d.update(o_rows=-1, o_r0=aff[0], o_rs=aff[1])
                        else:
                            d.update(o_rows=self.blob.add((dest * n).to(torch.int32)), o_r0=0, o_rs=0)
                            self.fused("gemm+row scatter")
                        self.absorbed.update(idx)
                        self.absorbed.add(j)
                        self.locs[add.output] = Loc(y, None, self.shape(add.output))
                        self.fused("gemm+add_requantize")
                        return
        y = self.new_buf(v, torch.int32, m * n)
        d.update(epi=0, o=y, o_es=4, label="int32")
        self.locs[v] = Loc(y, None, self.shape(v))

    # ------------------------------------------------------------------------------------ attention

    def attention(self, i: int, node: Node) -> None:
        q_t = self.types[node.inputs[0]]
        g, h, nt, dh = q_t.concrete(1)
        desc: dict[str, Any] = dict(G=g, H=h, N=nt, D=dh)
        for name, v in zip("qkv", node.inputs, strict=True):
            loc = self.locs[v]
            st = _affine4(loc.addresses())
            if st is None:
                loc = self.materialize(loc, v, i)
                st = (0, h * nt * dh, nt * dh, dh)
            desc[name] = loc.buf
            desc[f"{name}0"], desc[f"{name}g"], desc[f"{name}h"], desc[f"{name}n"] = st
        cc = {c: self.consts[kk] for c, kk in node.consts.items()}
        sm, ssh = int(cc["score_mult"].reshape(-1)[0]), int(cc["score_shift"].reshape(-1)[0])
        bits = int(node.attrs["score_bits"])
        raw = dh * self.types[node.inputs[0]].amax * self.types[node.inputs[1]].amax
        if "bias" in cc:
            raw += int(cc["bias"].to(torch.int64).abs().max())
        x0 = int(node.attrs["x0"])
        probs = int(node.attrs["probs"])
        desc.update(bias=self.blob.add(cc["bias"].to(torch.int32)) if "bias" in cc else -1,
                    mask=self.blob.add(cc["mask"].to(torch.uint8)) if "mask" in cc else -1,
                    nwin=int(cc["mask"].shape[0]) if "mask" in cc else 1, sm=sm, ssh=ssh, sq=ops.qmax(bits),
                    sc64=int(((raw * abs(sm) + (1 << (ssh - 1))) >> ssh) > INT32_LIMIT), shi=hi_mode(raw, ssh),
                    probs=probs, x0=x0,
                    n=int(node.attrs.get("n", 0)), rel_m=0, dmul=0, dsh=0, qcap=9)
        if probs == PROBS_REL8:
            dd = -x0
            lg = (dd - 1).bit_length()
            dmul = -(-(1 << (31 + lg)) // dd)
            if dmul >= 2**32:
                raise Unsupported("shiftmax_rel divisor")
            # the largest q = floor(xp / x0) the score bound allows (|s| <= sb, so d = s - max >= -2 sb)
            sb = min(ops.qmax(bits), (raw * abs(sm) + (1 << (ssh - 1))) >> ssh)
            dmin = -2 * sb
            umax = -max(dmin + (dmin >> 1) - (dmin >> 4), 9 * x0)
            desc.update(rel_m=(255 << 22) // dd, dmul=dmul, dsh=31 + lg, qcap=min(9, umax // dd))
        # output: fused with the following requantize when it sees the result through views only
        out_amax = self.types[node.output].amax
        idx, last, j = self.chain(node.output, frozenset({"reshape", "permute"}))
        fused = False
        if j is not None and self.nodes[j].op == "requantize" and self.nodes[j].inputs[0] == last:
            rq = self.nodes[j]
            final = self.chain_map(node.output, idx).reshape(-1)
            inv = torch.empty_like(final)
            inv[final] = torch.arange(final.numel(), dtype=torch.int64)
            inv = inv.reshape(g, h, nt, dh)
            st = _affine4(inv)
            c_r = self.types[rq.inputs[0]].shape[-1]
            ch = inv % c_r
            if st is not None and bool((ch == ch[:1, :, :1, :]).all()):
                mult, shift = self.consts[rq.consts["mult"]], self.consts[rq.consts["shift"]]
                chs = ch[0, :, 0, :].reshape(-1)
                om = _i32(mult, c_r)[chs].contiguous()
                osh = _i32(shift, c_r)[chs].contiguous()
                bits_o = int(rq.attrs["bits"])
                y = self.new_buf(rq.output, ops.storage_dtype(bits_o), math.prod(self.shape(rq.output)))
                desc.update(o=y, o_es=y.esize, o0=st[0], og=st[1], oh=st[2], on=st[3], orq=1, om=self.blob.add(om),
                            osh=self.blob.add(osh), oq=ops.qmax(bits_o),
                            oc64=int(_rs_bound(out_amax, mult, shift) > INT32_LIMIT), ohi=hi_mode(out_amax, shift))
                self.absorbed.update(idx)
                self.absorbed.add(j)
                self.locs[rq.output] = Loc(y, None, self.shape(rq.output))
                fused = True
                self.fused("attention+requantize")
        if not fused:
            y = self.new_buf(node.output, torch.int32, g * h * nt * dh)
            desc.update(o=y, o_es=4, o0=0, og=h * nt * dh, oh=nt * dh, on=dh, orq=0, om=-1, osh=-1, oq=0, oc64=0, ohi=0)
            self.locs[node.output] = Loc(y, None, self.shape(node.output))
        qb = QB  # the kernels compute QB query rows per block whatever qb is
        desc["qb"] = qb
        n16, n4, d4, d16 = _round(nt, 16), _round(nt, 4), _round(dh, 4), _round(dh, 16)
        kvb = _round(d4 * n16 + n16 * 4 + n4 * d16)
        writes = [desc["o"]]
        if self.isa == 2:
            kv = Buf(f"b{len(self.bufs)}_kv{i}", torch.uint8, g * h * kvb)
            self.bufs.append(kv)
            desc["kv"] = kv
            writes.append(kv)
            need = _round(QB * d4) + QB * n16 * 4 + QB * n16 + _round(nt * 8) + kvb + 256
        else:
            desc["kv"] = None
            need = _round(nt * 4) + nt * 8 + nt + 256
        self.thread_bytes = max(self.thread_bytes, need)
        reads = [desc["q"], desc["k"], desc["v"]]
        self.add_step(Step("attn", desc, f"attention {node.output} ({g}x{h} heads, N={nt}, d={dh}"
                                         f"{', requantize' if fused else ''})", i, reads=reads, writes=writes,
                           macs=2 * g * h * nt * nt * dh))

    # -------------------------------------------------------------------------------------- generic

    def generic(self, i: int, node: Node) -> None:
        spec = OPSET[node.op]
        low = LOWERINGS.get(node.op)
        if low is None:
            raise Unsupported(f"no lowering for {node.op}")
        ins = [self.materialize(self.locs[v], v, i) for v in node.inputs]
        ops_in = [Operand(v, CTYPES[self.types[v].dtype], self.shape(v), self.types[v].lo, self.types[v].hi)
                  for v in node.inputs]
        t = self.types[node.output]
        out_op = Operand(node.output, CTYPES[t.dtype], self.shape(node.output), t.lo, t.hi)
        ctx = NodeCtx(node, i, TARGET, ops_in, out_op, {c: self.consts[k] for c, k in node.consts.items()},
                      spec.inputs)
        res = low(ctx)
        if not isinstance(res, Kernel):
            raise Unsupported(f"{node.op} lowered to a view")
        y = self.new_buf(node.output, t.dtype, math.prod(self.shape(node.output)))
        decls = [dcl for dcl, _, _ in ctx.params] + [f"{out_op.ctype} *restrict out"]
        sig = ", ".join(decls)
        key = (sig, res.body)
        fname = self._fn_keys.get(key)
        if fname is None:
            fname = f"k_{node.op}_{i}"
            self._fn_keys[key] = fname
            body = "\n".join("    " + ln for ln in res.body.split("\n") if ln.strip())
            self.functions[fname] = (f"/* {node.op}: {c_comment(res.formula)} (one image) */\n"
                                     f"static void {fname}({sig}) {{\n{body}\n}}")
        self.helpers |= ctx.helpers
        args: list[str] = []
        has_scratch = False
        scratch_off = 0
        reads: list[Buf] = []
        for _, kind, ref in ctx.params:
            if kind == "input":
                loc = ins[ref]
                reads.append(loc.buf)
                ct = CTYPES[loc.buf.dtype]
                args.append(f"(const {ct} *)ivit_buf(&cx, {loc.buf.code}, @{loc.buf.name}@) + b * {loc.buf.elems}")
            elif kind == "const":
                tns = self.consts[node.consts[ref]]
                off = self.blob.add(tns, ("c", node.consts[ref]))
                args.append(f"(const {CTYPES[tns.dtype]} *)(cx.blob + {off})")
            else:
                _, nbytes, ct = ref
                has_scratch = True
                args.append(f"({ct} *)(cx.thread + (int64_t)tid * @TWS@ + {scratch_off})")  # per thread
                scratch_off += _round(nbytes)
        self.thread_bytes = max(self.thread_bytes, scratch_off)
        args.append(f"({out_op.ctype} *)ivit_buf(&cx, {y.code}, @{y.name}@) + b * {y.elems}")
        parallel = not has_scratch
        call = f"{fname}({', '.join(args)});"
        self.add_step(Step("generic", {}, f"{node.op} {node.output}", i, reads=reads, writes=[y], call=call,
                           parallel=parallel))
        self.locs[node.output] = Loc(y, None, self.shape(node.output))


def _place(bufs: list[Buf]) -> int:
    """Greedy placement (largest first) of arena buffers at per-image offsets; returns the per-image size."""
    placed: list[Buf] = []
    size = 0
    for b in sorted(bufs, key=lambda b: (-b.nbytes, b.first, b.name)):
        off = 0
        for p in sorted((p for p in placed if p.first <= b.last and b.first <= p.last), key=lambda p: p.offset):
            if off + b.nbytes <= p.offset:
                break
            off = max(off, p.offset + p.nbytes)
        b.offset = off
        placed.append(b)
        size = max(size, off + b.nbytes)
    return size


def plan_program(prog: Program, types: dict[str, TType], isa: int) -> Plan:
    """Plan ``prog`` (validated, after the backend's passes) for code path ``isa`` (2, 1 or 0)."""
    p = _Planner(prog, types, isa).run()
    arena = [b for b in p.bufs if b.where == "arena" and b.first >= 0]
    p.arena_bytes = max(_place(arena), ALIGN)
    for b in p.bufs:
        if b.where == "arena" and b.first < 0:
            b.offset = 0  # never touched
    return p
