"""Less common ONNX ops: quantization, RotaryEmbedding, SwiGLU, CumProd, windows, sampling
grids, sequence-shaped helpers (ReverseSequence, Compress, Unique, TensorScatter...)."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from frontend.onnx.dtypes import torch_dtype
from frontend.onnx.ops.common import int_list, scalar
from frontend.onnx.ops.nn import onnx_conv
from frontend.onnx.registry import NodeContext, Value, converter

# ----- quantization -----------------------------------------------------------------------
_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz)


def _broadcast_quant_param(param: torch.Tensor, shape: list[int], axis: int, block_size: int
                           ) -> torch.Tensor:
    """A scale / zero point shaped to broadcast against the tensor (per-axis or blocked)."""
    if param.dim() == 0 or param.numel() == 1:
        return param.reshape(())
    axis = axis % len(shape)
    if not block_size:
        return param.reshape([param.numel() if d == axis else 1 for d in range(len(shape))])
    expanded = torch.repeat_interleave(param, block_size, dim=axis)
    return expanded.narrow(axis, 0, shape[axis])


def quantize_linear(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                    axis: int, block_size: int, saturate: int, out_dtype: torch.dtype,
                    precision: torch.dtype | None) -> torch.Tensor:
    """QuantizeLinear: saturate(round_half_even(x / scale) + zero_point)."""
    shape = list(x.shape)
    scale = _broadcast_quant_param(scale, shape, axis, block_size)
    scaled = x.to(precision) / scale.to(precision) if precision is not None else x / scale
    if out_dtype in _FLOAT8:
        if zero_point is not None:
            scaled = scaled + _broadcast_quant_param(zero_point, shape, axis, block_size).to(
                scaled.dtype)
        limit = torch.finfo(out_dtype).max
        return (torch.clamp(scaled.float(), -limit, limit) if saturate else scaled.float()
                ).to(out_dtype)
    quantized = torch.round(scaled).to(torch.int64)
    if zero_point is not None:
        quantized = quantized + _broadcast_quant_param(zero_point, shape, axis, block_size).to(
            torch.int64)
    info = torch.iinfo(out_dtype)
    return torch.clamp(quantized, info.min, info.max).to(out_dtype)


@converter("QuantizeLinear")
def convert_quantize_linear(ctx: NodeContext) -> Value:
    """QuantizeLinear: per-tensor, per-axis or blocked; integer or float8 outputs."""
    x, scale, zero_point = ctx.input(0), ctx.input(1), ctx.optional_input(2)
    out_type = ctx.attr("output_dtype", 0)
    if zero_point is not None and zero_point.dtype is not None:
        out_dtype = zero_point.dtype
    elif out_type:
        out_dtype = torch_dtype(out_type, node=ctx.name, op_type=ctx.op_type, opset=ctx.opset)
    else:
        out_dtype = torch.uint8
    precision = ctx.attr("precision", 0)
    precision_dtype = torch_dtype(precision, node=ctx.name, op_type=ctx.op_type) if precision \
        else None
    return ctx.call(quantize_linear, x, scale, zero_point, ctx.attr("axis", 1),
                    ctx.attr("block_size", 0), ctx.attr("saturate", 1), out_dtype,
                    precision_dtype)


def dequantize_linear(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                      axis: int, block_size: int, out_dtype: torch.dtype | None
                      ) -> torch.Tensor:
    """DequantizeLinear: (x - zero_point) * scale, in float32 then the output type."""
    shape = list(x.shape)
    values = x.to(torch.float32)
    if zero_point is not None and x.dtype not in _FLOAT8:
        values = values - _broadcast_quant_param(zero_point, shape, axis, block_size).to(
            torch.float32)
    result = values * _broadcast_quant_param(scale, shape, axis, block_size)
    return result.to(out_dtype or scale.dtype)


@converter("DequantizeLinear")
def convert_dequantize_linear(ctx: NodeContext) -> Value:
    """DequantizeLinear: per-tensor, per-axis or blocked."""
    out_type = ctx.attr("output_dtype", 0)
    out_dtype = torch_dtype(out_type, node=ctx.name, op_type=ctx.op_type) if out_type else None
    return ctx.call(dequantize_linear, ctx.input(0), ctx.input(1), ctx.optional_input(2),
                    ctx.attr("axis", 1), ctx.attr("block_size", 0), out_dtype)


def dynamic_quantize_linear(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DynamicQuantizeLinear: uint8 quantization with a scale/zero point from x's range."""
    high = torch.clamp(torch.amax(x), min=0)
    low = torch.clamp(torch.amin(x), max=0)
    scale = torch.where(high == low, torch.ones_like(high), high - low) / 255
    zero_point = torch.round(torch.clamp(-low / scale, 0, 255))
    y = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
    return y.to(torch.uint8), scale.to(x.dtype), zero_point.to(torch.uint8)


