"""Program -> Program rewrites.  Each gives a program with the same integers on every input.

* ``fuse_attention``: the chain ``q k^T [+ bias] -> requantize -> shiftmax_rel [mask] -> p v ->
  attn_normalize`` (or the legacy ``... -> shiftmax(k_out=8) -> p v``) becomes one ``attention`` op,
  when its intermediates have no other use.
* ``fold_gelu_table``: ``requantize(8) -> shiftgelu -> requantize(8, per tensor)`` is a function of one
  int8 value; it becomes ``requantize_table`` with the 256-entry table computed by the reference ops.

Passes are registered by name in ``PASSES``; backends list the ones they want.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import ops
from .opset import OPSET, PROBS_REL8, PROBS_SHIFTMAX8
from .program import Node, Program

__all__ = ["PASSES", "apply_passes", "fuse_attention", "fold_gelu_table", "register_pass"]

Pass = Callable[[Program], Program]
PASSES: dict[str, Pass] = {}


def register_pass(name: str) -> Callable[[Pass], Pass]:
    def deco(fn: Pass) -> Pass:
        PASSES[name] = fn
        return fn
    return deco


def _uses(prog: Program) -> dict[str, int]:
    uses: dict[str, int] = {}
    for n in prog.nodes:
        for v in n.inputs:
            uses[v] = uses.get(v, 0) + 1
    uses[prog.output] = uses.get(prog.output, 0) + 1
    return uses


def _rewrite(prog: Program, groups: list[tuple[list[int], Node]], new_consts: dict[str, torch.Tensor]) -> Program:
    """Replace each group of node indices by one node placed at the group's last index."""
    drop: set[int] = set()
    place: dict[int, Node] = {}
    for idx, node in groups:
        drop.update(idx)
        place[max(idx)] = node
    nodes = [place[i] if i in place else n for i, n in enumerate(prog.nodes) if i not in drop or i in place]
    used = {k for n in nodes for k in n.consts.values()}
    consts = {k: v for k, v in {**prog.consts, **new_consts}.items() if k in used}
    return Program(nodes=nodes, consts=consts, input=prog.input, output=prog.output, meta=dict(prog.meta),
                   format_version=prog.format_version)


@register_pass("fuse_attention")
def fuse_attention(prog: Program) -> Program:
    """Fuse every attention chain whose intermediates are used only inside the chain (see module docstring)."""
    uses = _uses(prog)
    by_out = {n.output: i for i, n in enumerate(prog.nodes)}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(prog.nodes):
        for v in n.inputs:
            consumers.setdefault(v, []).append(i)
    groups: list[tuple[list[int], Node]] = []
    taken: set[int] = set()

    def only(v: str, op: str) -> int | None:
        """The single consumer of ``v`` if it is an ``op`` node."""
        c = consumers.get(v, [])
        if len(c) == 1 and uses.get(v) == 1 and prog.nodes[c[0]].op == op:
            return c[0]
        return None

    for i, mm in enumerate(prog.nodes):
        if mm.op != "matmul" or not mm.attrs.get("transpose_b") or i in taken:
            continue
        chain = [i]
        cur = mm.output
        bias_key = None
        j = only(cur, "add_const")
        if j is not None:
            bias_key = prog.nodes[j].consts["const"]
            chain.append(j)
            cur = prog.nodes[j].output
        j = only(cur, "requantize")
        if j is None:
            continue
        rq = prog.nodes[j]
        if prog.consts[rq.consts["mult"]].numel() != 1:
            continue
        chain.append(j)
        cur = rq.output
        c = consumers.get(cur, [])
        if len(c) != 1 or uses.get(cur) != 1:
            continue
        sm = prog.nodes[c[0]]
        if sm.op == "shiftmax" and sm.attrs.get("k_out") == 8:
            probs = PROBS_SHIFTMAX8
        elif sm.op == "shiftmax_rel":
            probs = PROBS_REL8
        else:
            continue
        chain.append(c[0])
        p = sm.output
        pv_i = next((k for k in consumers.get(p, []) if prog.nodes[k].op == "matmul"
                     and prog.nodes[k].inputs[0] == p and not prog.nodes[k].attrs.get("transpose_b")), None)
        if pv_i is None:
            continue
        pv = prog.nodes[pv_i]
        chain.append(pv_i)
        out = pv.output
        if probs == PROBS_REL8:
            if uses.get(p) != 2:
                continue
            k_norm = only(pv.output, "attn_normalize")
            if k_norm is None or prog.nodes[k_norm].inputs != (pv.output, p):
                continue
            chain.append(k_norm)
            out = prog.nodes[k_norm].output
        elif uses.get(p) != 1:
            continue
        if taken.intersection(chain):
            continue
        q, k = mm.inputs
        v = pv.inputs[1]
        if by_out.get(v, -1) > max(chain):  # v must exist where the fused node is placed
            continue
        consts = {"score_mult": rq.consts["mult"], "score_shift": rq.consts["shift"]}
        if bias_key is not None:
            consts["bias"] = bias_key
        if "mask" in sm.consts:
            consts["mask"] = sm.consts["mask"]
        attrs = {"score_bits": rq.attrs["bits"], "probs": probs, "x0": sm.attrs["x0"]}
        if probs == PROBS_SHIFTMAX8:
            attrs["n"] = sm.attrs["n"]
        groups.append((chain, Node("attention", (q, k, v), out, consts, attrs)))
        taken.update(chain)
    return _rewrite(prog, groups, {}) if groups else prog


@register_pass("fold_gelu_table")
def fold_gelu_table(prog: Program) -> Program:
    """``requantize(8) -> shiftgelu -> requantize(8)`` -> ``requantize_table`` (see module docstring)."""
    uses = _uses(prog)
    nodes = prog.nodes
    groups: list[tuple[list[int], Node]] = []
    new_consts: dict[str, torch.Tensor] = {}
    for i in range(len(nodes) - 2):
        a, b, c = nodes[i], nodes[i + 1], nodes[i + 2]
        if not (a.op == "requantize" and a.attrs.get("bits") == 8 and b.op == "shiftgelu" and b.inputs == (a.output,)
                and c.op == "requantize" and c.attrs.get("bits") == 8 and c.inputs == (b.output,)
                and uses.get(a.output) == 1 and uses.get(b.output) == 1
                and prog.consts[c.consts["mult"]].numel() == 1):
            continue
        if groups and i <= max(groups[-1][0]):
            continue
        v = torch.arange(-128, 128, dtype=torch.int8)
        g = OPSET["shiftgelu"].reference(v, **b.attrs)
        table = ops.requantize(g, prog.consts[c.consts["mult"]], prog.consts[c.consts["shift"]], 8).contiguous()
        key = f"{c.output}.gelu_table"
        while key in prog.consts or key in new_consts:
            key += "_"
        new_consts[key] = table
        groups.append(([i, i + 1, i + 2], Node("requantize_table", a.inputs, c.output,
                                              {"mult": a.consts["mult"], "shift": a.consts["shift"], "table": key},
                                              {})))
    return _rewrite(prog, groups, new_consts) if groups else prog


def apply_passes(prog: Program, names: tuple[str, ...] | list[str]) -> Program:
    for name in names:
        prog = PASSES[name](prog)
    return prog
