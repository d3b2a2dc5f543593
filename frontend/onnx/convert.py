"""Convert an ONNX ModelProto into a torch.fx GraphModule with ONNX semantics.

One fx ``call_function`` node per ONNX node (plus ``getitem`` nodes for multi-output ops),
with the ONNX node name in ``node.meta["onnx_node"]`` and its op type in
``node.meta["onnx_op"]``. Float initializers become ``nn.Parameter``s, other initializers and
constants used at run time become buffers. Everything computable from constants (shape
arithmetic, ConstantOfShape, Range, ...) is folded at conversion time, and the static shapes of
values are tracked on the meta device, so ``Shape`` of a statically shaped tensor folds too and
reshape targets end up as Python ints: the module is friendly to ``torch.export``.
"""
from __future__ import annotations

import keyword
import operator
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx
import torch.nn as nn

from frontend.onnx import ops  # noqa: F401  (importing registers the op converters)
from frontend.onnx.dtypes import (FLOAT_DTYPES, ONNX_TO_TORCH, onnx_type_name, sparse_to_dense,
                                  tensor_from_numpy, torch_dtype)
from frontend.onnx.errors import UnsupportedOnnx
from frontend.onnx.registry import CONVERTERS, NodeContext, Value

MIN_OPSET = 7
ONNX_DOMAINS = ("", "ai.onnx")
# Initializers feeding these (op, input index) slots are running statistics, not weights:
# they become buffers even though they are float.
_STATISTICS_INPUTS = {("BatchNormalization", 3), ("BatchNormalization", 4)}


class OnnxModule(torch.fx.GraphModule):
    """A torch module computing an ONNX graph; forward(*inputs) -> tuple of outputs.

    Attributes: ``input_names`` / ``output_names`` (ONNX graph inputs, initializers excluded,
    and outputs, in order), ``opset`` (the ai.onnx opset the model was converted with),
    ``initializer_names`` (ONNX names of all initializers, parameters first) and
    ``param_onnx_names`` (module attribute name -> ONNX initializer name, for parameters and
    buffers made from initializers) and ``config_inputs`` (graph inputs that ops read as
    configuration — shapes, axes, bounds — which makes forward data-dependent: fine eagerly,
    not traceable by torch.export; bind them with ``onnx_to_torch(constant_inputs=...)``).
    """

    input_names: list[str]
    output_names: list[str]
    opset: int
    initializer_names: list[str]
    param_onnx_names: dict[str, str]
    config_inputs: list[str]

    def __deepcopy__(self, memo: dict[int, Any]) -> OnnxModule:
        copied = super().__deepcopy__(memo)
        result = OnnxModule(copied, copied.graph, class_name=type(self).__name__)
        for attribute in ("input_names", "output_names", "opset", "initializer_names",
                          "param_onnx_names", "config_inputs"):
            setattr(result, attribute, _copy_plain(getattr(self, attribute)))
        return result


def _copy_plain(value: Any) -> Any:
    return type(value)(value) if isinstance(value, (list, dict)) else value


def python_identifier(name: str, taken: set[str]) -> str:
    """A valid, unused Python identifier resembling the ONNX name ``name``."""
    ident = re.sub(r"\W+", "_", name).strip("_") or "value"
    if ident[0].isdigit() or keyword.iskeyword(ident):
        ident = f"v_{ident}"
    candidate, suffix = ident, 1
    while candidate in taken:
        suffix += 1
        candidate = f"{ident}_{suffix}"
    taken.add(candidate)
    return candidate


def load_model(model: onnx.ModelProto | str | os.PathLike | bytes) -> tuple[onnx.ModelProto, str]:
    """The ModelProto (external data loaded) and the directory its external data lives in."""
    if isinstance(model, onnx.ModelProto):
        return model, ""
    if isinstance(model, (bytes, bytearray)):
        return onnx.load_model_from_string(bytes(model)), ""
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model file {str(path)!r} does not exist")
        return onnx.load(str(path), load_external_data=True), str(path.parent)
    raise TypeError(f"expected an onnx.ModelProto, bytes or a file path, got "
                    f"{type(model).__name__}")


def model_opset(model: onnx.ModelProto, override: int | None) -> int:
    """The ai.onnx opset to convert with: ``override`` or the model's opset_import."""
    if override is not None:
        return int(override)
    for entry in model.opset_import:
        if entry.domain in ONNX_DOMAINS:
            return int(entry.version)
    if any(node.domain in ONNX_DOMAINS for node in model.graph.node):
        raise ValueError("the ONNX model uses ai.onnx ops but imports no ai.onnx opset; pass "
                         "opset=... to onnx_to_torch")
    # no ai.onnx op at all: the nodes' own domains decide (and are refused by name)
    return onnx.defs.onnx_opset_version()


