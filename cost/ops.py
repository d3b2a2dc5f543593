"""Per-op FLOPs, bytes and time: the work one ATen op does, and the roofline that prices it.

Op costs take shapes whose entries are ints or sympy symbols and return sympy expressions; see
:func:`op_flops` for the per-op formulas and :data:`BACKWARD_FLOP_FACTOR` for backward factors.
:func:`compute_seconds` is the one formula the planner and the simulator price work with: the roofline
(FLOPs over peak FLOP/s, or bytes over memory bandwidth, whichever is longer) divided by the
efficiency the device reaches.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import functools

import numpy as np
import sympy

from cluster import Device
from ir.precision import model_dtype
from ir.types import DTYPES_BY_NAME, dtype_size

DEFAULT_OP_OVERHEAD_S = 5e-6
"""Launch/dispatch time of one eager op when neither the options nor the device say (backward ops
count twice)."""

Shape = Sequence[Any]  # entries are ints or sympy expressions

NORM_FLOPS_PER_ELEMENT = 5
"""layer_norm / rms_norm / group_norm / batch_norm: mean, centre, variance, normalise, scale-and-shift."""
SOFTMAX_FLOPS_PER_ELEMENT = 5
"""softmax / log_softmax: max, subtract, exp, sum, divide (or log)."""

BACKWARD_FLOP_FACTOR: dict[str, float] = {
    "matmul": 2.0,       # grad input and grad weight are one matmul each
    "conv": 2.0,         # same as matmul
    "attention": 2.5,    # five matmuls backward against two forward (FlashAttention accounting)
    "norm": 2.0,
    "softmax": 2.0,
    "loss": 1.0,
    "elementwise": 1.0,  # e.g. the relu mask or one multiply per element
    "reduction": 1.0,    # broadcasting the gradient back
    "embedding": 1.0,    # a scatter-add of the output gradient into the table rows
    "view": 0.0,
}
"""Backward FLOPs = factor x forward FLOPs, per op category (see :func:`op_category`)."""


def weight_gradient_share(op: str, param_inputs: Sequence[bool], grad_inputs: Sequence[bool] | None = None) -> float:
    """Share of an op's backward FLOPs that compute a parameter's gradient (the ``W`` of a split backward), given
    which inputs are parameters and which get a gradient (default all): of a matmul's or convolution's backward
    products (:func:`backward_products`), those for a parameter factor — half where both run, all of it where the
    activation needs none (a first layer reading the data); all of an embedding's backward (the scatter into its
    table); none of other ops' (their weight gradients are small reductions)."""
    category = op_category(op)
    wanted = tuple(grad_inputs) if grad_inputs is not None else (True,) * len(param_inputs)
    if category == "embedding":
        return 1.0 if param_inputs and param_inputs[0] and wanted[0] else 0.0
    if category not in ("matmul", "conv"):
        return 0.0
    factors = _factors_with_gradient(op, wanted)
    weights = [i for i in factors if i < len(param_inputs) and param_inputs[i]]
    return len(weights) / len(factors) if factors else 0.0


_FACTORS_AFTER_BIAS = {"addmm", "baddbmm", "addbmm", "addmv"}
"""Matmul-like ops whose first input is the added term: their factors are inputs 1 and 2."""


def _factor_positions(op: str) -> tuple[int, int]:
    """The input positions of a matmul's or convolution's two factors (a convolution's input and weight)."""
    return (1, 2) if normalize_op_name(op) in _FACTORS_AFTER_BIAS else (0, 1)


def _factors_with_gradient(op: str, grad_inputs: Sequence[bool]) -> tuple[int, ...]:
    """The positions of a matmul's or convolution's factors that get a gradient (``grad_inputs``: per input)."""
    return tuple(i for i in _factor_positions(op) if i < len(grad_inputs) and grad_inputs[i])


def backward_products(op: str, grad_inputs: Sequence[bool] | None) -> int:
    """Of the two products a matmul's or a convolution's backward runs (each factor's gradient), how many autograd
    computes: a factor without a gradient (the data a first layer reads, a frozen weight) gets none."""
    if grad_inputs is None:
        return 2
    return len(_factors_with_gradient(op, grad_inputs))


_MATMUL_OPS = {"linear", "mm", "bmm", "matmul", "addmm", "baddbmm", "addbmm", "addmv", "mv", "dot",
               "_grouped_mm", "grouped_mm", "grouped_mm_fallback", "expert_mm"}
"""... grouped matmuls of mixture-of-experts layers included: ``aten._grouped_mm`` and transformers' custom op
``transformers.grouped_mm_fallback`` ((S, K) rows, each by its expert's (K, N) matrix: 2·S·K·N; a shard of
the experts multiplies its experts' rows only, a share of S: see ``_experts_share``); expert parallelism's
``moe.expert_mm`` multiplies the rows routed to a rank (its local rows: balanced routing)."""
_ATTENTION_OPS = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
                  "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
                  "_scaled_dot_product_cudnn_attention", "ring_attention"}
