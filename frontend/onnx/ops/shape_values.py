"""Symbolic shape arithmetic: ``Shape`` of a tensor whose shape is not static.

Exporters compute reshape targets with small subgraphs (Shape -> Gather -> Unsqueeze ->
Concat -> Reshape). When the shape is static those fold to constants at conversion time; when
it is not (a dynamic graph input), the values stay Python ints at run time — torch.SymInts under
``torch.export`` — instead of becoming int64 tensors, whose values export could not trace.
These functions are the run-time side; a shape value is a list of ints (1-D) or an int (0-D).
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch

from frontend.onnx.registry import NodeContext, Value

ShapeData = list[Any] | Any


def shape_of(x: torch.Tensor, start: int, end: int | None) -> list[Any]:
    """``x.shape[start:end]`` as a list of (symbolic) ints."""
    return list(x.shape)[start:end]


def shape_gather(shape: list[Any], index: Any) -> ShapeData:
    """Entries of a shape list: one int for a scalar index, a list for an index list."""
    if isinstance(index, list):
        return [shape[i] for i in index]
    return shape[index]


def shape_slice(shape: list[Any], start: int, end: int, step: int) -> list[Any]:
    """A slice of a shape list (ONNX Slice on axis 0; Python clamping rules match ONNX's)."""
    return shape[slice(start, end, step)]


def shape_concat(*parts: list[Any]) -> list[Any]:
    """Concatenated shape lists."""
    return [dim for part in parts for dim in part]


def shape_unsqueeze(value: Any) -> list[Any]:
    """A scalar shape value as a one-element list."""
    return [value]


def shape_squeeze(value: list[Any]) -> Any:
    """A one-element shape list as a scalar."""
    return value[0]


def _floor_div_toward_zero(a: Any, b: Any) -> Any:
    quotient = abs(a) // abs(b)
    return quotient if (a >= 0) == (b >= 0) else -quotient


SHAPE_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "Add": operator.add, "Sub": operator.sub, "Mul": operator.mul,
    "Div": _floor_div_toward_zero,
}


def shape_binary(op: str, a: ShapeData, b: ShapeData) -> ShapeData:
    """An elementwise op on shape values, broadcasting scalars and one-element lists."""
    fn = SHAPE_BINARY[op]
    if not isinstance(a, list) and not isinstance(b, list):
        return fn(a, b)
    a_list = a if isinstance(a, list) else [a]
    b_list = b if isinstance(b, list) else [b]
    if len(a_list) == 1:
        a_list = a_list * len(b_list)
    if len(b_list) == 1:
        b_list = b_list * len(a_list)
    return [fn(x, y) for x, y in zip(a_list, b_list, strict=True)]


# ----- conversion-time support ------------------------------------------------------------
def is_shape_operand(value: Value | None) -> bool:
    """Whether ``value`` can take part in symbolic shape arithmetic."""
    if value is None:
        return False
    if value.is_shape:
        return True
    const = value.const
    return const is not None and const.dtype == torch.int64 and const.dim() <= 1


def as_shape_arg(value: Value) -> Any:
    """A shape-arithmetic operand: the Value (a run-time list) or the constant as Python data."""
    return value if value.is_shape else value.const.tolist()


def emit(ctx: NodeContext, fn: Callable[..., Any], *args: Any) -> Value:
    """Emit a shape-value function; its result is a run-time shape value."""
    return ctx.builder.call_runtime_list(ctx, fn, *args)
