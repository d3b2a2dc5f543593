"""Neural-network ONNX ops: convolutions, pooling, normalizations, Dropout, MatMul, Gemm."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from frontend.onnx.ops.common import compute_dtype, scalar, spatial_attr
from frontend.onnx.registry import NodeContext, Value, converter, normalize_axis

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _torch_fn(table: dict[int, Any], spatial: int, what: str) -> Any:
    try:
        return table[spatial]
    except KeyError:
        raise ValueError(f"{what} over {spatial} spatial dims is not supported by torch "
                         f"(1 to 3 are)") from None


def _torch_pad_list(begins: list[int], ends: list[int]) -> list[int]:
    """F.pad's argument (last axis first) for per-spatial-axis begin/end pads."""
    result: list[int] = []
    for begin, end in zip(reversed(begins), reversed(ends), strict=True):
        result += [begin, end]
    return result


def resolve_pads(auto_pad: str, pads: list[int] | None, in_sizes: list[int],
                 kernel: list[int], strides: list[int], dilations: list[int]
                 ) -> tuple[list[int], list[int]]:
    """Begin/end pads per spatial axis from explicit pads or auto_pad SAME_* / VALID."""
    spatial = len(in_sizes)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(in_sizes, kernel, strides, dilations, strict=True):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else large)
            ends.append(large if auto_pad == "SAME_UPPER" else small)
        return begins, ends
    if auto_pad == "VALID" or not pads:
        return [0] * spatial, [0] * spatial
    return list(pads[:spatial]), list(pads[spatial:])


# ----- Conv / ConvTranspose ---------------------------------------------------------------
def onnx_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, strides: list[int],
              pads: list[int] | None, dilations: list[int], group: int, auto_pad: str
              ) -> torch.Tensor:
    """ONNX Conv: asymmetric or auto pads are applied with F.pad first."""
    spatial = x.dim() - 2
    kernel = list(weight.shape[2:])
    begins, ends = resolve_pads(auto_pad, pads, list(x.shape[2:]), kernel, strides, dilations)
    padding: Any = begins
    if begins != ends:
        x = F.pad(x, _torch_pad_list(begins, ends))
        padding = 0
    conv = _torch_fn(_CONV, spatial, "Conv")
    return conv(x, weight, bias, strides, padding, dilations, group)


@converter("Conv")
def convert_conv(ctx: NodeContext) -> Value:
    """Conv with group, strides, dilations, pads and auto_pad."""
    x, weight = ctx.input(0), ctx.input(1)
    spatial = weight.rank - 2 if weight.rank is not None else len(ctx.attr("kernel_shape"))
    return ctx.call(onnx_conv, x, weight, ctx.optional_input(2),
                    spatial_attr(ctx, "strides", spatial, 1), ctx.attr("pads", None),
                    spatial_attr(ctx, "dilations", spatial, 1), ctx.attr("group"),
                    ctx.attr("auto_pad"))


def onnx_conv_transpose(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        strides: list[int], pads: list[int] | None, dilations: list[int],
                        group: int, auto_pad: str, output_padding: list[int],
                        output_shape: list[int] | None) -> torch.Tensor:
    """ONNX ConvTranspose: full transposed conv, then ONNX's output padding and cropping."""
    spatial = x.dim() - 2
    in_sizes = list(x.shape[2:])
    kernel = list(weight.shape[2:])
    full_sizes = [(n - 1) * s + (k - 1) * d + 1
                  for n, s, k, d in zip(in_sizes, strides, kernel, dilations, strict=True)]
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        targets = (list(output_shape)[-spatial:] if output_shape is not None
                   else [n * s for n, s in zip(in_sizes, strides, strict=True)])
        begins, ends = [], []
        for full, extra, target in zip(full_sizes, output_padding, targets, strict=True):
            total = full + extra - target
            small, large = total // 2, total - total // 2
            upper = auto_pad == "SAME_UPPER"
            begins.append(small if upper else large)
            ends.append(large if upper else small)
    else:
        begins, ends = resolve_pads("NOTSET", pads, in_sizes, kernel, strides, dilations)
    full = _torch_fn(_CONV_TRANSPOSE, spatial, "ConvTranspose")(
        x, weight, None, strides, 0, 0, group, dilations)
    # output_padding appends zeros at the end; negative F.pad values crop the pads away
    pad_list = _torch_pad_list([-b for b in begins],
                               [extra - e for extra, e in zip(output_padding, ends, strict=True)])
    result = F.pad(full, pad_list)
    if bias is not None:
        result = result + bias.reshape([1, -1] + [1] * spatial)
    return result