_CONV_OPS = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d"}
_NORM_OPS = {"layer_norm", "native_layer_norm", "rms_norm", "group_norm", "native_group_norm", "batch_norm",
             "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training", "instance_norm"}
_SOFTMAX_OPS = {"softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax"}
_LOSS_OPS = {"cross_entropy_loss", "cross_entropy", "nll_loss", "nll_loss_forward", "nll_loss2d", "mse_loss"}
_REDUCTION_OPS = {"sum", "mean", "amax", "amin", "max", "min", "prod", "var", "std", "var_mean", "norm",
                  "linalg_vector_norm", "logsumexp", "argmax", "argmin", "all", "any"}
_VIEW_OPS = {"view", "reshape", "_unsafe_view", "permute", "transpose", "t", "expand", "expand_as", "slice",
             "select", "squeeze", "unsqueeze", "flatten", "unflatten", "alias", "detach", "split", "chunk",
             "split_with_sizes", "unbind", "narrow", "as_strided", "view_as", "lift_fresh_copy", "sym_size",
             "getitem", "_assert_tensor_metadata", "empty", "empty_like", "zeros", "zeros_like", "ones",
             "ones_like", "full", "full_like", "arange", "scalar_tensor"}
_COPY_OPS = {"clone", "contiguous", "cat", "stack", "_to_copy", "to", "copy", "copy_", "index_select", "gather",
             "index", "repeat", "roll", "flip", "pad", "constant_pad_nd", "embedding", "scatter", "index_put"}


def normalize_op_name(op: str) -> str:
    """``aten.linear.default`` / ``aten::linear`` / ``torch.ops.aten.linear`` / ``linear`` -> ``linear``; a custom
    op's name without its namespace and overload (``transformers.grouped_mm_fallback.default`` ->
    ``grouped_mm_fallback``); an sbpc op without its namespace (``moe.expert_mm`` -> ``expert_mm``)."""
    name = op.replace("::", ".")
    for prefix in ("torch.ops.", "aten.", "prims.", "cp.", "moe."):  # sbpc's own ops have no overload
        name = name[len(prefix):] if name.startswith(prefix) else name
    parts = name.split(".")
    return parts[1] if len(parts) == 3 else parts[0]


def op_category(op: str) -> str:
    """The cost category of an op: matmul, attention, conv, norm, softmax, loss, reduction, embedding,
    view (no FLOPs), copy (no FLOPs, moves bytes) or elementwise (also the fallback for unknown ops)."""
    name = normalize_op_name(op)
    for category, names in (("matmul", _MATMUL_OPS), ("attention", _ATTENTION_OPS), ("conv", _CONV_OPS),
                            ("norm", _NORM_OPS), ("softmax", _SOFTMAX_OPS), ("loss", _LOSS_OPS),
                            ("reduction", _REDUCTION_OPS), ("view", _VIEW_OPS)):
        if name in names:
            return category
    if name == "embedding":
        return "embedding"
    return "copy" if name in _COPY_OPS else "elementwise"


def numel(shape: Shape) -> sympy.Expr:
    """Number of elements of ``shape`` (1 for a scalar)."""
    return sympy.Mul(*[sympy.sympify(d) for d in shape]) if len(shape) else sympy.Integer(1)


def op_flops(op: str, in_shapes: Sequence[Shape], out_shapes: Sequence[Shape],
             attrs: Mapping[str, Any] | None = None) -> sympy.Expr:
    """Forward FLOPs of one ATen op (a multiply-add counts 2), as a sympy expression.

    matmul-like (linear, mm, bmm, matmul, addmm, ...): 2·(output elements)·K, i.e. 2·M·K·N; bias adds
    are not counted (the usual 6·N·D convention). scaled_dot_product_attention: 2·B·L·S·E (QKᵀ) +
    2·B·L·S·Ev (·V), i.e. 4·b·h·s²·d, the softmax free; with ``is_causal`` half of it, the work a
    fused causal kernel does (it skips the masked blocks; FlashAttention's benchmarks count it so).
    conv: 2·(output elements)·(C_in/groups)·prod(kernel). Norms and softmax:
    :data:`NORM_FLOPS_PER_ELEMENT` / :data:`SOFTMAX_FLOPS_PER_ELEMENT` per element. cross_entropy:
    log-softmax on the logits plus one per target. Reductions: one per input element. Elementwise and
    unknown ops: one per output element. Views, copies and embedding: 0.
    """
    attrs = attrs or {}
    category = op_category(op)
    if category == "matmul":
        return 2 * _contraction_size(op, in_shapes) * _output_numel(op, in_shapes, out_shapes) * _experts_share(op, in_shapes)
    if category == "attention":
        return _attention_flops(in_shapes) / (2 if attrs.get("is_causal") else 1)
    if category == "conv":
        weight = in_shapes[1]
        return 2 * _output_numel(op, in_shapes, out_shapes, attrs) * numel(weight[1:])
    if category == "norm":
        return NORM_FLOPS_PER_ELEMENT * numel(in_shapes[0])
    if category == "softmax":
        return SOFTMAX_FLOPS_PER_ELEMENT * numel(in_shapes[0])
    if category == "loss":
        return _loss_flops(op, in_shapes)
    if category == "reduction":
        return numel(in_shapes[0])
    if category in ("view", "copy", "embedding"):
        return sympy.Integer(0)
    return _output_numel(op, in_shapes, out_shapes)