class GraphBuilder:
    """Builds the fx graph and the parameter/buffer holder while nodes are converted."""

    def __init__(self, opset: int, base_dir: str = ""):
        self.opset = opset
        self.base_dir = base_dir
        self.graph = torch.fx.Graph()
        self.root = nn.Module()
        self.env: dict[str, Value] = {}
        self._taken_attrs: set[str] = set()
        self._get_attr_nodes: dict[str, torch.fx.Node] = {}
        self._current: NodeContext | None = None
        self.param_onnx_names: dict[str, str] = {}
        self.inferred_types: dict[str, int] = {}
        self.config_inputs: set[str] = set()  # graph inputs read as op configuration

    # ----- state: parameters, buffers, constants ----------------------------------------
    def add_initializer(self, name: str, tensor: torch.Tensor, *, trainable: bool) -> Value:
        """Register an initializer as parameter (float, trainable) or buffer."""
        attr = python_identifier(name, self._taken_attrs)
        self.param_onnx_names[attr] = name
        if trainable and tensor.dtype in FLOAT_DTYPES:
            self.root.register_parameter(attr, nn.Parameter(tensor, requires_grad=True))
            value = Value(meta=tensor.to("meta"), initial=tensor)
        else:
            self.root.register_buffer(attr, tensor)
            value = Value(const=tensor)
        value.attr = attr
        return value

    def fx_arg(self, value: Value) -> torch.fx.Node:
        """The fx node giving ``value`` at run time (a get_attr for parameters/constants)."""
        if value.node is not None:
            return value.node
        if value.attr is None:  # a folded constant used at run time: make it a buffer
            value.attr = python_identifier(
                f"const_{self._current.name if self._current else ''}", self._taken_attrs)
            self.root.register_buffer(value.attr, value.const)
        node = self._get_attr_nodes.get(value.attr)
        if node is None:
            node = self.graph.get_attr(value.attr)
            self._get_attr_nodes[value.attr] = node
        if value.initial is not None:  # a parameter: remember its node for later uses
            value.node = node
        return node

    def tensor_from_proto(self, proto: onnx.TensorProto, ctx: NodeContext | None = None
                          ) -> torch.Tensor:
        """A TensorProto's value; the data type is checked against torch's dtypes."""
        if ctx is None:
            torch_dtype(proto.data_type, node=proto.name, opset=self.opset, kind="initializer")
        else:
            torch_dtype(proto.data_type, node=ctx.name, op_type=ctx.op_type, opset=self.opset)
        return tensor_from_numpy(onnx.numpy_helper.to_array(proto, base_dir=self.base_dir))

    # ----- emitting ---------------------------------------------------------------------
    def call(self, ctx: NodeContext, fn: Callable[..., Any], args: Sequence[Any],
             kwargs: dict[str, Any], *, num_results: int | None, foldable: bool
             ) -> Value | list[Value]:
        """Fold ``fn`` on constants, or emit it as an fx node with meta shape propagation."""
        values = _collect_values((args, kwargs))
        if foldable and all(v.const is not None for v in values):
            result = fn(*_substitute(args, _as_const), **_substitute(kwargs, _as_const))
            return _wrap_results(result, num_results, lambda t: Value(const=t))
        meta = _try_meta(fn, args, kwargs, values)
        node = self.graph.call_function(
            fn, tuple(_substitute(args, self.fx_arg)), dict(_substitute(kwargs, self.fx_arg)))
        self._annotate(node, ctx)
        if num_results is None:
            return Value(node=node, meta=meta if isinstance(meta, torch.Tensor) else None)
        results = []
        for index in range(num_results):
            item = self.graph.call_function(operator.getitem, (node, index))
            self._annotate(item, ctx)
            item_meta = meta[index] if isinstance(meta, (tuple, list)) else None
            results.append(Value(node=item, meta=item_meta))
        return results

    def call_runtime_list(self, ctx: NodeContext, fn: Callable[..., Any], *args: Any) -> Value:
        """Emit ``fn`` returning a Python list of (symbolic) ints: a shape value."""
        node = self.graph.call_function(fn, tuple(_substitute(args, self.fx_arg)))
        self._annotate(node, ctx)
        return Value(node=node, is_shape=True)

    def shape_to_tensor(self, value: Value) -> Value:
        """A symbolic shape list as an int64 tensor (for ops that need a tensor)."""
        if value.as_tensor is None:
            node = self.graph.call_function(shape_list_to_tensor, (value.node,))
            if self._current is not None:
                self._annotate(node, self._current)
            value.as_tensor = Value(node=node)
        return value.as_tensor

    def _annotate(self, node: torch.fx.Node, ctx: NodeContext) -> None:
        node.meta["onnx_node"] = ctx.name
        node.meta["onnx_op"] = ctx.op_type

    # ----- nodes ------------------------------------------------------------------------
    def convert_node(self, node: onnx.NodeProto) -> None:
        """Convert one ONNX node, binding its outputs in ``env``."""
        inputs = [self._lookup(name, node) if name else None for name in node.input]
        error = unsupported_node_error(node, self.opset)
        if error is not None:
            raise error
        ctx = NodeContext(self, node, self.opset, inputs)
        outer, self._current = self._current, ctx  # If branches convert nodes recursively
        try:
            result = CONVERTERS[node.op_type](ctx)
        finally:
            self._current = outer
        results = [result] if isinstance(result, Value) else list(result)
        for index, name in enumerate(node.output):
            if not name:
                continue
            if index >= len(results) or results[index] is None:
                raise ctx.unsupported(f"output {index} ({name!r}) is not produced by this "
                                      f"converter")
            value = results[index]
            if value.dtype is None and self.inferred_types.get(name):
                value.dtype_hint = ONNX_TO_TORCH.get(self.inferred_types[name])
            self.env[name] = value

    def inline_graph(self, graph: onnx.GraphProto) -> list[Value]:
        """Convert a subgraph (e.g. the taken If branch) in place; its output values.

        The subgraph reads outer values by name, which ``env`` holds already.
        """
        check_nodes_supported(graph, self.opset)
        for proto in graph.initializer:
            self.env[proto.name] = Value(const=self.tensor_from_proto(proto))
        for node in graph.node:
            self.convert_node(node)
        return [self.env[output.name] for output in graph.output]

    def _lookup(self, name: str, node: onnx.NodeProto) -> Value:
        try:
            return self.env[name]
        except KeyError:
            raise ValueError(f"ONNX node {node.name or node.op_type!r} ({node.op_type}) reads "
                             f"{name!r}, which no earlier node, input or initializer defines; "
                             f"the graph is not topologically sorted or is invalid") from None


