"""One forward: the quantized modules compute every integer op through ``call``, which also records it.

Outside a ``Tracer`` block, ``call(op, inputs, consts, attrs)`` just evaluates the op's reference
semantics (``ivit.ir.opset``) on the inputs' integer tensors, or an exact fast kernel passed as
``kernel`` (e.g. the int8 GEMM).  Inside one, it also appends a ``Node`` to the program being
built, with the constants stored in the dtype the op set prescribes (the eager computation uses
exactly those stored integers).  ``ivit.quant.freeze`` runs the model's own forward once under a
``Tracer``: the frozen program is the forward, never a second hand-written copy.

Constants are named after the module that recorded them (``blocks.0.attn.qkv.weight``), found from
a stack kept by global module hooks while tracing.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .opset import OPSET
from .program import Node
from .types import DTYPE_NAMES

__all__ = ["Tracer", "call", "active", "Traceable"]


class Traceable(Protocol):
    """What ``call`` needs of an input: its integer tensor and (when tracing) its program name."""

    q: Tensor
    name: str | None


_ACTIVE: contextvars.ContextVar[Tracer | None] = contextvars.ContextVar("ivit_tracer", default=None)


def active() -> Tracer | None:
    """The tracer of the current block, if any."""
    return _ACTIVE.get()


class Tracer:
    """Records the ops of one forward pass into program nodes and constants.

    Usage::

        with Tracer(model, input_name="pixels") as t:
            out = model(pixels)        # modules call ``call``; the model names its input value
        t.nodes, t.consts              # the program body
    """

    def __init__(self, model: nn.Module) -> None:
        self.nodes: list[Node] = []
        self.consts: dict[str, Tensor] = {}
        self._names = {id(m): n for n, m in model.named_modules()}
        self._stack: list[str] = []
        self._count = 0
        self._token: contextvars.Token[Tracer | None] | None = None
        self._hooks: list[Any] = []

    def __enter__(self) -> Tracer:
        if _ACTIVE.get() is not None:
            raise RuntimeError("nested tracing")
        self._token = _ACTIVE.set(self)

        def pre(module: nn.Module, args: Any) -> None:
            self._stack.append(self._names.get(id(module), ""))

        def post(module: nn.Module, args: Any, out: Any) -> None:
            if self._stack:
                self._stack.pop()

        self._hooks = [nn.modules.module.register_module_forward_pre_hook(pre),
                       nn.modules.module.register_module_forward_hook(post)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._token is not None:
            _ACTIVE.reset(self._token)
            self._token = None

    def _scope(self) -> str:
        for name in reversed(self._stack):
            if name:
                return name
        return "model"

    def add_const(self, cname: str, t: Tensor) -> str:
        key = f"{self._scope()}.{cname}"
        base, i = key, 1
        while key in self.consts:
            key = f"{base}_{i}"
            i += 1
        self.consts[key] = t.detach().cpu().contiguous()
        return key

    def new_value(self) -> str:
        self._count += 1
        return f"v{self._count}"

    def record(self, op: str, inputs: Sequence[str], consts: Mapping[str, Tensor], attrs: Mapping[str, Any]) -> str:
        keys = {c: self.add_const(c, t) for c, t in consts.items()}
        out = self.new_value()
        self.nodes.append(Node(op, tuple(inputs), out, keys, dict(attrs)))
        return out


def _store(op: str, cname: str, t: Tensor) -> Tensor:
    """A constant in the dtype the op set prescribes (the first allowed one), checking it fits."""
    spec = next((c for c in OPSET[op].consts if c.name == cname), None)
    if spec is None:
        raise RuntimeError(f"op {op} has no constant {cname}")
    t = torch.as_tensor(t)
    if t.dtype in spec.dtypes:
        return t
    dt = spec.dtypes[0]
    if t.is_floating_point():
        raise TypeError(f"{op}.{cname}: float constant; integer constants only")
    if dt != torch.bool and t.numel():
        info = torch.iinfo(dt)
        if int(t.min()) < info.min or int(t.max()) > info.max:
            raise ValueError(f"{op}.{cname} does not fit {DTYPE_NAMES[dt]}")
    return t.to(dt)


def _plain(v: Any) -> Any:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v]
    return int(v)


def call(op: str, inputs: Sequence[Traceable], consts: Mapping[str, Tensor | None] | None = None,
         attrs: Mapping[str, Any] | None = None, *,
         kernel: Callable[..., Tensor] | None = None) -> tuple[Tensor, str | None]:
    """Evaluate op ``op`` on the inputs' integer tensors and, when tracing, record it.

    Args:
        inputs: objects with ``.q`` (integer tensor) and ``.name`` (its program value, when tracing).
        consts: the op's integer constants (None entries are left out: absent optional constants).
        attrs: the op's integer attributes.
        kernel: an exact fast implementation to evaluate with instead of the reference (same
            calling convention ``kernel(*inputs, **consts, **attrs)``).
    Returns:
        ``(integer result, program value name or None)``.
    """
    spec = OPSET[op]
    attrs = {k: _plain(v) for k, v in (attrs or {}).items()}
    stored = {k: _store(op, k, v) for k, v in (consts or {}).items() if v is not None}
    dev = inputs[0].q.device if inputs else torch.device("cpu")
    fn = kernel or spec.reference
    out = fn(*[x.q for x in inputs], **{k: v.to(dev) for k, v in stored.items()}, **attrs)
    tracer = _ACTIVE.get()
    name = None
    if tracer is not None:
        names = [x.name for x in inputs]
        if any(n is None for n in names):
            raise RuntimeError(f"tracing {op}: an input was computed outside the traced ops")
        name = tracer.record(op, [str(n) for n in names], stored, attrs)
    return out, name


@contextmanager
def tracing(model: nn.Module) -> Iterator[Tracer]:
    with Tracer(model) as t:
        yield t