def op_backward_flops(op: str, in_shapes: Sequence[Shape], out_shapes: Sequence[Shape],
                      attrs: Mapping[str, Any] | None = None, grad_inputs: Sequence[bool] | None = None
                      ) -> sympy.Expr:
    """Backward FLOPs: :data:`BACKWARD_FLOP_FACTOR` of the op's category times the forward FLOPs (embedding: one add
    per output element, scattered into the table); a matmul or a convolution runs only the products for the factors
    that get a gradient (``grad_inputs``, per input, default all: see :func:`backward_products`)."""
    category = op_category(op)
    if category == "embedding":
        return _output_numel(op, in_shapes, out_shapes)
    factor = _exact(BACKWARD_FLOP_FACTOR.get(category, 0.0))
    if category in ("matmul", "conv"):
        factor = factor * sympy.Rational(backward_products(op, grad_inputs), 2)
    return factor * op_flops(op, in_shapes, out_shapes, attrs)


@functools.lru_cache(maxsize=None)
def _exact(factor: float) -> sympy.Expr:
    """``factor`` as an exact sympy number (``nsimplify`` is slow: a few of these constants, asked often)."""
    return sympy.nsimplify(factor)


def op_bytes(op: str, in_shapes: Sequence[Shape], out_shapes: Sequence[Shape],
             attrs: Mapping[str, Any] | None = None, dtype_bytes: int | Sequence[int] = 4) -> sympy.Expr:
    """Memory traffic of one op: every input read and output written once, ``dtype_bytes`` per element
    (one size for all, or one per tensor: the inputs', then the outputs').

    Views move nothing (0). Embedding reads only the looked-up rows: 8-byte indices plus the output
    read from the table and written (2 x output). Softmax and cross entropy make the passes PyTorch's row kernels
    make (:func:`_softmax_passes`).
    """
    sizes = _element_sizes(dtype_bytes, len(in_shapes) + len(out_shapes))
    category = op_category(op)
    if category == "view":
        return sympy.Integer(0)
    if category == "embedding":
        indices = in_shapes[1] if len(in_shapes) > 1 else ()
        return 8 * numel(indices) + 2 * sizes[len(in_shapes)] * _output_numel(op, in_shapes, out_shapes)
    name = normalize_op_name(op)
    if name in _GATHER_OPS:  # reads only the selected elements (and the indices)
        return _gathered_bytes(op, in_shapes, out_shapes, sizes)
    if name in _CROSS_ENTROPY_OPS:
        return _cross_entropy_bytes(in_shapes, sizes, backward=False)
    if category == "softmax":
        return _softmax_passes(in_shapes[0], sizes[0], backward=False) * sizes[0] * numel(in_shapes[0])
    return sum((size * numel(s) for s, size in zip([*in_shapes, *out_shapes], sizes)), sympy.Integer(0))


def op_backward_bytes(op: str, in_shapes: Sequence[Shape], out_shapes: Sequence[Shape],
                      attrs: Mapping[str, Any] | None = None, dtype_bytes: int | Sequence[int] = 4,
                      grad_inputs: Sequence[bool] | None = None) -> sympy.Expr:
    """Memory traffic of one op's backward as autograd's derivative of it runs (``dtype_bytes`` as :func:`op_bytes`
    takes it; ``grad_inputs``: per input, whether autograd computes its gradient, default every input's).

    Matmuls and convolutions move their forward's traffic for each factor that gets a gradient (the product reads
    the output gradient and the other factor, and writes the gradient), attention and losses twice their forward's;
    a dtype cast casts the gradient back (``_to_copy_backward``: the forward's traffic); a gather or an embedding
    zeroes its whole input's gradient and scatters into it (``gather_backward``, ``embedding_dense_backward``);
    cross entropy and softmax run PyTorch's row kernels (:func:`_softmax_passes`); a norm reads the output gradient
    and its input once for the input gradient and once more for its weight's (``layer_norm_backward``'s two
    kernels). Everything else writes each wanted input gradient from the output gradient and what the derivative
    reads (:func:`_pointwise_backward_bytes`): nothing where the gradient passes as is (an addition, a copy, a
    ``cat``: the input gradient is the output gradient or a view of it), a one-byte mask for dropout, the output for
    ``exp``, ``tanh`` and their kin, the other operands (or the input itself) for a product or a nonlinearity; a
    broadcast input's gradient is summed down."""
    name = normalize_op_name(op)
    sizes = _element_sizes(dtype_bytes, len(in_shapes) + len(out_shapes))
    wanted = tuple(grad_inputs) if grad_inputs is not None else (True,) * len(in_shapes)
    if not any(wanted):
        return sympy.Integer(0)
    if name in _CROSS_ENTROPY_OPS:
        return _cross_entropy_bytes(in_shapes, sizes, backward=True)
    category = op_category(op)
    if category in ("matmul", "conv"):  # each product reads the output gradient and the other factor
        return backward_products(op, wanted) * op_bytes(op, in_shapes, out_shapes, attrs, sizes)
    if category in ("attention", "loss"):
        return 2 * op_bytes(op, in_shapes, out_shapes, attrs, sizes)
    if name in _CAST_OPS:
        return op_bytes(op, in_shapes, out_shapes, attrs, sizes)
    if name in _GATHER_OPS or category == "embedding":
        zeroed = sizes[0] * numel(in_shapes[0])
        forward = op_bytes(op, in_shapes, out_shapes, attrs, sizes)
        return zeroed + forward + sizes[len(in_shapes)] * _output_numel(op, in_shapes, out_shapes)
    if category == "softmax":
        return _softmax_passes(in_shapes[0], sizes[0], backward=True) * sizes[0] * numel(in_shapes[0])
    if category == "norm":
        return _norm_backward_bytes(in_shapes, out_shapes, sizes, wanted)
    return _pointwise_backward_bytes(name, category, in_shapes, out_shapes, sizes, wanted)


