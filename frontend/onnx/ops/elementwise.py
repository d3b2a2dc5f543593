"""Elementwise ONNX ops: unary math, activations, arithmetic, comparisons, logic, Cast, Clip.

ONNX broadcasting for these ops is numpy's (multidirectional), which is torch's too.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from frontend.onnx.dtypes import WIDE_UNSIGNED, torch_dtype
from frontend.onnx.ops import shape_values as sv
from frontend.onnx.ops.common import known_float, pick, unsigned_safe
from frontend.onnx.registry import NodeContext, Value, converter

# ----- unary ops with a torch function of the same meaning --------------------------------
def onnx_abs(x: torch.Tensor) -> torch.Tensor:
    """Abs for every dtype (unsigned values are their own absolute value)."""
    return x if x.dtype in WIDE_UNSIGNED or x.dtype == torch.uint8 else torch.abs(x)


UNARY: dict[str, Any] = {
    "Abs": onnx_abs, "Neg": torch.neg, "Exp": torch.exp, "Log": torch.log,
    "Sqrt": torch.sqrt, "Reciprocal": torch.reciprocal, "Floor": torch.floor,
    "Ceil": torch.ceil, "Round": torch.round, "Sign": torch.sign, "Sin": torch.sin,
    "Cos": torch.cos, "Tan": torch.tan, "Asin": torch.asin, "Acos": torch.acos,
    "Atan": torch.atan, "Sinh": torch.sinh, "Cosh": torch.cosh, "Asinh": torch.asinh,
    "Acosh": torch.acosh, "Atanh": torch.atanh, "Erf": torch.erf, "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh, "Relu": torch.relu, "Softsign": F.softsign, "IsNaN": torch.isnan,
    "Not": torch.logical_not, "BitwiseNot": torch.bitwise_not, "Mish": F.mish,
    "Softplus": F.softplus,
}


@converter(*UNARY)
def convert_unary(ctx: NodeContext) -> Value:
    """Unary elementwise ops mapping one-to-one onto torch functions."""
    x = ctx.input(0)
    return ctx.call(pick(UNARY[ctx.op_type], x), x)



@converter("Identity")
def convert_identity(ctx: NodeContext) -> Value:
    """Identity aliases its input: no torch op is needed."""
    if not ctx.has_input(0):
        raise ctx.unsupported("optional-typed Identity is not supported")
    return ctx.shape_input(0)


# ----- activations with attributes --------------------------------------------------------
def hard_sigmoid(x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """max(0, min(1, alpha * x + beta))."""
    return torch.clamp(alpha * x + beta, 0.0, 1.0)


def selu(x: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """gamma * (x if x > 0 else alpha * (exp(x) - 1))."""
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


def thresholded_relu(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """x where x > alpha, else 0."""
    return torch.where(x > alpha, x, torch.zeros_like(x))


def shrink(x: torch.Tensor, bias: float, lambd: float) -> torch.Tensor:
    """x + bias below -lambd, x - bias above lambd, 0 between."""
    zero = torch.zeros_like(x)
    return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, zero))


def prelu(x: torch.Tensor, slope: torch.Tensor) -> torch.Tensor:
    """x where x >= 0, slope * x elsewhere (slope broadcasts to x)."""
    return torch.where(x < 0, slope * x, x)


def swish(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """x * sigmoid(alpha * x)."""
    return x * torch.sigmoid(alpha * x)


def is_inf(x: torch.Tensor, detect_negative: int, detect_positive: int) -> torch.Tensor:
    """Which elements are infinite, optionally only one sign."""
    if detect_negative and detect_positive:
        return torch.isinf(x)
    if detect_negative:
        return torch.isneginf(x)
    if detect_positive:
        return torch.isposinf(x)
    return torch.zeros_like(x, dtype=torch.bool)


@converter("LeakyRelu", "Elu", "Celu", "Selu", "HardSigmoid", "HardSwish", "ThresholdedRelu",
           "Shrink", "Gelu", "Swish", "PRelu", "IsInf")
def convert_activation(ctx: NodeContext) -> Value:
    """Activations parametrised by attributes (defaults from the op schema)."""
    x = ctx.input(0)
    op = ctx.op_type
    if op == "LeakyRelu":
        return ctx.call(F.leaky_relu, x, ctx.attr("alpha"))
    if op == "Elu":
        return ctx.call(F.elu, x, ctx.attr("alpha"))
    if op == "Celu":
        return ctx.call(F.celu, x, ctx.attr("alpha"))
    if op == "Selu":
        return ctx.call(selu, x, ctx.attr("alpha"), ctx.attr("gamma"))
    if op == "HardSigmoid":
        return ctx.call(hard_sigmoid, x, ctx.attr("alpha"), ctx.attr("beta"))
    if op == "HardSwish":
        return ctx.call(F.hardswish, x)
    if op == "ThresholdedRelu":
        return ctx.call(thresholded_relu, x, ctx.attr("alpha"))
    if op == "Shrink":
        return ctx.call(shrink, x, ctx.attr("bias"), ctx.attr("lambd"))
    if op == "Gelu":
        return ctx.call(F.gelu, x, approximate=ctx.attr("approximate"))
    if op == "Swish":
        return ctx.call(swish, x, ctx.attr("alpha"))
    if op == "IsInf":
        return ctx.call(is_inf, x, ctx.attr("detect_negative"), ctx.attr("detect_positive"))
    return ctx.call(prelu, x, ctx.input(1))


# ----- binary arithmetic ------------------------------------------------------------------
def onnx_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ONNX Div: true division for floats, truncation toward zero for integers."""
    if a.dtype.is_floating_point:
        return torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")


