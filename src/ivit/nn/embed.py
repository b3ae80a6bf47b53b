"""``QEmbed``: patch tokens + class token + position embedding on the residual scale."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..qtensor import QTensor, carry
from ._run import run
from .observers import RangeObserver

__all__ = ["QEmbed"]


class QEmbed(nn.Module):
    """Patch tokens + optional prefix (class/register) tokens + position embedding (``ops.embed_tokens``).

    Integer constants: ``prefix_int = round((cls + pos[:P]) / S_r)``, ``pos_int = round(pos[P:] / S_r)``,
    ``mult/shift = dyadic(S_acc / S_r)`` (per channel).  ``pos_on_prefix=False`` (timm's
    ``no_embed_class``) adds no position embedding to the prefix tokens.
    """

    def __init__(self, dim: int, num_patches: int, num_prefix: int = 1, bits: int = 16,
                 momentum: float = 0.95, pos_on_prefix: bool = True) -> None:
        super().__init__()
        self.bits = bits
        self.num_prefix = num_prefix
        self.pos_on_prefix = pos_on_prefix
        self.cls_token = nn.Parameter(torch.zeros(1, num_prefix, dim)) if num_prefix else None
        self.pos_embed = nn.Parameter(torch.zeros(1, (num_prefix if pos_on_prefix else 0) + num_patches, dim))
        self.observer = RangeObserver(bits, momentum)

    @property
    def _pos_offset(self) -> int:
        return self.num_prefix if self.pos_on_prefix else 0

    def _float_prefix(self) -> Tensor | None:
        if self.cls_token is None:
            return None
        if not self.pos_on_prefix:
            return self.cls_token[0]
        return self.cls_token[0] + self.pos_embed[0, : self.num_prefix]  # (P, C)

    def consts(self, acc_scale: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
        s = self.observer.scale()
        m = ops.qmax(self.bits)
        mult, shift = ops.dyadic(acc_scale / s)
        pos = torch.round(self.pos_embed.detach()[0, self._pos_offset:].to(torch.float64).cpu() / s)
        pos = pos.clamp(-m, m).to(torch.int32)
        prefix = None
        fp = self._float_prefix()
        if fp is not None:
            prefix = torch.round(fp.detach().to(torch.float64).cpu() / s).clamp(-m, m).to(torch.int32)
        return mult, shift, prefix, pos, s

    def _float_tokens(self, patches: Tensor) -> Tensor:
        x = patches + self.pos_embed[:, self._pos_offset:]
        fp = self._float_prefix()
        if fp is not None:
            x = torch.cat([fp.unsqueeze(0).expand(x.shape[0], -1, -1), x], dim=1)
        return x

    def forward(self, acc: QTensor) -> QTensor:
        if self.observer.observing:
            with torch.no_grad():
                self.observer.observe(self._float_tokens(acc.dequantize()))
        mult, shift, prefix, pos, s = self.consts(acc.scale)
        q, name = run("embed", [acc], {"mult": mult, "shift": shift, "pos": pos, "prefix": prefix},
                       {"bits": self.bits})
        value = None if acc.value is None else carry(self._float_tokens(acc.value), q, s)
        return QTensor(q, s, self.bits, value, name)
