"""Resource bounds checked before a program runs (user-raisable)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from .types import ProgramError

__all__ = ["Limits"]


@dataclass(frozen=True)
class Limits:
    """Resource bounds checked before a program runs.  Raise them explicitly for bigger models:
    ``ivit.load(path, limits=Limits(max_const_bytes=8 << 30))`` or ``--limit max_const_bytes=8e9``.

    Attributes:
        max_file_bytes: size of an ``.ivit`` file.
        max_header_bytes: size of its JSON header.
        max_json_depth: nesting depth of the JSON header.
        max_nodes: program nodes.
        max_image_side: input height and width.
        max_in_chans: input channels.
        max_classes: output classes.
        max_const_bytes: total bytes of the constants.
        max_activation_bytes: peak bytes of live values per image while the program runs.
        max_run_bytes: peak bytes of live values of a whole batch (checked at run time).
        max_float_params: parameters of a float twin that ``ivit bench`` may build.
    """

    max_file_bytes: int = 8 << 30
    max_header_bytes: int = 64 << 20
    max_json_depth: int = 32
    max_nodes: int = 50_000
    max_image_side: int = 4096
    max_in_chans: int = 16
    max_classes: int = 1_000_000
    max_const_bytes: int = 4 << 30
    max_activation_bytes: int = 2 << 30
    max_run_bytes: int = 16 << 30
    max_float_params: int = 2_000_000_000

    def with_overrides(self, items: list[str] | None) -> Limits:
        """``["max_nodes=100000", "max_const_bytes=8e9"]`` -> a copy with those limits (one-line errors)."""
        kw: dict[str, int] = {}
        names = {f.name for f in fields(self)}
        for item in items or []:
            key, sep, val = item.partition("=")
            if not sep or key not in names:
                raise ProgramError(f"bad --limit {item!r}: use NAME=VALUE with NAME one of {', '.join(sorted(names))}")
            try:
                num = float(val)
            except ValueError:
                raise ProgramError(f"bad --limit {item!r}: {val!r} is not a number") from None
            if not math.isfinite(num) or num < 1 or num > 2**62:
                raise ProgramError(f"bad --limit {item!r}: must be in [1, 2**62]")
            kw[key] = int(num)
        return replace(self, **kw)