_CROSS_ENTROPY_OPS = {"cross_entropy_loss", "cross_entropy"}

SOFTMAX_BLOCK_SMEM_BYTES = 48 * 1024
"""Shared memory a CUDA block gets without opting in (``sharedMemPerBlock``): PyTorch's softmax kernels keep a row
there when it fits, and read it again from memory for each of their passes when it does not
(``host_softmax``, aten/src/ATen/native/cuda/SoftMax.cu)."""
SOFTMAX_PERSISTENT_CLASSES = 1024
"""Rows up to this many classes take PyTorch's persistent softmax kernels (a warp holds the row in registers)."""


def _softmax_passes(shape: Shape, element: int, backward: bool) -> sympy.Expr:
    """Passes over a softmax's (or log-softmax's) tensor of ``shape``, rows along the last dim, as PyTorch's CUDA
    kernels make them: forward reads each row once and writes it where the row fits a block's shared memory, and
    reads it three times (its max, its sum of exponentials, the output) where it does not, which is every language
    model's vocabulary (``cunn_SoftMaxForward``); backward reads the output gradient for its row sum, reads it and
    the output again and writes the input gradient (``cunn_SoftMaxBackward``), the persistent kernel of rows up to
    :data:`SOFTMAX_PERSISTENT_CLASSES` reading the gradient once less. A row of unknown (symbolic) width or none (a
scalar) is taken as a small one."""
    classes = sympy.sympify(shape[-1]) if len(shape) else sympy.Integer(1)
    if not backward:
        wide = classes.is_number and classes * element > SOFTMAX_BLOCK_SMEM_BYTES
        return sympy.Integer(4 if wide else 2)
    persistent = not classes.is_number or classes <= SOFTMAX_PERSISTENT_CLASSES
    return sympy.Integer(3 if persistent else 4)


def _cross_entropy_bytes(in_shapes: Sequence[Shape], sizes: list, backward: bool) -> sympy.Expr:
    """Memory traffic of cross entropy (mean or sum) over ``[rows, classes]`` logits, as PyTorch runs it: log-softmax
    over the rows (:func:`_softmax_passes`), then the NLL picks one per row; backward zeroes the log-probabilities'
    gradient and scatters one per row into it (``nll_loss_backward``) before log-softmax's backward. More dims than
    two run PyTorch's spatial kernel: one pass each way."""
    shape, element = in_shapes[0], sizes[0]
    logits = element * numel(shape)
    targets = sizes[1] * numel(in_shapes[1]) if len(in_shapes) > 1 else sympy.Integer(0)
    row = shape if len(shape) == 2 else ()  # one row per sample, classes last
    passes = _softmax_passes(row, element, backward)
    return (logits if backward else sympy.Integer(0)) + passes * logits + targets


def _norm_backward_bytes(in_shapes: Sequence[Shape], out_shapes: Sequence[Shape], sizes: list,
                         wanted: Sequence[bool]) -> sympy.Expr:
    """A norm's backward: one kernel reads the output gradient and the input and writes the input gradient, another
    reads both again for the weight's and bias's gradients (statistics and weights are small)."""
    activations = sizes[len(in_shapes)] * numel(out_shapes[0]) + sizes[0] * numel(in_shapes[0]) if out_shapes \
        else 2 * sizes[0] * numel(in_shapes[0])
    input_gradient = activations + sizes[0] * numel(in_shapes[0]) if wanted[0] else sympy.Integer(0)
    weight_gradients = activations if any(wanted[1:]) else sympy.Integer(0)
    return input_gradient + weight_gradients


