"""The ``triton`` backend: exact integer kernels in Triton for CUDA GPUs.

* int8 GEMMs (``linear``, ``matmul``) on tensor cores with int32 accumulators (exact), epilogues for the
  requantization forms (``kernels.linear_requantize`` & co., ready for the fused ops the op set may gain);
* the fused ``attention`` op in one kernel per (image, head, block of query rows): ``q k^T``, bias, score
  requantization, Swin window mask, Shiftmax-rel (or the legacy Shiftmax), ``p v`` and the normalization, with
  no score tensor in memory;
* I-LayerNorm (both variants, exact integer square root), requantize, residual add, the GELU tables, Shiftmax.

Passes: ``fold_gelu_table`` then ``fuse_attention`` (as the cpu backend).  Ops without a kernel here (data movement,
``embed``, ``patchify``, ``add_const``, ``mean``) run their reference semantics, which is elementwise integer
torch and runs on CUDA as it is.

``import ivit`` never imports triton: the kernel table holds factories that import ``kernels`` (and so triton)
when an engine plans a program.  Availability: triton importable and a CUDA GPU present, or Triton's CPU
interpreter (tests only: ``TRITON_INTERPRET=1`` set before triton is first imported, i.e. before ``import ivit``,
which imports triton through torch), where the kernels also accept CPU tensors.

``proposed_kernels()`` holds factories for fused GEMM ops the op set does not have yet (``linear_requantize``,
``linear_add_requantize``, ``linear_requantize_table``); ``ptx`` compiles every kernel for a GPU offline and checks
that its PTX is integer-only.
"""

from __future__ import annotations

from ..base import Backend, register_backend
from .factories import available, interpreting, load_kernels, proposed_kernels, triton_kernels

__all__ = ["TRITON", "triton_kernels", "proposed_kernels", "interpreting", "available", "load_kernels"]

TRITON = register_backend(Backend(
    name="triton",
    devices=("cuda", "cpu"),
    available=available,
    kernels=triton_kernels,
    passes=("fold_gelu_table", "fuse_attention"),
    description="Triton kernels for CUDA: int8 tensor-core GEMMs, fused integer attention, I-LayerNorm "
                "(CPU tensors only under TRITON_INTERPRET=1)",
))
