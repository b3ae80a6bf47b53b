"""``QShiftmax``: integer attention probabilities and their product with the values.

Two representations (``QuantConfig.probs``):

* ``rel8`` (default): ``shiftmax_rel`` gives uint8 probabilities relative to each row's maximum,
  ``p @ v`` is a u8 x s8 GEMM, ``attn_normalize`` divides by the row sum: int32 out at ``S_v * 2**-16``.
* ``shiftmax8``: the I-ViT Shiftmax, int8 ``[0, 127]`` at ``2**-7``, then ``p @ v``: int32 at
  ``S_v * 2**-7``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..config import Probs
from ..ir.opset import expand_window_mask
from ..qtensor import QTensor, carry
from ._run import run

__all__ = ["QShiftmax", "SCORE_MIN_SCALE"]

#: smallest score scale ``rel8`` probabilities are computed at: ``|x0| = floor(1/S) <= 2**21`` keeps the row
#: maximum at 255 (``ops.shiftmax_rel``); finer scores are requantized to it first (``QAttention`` observes its
#: scores with this floor, so that requantization never appears in its programs)
SCORE_MIN_SCALE = 2.0**-21


class QShiftmax(nn.Module):
    """``softmax(scores) @ v`` in integers: scores 16-bit ``(B, H, N, N)``, v int8 ``(B, H, N, d)``.

    ``x0 = floor(-1/S)`` for the score scale ``S``; for ``shiftmax8`` the ShiftExp shift ``n`` is the
    largest ``<= n_max`` that bounds the row sum (``ops.choose_shiftmax_n``).
    """

    def __init__(self, k_out: int = 8, n_max: int = 15, probs: Probs = Probs.REL8) -> None:
        super().__init__()
        self.k_out = k_out
        self.n_max = n_max
        self.probs = Probs(probs)

    def consts(self, in_scale: Tensor, length: int) -> tuple[int, int, Tensor]:
        """``(x0, n, probability scale)`` (``n`` and the scale matter for ``shiftmax8`` only)."""
        x0 = ops.shift_exp_x0(float(in_scale))
        if self.probs == Probs.REL8:
            return x0, 0, torch.tensor(1.0 / 255, dtype=torch.float64)
        n = ops.choose_shiftmax_n(x0, length, self.n_max)
        return x0, n, torch.tensor(2.0 ** -(self.k_out - 1), dtype=torch.float64)

    def forward(self, s: QTensor, v: QTensor, mask: Tensor | None = None) -> QTensor:
        """-> int32 ``(B, H, N, d)``: the attention context before ``ctx_act``."""
        if self.probs == Probs.REL8 and float(s.scale) < SCORE_MIN_SCALE:
            mult, shift = ops.dyadic(s.scale.to(torch.float64) / SCORE_MIN_SCALE)
            bits = max(9, min(s.bits, 24))
            q, name = run("requantize", [s], {"mult": mult, "shift": shift}, {"bits": bits})
            ms = torch.tensor(SCORE_MIN_SCALE, dtype=torch.float64)
            s = QTensor(q, ms, bits, None if s.value is None else carry(s.value, q, ms.to(q.device)), name)
        x0, n, _ = self.consts(s.scale, s.q.shape[-1])
        if self.probs == Probs.REL8:
            p, pname = run("shiftmax_rel", [s], {"mask": mask}, {"x0": x0})
        else:
            p, pname = run("shiftmax", [s], {"mask": mask}, {"x0": x0, "n": n, "k_out": self.k_out})
        pq = QTensor(p, torch.ones((), dtype=torch.float64), 8, None, pname)
        acc, aname = run("matmul", [pq, v], attrs={"transpose_b": 0})
        if self.probs == Probs.REL8:
            ctx, cname = run("attn_normalize", [QTensor(acc, v.scale, 32, None, aname), pq])
            scale = v.scale.to(torch.float64) * 2.0**-ops.CTX_FRAC_BITS
        else:
            ctx, cname = acc, aname
            scale = v.scale.to(torch.float64) * 2.0 ** -(self.k_out - 1)
        value = None
        if s.value is not None and v.value is not None:
            sv = s.value
            if mask is not None:
                sv = sv.masked_fill(expand_window_mask(mask.to(sv.device), sv.shape), float("-inf"))
            value = carry(torch.softmax(sv, dim=-1) @ v.value, ctx, scale.to(ctx.device))
        return QTensor(ctx, scale, 32, value, cname)

    def extra_repr(self) -> str:
        return f"probs={self.probs.value}, n_max={self.n_max}"