def unsupported_node_error(node: onnx.NodeProto, opset: int) -> UnsupportedOnnx | None:
    """Why ``node`` cannot be converted at ``opset`` (domain, op type, old opset), or None."""
    name = node.name or (node.output[0] if node.output else node.op_type)

    def error(reason: str, hint: str = "") -> UnsupportedOnnx:
        return UnsupportedOnnx(node=name, op_type=node.op_type, opset=opset,
                               domain=node.domain, reason=reason, hint=hint)

    if node.domain not in ONNX_DOMAINS:
        return error("only the ai.onnx domain is supported",
                     "export the model without custom or contrib ops")
    if node.op_type not in CONVERTERS:
        return error("this op type has no torch converter")
    if opset < MIN_OPSET and not _unchanged_since_min_opset(node.op_type, opset):
        return error(f"opsets below {MIN_OPSET} are not supported and this op changed since",
                     f"upgrade the model with onnx.version_converter.convert_version(model, "
                     f"{MIN_OPSET}) or later")
    return None


def check_nodes_supported(graph: onnx.GraphProto, opset: int) -> None:
    """Raise one UnsupportedOnnx for the first unconvertible node, counting the others."""
    errors = [e for e in (unsupported_node_error(n, opset) for n in graph.node) if e is not None]
    if not errors:
        return
    first = errors[0]
    if len(errors) > 1:
        others = sorted({e.op_type for e in errors[1:]})
        first.args = (f"{first.args[0]} (and {len(errors) - 1} more unsupported node(s), op "
                      f"types: {', '.join(others)})",)
    raise first


def _unchanged_since_min_opset(op_type: str, opset: int) -> bool:
    # An op whose definition did not change between the model's opset and MIN_OPSET behaves
    # exactly like its MIN_OPSET version, e.g. Not-1.
    try:
        old = onnx.defs.get_schema(op_type, max_inclusive_version=opset)
        newer = onnx.defs.get_schema(op_type, max_inclusive_version=MIN_OPSET)
    except onnx.defs.SchemaError:
        return False
    return newer.since_version == old.since_version


