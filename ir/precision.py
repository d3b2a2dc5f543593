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

Where eager CPU and CUDA kernels differ in what they accumulate in, sbpc follows CUDA (the hardware
it plans for), which is never less accurate than the CPU kernel: CPU ``nll_loss`` sums bf16 losses in a
bf16 cascade and divides by a bf16 token count (``aten/src/ATen/native/LossNLL.cpp``), and CPU ``mean`` rounds its sum before
dividing; CUDA accumulates both in float32. Tests against eager bf16 on CPU therefore bound sbpc's
error by a multiple of eager's own error against float32 (see ``tests/compiler/test_low_precision.py``).

Mixed precision (parameters in one dtype, compute in another) builds on this module: the dtype an
op runs in under ``torch.autocast`` belongs here, beside the accumulation dtype. Those casts do depend on
the device: a plan follows the autocast lists of the device type its cluster's devices are
(:func:`autocast_device_type`: CPU ranks cast as ``torch.autocast("cpu")``, accelerators as ``"cuda"``).
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

AUTOCAST_DEVICE_TYPES = ("cuda", "cpu")
"""The torch device types whose ``torch.autocast`` cast lists a plan can follow (:func:`autocast_device_type`)."""

AUTOCAST_LOWER_OPS = {
    "cuda": frozenset({
        "linear", "mm", "mv", "bmm", "addmm", "addmv", "addr", "addbmm", "baddbmm", "matmul", "einsum",
        "chain_matmul", "linalg_multi_dot", "linalg_vecdot", "conv1d", "conv2d", "conv3d", "convolution",
        "_convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "conv_tbc", "prelu",
        "scaled_dot_product_attention", "_scaled_dot_product_flash_attention", "_native_multi_head_attention",
        "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell", "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell",
    }),
    "cpu": frozenset({
        "linear", "mm", "bmm", "addmm", "_addmm_activation", "addbmm", "baddbmm", "matmul", "linalg_vecdot",
        "conv1d", "conv2d", "conv3d", "_convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
        "conv_tbc", "prelu", "scaled_dot_product_attention", "_native_multi_head_attention", "mkldnn_rnn_layer",
    }),
}
"""Ops (aten base names) ``torch.autocast`` runs in the lower compute dtype on each device type: their float
inputs are cast to it (the matrix products and convolutions; ``aten/src/ATen/autocast_mode.h`` and
``autocast_mode.cpp`` of torch 2.13)."""

_LOSSES = frozenset({
    "nll_loss", "nll_loss2d", "nll_loss_nd", "cross_entropy_loss", "mse_loss", "l1_loss", "smooth_l1_loss",
    "huber_loss", "kl_div", "poisson_nll_loss", "cosine_embedding_loss", "hinge_embedding_loss",
    "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
    "binary_cross_entropy_with_logits",
})
AUTOCAST_FP32_OPS = {
    "cuda": _LOSSES | frozenset({
        "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
        "sinh", "tan", "pow", "softplus", "layer_norm", "native_layer_norm", "rms_norm", "group_norm", "norm",
        "frobenius_norm", "nuclear_norm", "cosine_similarity", "dist", "pdist", "cdist", "renorm", "logsumexp",
        "softmax", "_softmax", "log_softmax", "_log_softmax", "cumprod", "cumsum", "prod", "sum",
        "linalg_vector_norm", "linalg_matrix_norm",
    }),
    "cpu": _LOSSES | frozenset({
        "binary_cross_entropy", "ctc_loss", "multilabel_margin_loss_forward", "prod", "cdist", "trace", "quantile",
        "nanquantile", "stft", "polar", "view_as_complex", "avg_pool3d", "max_pool3d", "max_unpool2d", "max_unpool3d",
        "adaptive_avg_pool3d", "adaptive_max_pool3d", "fractional_max_pool2d", "fractional_max_pool3d",
        "reflection_pad1d", "reflection_pad2d", "replication_pad1d", "replication_pad2d", "replication_pad3d",
        "grid_sampler", "grid_sampler_2d", "grid_sampler_3d", "cholesky", "cholesky_inverse", "cholesky_solve",
        "inverse", "lu_solve", "orgqr", "ormqr", "pinverse", "geqrf", "_lu_with_info", "qr", "svd",
        "triangular_solve", "fake_quantize_per_tensor_affine", "fft_fft", "fft_ifft", "fft_fft2", "fft_ifft2",
        "fft_fftn", "fft_ifftn", "fft_rfft", "fft_irfft", "fft_rfft2", "fft_irfft2", "fft_rfftn", "fft_irfftn",
        "fft_hfft", "fft_ihfft", "linalg_cond", "linalg_matrix_rank", "linalg_solve", "linalg_cholesky",
        "linalg_cholesky_ex", "linalg_svdvals", "linalg_svd", "linalg_eigvals", "linalg_eigvalsh", "linalg_eig",
        "linalg_eigh", "linalg_inv", "linalg_inv_ex", "linalg_householder_product", "linalg_tensorinv",
        "linalg_tensorsolve", "linalg_qr", "linalg_lstsq",
    }),
}
"""Ops ``torch.autocast`` runs in float32 on each device type: their lower-precision float inputs are cast up.
Both lists hold the losses; CUDA's also norms, softmax, exponentials and sums, which CPU autocast runs in
their input's dtype (its kernels accumulate in float32 and round the result, :func:`accumulation_dtype`),
while its list holds the linear algebra, FFTs and 3-d pooling instead."""


def autocast_device_type(device_kinds) -> str:
    """The device type whose autocast lists a plan on devices of ``device_kinds`` (the cluster's
    ``Device.kind``) follows: ``"cpu"`` when every device is a CPU rank (kind ``cpu``: ``local:N`` clusters,
    and what ``sbpc calibrate`` names a CPU), ``"cuda"`` when none is (the accelerators the built-in clusters
    describe; also without a cluster). A cluster of both is an error: its ranks would cast differently."""
    kinds = set(device_kinds)
    if not kinds or "cpu" not in kinds:
        return "cuda"
    if kinds == {"cpu"}:
        return "cpu"
    raise ValueError(f"the cluster mixes CPU ranks with {', '.join(sorted(kinds - {'cpu'}))} devices, whose "
                     f"autocast casts differ; plan a mixed precision on CPU ranks only or on accelerators only")


def autocast_dtype(op: str, compute: str, device_type: str = "cuda") -> str | None:
    """The dtype ``torch.autocast(device_type, dtype=compute)`` casts ``op``'s float inputs to (IR names), or
    None for an op it leaves alone (elementwise ops, views: they follow their inputs' dtypes)."""
    base = op.split(".")[1] if op.startswith("aten.") else op
    if base in AUTOCAST_LOWER_OPS[device_type]:
        return compute
    if base in AUTOCAST_FP32_OPS[device_type]:
        return "f32"
    return None


def scales_loss(precision: dict | None) -> bool:
    """Whether a plan of ``precision`` (the graph's ``precision`` attr: IR dtype names) scales its loss
    dynamically, as ``torch.amp.GradScaler``: fp16 compute on fp32 master weights (fp16's narrow range
    flushes small gradients to zero; bf16 has fp32's range). Pure fp16 training (fp16 parameters) is not
    scaled: its gradients could not be unscaled without rounding, which GradScaler refuses too."""
    return bool(precision) and precision.get("compute") == "f16" and precision.get("param") == "f32"


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
