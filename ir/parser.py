"""Parse the IR text printed by :mod:`ir.printer` back into a :class:`~ir.core.Graph`."""
from __future__ import annotations

import json
from pathlib import Path

import lark
import sympy
import torch

from ir.core import Graph, Node, Value
from ir.sbp import parse_sbp
from ir.types import Mesh, TensorType, dim_symbol, parse_dim

_GRAMMAR = (Path(__file__).with_name("ir.lark")).read_text()
_PARSER = lark.Lark(_GRAMMAR, parser="lalr", propagate_positions=True)


class IRSyntaxError(ValueError):
    """Text that is not valid IR; the message has line:column and a caret."""


def parse(text: str) -> Graph:
    """Parse IR text into a graph (``str(parse(str(g))) == str(g)``)."""
    try:
        tree = _PARSER.parse(text)
    except lark.exceptions.UnexpectedInput as err:
        raise IRSyntaxError(_describe(err, text)) from None
    return _Builder(text).build(tree)


def _describe(err: lark.exceptions.UnexpectedInput, text: str) -> str:
    context = err.get_context(text).rstrip("\n")
    expected = sorted(getattr(err, "expected", None) or getattr(err, "allowed", None) or [])
    what = f"; expected one of {', '.join(expected)}" if expected else ""
    return f"line {err.line}:{err.column}: unexpected input{what}\n{context}"


class _Builder:
    """Walks the parse tree, creating values before their uses."""

    def __init__(self, text: str):
        self.text = text
        self.graph = Graph()
        self.values: dict[str, Value] = {}

    def error(self, meta, message: str) -> IRSyntaxError:
        line = self.text.splitlines()[meta.line - 1] if meta.line else ""
        return IRSyntaxError(f"line {meta.line}:{meta.column}: {message}\n{line}\n{' ' * (meta.column - 1)}^")

    def build(self, tree: lark.Tree) -> Graph:
        for item in tree.children:
            getattr(self, 'on_' + item.data)(item)
        self.graph.attrs["_names"] = set(self.values)
        return self.graph

    def on_mesh_decl(self, t: lark.Tree) -> None:
        name, *rest = t.children
        axes = [c for c in rest if isinstance(c, lark.Tree)]
        devices = [int(c) for c in rest if isinstance(c, lark.Token)]
        self.graph.meshes[str(name)] = Mesh.make([str(a.children[0]) for a in axes],
                                                 [int(a.children[1]) for a in axes], devices)

    def on_attr_decl(self, t: lark.Tree) -> None:
        self.graph.attrs[str(t.children[0])] = self.literal(t.children[1])

    def on_graph(self, t: lark.Tree) -> None:
        self.graph.name = str(t.children[0])
        for stmt in t.children[1:]:
            getattr(self, 'on_' + stmt.data)(stmt)

    def decl(self, t: lark.Tree, kind: str) -> Value:
        var, ttype, layout = t.children
        name = str(var)[1:]
        if name in self.values:
            raise self.error(t.meta, f"%{name} is defined twice")
        v = Value(name, self.ttype(ttype), kind=kind)
        if layout is not None:
            *sbps, mesh = layout.children
            v.sbp, v.mesh = tuple(parse_sbp(str(s)) for s in sbps), str(mesh)
        self.values[name] = v
        return v

    def ttype(self, t: lark.Tree) -> TensorType:
        dtype, *dims = t.children
        return TensorType(tuple(self.dim(d) for d in dims if d is not None), str(dtype))

    def dim(self, d) -> sympy.Expr:
        if d.data == "int_dim":
            return sympy.Integer(int(d.children[0]))
        if d.data == "name_dim":
            return dim_symbol(str(d.children[0]))
        return parse_dim(str(d.children[0]))

    def on_input_stmt(self, t: lark.Tree) -> None:
        self.graph.inputs.append(self.decl(t.children[0], "input"))

    def on_param_stmt(self, t: lark.Tree) -> None:
        kind, decl, target, flags = t.children
        v = self.decl(decl, str(kind))
        v.target = json.loads(str(target))
        if flags is not None:
            options = self.literal(flags)
            allowed = {"param": "requires_grad", "buffer": "persistent"}[v.kind]
            if set(options) != {allowed} or not isinstance(options[allowed], bool):
                raise self.error(t.meta, f"expected {{{allowed} = False}} after the state_dict name of "
                                         f"{v.kind} %{v.name}, found {options}")
            setattr(v, allowed, options[allowed])
        self.graph.params.append(v)

    def on_node_stmt(self, t: lark.Tree) -> None:
        decls = [c for c in t.children if isinstance(c, lark.Tree) and c.data == "vdecl"]
        op = next(c for c in t.children if isinstance(c, lark.Token) and c.type == "OPNAME")
        rest = t.children[len(decls) + 1:]
        attrs = rest[-1] if rest and isinstance(rest[-1], lark.Tree) and rest[-1].data == "dict" else None
        arg_trees = [a for a in (rest[:-1] if attrs is not None else rest) if a is not None]
        args, kwargs = [], {}
        for a in arg_trees:
            if isinstance(a, lark.Tree) and a.data == "kwarg":
                kwargs[str(a.children[0])] = self.literal(a.children[1])
            else:
                args.append(self.literal(a))
        outs = [self.decl(d, "node") for d in decls]
        node = Node(str(op), args, kwargs, outs, self.literal(attrs) if attrs is not None else {})
        for o in outs:
            o.producer = node
        for v in node.input_values():
            v.uses.append(node)
        self.graph.nodes.append(node)

    def on_output_stmt(self, t: lark.Tree) -> None:
        self.graph.outputs = [self.ref(c) for c in t.children if c is not None]

    def on_loss_stmt(self, t: lark.Tree) -> None:
        self.graph.loss = self.ref(t.children[0])

    def on_update_stmt(self, t: lark.Tree) -> None:
        buffer, value = (self.ref(c) for c in t.children)
        if buffer in self.graph.buffer_updates:
            raise self.error(t.meta, f"buffer %{buffer.name} is updated twice")
        self.graph.buffer_updates[buffer] = value

    def ref(self, token: lark.Token) -> Value:
        name = str(token)[1:]
        if name not in self.values:
            raise IRSyntaxError(f"line {token.line}:{token.column}: %{name} is used before it is defined")
        return self.values[name]

    def literal(self, t):
        kind = t.data if isinstance(t, lark.Tree) else None
        tok = t.children[0] if isinstance(t, lark.Tree) and t.children else None
        simple = {
            "var": lambda: self.ref(tok), "int_lit": lambda: int(tok), "float_lit": lambda: float(tok),
            "str_lit": lambda: json.loads(str(tok)), "none_lit": lambda: None, "true_lit": lambda: True,
            "false_lit": lambda: False, "sym_lit": lambda: dim_symbol(str(tok)),
            "expr_lit": lambda: parse_dim(str(tok)), "torch_lit": lambda: getattr(torch, str(tok)[6:]),
            "device_lit": lambda: torch.device(str(tok)[7:]),
            "list": lambda: [self.literal(c) for c in t.children if c is not None],
            "dict": lambda: {_key(p.children[0]): self.literal(p.children[1])
                             for p in t.children if p is not None},
            "nd_sbp": lambda: tuple(parse_sbp(str(s)) for s in t.children),
        }
        return simple[kind]()


def _key(token: lark.Token) -> str:
    return json.loads(str(token)) if token.type == "STRING" else str(token)
