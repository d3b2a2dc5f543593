"""Reductions, arg-reductions, TopK and the softmax family."""
from __future__ import annotations

import math
from typing import Any

import torch

from frontend.onnx.ops.common import int_list, scalar
from frontend.onnx.registry import NodeContext, Value, converter, prod

# The opset from which each Reduce* op takes its axes as an input instead of an attribute.
_AXES_INPUT_SINCE = {"ReduceSum": 13}
_DEFAULT_AXES_INPUT_SINCE = 18


def _sum(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    return torch.sum(x, dim=dims, keepdim=keepdim, dtype=x.dtype)


def _prod(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    for dim in sorted(dims, reverse=True):  # torch.prod reduces one axis at a time
        x = torch.prod(x, dim=dim, keepdim=keepdim, dtype=x.dtype)
    return x


def _mean(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    if x.dtype.is_floating_point:
        return torch.mean(x, dim=dims, keepdim=keepdim)
    return torch.mean(x.to(torch.float64), dim=dims, keepdim=keepdim).to(x.dtype)


def _max(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    return torch.amax(x, dim=dims, keepdim=keepdim)


def _min(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    return torch.amin(x, dim=dims, keepdim=keepdim)


def _l1(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    return _sum(torch.abs(x), dims, keepdim)


def _l2(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    if x.dtype.is_floating_point:
        return torch.sqrt(_sum(x * x, dims, keepdim))
    wide = x.to(torch.float64)
    return torch.sqrt(_sum(wide * wide, dims, keepdim)).to(x.dtype)


def _log_sum(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    return torch.log(_sum(x, dims, keepdim))


def _log_sum_exp(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    if x.dtype.is_floating_point:
        return torch.logsumexp(x, dim=dims, keepdim=keepdim)
    return torch.logsumexp(x.to(torch.float64), dim=dims, keepdim=keepdim).to(x.dtype)


def _sum_square(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    return _sum(x * x, dims, keepdim)


REDUCTIONS = {
    "ReduceSum": _sum, "ReduceProd": _prod, "ReduceMean": _mean, "ReduceMax": _max,
    "ReduceMin": _min, "ReduceL1": _l1, "ReduceL2": _l2, "ReduceLogSum": _log_sum,
    "ReduceLogSumExp": _log_sum_exp, "ReduceSumSquare": _sum_square,
}
# The value a reduction over no elements gives (ONNX's identity element for it).
_EMPTY_RESULT = {
    "ReduceSum": 0.0, "ReduceProd": 1.0, "ReduceMean": math.nan, "ReduceMax": -math.inf,
    "ReduceMin": math.inf, "ReduceL1": 0.0, "ReduceL2": 0.0, "ReduceLogSum": -math.inf,
    "ReduceLogSumExp": -math.inf, "ReduceSumSquare": 0.0,
}


def _empty_fill(op: str, dtype: torch.dtype) -> float | int | bool:
    value = _EMPTY_RESULT[op]
    if dtype == torch.bool:
        return op == "ReduceMin"
    if not dtype.is_floating_point and math.isinf(value):
        info = torch.iinfo(dtype)
        return info.min if value < 0 else info.max
    return value


def onnx_reduce(x: torch.Tensor, op: str, axes: Any, keepdims: int, noop_with_empty_axes: int
                ) -> torch.Tensor:
    """A Reduce* op over ``axes`` (all axes when empty, unless noop_with_empty_axes)."""
    axes = [] if axes is None else int_list(axes)
    if not axes and noop_with_empty_axes:
        return x
    dims = sorted({a % x.dim() for a in axes}) if axes else list(range(x.dim()))
    if x.dim() == 0:
        return REDUCTIONS[op](x.reshape(1), [0], False)
    if prod([x.shape[d] for d in dims]) == 0:
        shape = [1 if d in dims else size for d, size in enumerate(x.shape)
                 if keepdims or d not in dims]
        return torch.full(shape, _empty_fill(op, x.dtype), dtype=x.dtype, device=x.device)
    return REDUCTIONS[op](x, dims, bool(keepdims))


@converter(*REDUCTIONS)
def convert_reduce(ctx: NodeContext) -> Value:
    """Reduce*: axes attribute up to opset 12/17 (by op), axes input from 13/18."""
    x = ctx.input(0)
    if ctx.since >= _AXES_INPUT_SINCE.get(ctx.op_type, _DEFAULT_AXES_INPUT_SINCE):
        axes = ctx.static_ints(1)
        axes = ctx.input(1) if isinstance(axes, Value) else axes
        noop = ctx.attr("noop_with_empty_axes")
    else:
        axes = ctx.attr("axes", None)
        noop = 0
    return ctx.call(onnx_reduce, x, ctx.op_type, axes, ctx.attr("keepdims"), noop)


# ----- ArgMax / ArgMin / TopK -------------------------------------------------------------
def arg_reduce(x: torch.Tensor, axis: int, keepdims: int, select_last_index: int,
               largest: bool) -> torch.Tensor:
    """ArgMax / ArgMin along ``axis``; ties go to the first (or last) index."""
    fn = torch.argmax if largest else torch.argmin
    if not select_last_index:
        return fn(x, dim=axis, keepdim=bool(keepdims))
    axis = axis % x.dim()
    flipped = fn(torch.flip(x, (axis,)), dim=axis, keepdim=bool(keepdims))
    return x.shape[axis] - 1 - flipped


@converter("ArgMax", "ArgMin")
def convert_arg_reduce(ctx: NodeContext) -> Value:
    """ArgMax / ArgMin (select_last_index from opset 12)."""
    select_last = ctx.attr("select_last_index") if ctx.since >= 12 else 0
    return ctx.call(arg_reduce, ctx.input(0), ctx.attr("axis"), ctx.attr("keepdims"),
                    select_last, ctx.op_type == "ArgMax")


def top_k(x: torch.Tensor, k: Any, axis: int, largest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest (or smallest) values and their indices, lower index first on ties."""
    k = int(scalar(k))
    values, indices = torch.sort(x, dim=axis, descending=bool(largest), stable=True)
    return values.narrow(axis, 0, k), indices.narrow(axis, 0, k)


@converter("TopK")
def convert_top_k(ctx: NodeContext) -> list[Value]:
    """TopK: k attribute before opset 10, input after; results are always sorted."""
    k = ctx.attr("k") if ctx.since < 10 else ctx.static(1)
    k = ctx.input(1) if isinstance(k, Value) else int(scalar(k))
    largest = ctx.attr("largest") if ctx.since >= 11 else 1
    return ctx.call_multi(top_k, ctx.input(0), k, ctx.attr("axis"), largest, num_results=2)


# ----- Softmax / LogSoftmax / Hardmax -----------------------------------------------------
def hardmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """1 at the first maximum along ``dim``, 0 elsewhere."""
    index = torch.argmax(x, dim=dim, keepdim=True)
    return torch.zeros_like(x).scatter(dim, index, 1)


_SOFTMAX = {"Softmax": torch.softmax, "LogSoftmax": torch.log_softmax, "Hardmax": hardmax}


def softmax_2d(x: torch.Tensor, axis: int, op: str) -> torch.Tensor:
    """Softmax family before opset 13: over all axes from ``axis`` on, as one flat axis."""
    axis = axis % x.dim() if x.dim() else 0
    shape = list(x.shape)
    flat = torch.reshape(x, [prod(shape[:axis]), prod(shape[axis:])])
    return torch.reshape(_SOFTMAX[op](flat, 1), shape)


@converter(*_SOFTMAX)
def convert_softmax(ctx: NodeContext) -> Value:
    """Softmax / LogSoftmax / Hardmax: 2-D coercion before opset 13, one axis from 13."""
    x = ctx.input(0)
    axis = ctx.attr("axis")
    if ctx.since < 13:
        last = x.rank is not None and axis % max(x.rank, 1) == x.rank - 1
        if not last:
            return ctx.call(softmax_2d, x, axis, ctx.op_type)
    return ctx.call(_SOFTMAX[ctx.op_type], x, axis)