_AS_IS_OPS = {"add", "sub", "clone", "contiguous", "cat", "stack", "sum", "alias", "copy", "copy_"}
"""Ops whose derivative hands the output gradient (or a view of it) to an input unchanged: no kernel runs, but to
sum a broadcast operand's gradient down (``sub``'s second operand is negated: see :data:`_NEGATED`)."""
_NEGATED = {("sub", 1), ("rsub", 0), ("neg", 0)}
"""(op, input) whose gradient is the output gradient negated."""
_SCALED_OPS = {"mul", "div"}
"""With one tensor operand (the other a Python number), the gradient is the output gradient scaled."""
MASK_SAVED_OPS = frozenset({"dropout", "native_dropout", "feature_dropout"})
"""Ops whose backward reads (and autograd saves) a one-byte mask per output element."""
OUTPUT_SAVED_OPS = frozenset({"softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax", "relu",
                              "sigmoid", "tanh", "exp"})
"""Ops whose derivative is written with their output (autograd saves it)."""
_INPUT_READ_REDUCTIONS = {"amax", "amin", "max", "min", "prod", "var", "std", "var_mean", "norm",
                          "linalg_vector_norm", "logsumexp"}
"""Reductions whose derivative reads the input and the output (which elements won, or the deviations)."""
_GATHERED_VIEWS = {"slice", "select", "narrow", "split", "chunk", "split_with_sizes", "unbind", "expand",
                   "expand_as"}
"""Views whose backward writes the whole input's gradient (the pieces' gradients put back, or a broadcast's
summed)."""


def _pointwise_backward_bytes(name: str, category: str, in_shapes: Sequence[Shape], out_shapes: Sequence[Shape],
                              sizes: list, wanted: Sequence[bool]) -> sympy.Expr:
    """Backward traffic of a view, a copy, a reduction or an elementwise op: per wanted input gradient a kernel that
    reads the output gradient and what the derivative reads (:func:`_derivative_reads`) and writes the gradient,
    unless the gradient passes as is (:data:`_AS_IS_OPS`); a broadcast operand's gradient is formed at the output's
    size and summed down to its own."""
    outputs = list(out_shapes) or [in_shapes[0]]
    out_sizes = sizes[len(in_shapes):] or sizes[:1]
    dy = sum((size * numel(s) for s, size in zip(outputs, out_sizes)), sympy.Integer(0))
    full = out_sizes[0] * numel(outputs[0])
    gradient = [size * numel(s) for s, size in zip(in_shapes, sizes)]
    if category == "view":
        return dy + gradient[0] if name in _GATHERED_VIEWS and wanted[0] else sympy.Integer(0)
    total = sympy.Integer(0)
    for i in (i for i, want in enumerate(wanted) if want):
        broadcast = category == "elementwise" and tuple(in_shapes[i]) != tuple(outputs[0])
        summed_down = full + gradient[i] if broadcast else sympy.Integer(0)  # read the full-size term, write
        if name in _AS_IS_OPS and (name, i) not in _NEGATED:
            total += summed_down
            continue
        reads = _derivative_reads(name, category, i, gradient, full, numel(outputs[0]))
        total += dy + reads + (full if broadcast else gradient[i]) + summed_down
    return total


def _derivative_reads(name: str, category: str, position: int, inputs: Sequence[sympy.Expr], output: sympy.Expr,
                      output_numel: sympy.Expr) -> sympy.Expr:
    """Bytes an input gradient's kernel reads besides the output gradient (``inputs``: each input's bytes, ``output``:
    the output's): nothing for a negation, a scaling, a copy's reverse copy or a sum's broadcast; a one-byte mask per
    element for dropout; the output for ops written with it; the input and the output for a max, a norm or a
    variance; the other tensor operands for a product or a quotient, or the input itself for a one-operand
    nonlinearity (GELU, SiLU, a power)."""
    if (name, position) in _NEGATED or (name in _SCALED_OPS and len(inputs) == 1) or category == "copy":
        return sympy.Integer(0)
    if name in MASK_SAVED_OPS:
        return output_numel
    if name in OUTPUT_SAVED_OPS:
        return output
    if category == "reduction":
        return inputs[position] + output if name in _INPUT_READ_REDUCTIONS else sympy.Integer(0)
    others = [b for j, b in enumerate(inputs) if j != position]
    return sum(others, sympy.Integer(0)) if others else inputs[position]


def _element_sizes(dtype_bytes: int | Sequence[int], count: int) -> list:
    """Bytes per element of each of ``count`` tensors: ``dtype_bytes`` per tensor, or one size for all."""
    return list(dtype_bytes) if isinstance(dtype_bytes, Sequence) else [dtype_bytes] * count


_CAST_OPS = {"_to_copy", "to"}
"""Copies whose backward is the copy back (a dtype or device cast)."""
_GATHER_OPS = {"gather", "index_select", "index"}
"""Ops that read only the input elements their indices select (embedding has its own rule)."""


