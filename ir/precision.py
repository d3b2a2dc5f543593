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


# -- mixed precision: where torch.autocast casts ------------------------------------------------------

PRECISION_TO_IR = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
"""A strategy precision's dtype names (the cluster's peak FLOP/s keys) as IR dtype names."""

AUTOCAST_LOWER_OPS = frozenset({
    "linear", "mm", "bmm", "addmm", "addbmm", "baddbmm", "matmul", "conv1d", "conv2d", "conv3d", "convolution",
    "_convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "conv_tbc", "prelu",
    "scaled_dot_product_attention", "_native_multi_head_attention", "linalg_vecdot",
})
"""Ops (aten base names) ``torch.autocast`` runs in the lower compute dtype: their float inputs are cast
to it (the matrix products and convolutions; the same list on CUDA and CPU)."""

AUTOCAST_FP32_OPS = frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow", "softplus", "layer_norm", "native_layer_norm", "group_norm", "norm", "frobenius_norm",
    "nuclear_norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d",
    "nll_loss_nd", "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
    "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
    "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
    "softmax", "_softmax", "log_softmax", "_log_softmax", "cumprod", "cumsum", "prod", "sum",
    "cross_entropy_loss",
})
"""Ops CUDA's ``torch.autocast`` runs in float32: their lower-precision float inputs are cast up (losses,
norms, softmax, exponentials, sums). CUDA's list, the hardware sbpc plans for; CPU autocast runs
several of these (layer_norm, softmax, exp, sum) in the input dtype with float32 accumulation, so a
plan agrees with eager CPU autocast exactly where such an op's input is float32 already (a float32
residual stream, an upcast loss): the models the tests compare."""


def autocast_dtype(op: str, compute: str) -> str | None:
    """The dtype ``torch.autocast(dtype=compute)`` casts ``op``'s float inputs to (IR names), or None
    for an op it leaves alone (elementwise ops, views: they follow their inputs' dtypes)."""
    base = op.split(".")[1] if op.startswith("aten.") else op
    if base in AUTOCAST_LOWER_OPS:
        return compute
    if base in AUTOCAST_FP32_OPS:
        return "f32"
    return None


CAST_OP = "aten._to_copy.default"
"""The op of a dtype cast (what the precision pass inserts)."""


def narrowing_cast(node) -> bool:
    """Whether ``node`` only casts its input to a float dtype of fewer bytes (fp32 -> bf16)."""
    if node is None or node.op != CAST_OP or set(node.kwargs) != {"dtype"}:
        return False
    source, out = node.input_values()[0].type, node.outputs[0].type
    return out.torch_dtype.is_floating_point and out.torch_dtype.itemsize < source.torch_dtype.itemsize


def cast_parameter(value):
    """The parameter ``value`` is a narrowing cast of (see :func:`narrowing_cast`), else None. FSDP gathers such
    a value from the parameter's shard, cast before the gather (``passes/boxing.py``): the emitted program and
    the virtual mesh gather the parameter in one call that casts first and returns the gradient of the
    reduce-scatter in its reduce dtype, never rounded to the cast's dtype on its way to the parameter."""
    node = value.producer
    if not narrowing_cast(node):
        return None
    source = node.input_values()[0]
    return source if source.kind == "param" else None