@converter("DynamicQuantizeLinear")
def convert_dynamic_quantize_linear(ctx: NodeContext) -> list[Value]:
    """DynamicQuantizeLinear."""
    return ctx.call_multi(dynamic_quantize_linear, ctx.input(0), num_results=3)


def _minus_zero_point(x: torch.Tensor, zero_point: torch.Tensor | None, axis: int
                      ) -> torch.Tensor:
    values = x.to(torch.int32)
    if zero_point is None:
        return values
    zero_point = zero_point.to(torch.int32)
    if zero_point.numel() > 1:  # per row (A) / per column (B) or per output channel
        shape = [1] * x.dim()
        shape[axis] = zero_point.numel()
        zero_point = zero_point.reshape(shape)
    return values - zero_point


def matmul_integer(a: torch.Tensor, b: torch.Tensor, a_zero: torch.Tensor | None,
                   b_zero: torch.Tensor | None) -> torch.Tensor:
    """MatMulInteger: int32 matmul of zero-point-shifted 8-bit operands."""
    left = _minus_zero_point(a, a_zero, -2)
    right = _minus_zero_point(b, b_zero, -1)
    return torch.matmul(left.to(torch.int64), right.to(torch.int64)).to(torch.int32)


@converter("MatMulInteger")
def convert_matmul_integer(ctx: NodeContext) -> Value:
    """MatMulInteger."""
    return ctx.call(matmul_integer, ctx.input(0), ctx.input(1), ctx.optional_input(2),
                    ctx.optional_input(3))


def conv_integer(x: torch.Tensor, w: torch.Tensor, x_zero: torch.Tensor | None,
                 w_zero: torch.Tensor | None, strides: list[int], pads: list[int] | None,
                 dilations: list[int], group: int, auto_pad: str) -> torch.Tensor:
    """ConvInteger: convolution of zero-point-shifted operands, computed exactly in float64."""
    left = _minus_zero_point(x, x_zero, 1).to(torch.float64)
    right = _minus_zero_point(w, w_zero, 0).to(torch.float64)
    return onnx_conv(left, right, None, strides, pads, dilations, group, auto_pad).round().to(
        torch.int32)


@converter("ConvInteger")
def convert_conv_integer(ctx: NodeContext) -> Value:
    """ConvInteger."""
    w = ctx.input(1)
    spatial = w.rank - 2 if w.rank is not None else len(ctx.attr("kernel_shape"))
    strides = list(ctx.attr("strides", None) or [1] * spatial)
    dilations = list(ctx.attr("dilations", None) or [1] * spatial)
    return ctx.call(conv_integer, ctx.input(0), w, ctx.optional_input(2), ctx.optional_input(3),
                    strides, ctx.attr("pads", None), dilations, ctx.attr("group"),
                    ctx.attr("auto_pad"))