def shape_list_to_tensor(shape: Sequence[Any] | Any) -> torch.Tensor:
    """A (symbolic) shape list as a 1-D int64 tensor, or a shape scalar as a 0-D one."""
    if not isinstance(shape, (list, tuple)):
        return torch.scalar_tensor(shape, dtype=torch.int64)
    if not shape:
        return torch.zeros(0, dtype=torch.int64)
    return torch.stack([torch.scalar_tensor(dim, dtype=torch.int64) for dim in shape])


def _collect_values(tree: Any) -> list[Value]:
    found: list[Value] = []
    _substitute(tree, lambda v: found.append(v) or v)
    return found


def _substitute(tree: Any, fn: Callable[[Value], Any]) -> Any:
    """``tree`` with every Value replaced by ``fn(value)`` (lists, tuples, dicts walked)."""
    if isinstance(tree, Value):
        return fn(tree)
    if isinstance(tree, (list, tuple)):
        return type(tree)(_substitute(item, fn) for item in tree)
    if isinstance(tree, dict):
        return {key: _substitute(item, fn) for key, item in tree.items()}
    return tree


def _as_const(value: Value) -> torch.Tensor:
    return value.const


def _as_meta(value: Value) -> torch.Tensor:
    if value.const is not None:
        return value.const.to("meta")
    if value.meta is None:
        raise _NoMeta
    return value.meta


class _NoMeta(Exception):
    """An input's static shape is unknown: the output's is too."""


def _try_meta(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any],
              values: list[Value]) -> Any:
    """``fn`` evaluated on meta tensors (static shape/dtype), or None when not possible."""
    if any(v.is_shape for v in values):
        return None
    try:
        with torch.no_grad():
            return fn(*_substitute(args, _as_meta), **_substitute(kwargs, _as_meta))
    except Exception:  # noqa: BLE001 - any failure just means "shape unknown"
        return None


def _wrap_results(result: Any, num_results: int | None, wrap: Callable[[torch.Tensor], Value]
                  ) -> Value | list[Value]:
    if num_results is None:
        return wrap(result)
    return [wrap(item) for item in result]


# ----- the model-level driver -------------------------------------------------------------
def onnx_to_torch(model: onnx.ModelProto | str | os.PathLike | bytes, *,
                  opset: int | None = None,
                  trainable: Collection[str] | None = None,
                  constant_inputs: Mapping[str, Any] | None = None) -> OnnxModule:
    """Convert an ONNX model (proto, serialized bytes or file path) into an OnnxModule.

    ``opset`` overrides the model's ai.onnx opset. Float initializers become trainable
    ``nn.Parameter``s, except those that look like exporter constants rather than weights
    (single-element tensors, tensors holding inf/NaN such as attention masks) and
    BatchNormalization running statistics, which become buffers; ``trainable`` (ONNX
    initializer names) replaces that rule: exactly the listed float initializers are
    parameters. ``constant_inputs`` binds graph inputs to fixed values (arrays or tensors):
    they fold like initializers and leave the forward signature. Use it for the inputs listed
    in ``module.config_inputs`` (inputs read as shapes, axes, bounds...) to get a static,
    ``torch.export``-friendly module.
    """
    proto, base_dir = load_model(model)
    if proto.functions:
        proto = onnx.inliner.inline_local_functions(proto)
    version = model_opset(proto, opset)
    graph = proto.graph
    check_nodes_supported(graph, version)
    builder = GraphBuilder(version, base_dir)
    builder.inferred_types = _inferred_element_types(proto)

    initializer_names = _add_initializers(builder, graph, trainable)
    input_names = []
    constant_inputs = constant_inputs or {}
    for value_info in graph.input:
        if value_info.name in builder.env:  # an initializer also listed as input (IR < 4)
            continue
        if value_info.name in constant_inputs:
            bound = constant_inputs[value_info.name]
            builder.env[value_info.name] = Value(const=bound.clone() if isinstance(
                bound, torch.Tensor) else tensor_from_numpy(np.asarray(bound)))
            continue
        input_names.append(value_info.name)
        builder.env[value_info.name] = _placeholder(builder, value_info)
    unknown = set(constant_inputs) - {v.name for v in graph.input}
    if unknown:
        raise ValueError(f"constant_inputs names {sorted(unknown)}, which are not graph inputs "
                         f"of the model; its inputs are {[v.name for v in graph.input]}")
    for node in graph.node:
        builder.convert_node(node)

    outputs = [_output_arg(builder, value_info) for value_info in graph.output]
    builder.graph.output(tuple(outputs))
    # values only feeding folded computations (e.g. a Transpose read by Shape) are dead
    builder.graph.eliminate_dead_code()
    module = OnnxModule(builder.root, builder.graph, class_name="OnnxModule")
    module.input_names = input_names
    module.output_names = [value_info.name for value_info in graph.output]
    module.opset = version
    module.initializer_names = initializer_names
    module.param_onnx_names = builder.param_onnx_names
    module.config_inputs = sorted(builder.config_inputs)
    return module


