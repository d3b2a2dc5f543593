"""The dtypes eager PyTorch computes in: one home for "what does op X accumulate in at input dtype D".

Low-precision floats (bf16, f16) are stored in two bytes, but PyTorch's kernels add them up in float32
(``at::opmath_type``, CUDA's ``acc_type``) and round once, when they write their output: sums and
means, softmax and log_softmax, layer and batch norm statistics, matrix products, and the
cross-entropy / NLL loss. Passes that write one of these kernels as several ops
(``passes/decompose.py``: a mean loss as sum / count, vocabulary-parallel cross entropy, batch norm
from sums) and local kernels that split one over ranks (``ir/kernels.py``: a mean's share of a shard)
accumulate in :func:`accumulation_dtype` and round to the op's declared output dtype at the end, as the
fused kernel does. Elementwise ops keep their input dtype: eager computes each in float and rounds
its result, which is what the same op does when a decomposition writes it.

Where eager CPU and CUDA differ, sbpc follows CUDA (the hardware it plans for), which is never less
accurate than the CPU kernel: CPU ``nll_loss`` sums bf16 losses in a bf16 cascade and divides by a
bf16 token count (``aten/src/ATen/native/LossNLL.cpp``), and CPU ``mean`` rounds its sum before
dividing; CUDA accumulates both in float32. Tests against eager bf16 on CPU therefore bound sbpc's
error by a multiple of eager's own error against float32 (see ``tests/compiler/test_low_precision.py``).

Mixed precision (parameters in one dtype, compute in another) builds on this module: the dtype an
op runs in under ``torch.autocast`` belongs here, beside the accumulation dtype.
"""
from __future__ import annotations

import math

import torch

from ir.types import DTYPE_NAMES, DTYPES_BY_NAME

LOW_PRECISION_FLOATS = ("bf16", "f16")
"""Float dtypes whose sums PyTorch accumulates in float32."""

ACCUMULATING_OPS = frozenset({
    "aten.sum.default", "aten.sum.dim_IntList", "aten.mean.default", "aten.mean.dim",
    "aten._softmax.default", "aten.softmax.int", "aten._log_softmax.default", "aten.log_softmax.int",
    "aten.layer_norm.default", "aten.native_layer_norm.default", "aten.rms_norm.default",
    "aten.batch_norm.default", "aten._native_batch_norm_legit.no_stats",
    "aten._native_batch_norm_legit_functional.default", "aten.native_batch_norm.default",
    "aten.cross_entropy_loss.default", "aten.nll_loss.default", "aten.nll_loss_nd.default",
    "aten.mse_loss.default", "aten.l1_loss.default", "aten.smooth_l1_loss.default", "aten.huber_loss.default",
    "aten.binary_cross_entropy.default", "aten.binary_cross_entropy_with_logits.default",
    "aten.linear.default", "aten.mm.default", "aten.bmm.default", "aten.matmul.default", "aten.addmm.default",
})
"""Ops whose kernels accumulate low-precision inputs in float32 (reductions, norms, losses, products)."""


def accumulation_dtype(op: str, dtype: str) -> str:
    """The dtype eager PyTorch accumulates ``op`` in when its input has ``dtype`` (short names, ``f32``).

    float32 for bf16 and f16 inputs of the ops in :data:`ACCUMULATING_OPS`; the input dtype otherwise
    (float32 and float64 accumulate in themselves; elementwise ops round each result to their dtype).
    """
    if op in ACCUMULATING_OPS and dtype in LOW_PRECISION_FLOATS:
        return "f32"
    return dtype


def torch_accumulation_dtype(op: str, dtype: torch.dtype) -> torch.dtype:
    """:func:`accumulation_dtype` for a ``torch.dtype``."""
    return DTYPES_BY_NAME[accumulation_dtype(op, DTYPE_NAMES[dtype])]


def promoted(*dtypes: str) -> str:
    """The dtype PyTorch's type promotion gives for tensors (of equal rank category) of ``dtypes``."""
    out = DTYPES_BY_NAME[dtypes[0]]
    for name in dtypes[1:]:
        out = torch.promote_types(out, DTYPES_BY_NAME[name])
    return DTYPE_NAMES[out]


def model_dtype(graph) -> str:
    """The float dtype a model computes in: the dtype of most of its float parameter elements (``f32``
    for a model without float parameters)."""
    sizes: dict[str, int] = {}
    for p in graph.params:
        if p.kind == "param" and DTYPES_BY_NAME[p.type.dtype].is_floating_point:
            elements = math.prod(int(d) for d in p.type.shape if d.is_Integer)
            sizes[p.type.dtype] = sizes.get(p.type.dtype, 0) + elements
    return max(sizes, key=sizes.get) if sizes else "f32"