def onnx_pow(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ONNX Pow: the result has the base's dtype whatever the exponent's."""
    result = torch.pow(x, y)
    return result if result.dtype == x.dtype else result.to(x.dtype)


def onnx_mod(a: torch.Tensor, b: torch.Tensor, fmod: int) -> torch.Tensor:
    """ONNX Mod: C fmod (sign of the dividend) when fmod=1, else the divisor's sign."""
    return torch.fmod(a, b) if fmod else torch.remainder(a, b)


def bit_shift(x: torch.Tensor, shift: torch.Tensor, direction: str) -> torch.Tensor:
    """ONNX BitShift on unsigned integers."""
    if direction == "LEFT":
        return torch.bitwise_left_shift(x, shift)
    return torch.bitwise_right_shift(x, shift)


BINARY: dict[str, Any] = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "And": torch.logical_and,
    "Or": torch.logical_or, "Xor": torch.logical_xor, "BitwiseAnd": torch.bitwise_and,
    "BitwiseOr": torch.bitwise_or, "BitwiseXor": torch.bitwise_xor,
}


def _symbolic_shape_arithmetic(ctx: NodeContext) -> Value | None:
    """Add/Sub/Mul/Div on symbolic shape values stays Python int arithmetic."""
    a, b = ctx.shape_input(0), ctx.shape_input(1)
    if (a.is_shape or b.is_shape) and sv.is_shape_operand(a) and sv.is_shape_operand(b):
        return sv.emit(ctx, sv.shape_binary, ctx.op_type, sv.as_shape_arg(a),
                       sv.as_shape_arg(b))
    return None


@converter(*BINARY)
def convert_binary(ctx: NodeContext) -> Value:
    """Binary elementwise ops mapping one-to-one onto torch functions."""
    if ctx.op_type in sv.SHAPE_BINARY and (symbolic := _symbolic_shape_arithmetic(ctx)):
        return symbolic
    a, b = ctx.input(0), ctx.input(1)
    return ctx.call(pick(BINARY[ctx.op_type], a, b), a, b)


@converter("Div")
def convert_div(ctx: NodeContext) -> Value:
    """Div: integer division truncates toward zero in ONNX (torch.div would not)."""
    if symbolic := _symbolic_shape_arithmetic(ctx):
        return symbolic
    a, b = ctx.input(0), ctx.input(1)
    fn = torch.div if known_float(a, b) else unsigned_safe(onnx_div)
    return ctx.call(fn, a, b)


@converter("Pow")
def convert_pow(ctx: NodeContext) -> Value:
    """Pow: the exponent may have another dtype than the base."""
    x, y = ctx.input(0), ctx.input(1)
    same_float = known_float(x) and x.dtype == y.dtype
    return ctx.call(torch.pow if same_float else unsigned_safe(onnx_pow), x, y)