def _inferred_element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types ONNX type inference finds for the graph's values (where it can)."""
    if all(_has_static_shape(v) for v in model.graph.input):
        return {}  # static shapes: meta tensors carry every dtype already
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is only a hint
        return {}
    return {info.name: info.type.tensor_type.elem_type for info in inferred.graph.value_info
            if info.type.HasField("tensor_type")}


def _has_static_shape(value_info: onnx.ValueInfoProto) -> bool:
    tensor_type = value_info.type.tensor_type
    return tensor_type.HasField("shape") and all(d.HasField("dim_value")
                                                 for d in tensor_type.shape.dim)


def _add_initializers(builder: GraphBuilder, graph: onnx.GraphProto,
                      trainable: Collection[str] | None) -> list[str]:
    """Register every initializer; their ONNX names, parameters first."""
    statistics = {node.input[index] for node in graph.node
                  for op_type, index in _STATISTICS_INPUTS
                  if node.op_type == op_type and len(node.input) > index}
    named = [(proto.name, builder.tensor_from_proto(proto)) for proto in graph.initializer]
    named += [(sparse.values.name, tensor_from_numpy(sparse_to_dense(sparse, builder.base_dir)))
              for sparse in graph.sparse_initializer]
    params, buffers = [], []
    for name, tensor in named:
        is_weight = (name in trainable if trainable is not None
                     else name not in statistics and _looks_like_weight(tensor))
        value = builder.add_initializer(name, tensor, trainable=is_weight)
        builder.env[name] = value
        (params if value.initial is not None else buffers).append(name)
    return params + buffers


def _looks_like_weight(tensor: torch.Tensor) -> bool:
    # Exporters store scalars (scales, epsilons) and masks (-inf entries) as initializers;
    # training those would change the model's definition, not learn its weights.
    if not tensor.dtype.is_floating_point or tensor.numel() <= 1:
        return False
    return bool(torch.isfinite(tensor).all())


def _placeholder(builder: GraphBuilder, value_info: onnx.ValueInfoProto) -> Value:
    node = builder.graph.placeholder(python_identifier(value_info.name, builder._taken_attrs))
    node.meta["onnx_node"] = value_info.name
    node.meta["onnx_op"] = "input"
    type_proto = value_info.type
    if not type_proto.HasField("tensor_type"):
        kind = type_proto.WhichOneof("value") or "undefined"
        raise UnsupportedOnnx(node=value_info.name, op_type="", opset=builder.opset,
                              dtype=kind, kind="graph input", reason="not a tensor; sequence, "
                              "map and optional values are not supported")
    tensor_type = type_proto.tensor_type
    if not tensor_type.elem_type:
        return Value(node=node)
    dtype = torch_dtype(tensor_type.elem_type, node=value_info.name, opset=builder.opset,
                        kind="graph input")
    if not tensor_type.HasField("shape"):
        return Value(node=node)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    if any(d is None for d in dims):
        return Value(node=node)
    return Value(node=node, meta=torch.empty(dims, dtype=dtype, device="meta"))


def _output_arg(builder: GraphBuilder, value_info: onnx.ValueInfoProto) -> torch.fx.Node:
    value = builder.env.get(value_info.name)
    if value is None:
        raise ValueError(f"ONNX graph output {value_info.name!r} is not produced by any node")
    if value_info.type.HasField("tensor_type"):
        elem_type = value_info.type.tensor_type.elem_type
        if elem_type:
            torch_dtype(elem_type, node=value_info.name, opset=builder.opset,
                        kind="graph output")
    elif value_info.type.WhichOneof("value"):
        raise UnsupportedOnnx(node=value_info.name, op_type="", opset=builder.opset,
                              dtype=value_info.type.WhichOneof("value"), kind="graph output",
                              reason="not a tensor; sequence, map and optional values are "
                              "not supported")
    if value.is_shape:
        value = builder.shape_to_tensor(value)
    return builder.fx_arg(value)


__all__ = ["OnnxModule", "UnsupportedOnnx", "onnx_to_torch", "onnx_type_name"]
