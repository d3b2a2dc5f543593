"""The graph IR: values, nodes and graphs.

A :class:`Graph` is a straight-line program over tensor :class:`Value` s. Every value has a logical
:class:`~ir.types.TensorType` and, once layouts are chosen, an N-D SBP over a named mesh. Nodes are
mutable and values keep use lists, so passes can rewrite the graph in place.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ir.sbp import NdSbp
from ir.types import TensorType


@dataclass(eq=False)
class Value:
    """A tensor produced by a node, or a graph input / parameter."""

    name: str
    """Unique name in the graph (printed with a ``%`` prefix)."""
    type: TensorType
    """The logical (global) type."""
    sbp: NdSbp | None = None
    """The layout on :attr:`mesh`, one entry per mesh axis; None before layouts are chosen."""
    mesh: str | None = None
    """Name of the graph mesh that holds this value."""
    kind: str = "node"
    """``input``, ``param``, ``buffer`` or ``node``."""
    target: str | None = None
    """For params and buffers: the qualified name in the model's ``state_dict``."""
    requires_grad: bool = True
    """For params: False when the model freezes it (``p.requires_grad`` was False at capture): it gets
    no gradient, no gradient sync and no optimizer state. Printed as ``{requires_grad = False}``."""
    persistent: bool = True
    """For buffers: False when it is not part of the model's ``state_dict`` (a buffer registered with
    ``persistent=False``, or a tensor constant torch.export lifted): used, never saved. Printed as
    ``{persistent = False}``."""
    producer: "Node | None" = None
    """The node that produces this value (None for inputs and params)."""
    uses: list = field(default_factory=list)
    """Nodes that read this value."""

    @property
    def trainable(self) -> bool:
        """A parameter the optimizer updates (kind ``param`` and not frozen)."""
        return self.kind == "param" and self.requires_grad

    def __repr__(self) -> str:
        return f"%{self.name}"


@dataclass(eq=False)
class Node:
    """One operation: ``outputs = op(*args, **kwargs)``; args mix values and literals."""

    op: str
    """The op name, e.g. ``aten.linear.default`` or ``comm.all_reduce``."""
    args: list
    """Positional arguments: :class:`Value` s, literals, or (nested) lists of them."""
    kwargs: dict
    """Keyword arguments, like args."""
    outputs: list
    """The values this node produces."""
    attrs: dict = field(default_factory=dict)
    """Metadata that does not change the computation, e.g. ``module`` (the source module path)."""

    def input_values(self) -> list[Value]:
        """Every value read by this node, in argument order (duplicates kept)."""
        found: list[Value] = []
        _collect_values(self.args, found)
        _collect_values(self.kwargs, found)
        return found

    @property
    def name(self) -> str:
        """The node's name: that of its first output (or its op when it has none)."""
        return self.outputs[0].name if self.outputs else self.op

    def map_values(self, fn: Callable[[Value], Any]) -> None:
        """Replace every value argument ``v`` by ``fn(v)``, keeping use lists right."""
        for v in self.input_values():
            if self in v.uses:
                v.uses.remove(self)
        self.args = map_structure(self.args, fn)
        self.kwargs = map_structure(self.kwargs, fn)
        for v in self.input_values():
            v.uses.append(self)


def _collect_values(obj: Any, found: list) -> None:
    """Append the values inside the list, tuple or dict ``obj`` (nested any depth) to ``found``, in order."""
    if isinstance(obj, dict):
        obj = obj.values()
    elif not isinstance(obj, (list, tuple)):
        return
    for item in obj:
        if isinstance(item, Value):
            found.append(item)
        elif isinstance(item, (list, tuple, dict)):
            _collect_values(item, found)


