"""Resize and Upsample: separable per-axis resampling with ONNX's coordinate rules.

For every resized axis a *plan* is computed from Python ints (the static sizes): for each
output position, the input positions it reads and their weights, following the ONNX
reference (coordinate transformation modes, nearest rounding modes, linear and cubic kernels,
antialiasing, exclude_outside, tf_crop_and_resize extrapolation). At run time an axis is one
``index_select`` (nearest) or an ``index_select`` and a weighted sum (linear / cubic).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from frontend.onnx.ops.common import int_list, number_list
from frontend.onnx.registry import NodeContext, Value, converter


@dataclass(frozen=True)
class ResizeMode:
    """Resize attributes that shape the per-axis plans."""

    mode: str = "nearest"
    coordinates: str = "half_pixel"
    nearest_mode: str = "round_prefer_floor"
    cubic_a: float = -0.75
    antialias: int = 0
    exclude_outside: int = 0
    extrapolation_value: float = 0.0
    keep_aspect_ratio_policy: str = "stretch"


def _source_coordinates(out_positions: np.ndarray, scale: float, in_size: int, out_size: int,
                        coordinates: str, roi: tuple[float, float] | None
                        ) -> tuple[np.ndarray, np.ndarray | None]:
    """Input coordinate of every output position, and which ones extrapolate (crop mode)."""
    out_width = scale * in_size  # the unrounded output size
    y = out_positions
    if coordinates == "align_corners":
        x = np.zeros_like(y) if out_width == 1 else y * (in_size - 1) / (out_width - 1)
    elif coordinates == "asymmetric":
        x = y / scale
    elif coordinates == "tf_crop_and_resize":
        start, end = roi if roi is not None else (0.0, 1.0)
        x = (np.full_like(y, (end - start) * (in_size - 1) / 2) if out_width == 1
             else y * (end - start) * (in_size - 1) / (out_width - 1))
        x = x + start * (in_size - 1)
        return x, (x < 0) | (x > in_size - 1)
    elif coordinates == "pytorch_half_pixel":
        x = np.full_like(y, -0.5) if out_width == 1 else (y + 0.5) / scale - 0.5
    elif coordinates == "half_pixel":
        x = (y + 0.5) / scale - 0.5
    elif coordinates == "half_pixel_symmetric":
        offset = in_size / 2 * (1 - out_size / out_width)
        x = offset + (y + 0.5) / scale - 0.5
    else:
        raise ValueError(f"unknown Resize coordinate_transformation_mode {coordinates!r}")
    return x, None


def _nearest_weights(ratio: float, style: ResizeMode, scale: float) -> list[float]:
    if ratio == 1.0:
        return [0.0, 1.0]
    rule = style.nearest_mode
    if rule == "round_prefer_floor":
        return [float(ratio <= 0.5), float(ratio > 0.5)]
    if rule == "round_prefer_ceil":
        return [float(ratio < 0.5), float(ratio >= 0.5)]
    if rule == "floor":
        return [1.0, 0.0]
    if rule == "ceil":
        return [0.0, 1.0]
    raise ValueError(f"unknown Resize nearest_mode {rule!r}")


def _linear_weights(ratio: float, style: ResizeMode, scale: float) -> list[float]:
    if not style.antialias:
        return [1 - ratio, ratio]
    scale = min(scale, 1.0)  # antialiasing widens the kernel when downsampling
    start = math.floor(-1 / scale) + 1
    taps = (np.arange(start, 2 - start) - ratio) * scale
    weights = np.clip(1 - np.abs(taps), 0, 1)
    return list(weights / weights.sum())


def _cubic_kernel(x: float, a: float) -> float:
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    if x < 2:
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return 0.0


def _cubic_weights(ratio: float, style: ResizeMode, scale: float) -> list[float]:
    a = style.cubic_a
    if not style.antialias:
        return [_cubic_kernel(ratio + 1, a), _cubic_kernel(ratio, a),
                _cubic_kernel(1 - ratio, a), _cubic_kernel(2 - ratio, a)]
    scale = min(scale, 1.0)
    start = math.floor(-2 / scale) + 1
    weights = np.array([_cubic_kernel(scale * (i - ratio), a) for i in range(start, 2 - start)])
    return list(weights / weights.sum())


_WEIGHTS = {"nearest": _nearest_weights, "linear": _linear_weights, "cubic": _cubic_weights}


def axis_plan(in_size: int, out_size: int, scale: float, style: ResizeMode,
              roi: tuple[float, float] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Input indices [out, taps], weights [out, taps] and extrapolated rows for one axis."""
    y = np.arange(out_size, dtype=np.float64)
    x, extrapolated = _source_coordinates(y, scale, in_size, out_size, style.coordinates, roi)
    floor = np.floor(x)
    ratios = np.where(x == floor, 1.0, x - floor)  # prefer the left neighbour
    weights = np.array([_WEIGHTS[style.mode](float(r), style, scale) for r in ratios],
                       dtype=np.float64).reshape(out_size, -1)
    taps = weights.shape[1]
    # the `taps` input positions nearest to x, ties to the smaller index (ONNX reference)
    half = math.ceil(taps / 2)
    shifted = x + half
    base = np.floor(shifted)
    frac = shifted - base
    if taps % 2 == 0:
        offset = np.where(frac == 0, -(taps // 2), -(taps // 2) + 1)
    else:
        offset = np.where(frac <= 0.5, -((taps - 1) // 2), -((taps - 1) // 2) + 1)
    indices = (base + offset).astype(np.int64)[:, None] + np.arange(taps)[None, :] - half
    if style.exclude_outside:
        outside = (indices < 0) | (indices >= in_size)
        weights = np.where(outside, 0.0, weights)
        totals = weights.sum(axis=1, keepdims=True)
        weights = weights / np.where(totals == 0, 1.0, totals)
    return np.clip(indices, 0, in_size - 1), weights, extrapolated


def _resample_axis(x: torch.Tensor, axis: int, out_size: int, scale: float, style: ResizeMode,
                   roi: tuple[float, float] | None) -> torch.Tensor:
    indices, weights, extrapolated = axis_plan(x.shape[axis], out_size, scale, style, roi)
    if style.mode == "nearest":
        chosen = indices[np.arange(out_size), weights.argmax(axis=1)]
        result = torch.index_select(x, axis, torch.from_numpy(chosen).to(x.device))
    else:
        taps = indices.shape[1]
        picked = torch.index_select(x, axis, torch.from_numpy(indices.reshape(-1)).to(x.device))
        shape = list(x.shape)
        picked = picked.reshape(shape[:axis] + [out_size, taps] + shape[axis + 1:])
        weight_shape = [1] * axis + [out_size, taps] + [1] * (x.dim() - axis - 1)
        weights_t = torch.from_numpy(weights).to(device=x.device, dtype=x.dtype)
        result = torch.sum(picked * weights_t.reshape(weight_shape), dim=axis + 1)
    if extrapolated is not None and extrapolated.any():
        mask_shape = [1] * axis + [out_size] + [1] * (x.dim() - axis - 1)
        mask = torch.from_numpy(extrapolated).to(x.device).reshape(mask_shape)
        result = torch.where(mask, torch.full_like(result, style.extrapolation_value), result)
    return result


def _targets(in_shape: list[int], axes: list[int], scales: list[float] | None,
             sizes: list[int] | None, policy: str) -> tuple[list[float], list[int]]:
    """Per-axis scale factors and output sizes (sizes win; aspect-ratio policies apply)."""
    if sizes is not None:
        factors = [size / in_shape[a] for size, a in zip(sizes, axes, strict=True)]
        if policy != "stretch":
            common = min(factors) if policy == "not_larger" else max(factors)
            factors = [common] * len(axes)
            sizes = [int(common * in_shape[a] + 0.5) for a in axes]
        return factors, list(sizes)
    return list(scales), [int(s * in_shape[a]) for s, a in zip(scales, axes, strict=True)]


def onnx_resize(x: torch.Tensor, scales: Any, sizes: Any, roi: Any, axes: list[int] | None,
                **attributes: Any) -> torch.Tensor:
    """ONNX Resize of ``x`` to ``sizes`` or by ``scales`` along ``axes`` (default: all).

    ``attributes`` are :class:`ResizeMode`'s fields (plain values keep the fx graph printable).
    """
    style = ResizeMode(**attributes)
    rank = x.dim()
    axes = list(range(rank)) if axes is None else [a % rank for a in axes]
    scales = [float(v) for v in number_list(scales)] if _given(scales) else None
    sizes = int_list(sizes) if _given(sizes) else None
    roi = [float(v) for v in number_list(roi)] if _given(roi) else None
    factors, out_sizes = _targets(list(x.shape), axes, scales, sizes,
                                  style.keep_aspect_ratio_policy)
    work = x if x.dtype.is_floating_point else x.to(torch.float64)
    for i, axis in enumerate(axes):
        axis_roi = (roi[i], roi[i + len(axes)]) if roi is not None else None
        identity_roi = axis_roi is None or axis_roi == (0.0, 1.0)
        if out_sizes[i] == x.shape[axis] and math.isclose(factors[i], 1.0) and identity_roi:
            continue
        work = _resample_axis(work, axis, out_sizes[i], factors[i], style, axis_roi)
    if work.dtype != x.dtype:  # integers: round and saturate, as the reference does
        info = torch.iinfo(x.dtype)
        work = torch.clamp(torch.round(work), info.min, info.max).to(x.dtype)
    return work


def _given(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, torch.Tensor):
        return value.numel() > 0
    return len(number_list(value)) > 0


def _runtime_or_static(ctx: NodeContext, index: int) -> Any:
    value = ctx.static(index)
    return ctx.input(index) if isinstance(value, Value) else value


@converter("Resize")
def convert_resize(ctx: NodeContext) -> Value:
    """Resize (opset 10 to 19): nearest / linear / cubic with all coordinate modes."""
    x = ctx.input(0)
    if ctx.since < 11:  # Resize-10: (X, scales), asymmetric coordinates, floor for nearest
        return ctx.call(onnx_resize, x, _runtime_or_static(ctx, 1), None, None, None,
                        mode=ctx.attr("mode"), coordinates="asymmetric", nearest_mode="floor")
    axes = ctx.attr("axes", None)
    return ctx.call(
        onnx_resize, x, _runtime_or_static(ctx, 2), _runtime_or_static(ctx, 3),
        _runtime_or_static(ctx, 1), list(axes) if axes else None,
        mode=ctx.attr("mode"), coordinates=ctx.attr("coordinate_transformation_mode"),
        nearest_mode=ctx.attr("nearest_mode"), cubic_a=ctx.attr("cubic_coeff_a"),
        antialias=ctx.attr("antialias", 0), exclude_outside=ctx.attr("exclude_outside"),
        extrapolation_value=ctx.attr("extrapolation_value"),
        keep_aspect_ratio_policy=ctx.attr("keep_aspect_ratio_policy", "stretch"))


@converter("Upsample")
def convert_upsample(ctx: NodeContext) -> Value:
    """Upsample (deprecated): scales attribute (opset 7) or input (opset 9)."""
    scales = ctx.attr("scales") if ctx.since < 9 else _runtime_or_static(ctx, 1)
    mode = ctx.attr("mode")
    return ctx.call(onnx_resize, ctx.input(0), scales, None, None, None,
                    mode="linear" if mode in ("linear", "bilinear") else mode,
                    coordinates="asymmetric", nearest_mode="floor")