@converter("ConvTranspose")
def convert_conv_transpose(ctx: NodeContext) -> Value:
    """ConvTranspose with pads, output_padding, output_shape and auto_pad."""
    x, weight = ctx.input(0), ctx.input(1)
    spatial = weight.rank - 2 if weight.rank is not None else len(ctx.attr("kernel_shape"))
    output_shape = ctx.attr("output_shape", None)
    return ctx.call(onnx_conv_transpose, x, weight, ctx.optional_input(2),
                    spatial_attr(ctx, "strides", spatial, 1), ctx.attr("pads", None),
                    spatial_attr(ctx, "dilations", spatial, 1), ctx.attr("group"),
                    ctx.attr("auto_pad"), spatial_attr(ctx, "output_padding", spatial, 0),
                    list(output_shape) if output_shape else None)


# ----- pooling ----------------------------------------------------------------------------
def pool_geometry(in_sizes: list[int], kernel: list[int], strides: list[int],
                  dilations: list[int], pads: list[int] | None, auto_pad: str, ceil_mode: int
                  ) -> tuple[list[int], list[int], list[int]]:
    """Output sizes and begin/end pads of a pooling window, ONNX rules.

    With ceil_mode the last window may hang past the end but must start inside the input or
    the begin padding (the rule torch uses too).
    """
    begins, ends = resolve_pads(auto_pad, pads, in_sizes, kernel, strides, dilations)
    outs = []
    for size, k, s, d, b, e in zip(in_sizes, kernel, strides, dilations, begins, ends,
                                   strict=True):
        span = size + b + e - ((k - 1) * d + 1)
        out = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (out - 1) * s >= size + b:
            out -= 1
        outs.append(out)
    return outs, begins, ends


def _torch_pool_ok(kernel: list[int], dilations: list[int], begins: list[int],
                   ends: list[int]) -> bool:
    # torch pools pad symmetrically and by at most half the (dilated) window
    return begins == ends and all(2 * b <= (k - 1) * d + 1
                                  for b, k, d in zip(begins, kernel, dilations, strict=True))


def _max_pool_value(dtype: torch.dtype) -> float:
    return -math.inf if dtype.is_floating_point else torch.iinfo(dtype).min


def onnx_max_pool(x: torch.Tensor, kernel: list[int], strides: list[int], dilations: list[int],
                  pads: list[int] | None, auto_pad: str, ceil_mode: int, storage_order: int,
                  with_indices: bool) -> Any:
    """ONNX MaxPool (and its Indices output: flat positions in the input tensor)."""
    in_sizes = list(x.shape[2:])
    spatial = len(in_sizes)
    outs, begins, ends = pool_geometry(in_sizes, kernel, strides, dilations, pads, auto_pad,
                                       ceil_mode)
    pooled_input = x if x.dtype.is_floating_point else x.to(torch.float64)
    pool = _torch_fn(_MAX_POOL, spatial, "MaxPool")
    if _torch_pool_ok(kernel, dilations, begins, ends):
        values, indices = pool(pooled_input, kernel, strides, begins, dilations,
                               ceil_mode=bool(ceil_mode), return_indices=True)
        offsets = [0] * spatial
        padded_sizes = in_sizes
    else:  # pad by hand (-inf) exactly as far as the last window reaches
        needed = [(o - 1) * s + (k - 1) * d + 1 - n - b
                  for o, s, k, d, n, b in zip(outs, strides, kernel, dilations, in_sizes, begins,
                                              strict=True)]
        pooled_input = F.pad(pooled_input, _torch_pad_list(begins, needed),
                             value=_max_pool_value(pooled_input.dtype))
        values, indices = pool(pooled_input, kernel, strides, 0, dilations, return_indices=True)
        offsets = begins
        padded_sizes = list(pooled_input.shape[2:])
    values = values.to(x.dtype)
    if not with_indices:
        return values
    return values, _input_flat_indices(indices, padded_sizes, offsets, in_sizes, x.shape,
                                       storage_order)