# ----- transformer helpers ----------------------------------------------------------------
def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     position_ids: torch.Tensor | None, interleaved: int, rotary_dim: int,
                     num_heads: int | None) -> torch.Tensor:
    """RotaryEmbedding on [batch, heads, seq, size] or [batch, seq, heads * size] inputs."""
    original_shape = x.shape
    if x.dim() == 4:
        x = x.transpose(1, 2)  # -> [batch, seq, heads, size]
    else:
        batch, seq, hidden = x.shape
        x = x.reshape(batch, seq, num_heads, hidden // num_heads)
    rotary_dim = rotary_dim or x.shape[3]
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    if interleaved:
        first, second = rotated[..., 0::2], rotated[..., 1::2]
    else:
        first, second = torch.chunk(rotated, 2, dim=-1)
    real = cos * first - sin * second
    imaginary = sin * first + cos * second
    if interleaved:
        rotated = torch.stack([real, imaginary], dim=-1).reshape(rotated.shape)
    else:
        rotated = torch.cat([real, imaginary], dim=-1)
    result = torch.cat([rotated, passed], dim=-1)
    if len(original_shape) == 3:
        return result.reshape(original_shape)
    return result.transpose(1, 2)


@converter("RotaryEmbedding")
def convert_rotary_embedding(ctx: NodeContext) -> Value:
    """RotaryEmbedding (opset 23)."""
    return ctx.call(rotary_embedding, ctx.input(0), ctx.input(1), ctx.input(2),
                    ctx.optional_input(3), ctx.attr("interleaved"),
                    ctx.attr("rotary_embedding_dim"), ctx.attr("num_heads", None))


def swiglu(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """SwiGLU: a * sigmoid(alpha * a) * b."""
    return a * torch.sigmoid(alpha * a) * b


@converter("SwiGLU")
def convert_swiglu(ctx: NodeContext) -> Value:
    """SwiGLU."""
    return ctx.call(swiglu, ctx.input(0), ctx.input(1), ctx.attr("alpha"))


def tensor_scatter(cache: torch.Tensor, update: torch.Tensor, write_indices: torch.Tensor | None,
                   axis: int, mode: str) -> torch.Tensor:
    """TensorScatter: write ``update`` into the cache at per-batch offsets along ``axis``."""
    axis = axis % cache.dim()
    batch, length, count = cache.shape[0], cache.shape[axis], update.shape[axis]
    starts = (torch.zeros(batch, dtype=torch.int64, device=cache.device) if write_indices is None
              else write_indices.to(torch.int64))
    positions = starts.reshape(batch, 1) + torch.arange(count, device=cache.device)
    if mode == "circular":
        positions = positions.remainder(length)
    index_shape = [batch] + [1] * (cache.dim() - 1)
    index_shape[axis] = count
    index = positions.reshape(index_shape).expand(update.shape)
    return torch.scatter(cache, axis, index, update)


@converter("TensorScatter")
def convert_tensor_scatter(ctx: NodeContext) -> Value:
    """TensorScatter (KV-cache update, linear or circular)."""
    return ctx.call(tensor_scatter, ctx.input(0), ctx.input(1), ctx.optional_input(2),
                    ctx.attr("axis"), ctx.attr("mode"))


# ----- cumulative product / windows / BitCast ---------------------------------------------
def onnx_cumprod(x: torch.Tensor, axis: Any, exclusive: int, reverse: int) -> torch.Tensor:
    """Cumulative product along ``axis``, optionally exclusive and/or from the end."""
    axis = int(scalar(axis)) % x.dim()
    if reverse:
        x = torch.flip(x, (axis,))
    result = torch.cumprod(x, dim=axis, dtype=x.dtype)
    if exclusive:
        result = torch.cat([torch.ones_like(x.narrow(axis, 0, 1)),
                            result.narrow(axis, 0, x.shape[axis] - 1)], dim=axis)
    return torch.flip(result, (axis,)) if reverse else result


@converter("CumProd")
def convert_cumprod(ctx: NodeContext) -> Value:
    """CumProd with exclusive / reverse."""
    axis = ctx.static(1)
    axis = ctx.input(1) if isinstance(axis, Value) else int(scalar(axis))
    return ctx.call(onnx_cumprod, ctx.input(0), axis, ctx.attr("exclusive"), ctx.attr("reverse"))


_WINDOW_COEFFICIENTS = {"HannWindow": (0.5, 0.5, 0.0), "HammingWindow": (25 / 46, 21 / 46, 0.0),
                        "BlackmanWindow": (0.42, 0.5, 0.08)}


def cosine_window(size: Any, coefficients: tuple[float, float, float], periodic: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """a0 - a1 cos(2 pi n / N) + a2 cos(4 pi n / N), N = size (periodic) or size - 1."""
    size = int(scalar(size))
    denominator = size if periodic else size - 1
    n = torch.arange(size, dtype=torch.float64)
    a0, a1, a2 = coefficients
    phase = 2 * math.pi * n / denominator
    return (a0 - a1 * torch.cos(phase) + a2 * torch.cos(2 * phase)).to(dtype)


@converter(*_WINDOW_COEFFICIENTS)
def convert_window(ctx: NodeContext) -> Value:
    """HannWindow / HammingWindow / BlackmanWindow."""
    size = ctx.static(0)
    size = ctx.input(0) if isinstance(size, Value) else size
    dtype = torch_dtype(ctx.attr("output_datatype"), node=ctx.name, op_type=ctx.op_type)
    return ctx.call(cosine_window, size, _WINDOW_COEFFICIENTS[ctx.op_type],
                    ctx.attr("periodic"), dtype)


def bit_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret the bits of ``x`` as ``dtype`` (same element width)."""
    if x.dtype == torch.bool or dtype == torch.bool:
        return x.view(torch.uint8).view(dtype)
    return x.view(dtype)


@converter("BitCast")
def convert_bit_cast(ctx: NodeContext) -> Value:
    """BitCast between types of the same width."""
    dtype = torch_dtype(ctx.attr("to"), node=ctx.name, op_type=ctx.op_type, opset=ctx.opset)
    return ctx.call(bit_cast, ctx.input(0), dtype)


# ----- data-dependent / sequence helpers --------------------------------------------------
def reverse_sequence(x: torch.Tensor, lengths: torch.Tensor, batch_axis: int, time_axis: int
                     ) -> torch.Tensor:
    """Reverse the first lengths[b] steps along ``time_axis`` of every batch entry."""
    steps = x.shape[time_axis]
    time = torch.arange(steps, device=x.device).reshape(1, steps)
    lengths = lengths.to(torch.int64).reshape(-1, 1)
    source = torch.where(time < lengths, lengths - 1 - time, time)  # [batch, time]
    if batch_axis > time_axis:
        source = source.T
    shape = [1] * x.dim()
    shape[batch_axis], shape[time_axis] = x.shape[batch_axis], steps
    return torch.gather(x, time_axis, source.reshape(shape).expand(x.shape))


@converter("ReverseSequence")
def convert_reverse_sequence(ctx: NodeContext) -> Value:
    """ReverseSequence."""
    return ctx.call(reverse_sequence, ctx.input(0), ctx.input(1), ctx.attr("batch_axis"),
                    ctx.attr("time_axis"))


def compress(x: torch.Tensor, condition: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Compress: keep the slices where ``condition`` is true (eager only)."""
    keep = torch.nonzero(condition.to(torch.bool).reshape(-1)).reshape(-1)
    if axis is None:
        flat = x.reshape(-1)
        return flat[keep[keep < flat.shape[0]]]
    return torch.index_select(x, axis, keep[keep < x.shape[axis]])


@converter("Compress")
def convert_compress(ctx: NodeContext) -> Value:
    """Compress (its output shape depends on the data)."""
    return ctx.call(compress, ctx.input(0), ctx.input(1), ctx.attr("axis", None))


def center_crop_pad(x: torch.Tensor, shape: Any, axes: list[int] | None) -> torch.Tensor:
    """Crop or zero-pad the given axes symmetrically (the extra element at the end)."""
    axes = list(range(x.dim())) if axes is None else [a % x.dim() for a in axes]
    for axis, target in zip(axes, int_list(shape), strict=True):
        size = x.shape[axis]
        if target < size:
            x = x.narrow(axis, (size - target) // 2, target)
        elif target > size:
            before = (target - size) // 2
            pads = [0, 0] * (x.dim() - 1 - axis) + [before, target - size - before]
            x = F.pad(x, pads)
    return x


@converter("CenterCropPad")
def convert_center_crop_pad(ctx: NodeContext) -> Value:
    """CenterCropPad."""
    shape = ctx.static_ints(1)
    shape = ctx.input(1) if isinstance(shape, Value) else shape
    axes = ctx.attr("axes", None)
    return ctx.call(center_crop_pad, ctx.input(0), shape, list(axes) if axes else None)


def unique(x: torch.Tensor, axis: int | None, sort: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unique values, first-occurrence indices, inverse indices and counts (eager only)."""
    data = x.reshape(-1) if axis is None else x
    dim = 0 if axis is None else axis % x.dim()
    values, inverse, counts = torch.unique(data, sorted=True, return_inverse=True,
                                           return_counts=True, dim=dim)
    positions = torch.arange(data.shape[dim], device=x.device)
    first = torch.full((values.shape[dim],), data.shape[dim], dtype=torch.int64, device=x.device)
    first = first.scatter_reduce(0, inverse, positions, "amin")
    if not sort:  # order of first occurrence
        order = torch.argsort(first)
        remap = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(),
                                                                       device=x.device))
        values = torch.index_select(values, dim, order)
        first, counts, inverse = first[order], counts[order], remap[inverse]
    return values, first, inverse, counts


@converter("Unique")
def convert_unique(ctx: NodeContext) -> list[Value]:
    """Unique (its output shape depends on the data)."""
    return ctx.call_multi(unique, ctx.input(0), ctx.attr("axis", None), ctx.attr("sorted"),
                          num_results=4)


# ----- sampling grids ---------------------------------------------------------------------
_GRID_MODES = {"linear": "bilinear", "bilinear": "bilinear", "nearest": "nearest",
               "cubic": "bicubic", "bicubic": "bicubic"}


def grid_sample(x: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str,
                align_corners: int) -> torch.Tensor:
    """GridSample through F.grid_sample (2-D; 3-D for linear / nearest)."""
    return F.grid_sample(x, grid, mode=_GRID_MODES[mode], padding_mode=padding_mode,
                         align_corners=bool(align_corners))


@converter("GridSample")
def convert_grid_sample(ctx: NodeContext) -> Value:
    """GridSample."""
    return ctx.call(grid_sample, ctx.input(0), ctx.input(1), ctx.attr("mode"),
                    ctx.attr("padding_mode"), ctx.attr("align_corners"))


def affine_grid(theta: torch.Tensor, size: Any, align_corners: int) -> torch.Tensor:
    """AffineGrid through F.affine_grid."""
    return F.affine_grid(theta, list(int_list(size)), align_corners=bool(align_corners))


@converter("AffineGrid")
def convert_affine_grid(ctx: NodeContext) -> Value:
    """AffineGrid."""
    size = ctx.static_ints(1)
    size = ctx.input(1) if isinstance(size, Value) else size
    return ctx.call(affine_grid, ctx.input(0), size, ctx.attr("align_corners"))


def col2im(x: torch.Tensor, image_shape: Any, block_shape: Any, strides: list[int] | None,
           pads: list[int] | None, dilations: list[int] | None) -> torch.Tensor:
    """Col2Im (2-D images) through F.fold."""
    image, block = int_list(image_shape), int_list(block_shape)
    if len(image) != 2:
        raise ValueError(f"Col2Im is supported for 2-D images only, got {len(image)}-D")
    pads = pads or [0] * 4
    if pads[:2] != pads[2:]:
        raise ValueError(f"Col2Im with asymmetric pads {pads} is not supported")
    return F.fold(x, image, block, dilation=dilations or 1, padding=pads[:2],
                  stride=strides or 1)


@converter("Col2Im")
def convert_col2im(ctx: NodeContext) -> Value:
    """Col2Im."""
    shapes = [ctx.static_ints(i) for i in (1, 2)]
    if isinstance(shapes[0], list) and len(shapes[0]) != 2:
        raise ctx.unsupported(f"Col2Im of {len(shapes[0])}-D images (torch's fold is 2-D only)")
    shapes = [ctx.input(i) if isinstance(s, Value) else s for i, s in zip((1, 2), shapes,
                                                                          strict=True)]
    return ctx.call(col2im, ctx.input(0), *shapes, ctx.attr("strides", None),
                    ctx.attr("pads", None), ctx.attr("dilations", None))



# ----- quantized linear algebra -----------------------------------------------------------
def _dequantize_axis(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                     axis: int) -> torch.Tensor:
    """(x - zero_point) * scale in float64, parameters per tensor or along ``axis``."""
    values = x.to(torch.float64)
    shape = [1] * x.dim()
    if scale.numel() > 1:
        shape[axis] = scale.numel()
    if zero_point is not None:
        values = values - zero_point.to(torch.float64).reshape(shape if zero_point.numel() > 1
                                                               else [])
    return values * scale.to(torch.float64).reshape(shape if scale.numel() > 1 else [])


def _requantize(y: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                out_dtype: torch.dtype) -> torch.Tensor:
    quantized = torch.round(y / scale.to(torch.float64).reshape([]))
    if zero_point is not None:
        quantized = quantized + zero_point.to(torch.float64).reshape([])
    info = torch.iinfo(out_dtype)
    return torch.clamp(quantized, info.min, info.max).to(out_dtype)


def qlinear_matmul(a: torch.Tensor, a_scale: torch.Tensor, a_zero: torch.Tensor,
                   b: torch.Tensor, b_scale: torch.Tensor, b_zero: torch.Tensor,
                   y_scale: torch.Tensor, y_zero: torch.Tensor) -> torch.Tensor:
    """QLinearMatMul: quantized matmul (per-row A / per-column B parameters allowed)."""
    product = torch.matmul(_dequantize_axis(a, a_scale, a_zero, -2),
                           _dequantize_axis(b, b_scale, b_zero, -1))
    return _requantize(product, y_scale, y_zero, y_zero.dtype)


@converter("QLinearMatMul")
def convert_qlinear_matmul(ctx: NodeContext) -> Value:
    """QLinearMatMul."""
    return ctx.call(qlinear_matmul, *[ctx.input(i) for i in range(8)])


def qlinear_conv(x: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor,
                 w: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor,
                 y_scale: torch.Tensor, y_zero: torch.Tensor, bias: torch.Tensor | None,
                 strides: list[int], pads: list[int] | None, dilations: list[int], group: int,
                 auto_pad: str) -> torch.Tensor:
    """QLinearConv: quantized convolution (per-output-channel weight parameters allowed)."""
    inputs = _dequantize_axis(x, x_scale, x_zero, 1)
    weights = _dequantize_axis(w, w_scale, w_zero, 0)
    scaled_bias = None
    if bias is not None:
        scaled_bias = bias.to(torch.float64) * x_scale.to(torch.float64) * w_scale.to(
            torch.float64).reshape(-1)
    y = onnx_conv(inputs, weights, scaled_bias, strides, pads, dilations, group, auto_pad)
    return _requantize(y, y_scale, y_zero, y_zero.dtype)


@converter("QLinearConv")
def convert_qlinear_conv(ctx: NodeContext) -> Value:
    """QLinearConv."""
    w = ctx.input(3)
    spatial = w.rank - 2 if w.rank is not None else len(ctx.attr("kernel_shape"))
    return ctx.call(qlinear_conv, *[ctx.input(i) for i in range(8)], ctx.optional_input(8),
                    list(ctx.attr("strides", None) or [1] * spatial), ctx.attr("pads", None),
                    list(ctx.attr("dilations", None) or [1] * spatial), ctx.attr("group"),
                    ctx.attr("auto_pad"))


# ----- DFT --------------------------------------------------------------------------------
def onnx_dft(x: torch.Tensor, length: Any, axis: Any, inverse: int, onesided: int
             ) -> torch.Tensor:
    """DFT of real ([..., 1]) or complex ([..., 2]) signals along ``axis`` (ONNX reference).

    Forward: [..., n, 2] (first n // 2 + 1 bins when onesided). Inverse: [..., n, 2], or the
    real [..., n, 1] signal of a onesided (Hermitian) spectrum.
    """
    axis = int(scalar(axis)) % x.dim()
    wide = x.to(torch.float64)
    signal = (torch.view_as_complex(wide.contiguous()) if x.shape[-1] == 2 else wide[..., 0])
    if length is None:
        n = 2 * (x.shape[axis] - 1) if inverse and onesided else x.shape[axis]
    else:
        n = int(scalar(length))
    if inverse and onesided:
        return torch.fft.irfft(signal, n=n, dim=axis).unsqueeze(-1).to(x.dtype)
    result = torch.fft.ifft(signal, n=n, dim=axis) if inverse else torch.fft.fft(
        signal, n=n, dim=axis)
    if onesided:
        result = result.narrow(axis, 0, n // 2 + 1)
    return torch.view_as_real(result).to(x.dtype)


def _static_or_input(ctx: NodeContext, index: int, default: Any) -> Any:
    value = ctx.static(index)
    if value is None:
        return default
    return ctx.input(index) if isinstance(value, Value) else value


@converter("DFT")
def convert_dft(ctx: NodeContext) -> Value:
    """DFT: axis attribute (opset 17) or input (opset 20)."""
    axis = _static_or_input(ctx, 2, -2) if ctx.since >= 20 else ctx.attr("axis")
    return ctx.call(onnx_dft, ctx.input(0), _static_or_input(ctx, 1, None), axis,
                    ctx.attr("inverse"), ctx.attr("onesided"))