def _gathered_bytes(op: str, in_shapes: Sequence[Shape], out_shapes: Sequence[Shape], sizes: list) -> sympy.Expr:
    """A gather's forward traffic: its index tensors read, the selected input elements read and the output
    written (one output element each)."""
    outputs = _output_numel(op, in_shapes, out_shapes)
    indices = sum((size * numel(s) for s, size in zip(in_shapes[1:], sizes[1:len(in_shapes)])), sympy.Integer(0))
    return indices + (sizes[0] + sizes[len(in_shapes)]) * outputs


def op_time(op: str, in_shapes: Sequence[Shape], out_shapes: Sequence[Shape], attrs: Mapping[str, Any] | None,
            device: Device, dtype: str = "fp32", dtype_bytes: int | Sequence[int] = 4) -> sympy.Expr:
    """Roofline time of one op on ``device``: max(FLOPs / peak FLOP/s of ``dtype``, bytes / memory bandwidth)
    (``dtype_bytes`` as :func:`op_bytes` takes it)."""
    if dtype not in device.peak_flops:
        raise ValueError(f"device {device.id} ({device.kind}) has no peak FLOP/s for {dtype}; "
                         f"known: {sorted(device.peak_flops)}")
    compute = op_flops(op, in_shapes, out_shapes, attrs) / sympy.Float(device.peak_flops[dtype])
    if not device.memory_bandwidth_Bps:
        return compute
    memory = op_bytes(op, in_shapes, out_shapes, attrs, dtype_bytes) / sympy.Float(device.memory_bandwidth_Bps)
    return sympy.Max(compute, memory)


def _experts_share(op: str, in_shapes: Sequence[Shape]) -> sympy.Expr:
    """The share of a grouped matmul's rows that a shard of its experts multiplies: experts held / all experts
    (``offs`` has one entry per expert), assuming tokens are routed evenly; 1 for other matmuls."""
    if normalize_op_name(op) not in _GROUPED_MATMUL_OPS or len(in_shapes) < 3 or len(in_shapes[1]) != 3:
        return sympy.Integer(1)
    return sympy.sympify(in_shapes[1][0]) / sympy.sympify(in_shapes[2][0])


_GROUPED_MATMUL_OPS = {"_grouped_mm", "grouped_mm", "grouped_mm_fallback"}


def _contraction_size(op: str, in_shapes: Sequence[Shape]) -> sympy.Expr:
    """K of a matmul-like op: the last dim of the left operand (addmm-style ops have the bias first)."""
    name = normalize_op_name(op)
    left = in_shapes[1] if name in ("addmm", "baddbmm", "addbmm", "addmv") else in_shapes[0]
    return sympy.sympify(left[-1])


def _output_numel(op: str, in_shapes: Sequence[Shape], out_shapes: Sequence[Shape],
                  attrs: Mapping[str, Any] | None = None) -> sympy.Expr:
    """Elements of the first output; inferred from the inputs when no output shape is given."""
    if out_shapes:
        return numel(out_shapes[0])
    name = normalize_op_name(op)
    inferred = _INFER_OUTPUT.get(name)
    if inferred is None and op_category(op) == "elementwise":
        inferred = _broadcast_shape
    if inferred is None:
        raise ValueError(f"{op}: expected out_shapes (cannot infer the output shape from the inputs)")
    return numel(inferred(in_shapes, attrs or {}))


def _broadcast_shape(in_shapes: Sequence[Shape], attrs: Mapping[str, Any]) -> tuple:
    """NumPy broadcasting of the input shapes (symbolic dims must match or be 1)."""
    rank = max(len(s) for s in in_shapes)
    padded = [(1,) * (rank - len(s)) + tuple(s) for s in in_shapes]
    return tuple(next((d for d in dims if d != 1), 1) for dims in zip(*padded))


def _conv_output_shape(in_shapes: Sequence[Shape], attrs: Mapping[str, Any]) -> tuple:
    """(N, C_out, *spatial) from stride/padding/dilation attrs (ints or per-dim lists; PyTorch defaults)."""
    x, w = in_shapes[0], in_shapes[1]
    spatial = len(w) - 2

    def per_dim(key: str, default: int) -> list:
        value = attrs.get(key, default)
        return list(value) if isinstance(value, (list, tuple)) else [value] * spatial

    stride, padding, dilation = per_dim("stride", 1), per_dim("padding", 0), per_dim("dilation", 1)
    out = [sympy.floor((sympy.sympify(x[2 + i]) + 2 * padding[i] - dilation[i] * (w[2 + i] - 1) - 1) / stride[i]) + 1
           for i in range(spatial)]
    return (x[0], w[0], *out)


