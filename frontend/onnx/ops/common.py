"""Helpers shared by the op converters: dtype workarounds and int-list arguments."""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from frontend.onnx.dtypes import WIDE_UNSIGNED
from frontend.onnx.registry import NodeContext, Value


def int_list(value: Any) -> list[Any]:
    """A run-time int list argument as a Python list (from a list, tuple or tensor)."""
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def number_list(value: Any) -> list[Any]:
    """A run-time list of numbers (ints or floats kept as they are) from a list or tensor."""
    if isinstance(value, torch.Tensor):
        return value.reshape(-1).tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def scalar(value: Any) -> Any:
    """A run-time scalar argument as a Python number (from a number, list or tensor)."""
    if isinstance(value, torch.Tensor):
        return value.reshape(-1)[0].item()
    if isinstance(value, (list, tuple)):
        return value[0]
    return value


def _widen(tensor: Any) -> Any:
    if isinstance(tensor, torch.Tensor) and tensor.dtype in WIDE_UNSIGNED:
        return tensor.to(torch.int64)
    return tensor


@functools.cache
def unsigned_safe(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn`` working on uint16/32/64 too, by computing in int64 and casting back.

    torch has few kernels for the wide unsigned types. Add, Sub and Mul are exact modulo 2**64
    this way; order-sensitive ops (division, comparisons) are exact below 2**63.
    """

    def wrapped(*args: Any, **kwargs: Any) -> torch.Tensor:
        dtypes = [a.dtype for a in args if isinstance(a, torch.Tensor)]
        unsigned = next((d for d in dtypes if d in WIDE_UNSIGNED), None)
        if unsigned is None:
            return fn(*args, **kwargs)
        result = fn(*(_widen(a) for a in args), **kwargs)
        if isinstance(result, torch.Tensor) and result.dtype == torch.int64:
            return result.to(unsigned)
        return result

    wrapped.__name__ = f"{getattr(fn, '__name__', 'op')}_unsigned_safe"
    wrapped.__qualname__ = wrapped.__name__
    return wrapped


def pick(fn: Callable[..., torch.Tensor], *values: Value | None) -> Callable[..., torch.Tensor]:
    """``fn`` itself when the inputs' dtypes are known and torch-native, else the safe wrapper."""
    dtypes = [v.dtype for v in values if v is not None]
    if all(d is not None and d not in WIDE_UNSIGNED for d in dtypes):
        return fn
    return unsigned_safe(fn)


def known_float(*values: Value | None) -> bool:
    """Whether every given value is known (at conversion time) to be floating point."""
    return all(v is None or (v.dtype is not None and v.dtype.is_floating_point) for v in values)


def compute_dtype(dtype: torch.dtype, stash_type: int = 1) -> torch.dtype:
    """The dtype normalisations compute in: float32 for half types when stash_type is 1."""
    if stash_type == 1 and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def spatial_attr(ctx: NodeContext, name: str, spatial: int, default: int) -> list[int]:
    """A per-spatial-dim int list attribute (strides, dilations...), defaulted per dim."""
    value = ctx.attr(name, None)
    return list(value) if value else [default] * spatial