def _input_flat_indices(indices: torch.Tensor, padded_sizes: list[int], offsets: list[int],
                        in_sizes: list[int], x_shape: Any, storage_order: int) -> torch.Tensor:
    """torch's per-plane indices (in the padded plane) -> ONNX flat indices into the input."""
    coordinates = []
    remainder = indices
    for size in reversed(padded_sizes):
        coordinates.append(remainder % size)
        remainder = remainder // size
    coordinates = [c - o for c, o in zip(reversed(coordinates), offsets, strict=True)]
    order = list(range(len(in_sizes)))
    if storage_order:  # column-major: the first spatial axis varies fastest
        order.reverse()
    flat = torch.zeros_like(indices)
    for axis in order:
        flat = flat * in_sizes[axis] + coordinates[axis]
    batch, channels = x_shape[0], x_shape[1]
    plane = math.prod(in_sizes)
    planes = torch.arange(batch * channels, dtype=torch.int64, device=indices.device).reshape(
        [batch, channels] + [1] * len(in_sizes))
    return flat + planes * plane


def window_sum(x: torch.Tensor, kernel: list[int], strides: list[int], dilations: list[int]
               ) -> torch.Tensor:
    """Sum over every pooling window of every channel (a depthwise conv with a ones kernel)."""
    channels = x.shape[1]
    ones = torch.ones([channels, 1] + list(kernel), dtype=x.dtype, device=x.device)
    conv = _torch_fn(_CONV, len(kernel), "pooling")
    return conv(x, ones, None, strides, 0, dilations, channels)