def map_structure(obj: Any, fn: Callable[[Value], Any]) -> Any:
    """Rebuild nested lists/tuples/dicts with every value ``v`` replaced by ``fn(v)``."""
    if isinstance(obj, Value):
        return fn(obj)
    if isinstance(obj, list):
        return [map_structure(o, fn) for o in obj]
    if isinstance(obj, tuple):
        return tuple(map_structure(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_structure(o, fn) for k, o in obj.items()}
    return obj


@dataclass(eq=False)
class Graph:
    """A captured model: inputs, parameters, nodes in execution order and outputs."""

    name: str = "model"
    """A name for dumps and generated programs."""
    meshes: dict = field(default_factory=dict)
    """Named placements (:class:`~ir.types.Mesh`), e.g. ``{"world": Mesh(...)}``."""
    inputs: list = field(default_factory=list)
    """User inputs, in call order."""
    params: list = field(default_factory=list)
    """Parameters and buffers (values of kind ``param`` / ``buffer``)."""
    nodes: list = field(default_factory=list)
    """Nodes in a valid execution order."""
    outputs: list = field(default_factory=list)
    """The values the program returns."""
    loss: Value | None = None
    """In training graphs, the scalar value that is differentiated (one of the outputs)."""
    buffer_updates: dict = field(default_factory=dict)
    """Buffers the step writes (running statistics, counters): buffer value -> the value it holds
    after the step. Printed ``update %bn.running_mean <- %v``; nodes never write a buffer in place."""
    attrs: dict = field(default_factory=dict)
    """Graph-level results of passes: the strategy, gradient buckets, schedules, ..."""

    # -- construction ---------------------------------------------------------------------------
    def add_input(self, name: str, type: TensorType) -> Value:
        """Append a user input."""
        v = Value(self.fresh_name(name), type, kind="input")
        self.inputs.append(v)
        return v

    def add_param(self, name: str, type: TensorType, target: str, kind: str = "param",
                  requires_grad: bool = True, persistent: bool = True) -> Value:
        """Append a parameter (or buffer) read from ``state_dict()[target]``; ``requires_grad=False``
        marks a frozen parameter, ``persistent=False`` a buffer outside the model's ``state_dict``."""
        v = Value(self.fresh_name(name), type, kind=kind, target=target, requires_grad=requires_grad,
                  persistent=persistent)
        self.params.append(v)
        return v

    def create_node(self, op: str, args: list, kwargs: dict, out_types: list[TensorType],
                    out_names: list[str] | None = None, attrs: dict | None = None,
                    before: Node | None = None) -> Node:
        """Make a node with fresh output values, insert it (at the end or before ``before``)."""
        names = out_names or [op.split(".")[1] if "." in op else op] * len(out_types)
        outs = [Value(self.fresh_name(n), t) for n, t in zip(names, out_types)]
        node = Node(op, list(args), dict(kwargs), outs, dict(attrs or {}))
        for o in outs:
            o.producer = node
        for v in node.input_values():
            v.uses.append(node)
        if before is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(self.nodes.index(before), node)
        return node

    def fresh_name(self, base: str) -> str:
        """A value name not used yet in this graph, derived from ``base``."""
        taken = self.attrs.get("_names")
        if taken is None:
            taken = self._names()
        base = sanitize_name(base)
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    def _names(self) -> set:
        names = {v.name for v in self.all_values()}
        self.attrs["_names"] = names
        return names

    # -- queries ------------------------------------------------------------------------------
    def all_values(self) -> Iterator[Value]:
        """Inputs, params, then every node output."""
        yield from self.inputs
        yield from self.params
        for n in self.nodes:
            yield from n.outputs

    def value(self, name: str) -> Value:
        """The value called ``name`` (without ``%``)."""
        for v in self.all_values():
            if v.name == name:
                return v
        raise KeyError(f"no value %{name} in graph {self.name}")

    def param_values(self) -> dict[str, Value]:
        """Trainable parameters by their ``state_dict`` name (frozen ones left out)."""
        return {v.target: v for v in self.params if v.trainable}

    def replace_all_uses(self, old: Value, new: Value, only: Callable[[Node], bool] | None = None) -> None:
        """Make every (selected) reader of ``old`` read ``new`` instead; outputs too."""
        for user in list(old.uses):
            if only is None or only(user):
                user.map_values(lambda v: new if v is old else v)
        if only is None:
            self.outputs = [new if o is old else o for o in self.outputs]
            if self.loss is old:
                self.loss = new
            for buffer, value in self.buffer_updates.items():
                if value is old:
                    self.buffer_updates[buffer] = new

    def remove_node(self, node: Node) -> None:
        """Remove a node whose outputs are unused."""
        updates = {id(v) for v in self.buffer_updates.values()}
        for o in node.outputs:
            if o.uses or o in self.outputs or id(o) in updates:
                raise ValueError(f"cannot remove {node.op} producing %{o.name}: it is still used")
        node.map_values(lambda v: v)
        for v in node.input_values():
            v.uses.remove(node)
        self.nodes.remove(node)

    def copy(self) -> "Graph":
        """A private copy with new values and nodes, printing as this graph does (``str(g.copy()) == str(g)``)
        and, like :func:`~ir.parser.parse` of that text, without private attributes; much cheaper than
        printing and parsing. Literals in node arguments are shared (the IR treats them as immutable);
        graph and node attributes are deep-copied, any value in them mapped to its copy."""
        copies: dict[int, Any] = {}  # id -> copy: every value, then deepcopy's memo of the attributes too

        def fresh(v: Value) -> Value:
            c = Value(v.name, v.type, v.sbp, v.mesh, v.kind, v.target, v.requires_grad, v.persistent)
            copies[id(v)] = c
            return c

        def copied(v: Value) -> Value:
            return copies[id(v)]

        graph = Graph(self.name, dict(self.meshes), [fresh(v) for v in self.inputs], [fresh(v) for v in self.params])
        outputs = [[fresh(o) for o in node.outputs] for node in self.nodes]  # all first: attributes may name any
        for node, outs in zip(self.nodes, outputs):
            attrs = copy.deepcopy({k: v for k, v in node.attrs.items() if not k.startswith("_")}, copies)
            copied_node = Node(node.op, map_structure(node.args, copied), map_structure(node.kwargs, copied), outs,
                               attrs)
            for o in outs:
                o.producer = copied_node
            for v in copied_node.input_values():
                v.uses.append(copied_node)
            graph.nodes.append(copied_node)
        graph.outputs = [copied(v) for v in self.outputs]
        graph.loss = copied(self.loss) if self.loss is not None else None
        graph.buffer_updates = {copied(b): copied(v) for b, v in self.buffer_updates.items()}
        graph.attrs = copy.deepcopy(self.public_attrs(), copies)
        return graph

    def public_attrs(self) -> dict:
        """Graph attributes that are part of the IR text (not private caches)."""
        return {k: v for k, v in self.attrs.items() if not k.startswith("_")}

    def __str__(self) -> str:
        from ir.printer import print_graph
        return print_graph(self)


def sanitize_name(text: str) -> str:
    """A value name made of letters, digits, ``_`` and ``.``."""
    out = "".join(c if (c.isalnum() or c in "_.") else "_" for c in text)
    if not out or out[0].isdigit() or out[0] == ".":
        out = "v" + out
    return out
