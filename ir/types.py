"""Tensor types with symbolic shapes, dtypes, and device meshes (placements)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache, reduce
from typing import Iterable, Sequence

import sympy
import torch

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "bool", torch.complex64: "c64", torch.complex128: "c128",
    torch.uint16: "u16", torch.uint32: "u32", torch.uint64: "u64",
    torch.float8_e4m3fn: "f8e4m3fn", torch.float8_e5m2: "f8e5m2", torch.float8_e4m3fnuz: "f8e4m3fnuz",
    torch.float8_e5m2fnuz: "f8e5m2fnuz", torch.float8_e8m0fnu: "f8e8m0fnu",
}
DTYPES_BY_NAME: dict[str, torch.dtype] = {v: k for k, v in DTYPE_NAMES.items()}

Dim = sympy.Expr


def as_dim(value: int | sympy.Expr) -> sympy.Expr:
    """A dimension as a sympy expression (plain ints become ``sympy.Integer``)."""
    return sympy.sympify(value)


def format_dim(dim: sympy.Expr) -> str:
    """The text form of one dimension: ``64``, ``batch`` or `` `batch*seq` ``."""
    if dim.is_Integer or dim.is_Symbol:
        return str(dim)
    return f"`{dim}`"


def parse_dim(text: str, symbols: dict[str, sympy.Symbol] | None = None) -> sympy.Expr:
    """Parse a dimension (int, symbol name or back-quoted expression) into sympy."""
    text = text.strip().strip("`")
    names = {} if symbols is None else dict(symbols)
    expr = sympy.sympify(text, locals=names)
    return expr.subs({s: dim_symbol(str(s)) for s in expr.free_symbols})


def is_float_expr(expr: sympy.Expr) -> bool:
    """Whether a scalar argument is a float computed from sizes (``1.0*batch*seq``, from ``float(b * s)``
    in the model) rather than a size: it has a float coefficient, and evaluates to a Python float."""
    return expr.has(sympy.Float)


def dim_symbol(name: str) -> sympy.Symbol:
    """The symbol used for a named dimension; positive integers, so sympy can simplify."""
    return sympy.Symbol(name, integer=True, positive=True)


@dataclass(frozen=True)
class TensorType:
    """The logical (global) type of a tensor: a shape of sympy dims and a dtype name."""

    shape: tuple
    """One sympy expression per dimension; symbols stand for the batch and sequence sizes."""
    dtype: str
    """A short dtype name such as ``f32`` or ``i64`` (see :data:`DTYPE_NAMES`)."""

    @property
    def ndim(self) -> int:
        """The number of dimensions."""
        return len(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype as a ``torch.dtype``."""
        return DTYPES_BY_NAME[self.dtype]

    def numel(self) -> sympy.Expr:
        """The number of elements, symbolic."""
        return reduce(lambda a, b: a * b, self.shape, sympy.Integer(1))

    def nbytes(self) -> sympy.Expr:
        """The size in bytes, symbolic."""
        return self.numel() * dtype_size(self.dtype)

    def concrete_shape(self, bindings: dict) -> tuple[int, ...]:
        """The shape with every symbol replaced by its bound value."""
        return _concrete_dims(self.shape, tuple(bindings.items()))

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(format_dim(d) for d in self.shape)}]"

    @staticmethod
    def of(shape: Iterable, dtype: torch.dtype | str) -> "TensorType":
        """Build a type from any shape iterable and a torch or short dtype."""
        name = dtype if isinstance(dtype, str) else DTYPE_NAMES[dtype]
        return TensorType(tuple(as_dim(d) for d in shape), name)


@lru_cache(maxsize=65536)
def _concrete_dims(shape: tuple, bindings: tuple) -> tuple[int, ...]:
    values = dict(bindings)
    return tuple(int(sympy.sympify(d).subs(values)) for d in shape)


def dtype_size(name: str) -> int:
    """Bytes per element of a dtype name."""
    return DTYPES_BY_NAME[name].itemsize


CONTEXT_AXIS = "cp"
"""The mesh axis of context parallelism: it splits the sequence (dim 1 of inputs, the query/key
length of attention); op rules offer sequence splits of position ops on it (``OpRule.on_axis``)."""
EXPERT_AXIS = "ep"
"""The mesh axis of expert parallelism: it splits the experts of mixture-of-experts layers and, like the
data-parallel axis, the batch (tokens reach their experts by all-to-all, ``ir/ops/moe.py``)."""


@dataclass(frozen=True)
class Mesh:
    """A placement: an N-D array of device ids with one name per array axis."""

    axes: tuple
    """Axis names, outermost first, e.g. ``("dp", "tp")``."""
    shape: tuple
    """The size of each axis."""
    devices: tuple
    """Device ids in row-major order; ``len(devices) == prod(shape)``."""

    @staticmethod
    def make(axes: Sequence[str], shape: Sequence[int], devices: Sequence[int] | None = None) -> "Mesh":
        """A mesh over ``devices`` (default ``0..n-1``)."""
        n = math.prod(shape)
        devs = tuple(range(n)) if devices is None else tuple(devices)
        if len(devs) != n:
            raise ValueError(f"a mesh of shape {tuple(shape)} needs {n} devices, found {len(devs)}")
        return Mesh(tuple(axes), tuple(int(s) for s in shape), devs)

    @property
    def size(self) -> int:
        """The number of devices."""
        return len(self.devices)

    @property
    def ndim(self) -> int:
        """The number of mesh axes."""
        return len(self.shape)

    def axis_index(self, name: str) -> int:
        """The position of a named axis."""
        if name not in self.axes:
            raise KeyError(f"mesh has axes {list(self.axes)}, not {name!r}")
        return self.axes.index(name)

    def coords(self, local_rank: int) -> tuple[int, ...]:
        """The coordinates of the ``local_rank``-th device of this mesh."""
        out = []
        for size in reversed(self.shape):
            out.append(local_rank % size)
            local_rank //= size
        return tuple(reversed(out))

    def index_of(self, coords: Sequence[int]) -> int:
        """The position in :attr:`devices` of the device at ``coords``."""
        idx = 0
        for c, size in zip(coords, self.shape):
            idx = idx * size + c
        return idx

    def groups(self, axis: int) -> list[list[int]]:
        """The device positions that form a group along ``axis`` (one list per group)."""
        groups: dict[tuple, list[int]] = {}
        for i in range(self.size):
            c = list(self.coords(i))
            c[axis] = 0
            groups.setdefault(tuple(c), []).append(i)
        return list(groups.values())

    def __str__(self) -> str:
        axes = ", ".join(f"{a}={s}" for a, s in zip(self.axes, self.shape))
        return f"[{axes}] devices [{', '.join(str(d) for d in self.devices)}]"
