"""The op-converter registry and what a converter sees of its ONNX node.

A converter is a function ``(ctx: NodeContext) -> Value | Sequence[Value]`` registered for one or
more ONNX op types with :func:`converter`. It reads attributes (defaults come from the ONNX
schema of the model's opset, never from guesses), reads inputs as :class:`Value`s, and emits
torch computations with :meth:`NodeContext.call`, which folds them at conversion time when every
input is a known constant and otherwise adds one ``call_function`` node to the fx graph.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import onnx
import torch
import torch.fx

from frontend.onnx.dtypes import TORCH_TO_ONNX, onnx_type_name
from frontend.onnx.errors import UnsupportedOnnx

if TYPE_CHECKING:
    from frontend.onnx.convert import GraphBuilder


@dataclass(eq=False)
class Value:
    """One ONNX value (a tensor edge) during conversion.

    Exactly one of ``node`` / ``const`` says where it comes from at run time:
    ``const`` is a tensor known at conversion time (Constant nodes, non-float initializers and
    everything folded from them); ``node`` is the fx node computing it. ``meta`` is a tensor on
    the meta device with the static shape and dtype, when known. ``initial`` is a parameter's
    initial value (used only where ONNX takes configuration, e.g. Resize scales, from a tensor).
    ``is_shape`` marks a run-time value that is a Python list of (symbolic) ints: the output of
    ``Shape`` on a tensor whose shape is not static, kept as a list so reshapes stay symbolic.
    ``dtype_hint`` is the element type from ONNX type inference, for values without ``meta``.
    ``attr`` / ``as_tensor`` are bookkeeping of the graph builder.
    """

    node: torch.fx.Node | None = None
    const: torch.Tensor | None = None
    meta: torch.Tensor | None = None
    initial: torch.Tensor | None = None
    is_shape: bool = False
    dtype_hint: torch.dtype | None = None
    attr: str | None = None  # the module attribute (parameter / buffer) holding it
    as_tensor: Value | None = None  # a shape list's tensor form, once materialised

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype when known at conversion time (int64 for shape lists).

        Without a static shape, the element type ONNX type inference gave is used.
        """
        if self.is_shape:
            return torch.int64
        known = self.const if self.const is not None else self.meta
        return self.dtype_hint if known is None else known.dtype

    @property
    def shape(self) -> tuple[int, ...] | None:
        """The static shape when known at conversion time."""
        known = self.const if self.const is not None else self.meta
        return None if known is None else tuple(known.shape)

    @property
    def rank(self) -> int | None:
        """The static rank when known."""
        shape = self.shape
        return None if shape is None else len(shape)


Converter = Callable[["NodeContext"], "Value | Sequence[Value | None]"]
CONVERTERS: dict[str, Converter] = {}


def converter(*op_types: str) -> Callable[[Converter], Converter]:
    """Register the decorated function as the converter of ``op_types`` (domain ai.onnx)."""

    def register(fn: Converter) -> Converter:
        for op_type in op_types:
            if op_type in CONVERTERS:
                raise ValueError(f"two converters registered for ONNX op {op_type}")
            CONVERTERS[op_type] = fn
        return fn

    return register


_NO_DEFAULT = object()