@converter("Mod")
def convert_mod(ctx: NodeContext) -> Value:
    """Mod with the fmod attribute choosing the sign convention."""
    a, b = ctx.input(0), ctx.input(1)
    return ctx.call(pick(onnx_mod, a, b), a, b, ctx.attr("fmod"))


@converter("BitShift")
def convert_bit_shift(ctx: NodeContext) -> Value:
    """BitShift LEFT / RIGHT."""
    x, shift = ctx.input(0), ctx.input(1)
    return ctx.call(pick(bit_shift, x, shift), x, shift, ctx.attr("direction"))


# ----- comparisons ------------------------------------------------------------------------
def _order_preserving_int64(tensor: torch.Tensor) -> torch.Tensor:
    # uint64 -> int64 with the sign bit flipped keeps the unsigned order exactly.
    if tensor.dtype == torch.uint64:
        return tensor.view(torch.int64) ^ torch.iinfo(torch.int64).min
    return tensor.to(torch.int64)


@functools.cache
def compare_unsigned_safe(fn: Any) -> Any:
    """A comparison working on uint16/32/64 (exactly, through an order-preserving map)."""

    def wrapped(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dtype in WIDE_UNSIGNED:
            return fn(_order_preserving_int64(a), _order_preserving_int64(b))
        return fn(a, b)

    wrapped.__name__ = f"{fn.__name__}_unsigned_safe"
    wrapped.__qualname__ = wrapped.__name__
    return wrapped


COMPARISONS: dict[str, Any] = {
    "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge,
}


@converter(*COMPARISONS)
def convert_comparison(ctx: NodeContext) -> Value:
    """Comparisons, producing bool tensors."""
    a, b = ctx.input(0), ctx.input(1)
    fn = COMPARISONS[ctx.op_type]
    if pick(fn, a, b) is not fn:
        fn = compare_unsigned_safe(fn)
    return ctx.call(fn, a, b)


# ----- variadic ---------------------------------------------------------------------------
def variadic_max(*tensors: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of any number of broadcastable tensors (NaN propagates)."""
    return functools.reduce(torch.maximum, tensors)


def variadic_min(*tensors: torch.Tensor) -> torch.Tensor:
    """Elementwise minimum of any number of broadcastable tensors (NaN propagates)."""
    return functools.reduce(torch.minimum, tensors)


def variadic_sum(*tensors: torch.Tensor) -> torch.Tensor:
    """Elementwise sum of any number of broadcastable tensors."""
    return functools.reduce(torch.add, tensors)


def variadic_mean(*tensors: torch.Tensor) -> torch.Tensor:
    """Elementwise mean of any number of broadcastable tensors."""
    return variadic_sum(*tensors) / len(tensors)


VARIADIC = {"Max": variadic_max, "Min": variadic_min, "Sum": variadic_sum,
            "Mean": variadic_mean}


@converter(*VARIADIC)
def convert_variadic(ctx: NodeContext) -> Value:
    """Max / Min / Sum / Mean over one or more inputs."""
    inputs = [ctx.input(i) for i in range(len(ctx.inputs)) if ctx.has_input(i)]
    fn = VARIADIC[ctx.op_type]
    if fn is not variadic_mean:
        fn = pick(fn, *inputs)
    return ctx.call(fn, *inputs)


@converter("Where")
def convert_where(ctx: NodeContext) -> Value:
    """Where(condition, x, y) with three-way broadcasting."""
    condition, x, y = ctx.input(0), ctx.input(1), ctx.input(2)
    return ctx.call(pick(torch.where, x, y), condition, x, y)


# ----- Clip -------------------------------------------------------------------------------
def onnx_clip(x: torch.Tensor, low: Any, high: Any) -> torch.Tensor:
    """Clamp to [low, high] (either may be None); min > max gives max everywhere, as in ONNX."""
    if low is None and high is None:
        return x
    return torch.clamp(x, low, high)


@converter("Clip")
def convert_clip(ctx: NodeContext) -> Value:
    """Clip: bounds are attributes before opset 11, optional scalar inputs from 11."""
    x = ctx.input(0)
    if ctx.since < 11:
        low, high = ctx.attr("min"), ctx.attr("max")
    else:
        low, high = _clip_bound(ctx, 1), _clip_bound(ctx, 2)
    return ctx.call(pick(onnx_clip, x), x, low, high)


def _clip_bound(ctx: NodeContext, index: int) -> Any:
    bound = ctx.static(index)
    if isinstance(bound, list):  # a one-element tensor given as 1-D
        bound = bound[0]
    return bound if not isinstance(bound, Value) else ctx.input(index)


# ----- Cast -------------------------------------------------------------------------------
_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2, torch.float8_e5m2fnuz)
# What a value beyond the float8 range becomes without saturation (the type's inf or NaN).
_FLOAT8_OVERFLOW = {torch.float8_e4m3fn: float("nan"), torch.float8_e4m3fnuz: float("nan"),
                    torch.float8_e5m2: float("inf"), torch.float8_e5m2fnuz: float("nan")}


def onnx_cast(x: torch.Tensor, dtype: torch.dtype, saturate: int = 1) -> torch.Tensor:
    """Cast with ONNX float8 saturation rules (other casts are plain torch conversions)."""
    if x.dtype == dtype:
        return x
    if dtype in _FLOAT8 and x.dtype.is_floating_point:
        return _cast_to_float8(x, dtype, bool(saturate))
    return x.to(dtype)


def _cast_to_float8(x: torch.Tensor, dtype: torch.dtype, saturate: bool) -> torch.Tensor:
    limit = torch.finfo(dtype).max
    wide = x.to(torch.float32)
    if saturate:
        return torch.clamp(wide, -limit, limit).to(dtype)
    # Values that round above the largest finite value overflow to inf (E5M2) or NaN.
    rounded = wide.to(dtype).to(torch.float32)
    overflow = torch.isinf(wide) | (wide.abs() > limit) | (rounded.abs() > limit)
    replacement = torch.copysign(torch.full_like(wide, _FLOAT8_OVERFLOW[dtype]), wide)
    return torch.where(overflow, replacement, torch.clamp(wide, -limit, limit)).to(dtype)


def cast_to_e8m0(x: torch.Tensor, saturate: int, round_mode: str) -> torch.Tensor:
    """Cast to FLOAT8E8M0 (a bare power-of-two exponent): ONNX's rounding on float32 bits."""
    bits = x.to(torch.float32).view(torch.int32)
    exponent = (bits >> 23) & 0xFF
    special = exponent == 0xFF  # NaN and inf stay NaN
    if round_mode == "nearest":
        guard = (bits & 0x400000) != 0
        rest = (bits & 0x3FFFFF) != 0
        round_up = guard & (rest | (exponent > 0))
    elif round_mode == "up":
        round_up = (bits & 0x7FFFFF) != 0
    else:
        round_up = torch.zeros_like(special)
    round_up = round_up & ~special
    if saturate:
        round_up = round_up & (exponent != 0xFE)
    exponent = torch.where(special, 0xFF, exponent + round_up.to(torch.int32)) & 0xFF
    return exponent.to(torch.uint8).view(torch.float8_e8m0fnu)


@converter("Cast")
def convert_cast(ctx: NodeContext) -> Value:
    """Cast to the ``to`` element type (saturate applies to float8 targets)."""
    dtype = torch_dtype(ctx.attr("to"), node=ctx.name, op_type=ctx.op_type, opset=ctx.opset)
    x = ctx.shape_input(0)
    if x.is_shape and dtype == torch.int64:
        return x
    x = ctx.input(0)
    saturate = ctx.attr("saturate") if ctx.since >= 19 else 1
    if dtype == torch.float8_e8m0fnu:
        return ctx.call(cast_to_e8m0, x, saturate, ctx.attr("round_mode"))
    return ctx.call(onnx_cast, x, dtype, saturate)


def cast_like(x: torch.Tensor, like: torch.Tensor, saturate: int) -> torch.Tensor:
    """Cast ``x`` to ``like``'s dtype."""
    return onnx_cast(x, like.dtype, saturate)


@converter("CastLike")
def convert_cast_like(ctx: NodeContext) -> Value:
    """CastLike: Cast to the dtype of the second input."""
    x, like = ctx.input(0), ctx.input(1)
    saturate = ctx.attr("saturate", 1)
    if like.dtype is not None:
        return ctx.call(onnx_cast, x, like.dtype, saturate)
    return ctx.call(cast_like, x, like, saturate)