def _padded_for_windows(x: torch.Tensor, outs: list[int], begins: list[int], ends: list[int],
                        kernel: list[int], strides: list[int], dilations: list[int],
                        count_include_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded input covering every window, and the count of elements each one averages."""
    in_sizes = list(x.shape[2:])
    needed = [(o - 1) * s + (k - 1) * d + 1 - n - b
              for o, s, k, d, n, b in zip(outs, strides, kernel, dilations, in_sizes, begins,
                                          strict=True)]
    padded = F.pad(x, _torch_pad_list(begins, needed))
    mask = torch.ones([1, 1] + in_sizes, dtype=x.dtype, device=x.device)
    if count_include_pad:  # explicit pads count, the extra reach of ceil_mode does not
        mask = F.pad(mask, _torch_pad_list(begins, ends), value=1.0)
        mask = F.pad(mask, _torch_pad_list([0] * len(begins),
                                           [n - e for n, e in zip(needed, ends, strict=True)]))
    else:
        mask = F.pad(mask, _torch_pad_list(begins, needed))
    counts = window_sum(mask, kernel, strides, dilations)
    return padded, counts


def onnx_average_pool(x: torch.Tensor, kernel: list[int], strides: list[int],
                      dilations: list[int], pads: list[int] | None, auto_pad: str,
                      ceil_mode: int, count_include_pad: int) -> torch.Tensor:
    """ONNX AveragePool: torch's avg_pool where it matches, else window sums / counts."""
    in_sizes = list(x.shape[2:])
    spatial = len(in_sizes)
    outs, begins, ends = pool_geometry(in_sizes, kernel, strides, dilations, pads, auto_pad,
                                       ceil_mode)
    if all(d == 1 for d in dilations) and _torch_pool_ok(kernel, dilations, begins, ends):
        return _torch_fn(_AVG_POOL, spatial, "AveragePool")(
            x, kernel, strides, begins, bool(ceil_mode), bool(count_include_pad))
    padded, counts = _padded_for_windows(x, outs, begins, ends, kernel, strides, dilations,
                                         count_include_pad)
    return window_sum(padded, kernel, strides, dilations) / counts


def onnx_lp_pool(x: torch.Tensor, kernel: list[int], strides: list[int], dilations: list[int],
                 pads: list[int] | None, auto_pad: str, ceil_mode: int, p: int) -> torch.Tensor:
    """ONNX LpPool: the p-norm of every window (zero padding)."""
    outs, begins, ends = pool_geometry(list(x.shape[2:]), kernel, strides, dilations, pads,
                                       auto_pad, ceil_mode)
    padded, _ = _padded_for_windows(x, outs, begins, ends, kernel, strides, dilations, 1)
    return window_sum(torch.abs(padded) ** p, kernel, strides, dilations) ** (1.0 / p)


def _pool_args(ctx: NodeContext) -> tuple[list[int], list[int], list[int], Any, str, int]:
    kernel = list(ctx.attr("kernel_shape"))
    spatial = len(kernel)
    dilations = spatial_attr(ctx, "dilations", spatial, 1)
    ceil_mode = ctx.attr("ceil_mode", 0)
    return (kernel, spatial_attr(ctx, "strides", spatial, 1), dilations,
            ctx.attr("pads", None), ctx.attr("auto_pad"), ceil_mode)


@converter("MaxPool")
def convert_max_pool(ctx: NodeContext) -> Value | list[Value]:
    """MaxPool with pads, strides, dilations, ceil_mode and the optional Indices output."""
    args = _pool_args(ctx)
    with_indices = ctx.wants_output(1)
    call = ctx.call_multi if with_indices else ctx.call
    extra = {"num_results": 2} if with_indices else {}
    return call(onnx_max_pool, ctx.input(0), *args, ctx.attr("storage_order", 0), with_indices,
                **extra)


@converter("AveragePool")
def convert_average_pool(ctx: NodeContext) -> Value:
    """AveragePool with count_include_pad, ceil_mode and dilations."""
    return ctx.call(onnx_average_pool, ctx.input(0), *_pool_args(ctx),
                    ctx.attr("count_include_pad"))


@converter("LpPool")
def convert_lp_pool(ctx: NodeContext) -> Value:
    """LpPool."""
    return ctx.call(onnx_lp_pool, ctx.input(0), *_pool_args(ctx), ctx.attr("p"))


def global_average_pool(x: torch.Tensor) -> torch.Tensor:
    """Mean over all spatial axes, kept as size-1 axes."""
    return torch.mean(x, dim=list(range(2, x.dim())), keepdim=True)


def global_max_pool(x: torch.Tensor) -> torch.Tensor:
    """Max over all spatial axes, kept as size-1 axes."""
    return torch.amax(x, dim=list(range(2, x.dim())), keepdim=True)


def global_lp_pool(x: torch.Tensor, p: int) -> torch.Tensor:
    """p-norm over all spatial axes, kept as size-1 axes."""
    dims = list(range(2, x.dim()))
    return torch.sum(torch.abs(x) ** p, dim=dims, keepdim=True) ** (1.0 / p)


@converter("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
def convert_global_pool(ctx: NodeContext) -> Value:
    """Global pooling over the spatial axes."""
    x = ctx.input(0)
    if ctx.op_type == "GlobalLpPool":
        return ctx.call(global_lp_pool, x, ctx.attr("p"))
    fn = global_average_pool if ctx.op_type == "GlobalAveragePool" else global_max_pool
    return ctx.call(fn, x)


# ----- normalizations ---------------------------------------------------------------------
def _channel_shape(x: torch.Tensor, param: torch.Tensor, spatial_mode: int) -> list[int]:
    if spatial_mode:
        return [1, -1] + [1] * (x.dim() - 2)
    return [1] + list(param.shape)


def batch_norm_inference(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                         mean: torch.Tensor, var: torch.Tensor, epsilon: float,
                         spatial: int = 1) -> torch.Tensor:
    """BatchNormalization with the given statistics (spatial=0: per-activation params)."""
    if spatial and x.dim() >= 2:
        return F.batch_norm(x, mean, var, scale, bias, False, 0.0, epsilon)
    shape = _channel_shape(x, scale, spatial)
    return ((x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + epsilon)
            * scale.reshape(shape) + bias.reshape(shape))


def batch_norm_training(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                        mean: torch.Tensor, var: torch.Tensor, epsilon: float, momentum: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNormalization in training mode: batch statistics and updated running ones."""
    dims = [0] + list(range(2, x.dim()))
    batch_mean = torch.mean(x, dim=dims)
    batch_var = torch.var(x, dim=dims, correction=0)
    y = batch_norm_inference(x, scale, bias, batch_mean, batch_var, epsilon)
    running_mean = mean * momentum + batch_mean * (1 - momentum)
    running_var = var * momentum + batch_var * (1 - momentum)
    return y, running_mean, running_var


@converter("BatchNormalization")
def convert_batch_norm(ctx: NodeContext) -> Value | list[Value]:
    """BatchNormalization: inference, or training mode (opset 14 attribute, or extra outputs)."""
    args = [ctx.input(i) for i in range(5)]
    epsilon = ctx.attr("epsilon")
    training = ctx.attr("training_mode") if ctx.since >= 14 else int(ctx.num_outputs > 1)
    if training:
        return ctx.call_multi(batch_norm_training, *args, epsilon, ctx.attr("momentum"),
                              num_results=3)
    spatial = ctx.attr("spatial", 1) if ctx.since < 9 else 1
    return ctx.call(batch_norm_inference, *args, epsilon, spatial)


def instance_norm(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, epsilon: float
                  ) -> torch.Tensor:
    """InstanceNormalization: per sample and channel over the spatial axes."""
    return F.instance_norm(x, weight=scale, bias=bias, eps=epsilon)


@converter("InstanceNormalization")
def convert_instance_norm(ctx: NodeContext) -> Value:
    """InstanceNormalization."""
    return ctx.call(instance_norm, ctx.input(0), ctx.input(1), ctx.input(2), ctx.attr("epsilon"))


def layer_norm(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, axis: int,
               epsilon: float, stash_type: int, with_stats: bool) -> Any:
    """LayerNormalization over the axes from ``axis`` on; optionally Mean and InvStdDev too."""
    axis = axis % x.dim()
    dims = list(range(axis, x.dim()))
    wide = x.to(compute_dtype(x.dtype, stash_type))
    mean = torch.mean(wide, dim=dims, keepdim=True)
    centered = wide - mean
    inv_std = torch.rsqrt(torch.mean(centered * centered, dim=dims, keepdim=True) + epsilon)
    y = (centered * inv_std).to(x.dtype) * scale
    if bias is not None:
        y = y + bias
    return (y, mean, inv_std) if with_stats else y


@converter("LayerNormalization")
def convert_layer_norm(ctx: NodeContext) -> Value | list[Value]:
    """LayerNormalization: F.layer_norm when it matches exactly, else the ONNX formula."""
    x, scale, bias = ctx.input(0), ctx.input(1), ctx.optional_input(2)
    axis, epsilon, stash = ctx.attr("axis"), ctx.attr("epsilon"), ctx.attr("stash_type")
    with_stats = ctx.wants_output(1) or ctx.wants_output(2)
    normalized = _layer_norm_shape(x, scale, bias, axis)
    if not with_stats and normalized is not None and x.dtype == torch.float32:
        return ctx.call(F.layer_norm, x, list(normalized), scale, bias, epsilon)
    if with_stats:
        return ctx.call_multi(layer_norm, x, scale, bias, axis, epsilon, stash, True,
                              num_results=3)
    return ctx.call(layer_norm, x, scale, bias, axis, epsilon, stash, False)


def _layer_norm_shape(x: Value, scale: Value, bias: Value | None, axis: int
                      ) -> tuple[int, ...] | None:
    """F.layer_norm's normalized_shape, when scale and bias span exactly the normalized axes."""
    if x.shape is not None:
        normalized = x.shape[normalize_axis(axis, len(x.shape)):]
    elif axis < 0 and scale.shape is not None and len(scale.shape) == -axis \
            and 1 not in scale.shape:
        normalized = scale.shape  # without broadcast dims, scale's shape is the normalized one
    else:
        return None
    if scale.shape == normalized and (bias is None or bias.shape == normalized):
        return normalized
    return None


def group_norm(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, groups: int,
               epsilon: float, stash_type: int, per_channel: bool) -> torch.Tensor:
    """GroupNormalization; scale/bias per channel (opset 21) or per group (opset 18)."""
    batch, channels = x.shape[0], x.shape[1]
    wide = x.to(compute_dtype(x.dtype, stash_type))
    grouped = wide.reshape(batch, groups, -1)
    mean = torch.mean(grouped, dim=2, keepdim=True)
    var = torch.var(grouped, dim=2, keepdim=True, correction=0)
    normalized = ((grouped - mean) / torch.sqrt(var + epsilon)).reshape(x.shape).to(x.dtype)
    if not per_channel:
        scale = torch.repeat_interleave(scale, channels // groups)
        bias = torch.repeat_interleave(bias, channels // groups)
    shape = [1, channels] + [1] * (x.dim() - 2)
    return normalized * scale.reshape(shape) + bias.reshape(shape)


@converter("GroupNormalization")
def convert_group_norm(ctx: NodeContext) -> Value:
    """GroupNormalization."""
    return ctx.call(group_norm, ctx.input(0), ctx.input(1), ctx.input(2),
                    ctx.attr("num_groups"), ctx.attr("epsilon"),
                    ctx.attr("stash_type", 1), ctx.since >= 21)


def rms_norm(x: torch.Tensor, scale: torch.Tensor, axis: int, epsilon: float, stash_type: int
             ) -> torch.Tensor:
    """RMSNormalization over the axes from ``axis`` on."""
    axis = axis % x.dim()
    wide = x.to(compute_dtype(x.dtype, stash_type))
    mean_square = torch.mean(wide * wide, dim=list(range(axis, x.dim())), keepdim=True)
    return (wide * torch.rsqrt(mean_square + epsilon)).to(x.dtype) * scale


@converter("RMSNormalization")
def convert_rms_norm(ctx: NodeContext) -> Value:
    """RMSNormalization."""
    return ctx.call(rms_norm, ctx.input(0), ctx.input(1), ctx.attr("axis"), ctx.attr("epsilon"),
                    ctx.attr("stash_type"))


def local_response_norm(x: torch.Tensor, size: int, alpha: float, beta: float, bias: float
                        ) -> torch.Tensor:
    """LRN: sums of squares over ``size`` neighbouring channels (more of them after)."""
    before, after = (size - 1) // 2, -(-(size - 1) // 2)
    squares = F.pad(x * x, [0, 0] * (x.dim() - 2) + [before, after])
    window = squares.unfold(1, size, 1).sum(dim=-1)
    return x / (bias + alpha / size * window) ** beta


@converter("LRN")
def convert_lrn(ctx: NodeContext) -> Value:
    """LRN (local response normalization across channels)."""
    return ctx.call(local_response_norm, ctx.input(0), ctx.attr("size"), ctx.attr("alpha"),
                    ctx.attr("beta"), ctx.attr("bias"))


def mean_variance_norm(x: torch.Tensor, axes: list[int]) -> torch.Tensor:
    """MeanVarianceNormalization: (x - mean) / (std + 1e-9) over ``axes``."""
    mean = torch.mean(x, dim=axes, keepdim=True)
    variance = torch.mean(x * x, dim=axes, keepdim=True) - mean * mean
    return (x - mean) / (torch.sqrt(variance) + 1e-9)


@converter("MeanVarianceNormalization")
def convert_mvn(ctx: NodeContext) -> Value:
    """MeanVarianceNormalization."""
    return ctx.call(mean_variance_norm, ctx.input(0), list(ctx.attr("axes")))


def lp_normalize(x: torch.Tensor, axis: int, p: int) -> torch.Tensor:
    """LpNormalization: divide by the L1 or L2 norm along ``axis`` (zero norms give 0)."""
    norm = torch.linalg.vector_norm(x, ord=p, dim=axis, keepdim=True)
    return x / torch.where(norm == 0, torch.ones_like(norm), norm)


@converter("LpNormalization")
def convert_lp_normalization(ctx: NodeContext) -> Value:
    """LpNormalization."""
    return ctx.call(lp_normalize, ctx.input(0), ctx.attr("axis"), ctx.attr("p"))


# ----- Dropout ----------------------------------------------------------------------------
def dropout_mask(x: torch.Tensor) -> torch.Tensor:
    """The all-keep mask of inference-mode Dropout."""
    return torch.ones_like(x, dtype=torch.bool)


def dropout_train(x: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-mode Dropout (random: not reproducible against other runtimes)."""
    keep = torch.rand_like(x, dtype=torch.float32) >= ratio
    scale = 1.0 / (1.0 - ratio) if ratio < 1 else 0.0
    return torch.where(keep, x * scale, torch.zeros_like(x)), keep


def dropout_runtime(x: torch.Tensor, ratio: Any, training: Any
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dropout whose ratio / training_mode are run-time tensors (eager only)."""
    ratio = float(scalar(ratio))
    if training is not None and bool(scalar(training)) and ratio > 0:
        return dropout_train(x, ratio)
    return x, dropout_mask(x)


@converter("Dropout")
def convert_dropout(ctx: NodeContext) -> Value | list[Value]:
    """Dropout: identity in inference (the default); ratio/training_mode inputs from opset 12."""
    x = ctx.input(0)
    if ctx.since >= 12:
        ratio = ctx.static(1)
        training = ctx.static(2)
        ratio = 0.5 if ratio is None else ratio
    else:
        ratio, training = ctx.attr("ratio", 0.5), False
    if isinstance(training, Value) or isinstance(ratio, Value):
        ratio = ctx.input(1) if isinstance(ratio, Value) else ratio
        training = ctx.input(2) if isinstance(training, Value) else training
        return ctx.call_multi(dropout_runtime, x, ratio, training, num_results=2,
                              foldable=False)
    training = bool(scalar(training)) if training is not None else False
    ratio = float(scalar(ratio))
    if training and ratio > 0:
        return ctx.call_multi(dropout_train, x, ratio, num_results=2, foldable=False)
    if not ctx.wants_output(1):
        return [x]
    mask = ctx.call(dropout_mask, x)
    if ctx.since < 10:  # the mask had x's type before opset 10
        mask = ctx.call(torch.ones_like, x)
    return [x, mask]


# ----- MatMul / Gemm / Einsum / Det -------------------------------------------------------
@converter("MatMul")
def convert_matmul(ctx: NodeContext) -> Value:
    """MatMul (numpy semantics, which torch.matmul shares)."""
    return ctx.call(torch.matmul, ctx.input(0), ctx.input(1))


def onnx_gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None, alpha: float,
              beta: float, trans_a: int, trans_b: int) -> torch.Tensor:
    """alpha * op(A) @ op(B) + beta * C (C broadcast; scaling skipped when 1)."""
    if trans_a:
        a = a.transpose(0, 1)
    if trans_b:
        b = b.transpose(0, 1)
    y = torch.matmul(a, b)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c if beta == 1.0 else c * beta)
    return y


@converter("Gemm")
def convert_gemm(ctx: NodeContext) -> Value:
    """Gemm with alpha, beta, transA, transB and an optional C."""
    return ctx.call(onnx_gemm, ctx.input(0), ctx.input(1), ctx.optional_input(2),
                    ctx.attr("alpha"), ctx.attr("beta"), ctx.attr("transA"), ctx.attr("transB"))


@converter("Einsum")
def convert_einsum(ctx: NodeContext) -> Value:
    """Einsum (torch accepts ONNX's equation syntax)."""
    inputs = [ctx.input(i) for i in range(len(ctx.inputs))]
    return ctx.call(torch.einsum, ctx.attr("equation").replace(" ", ""), *inputs)


@converter("Det")
def convert_det(ctx: NodeContext) -> Value:
    """Det of the last two axes."""
    return ctx.call(torch.linalg.det, ctx.input(0))