class NodeContext:
    """What a converter knows about the ONNX node it converts, and how it emits torch code."""

    def __init__(self, builder: GraphBuilder, node: onnx.NodeProto, opset: int,
                 inputs: list[Value | None]):
        self.builder = builder
        self.node = node
        self.op_type = node.op_type
        self.opset = opset
        self.name = node.name or (node.output[0] if node.output else node.op_type)
        self.inputs = inputs
        try:
            self.schema: onnx.defs.OpSchema | None = onnx.defs.get_schema(
                node.op_type, max_inclusive_version=opset, domain=node.domain or "")
        except onnx.defs.SchemaError:
            self.schema = None
        # The version of the op's definition in force: converters branch on this.
        self.since = self.schema.since_version if self.schema is not None else opset
        self._attrs = {a.name: a for a in node.attribute}

    # ----- attributes -------------------------------------------------------------------
    def attr(self, name: str, default: Any = _NO_DEFAULT) -> Any:
        """An attribute's value; when absent, ``default`` if given, else the schema default."""
        proto = self._attrs.get(name)
        if proto is not None:
            if proto.ref_attr_name:
                raise self.unsupported(f"attribute {name!r} refers to a function attribute")
            if proto.type == onnx.AttributeProto.TENSOR:
                return self.builder.tensor_from_proto(proto.t, self)
            if proto.type == onnx.AttributeProto.GRAPH:
                return proto.g
            value = onnx.helper.get_attribute_value(proto)
            return value.decode() if isinstance(value, bytes) else value
        if default is not _NO_DEFAULT:
            return default
        schema_attr = self.schema.attributes.get(name) if self.schema is not None else None
        if schema_attr is not None and schema_attr.default_value.name:
            value = onnx.helper.get_attribute_value(schema_attr.default_value)
            return value.decode() if isinstance(value, bytes) else value
        if schema_attr is not None and schema_attr.required:
            raise ValueError(f"ONNX node {self.name!r} ({self.op_type}): required attribute "
                             f"{name!r} is missing; the model is invalid")
        return None

    def has_attr(self, name: str) -> bool:
        """Whether the node sets attribute ``name`` explicitly."""
        return name in self._attrs

    # ----- inputs -----------------------------------------------------------------------
    def has_input(self, index: int) -> bool:
        """Whether optional input ``index`` is present (given and not the empty name)."""
        return index < len(self.inputs) and self.inputs[index] is not None

    def input(self, index: int) -> Value:
        """Input ``index`` as a tensor value (a symbolic shape list becomes a tensor)."""
        value = self.shape_input(index)
        if value.is_shape:
            return self.builder.shape_to_tensor(value)
        return value

    def optional_input(self, index: int) -> Value | None:
        """Input ``index`` as a tensor value, or None when it is omitted."""
        return self.input(index) if self.has_input(index) else None

    def shape_input(self, index: int) -> Value:
        """Input ``index``, keeping a symbolic shape list as it is."""
        if not self.has_input(index):
            raise ValueError(f"ONNX node {self.name!r} ({self.op_type}): input {index} is "
                             f"required but missing; the model is invalid")
        return self.inputs[index]

    def static(self, index: int) -> Any:
        """Input ``index`` as a Python value (list or scalar) when known at conversion time.

        ONNX passes configuration such as reshape targets, slice bounds or reduce axes as
        tensors; they are nearly always constants, which keeps the torch graph static. When
        one is computed at run time, the :class:`Value` is returned instead and the torch
        helper reads it at run time (eager only: torch.export cannot trace data-dependent
        shapes). Returns None for an omitted optional input.
        """
        if not self.has_input(index):
            return None
        value = self.inputs[index]
        known = value.const if value.const is not None else value.initial
        if known is not None:
            return known.tolist()
        if value.node is not None:
            self.builder.config_inputs |= _input_ancestors(value.node)
        return value

    def static_ints(self, index: int) -> list[int] | Value | None:
        """Like :meth:`static` for an int list input, flattening a scalar to a 1-list."""
        value = self.static(index)
        if value is None or isinstance(value, Value):
            return value
        return [int(v) for v in value] if isinstance(value, list) else [int(value)]

    def require_static(self, index: int, what: str) -> Any:
        """Like :meth:`static`, refusing a run-time value (for inputs torch needs as ints)."""
        value = self.static(index)
        if isinstance(value, Value):
            raise self.unsupported(f"input {index} ({what}) is computed at run time; only "
                                   f"constant {what} can be converted")
        return value

    # ----- outputs ----------------------------------------------------------------------
    @property
    def num_outputs(self) -> int:
        """How many outputs the node declares (including omitted optional ones)."""
        return len(self.node.output)

    def wants_output(self, index: int) -> bool:
        """Whether output ``index`` is present (optional outputs may be omitted)."""
        return index < len(self.node.output) and self.node.output[index] != ""

    # ----- emitting ---------------------------------------------------------------------
    def call(self, fn: Callable[..., Any], *args: Any, foldable: bool = True, **kwargs: Any
             ) -> Value:
        """``fn(*args, **kwargs)`` with :class:`Value` arguments: folded or one fx node."""
        return self.builder.call(self, fn, args, kwargs, num_results=None, foldable=foldable)

    def call_multi(self, fn: Callable[..., Any], *args: Any, num_results: int,
                   foldable: bool = True, **kwargs: Any) -> list[Value]:
        """Like :meth:`call` for a function returning a tuple of ``num_results`` tensors."""
        return self.builder.call(self, fn, args, kwargs, num_results=num_results,
                                 foldable=foldable)

    # ----- errors -----------------------------------------------------------------------
    def unsupported(self, reason: str, *, dtype: torch.dtype | int | str | None = None,
                    hint: str = "") -> UnsupportedOnnx:
        """An :class:`UnsupportedOnnx` naming this node (raise it)."""
        if isinstance(dtype, int):
            dtype = onnx_type_name(dtype)
        elif isinstance(dtype, torch.dtype):
            dtype = onnx_type_name(TORCH_TO_ONNX[dtype])
        return UnsupportedOnnx(node=self.name, op_type=self.op_type, opset=self.opset,
                               domain=self.node.domain, dtype=dtype, reason=reason, hint=hint)


def _input_ancestors(node: torch.fx.Node) -> set[str]:
    """ONNX names of the graph inputs whose values ``node`` is computed from."""
    found, pending, seen = set(), [node], set()
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder":
            found.add(current.meta["onnx_node"])
        pending.extend(current.all_input_nodes)
    return found


def normalize_axis(axis: int, rank: int) -> int:
    """A possibly negative ONNX axis as an index in ``range(rank)``."""
    if not -rank <= axis < max(rank, 1):
        raise ValueError(f"axis {axis} is out of range for a tensor of rank {rank}")
    return axis % rank if rank else 0


def prod(values: Sequence[Any]) -> Any:
    """The product of ints (or symbolic ints); 1 for an empty sequence."""
    return math.prod(values, start=1)