_INFER_OUTPUT: dict[str, Callable[[Sequence[Shape], Mapping[str, Any]], tuple]] = {
    "linear": lambda s, a: (*s[0][:-1], s[1][0]),
    "mm": lambda s, a: (s[0][0], s[1][1]),
    "addmm": lambda s, a: (s[1][0], s[2][1]),
    "bmm": lambda s, a: (s[0][0], s[0][1], s[1][2]),
    "baddbmm": lambda s, a: (s[1][0], s[1][1], s[2][2]),
    "embedding": lambda s, a: (*s[1], s[0][1]),
    "conv1d": _conv_output_shape, "conv2d": _conv_output_shape, "conv3d": _conv_output_shape,
    "convolution": _conv_output_shape,
}


def _attention_flops(in_shapes: Sequence[Shape]) -> sympy.Expr:
    query, key, value = in_shapes[0], in_shapes[1], in_shapes[2]
    batch = numel(query[:-2])
    target_len, head_dim = sympy.sympify(query[-2]), sympy.sympify(query[-1])
    source_len, value_dim = sympy.sympify(key[-2]), sympy.sympify(value[-1])
    return 2 * batch * target_len * source_len * head_dim + 2 * batch * target_len * source_len * value_dim


def _loss_flops(op: str, in_shapes: Sequence[Shape]) -> sympy.Expr:
    name = normalize_op_name(op)
    targets = numel(in_shapes[1]) if len(in_shapes) > 1 else sympy.Integer(0)
    if name in ("cross_entropy_loss", "cross_entropy"):
        return SOFTMAX_FLOPS_PER_ELEMENT * numel(in_shapes[0]) + targets
    if name == "mse_loss":
        return 3 * numel(in_shapes[0])  # subtract, square, sum
    return targets  # nll: pick one log-probability per target and sum


# ==================================================================================================
# Precision, peaks and the roofline
# ==================================================================================================


COMPUTE_NAMES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16", "f64": "fp32"}
"""IR dtype -> the device's peak FLOP/s entry a model of that dtype computes at (f64 has none: fp32's)."""
NAMED_FLOAT_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2}
MIXED_WHAT_IFS = {"bf16-mixed": "bf16", "fp16-mixed": "fp16"}
"""Named mixed precisions priced as what-ifs: the compute precision's 2-byte tensors and fp32 master weights,
with gradients reduced in fp32 (what ``Strategy.precision`` ``bf16-mixed`` plans, and what Megatron-LM does
for bf16 training by default: ``accumulate_allreduce_grads_in_fp32``, megatron/training/arguments.py)."""


