"""Reading a node's arguments by name, as its op's schema declares them.

A node keeps its arguments as ``torch.export`` wrote them: positional ones in schema
order (trailing defaults left out), keyword-only ones in ``kwargs``. The same argument sits at
different positions in different ops (``unbind(self, dim)`` vs ``split(self, split_size, dim)``), so
rules never index ``node.args``: they read :func:`arg` ``(node, "dim")``, which binds the node's
arguments to ``torch.ops.<namespace>.<op>.<overload>._schema`` (ATen or custom ops alike) and falls back to the schema's default.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

from ir.core import Node


class Parameter(NamedTuple):
    """One argument of an op's schema."""

    name: str
    kwarg_only: bool
    has_default: bool
    default: Any


class SchemaError(ValueError):
    """An op name without an ATen overload, or an argument its schema does not have."""


@functools.lru_cache(maxsize=None)
def schema_of(op: str):
    """The ``torch.FunctionSchema`` of an op name: ``aten.<name>.<overload>``, or a custom op registered
    with ``torch.library`` (``<namespace>.<name>.<overload>``)."""
    from ir.ops.custom import SBPC_NAMESPACES, UnknownOpError, namespace, resolve_op
    from ir.ops.attention import RING_ATTENTION, RING_ATTENTION_SCHEMA
    if op == RING_ATTENTION:  # an sbpc op that declares its arguments like a torch op
        import torch
        return torch._C.parse_schema(RING_ATTENTION_SCHEMA)
    from ir.ops.moe import SCHEMAS as MOE_SCHEMAS
    if op in MOE_SCHEMAS:
        import torch
        return torch._C.parse_schema(MOE_SCHEMAS[op])
    if namespace(op) in SBPC_NAMESPACES:
        raise SchemaError(f"{op} is an sbpc op, not a torch op (expected a name such as aten.unbind.int); "
                          f"it has no schema")
    try:
        return resolve_op(op)._schema
    except UnknownOpError as e:
        what = "ATen overload" if op.startswith("aten.") else "registered op overload"
        raise SchemaError(f"{op} names no {what} ({e}); spell it as torch.ops.<namespace>.<name>.<overload>, "
                          "e.g. aten.unbind.int") from None


@functools.lru_cache(maxsize=None)
def parameters(op: str) -> tuple[Parameter, ...]:
    """The arguments of ``op`` in schema order (keyword-only ones last)."""
    return tuple(Parameter(a.name, a.kwarg_only, a.has_default_value(),
                           a.default_value if a.has_default_value() else None)
                 for a in schema_of(op).arguments)


def parameter_names(op: str) -> list[str]:
    """The names of the arguments of ``op``, in schema order."""
    return [p.name for p in parameters(op)]


def _position(op: str, name: str) -> tuple[int, Parameter]:
    for i, p in enumerate(parameters(op)):
        if p.name == name:
            return i, p
    raise SchemaError(f"{op} has no argument {name!r}: its schema is {schema_of(op)}; a rule that reads "
                      f"{name!r} is registered for an op with another argument convention")


def arg(node: Node, name: str) -> Any:
    """The argument ``name`` of ``node``: given positionally or by keyword, else the schema default."""
    i, p = _position(node.op, name)
    if not p.kwarg_only and i < len(node.args):
        return node.args[i]
    if name in node.kwargs:
        return node.kwargs[name]
    if p.has_default:
        return list(p.default) if isinstance(p.default, list) else p.default
    raise SchemaError(f"node {node.name} ({node.op}) lacks its required argument {name!r} "
                      f"(schema {schema_of(node.op)}); found args {node.args!r} and kwargs {node.kwargs!r}")


def dim_arg(node: Node, name: str, ndim: int) -> int:
    """The dim argument ``name`` of ``node`` in ``[0, ndim)`` (negative dims count from the end)."""
    try:
        return normalize_dim(arg(node, name), ndim)
    except SchemaError as err:
        raise SchemaError(f"node {node.name} ({node.op}), argument {name!r}: {err}") from None


def normalize_dim(d: Any, ndim: int) -> int:
    """``d`` in ``[0, ndim)``; a zero-dim tensor takes ``0`` and ``-1`` like torch does."""
    size = max(ndim, 1)
    if not -size <= int(d) < size:
        raise SchemaError(f"dim {d} is out of range for a tensor of {ndim} dims")
    return int(d) % size


def with_arg(node: Node, name: str, value: Any) -> tuple[list, dict]:
    """The node's ``(args, kwargs)`` with argument ``name`` set to ``value`` (where the node has it, or
    by keyword)."""
    i, p = _position(node.op, name)
    args, kwargs = list(node.args), dict(node.kwargs)
    if not p.kwarg_only and i < len(args):
        args[i] = value
    else:
        kwargs[name] = value
    return args, kwargs
