"""Print a :class:`~ir.core.Graph` as text; :mod:`ir.parser` reads the same text back."""
from __future__ import annotations

import json
import math
from typing import Any

import sympy
import torch

from ir.core import Graph, Node, Value
from ir.sbp import Broadcast, Partial, Split, format_nd_sbp
from ir.types import format_dim


def print_graph(graph: Graph) -> str:
    """The whole graph as text: meshes, the graph body, then graph attributes."""
    lines = [f"mesh {name} = {_format_mesh(m)}" for name, m in graph.meshes.items()]
    lines.append(f"graph {graph.name} {{")
    lines += [f"  input {format_decl(v)}" for v in graph.inputs]
    lines += [f"  {format_param(v)}" for v in graph.params]
    lines += [f"  {format_node(n)}" for n in graph.nodes]
    lines.append("  output " + ", ".join(f"%{v.name}" for v in graph.outputs))
    if graph.loss is not None:
        lines.append(f"  loss %{graph.loss.name}")
    lines += [f"  update %{buffer.name} <- %{value.name}" for buffer, value in graph.buffer_updates.items()]
    lines.append("}")
    lines += [f"attr {k} = {format_literal(v)}" for k, v in graph.public_attrs().items()]
    return "\n".join(lines) + "\n"


def _format_mesh(mesh) -> str:
    axes = ", ".join(f"{a}={s}" for a, s in zip(mesh.axes, mesh.shape))
    return f"[{axes}] devices [{', '.join(str(d) for d in mesh.devices)}]"


def format_decl(v: Value) -> str:
    """``%name: f32[batch, 64] (S(0), B) @world``."""
    text = f"%{v.name}: {v.type}"
    if v.sbp is not None:
        text += f" {format_nd_sbp(v.sbp)} @{v.mesh}"
    return text


def format_param(v: Value) -> str:
    """``param %w: f32[4, 8] (B) @world = "w"``; a frozen parameter ends in ``{requires_grad = False}``,
    a buffer outside the model's ``state_dict`` in ``{persistent = False}``."""
    text = f"{v.kind} {format_decl(v)} = {json.dumps(v.target)}"
    options = param_options(v)
    return f"{text} {format_literal(options)}" if options else text


def param_options(v: Value) -> dict:
    """The options a param or buffer statement prints: only those that differ from the default."""
    if v.kind == "param" and not v.requires_grad:
        return {"requires_grad": False}
    if v.kind == "buffer" and not v.persistent:
        return {"persistent": False}
    return {}


def format_node(node: Node) -> str:
    """One node statement."""
    outs = ", ".join(format_decl(v) for v in node.outputs)
    args = [format_literal(a) for a in node.args]
    args += [f"{k}={format_literal(v)}" for k, v in node.kwargs.items()]
    text = f"{outs} = {node.op}({', '.join(args)})"
    attrs = {k: v for k, v in node.attrs.items() if not k.startswith("_")}
    if attrs:
        text += " " + format_literal(attrs)
    return text


def format_literal(obj: Any) -> str:
    """The text of an argument or attribute value."""
    if isinstance(obj, Value):
        return f"%{obj.name}"
    if obj is None or isinstance(obj, bool):
        return str(obj)
    if isinstance(obj, int):
        return str(obj)
    if isinstance(obj, float):
        return _format_float(obj)
    if isinstance(obj, str):
        return json.dumps(obj)
    if is_nd_sbp(obj):
        return format_nd_sbp(obj)
    if isinstance(obj, (list, tuple)):
        return "[" + ", ".join(format_literal(o) for o in obj) + "]"
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{_key(k)} = {format_literal(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, sympy.Expr):
        return str(int(obj)) if obj.is_Integer else format_dim(obj)
    if isinstance(obj, torch.device):
        return f"device:{obj}"
    if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
        return str(obj)
    raise TypeError(f"cannot print a literal of type {type(obj).__name__}: {obj!r}")


def is_nd_sbp(obj: Any) -> bool:
    """Whether ``obj`` is an N-D SBP (a non-empty tuple of SBP values): printed ``(S(0), B)``."""
    return isinstance(obj, tuple) and bool(obj) and all(isinstance(s, (Split, Broadcast, Partial)) for s in obj)


def _format_float(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    text = repr(x)
    return text if any(c in text for c in ".en") else text + ".0"


def _key(k: str) -> str:
    return k if k.isidentifier() else json.dumps(k)