@dataclass(frozen=True)
class Precision:
    """How a plan is priced: the peak FLOP/s entry its arithmetic runs at, and bytes per tensor element.

    A model's own precision (:meth:`resolve` without a name) prices every tensor at its dtype's size: a
    bf16 model has 2-byte activations, parameters, gradients and optimizer state, as eager training of
    a bf16 model keeps them, and computes at the bf16 peak. A named precision other than the model's
    prices a what-if: every float tensor at the named size (on a model already of that size, each at its
    own dtype's), and with ``bf16``/``fp16`` an fp32 master copy and fp32 optimizer state beside the 2-byte
    parameters (mixed-precision training).
    """

    name: str
    """The peak FLOP/s entry: ``fp32``, ``tf32``, ``bf16`` or ``fp16``."""
    float_bytes: int | None = None
    """Bytes of every float tensor (a what-if); None: each tensor at its own dtype's size."""
    master_weights: bool = False
    """An fp32 master copy of the parameters and fp32 optimizer state (mixed precision)."""
    graph_float_bytes: int = 4
    """Bytes of the graph's own float elements (what :attr:`scale` compares ``float_bytes`` with)."""
    reduce_bytes: int | None = None
    """Bytes per gradient element as gradient reductions move it (data-parallel all-reduces, FSDP
    reduce-scatters, tied-copy sums); None: the gradient's own size, the parameter's."""

    def __post_init__(self):
        if self.name not in NAMED_FLOAT_BYTES:
            raise ValueError(f"expected a compute precision in {sorted(NAMED_FLOAT_BYTES)}, found {self.name!r} "
                             f"(mixed what-ifs by name: {sorted(MIXED_WHAT_IFS)})")

    @staticmethod
    def of(name: str) -> "Precision":
        """The named precision on an fp32 graph: ``fp32`` / ``tf32`` (4-byte tensors), ``bf16`` / ``fp16``
        (2-byte tensors, fp32 master weights and optimizer state, 2-byte gradient reductions) or
        ``bf16-mixed`` / ``fp16-mixed`` (the same with gradients reduced in fp32)."""
        if name in MIXED_WHAT_IFS:
            return replace(Precision.of(MIXED_WHAT_IFS[name]), reduce_bytes=4)
        if name not in NAMED_FLOAT_BYTES:
            raise ValueError(f"expected a precision in {sorted([*NAMED_FLOAT_BYTES, *MIXED_WHAT_IFS])}, "
                             f"found {name!r}")
        size = NAMED_FLOAT_BYTES[name]
        return Precision(name, None if size == 4 else size, size < 4)

    @staticmethod
    def resolve(name: "str | Precision | None", graph) -> "Precision":
        """The precision to price ``graph`` with: its model's own (``name`` None, or the model's dtype, or
        ``tf32`` for an fp32 model: only the peak differs; a plan with a mixed precision, graph attr ``precision``:
        its compute dtype's peak, each tensor at its dtype's size) or the named what-if (a name of :meth:`of`, or a
        :class:`Precision` for a combination no name gives, such as fp32 master weights beside a bf16 model's
        bf16 gradient reductions). A what-if whose float size is the model's own keeps each tensor at its dtype:
        a bf16 model's explicit float32 upcasts (a loss computed on ``logits.float()``) stay 4 bytes (a plan's
        own mixed-precision casts do not: the what-if replaces them)."""
        dtype = model_dtype(graph)
        own = COMPUTE_NAMES.get(dtype, "fp32")
        planned = graph.attrs.get("precision")  # a plan's mixed precision: casts in the IR, fp32 master weights
        reduce_bytes = None
        if planned is not None:
            own = COMPUTE_NAMES[planned["compute"]]
            reduce_bytes = dtype_size(planned["reduce"]) if planned.get("reduce") else None
        if name is None or name == own or (name == "tf32" and own == "fp32"):
            return Precision(name or own, reduce_bytes=reduce_bytes)
        named = name if isinstance(name, Precision) else Precision.of(name)
        float_bytes = named.float_bytes or NAMED_FLOAT_BYTES[named.name]
        own_sizes = planned is None and float_bytes == dtype_size(dtype)  # the model's own dtypes, upcasts kept
        return replace(named, float_bytes=None if own_sizes else float_bytes, graph_float_bytes=dtype_size(dtype))

    def grad_bytes(self, param_bytes: float) -> float:
        """Bytes per element of a stored gradient of a ``param_bytes`` parameter: the parameter's size, or the
        reduce dtype's where wider (gradients accumulated in fp32 for an fp32 reduction, as Megatron keeps
        bf16 models' ``main_grad``); a narrower reduce dtype is a cast made for the reduction only."""
        return max(param_bytes, self.reduce_bytes or 0)

    def element_bytes(self, dtype: str) -> int:
        """Bytes of one element of a tensor of IR dtype ``dtype`` (``f32``, ``bf16``, ``i64``...) as priced."""
        if self.float_bytes is not None and DTYPES_BY_NAME[dtype].is_floating_point:
            return self.float_bytes
        return dtype_size(dtype)

    def describe(self) -> str:
        """What is priced, for reports: ``bf16 compute (each tensor at its dtype's size)``, or the what-if."""
        sizes = ("each tensor at its dtype's size" if self.float_bytes is None
                 else f"{self.float_bytes}-byte float tensors")
        master = ", fp32 master weights and optimizer state" if self.master_weights else ""
        reduced = f", {self.reduce_bytes}-byte gradient reductions" if self.reduce_bytes else ""
        return f"{self.name} compute ({sizes}{master}{reduced})"

    @property
    def scale(self) -> float:
        """Bytes of a float element relative to the graph's own (for costs computed from the IR types)."""
        return self.float_bytes / self.graph_float_bytes if self.float_bytes else 1.0


def peak_flops(device: Device, precision: Precision) -> float:
    """The device's peak FLOP/s for the precision (bf16 falls back to fp16, then fp32)."""
    for name in (precision.name, "fp16" if precision.name == "bf16" else "bf16", "fp32"):
        if name in device.peak_flops:
            return device.peak_flops[name]
    raise ValueError(f"device {device.id} ({device.kind}) lists no peak FLOP/s for {precision.name} or fp32")


def compute_seconds(flops, nbytes, peak: float, memory_bandwidth: float | None, efficiency=1.0):
    """Seconds of work at the roofline divided by the efficiency the device reaches on it:
    ``max(flops / peak, nbytes / memory_bandwidth) / efficiency`` (compute alone without a memory
    bandwidth), and never less than ``flops / peak``: an efficiency above 1 (a CPU's caches beat the
    measured memory bandwidth) may speed up memory-bound work, but no op runs above peak FLOP/s.
    Floats or numpy arrays (element-wise)."""
    at_peak = flops / peak
    seconds = at_peak
    if memory_bandwidth:
        seconds = np.maximum(seconds, nbytes / memory_bandwidth)
    return np.maximum(seconds / efficiency, at_peak)


def op_overheads(device: Device, overhead_s: float | None = None) -> tuple[float, float]:
    """(forward, backward) dispatch seconds per op: ``overhead_s`` (backward twice it) when given, else
    what the device measured, else :data:`DEFAULT_OP_OVERHEAD_S`; the last slower on a device that shares
    its cores (its measured figure already is)."""
    if overhead_s is not None:
        return overhead_s, 2 * overhead_s
    if device.op_overhead_s is not None:
        return device.op_overhead_s
    default = DEFAULT_OP_OVERHEAD_S / device.compute_share
    return default, 2 * default
