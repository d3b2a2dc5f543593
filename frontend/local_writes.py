"""Make the common in-place writes of an exported graph functional without tracing the model again.

torch's functionalization (``ExportedProgram.run_decompositions``) traces the whole program a second
time, which costs as much as the export itself (a tiny T5 4-5 s, Mixtral 4 s on a CPU), to rewrite a
handful of writes. Most writes in real models are local: into a tensor the forward has just made
(``x.add_(bias)`` on a matmul's result, ``topk_weights /= denominator``, ``masked_fill_`` of a
``new_zeros``), or through a chain of ``slice`` / ``select`` views of one (``shifted[..., 1:] = ids``).
Those are rewritten here as torch would: the op's functional twin, the new value written back into the
base with ``slice_scatter`` / ``select_scatter``, and later readers of the base reading the new value.

Anything else — writes into inputs, parameters or buffers (BatchNorm's running statistics), through
other views, or a view of the written tensor read after the write — is left to torch:
:func:`make_local_writes_functional` then returns False and the caller runs torch's functionalization on
the whole program. A graph is rewritten completely or not at all.
"""
from __future__ import annotations

import copy
import operator
from typing import Any

import torch
import torch.fx

SCATTER_OF_VIEW = {
    "aten.slice.Tensor": (torch.ops.aten.slice_scatter.default, ("dim", "start", "end", "step"),
                          (0, None, None, 1)),
    "aten.select.int": (torch.ops.aten.select_scatter.default, ("dim", "index"), (None, None)),
}
"""View op -> (the op that writes a new value of the view into its base, the view's arguments after ``self``
in schema order, their defaults)."""


HIDDEN_WRITES = {
    "aten.batch_norm.default": (5, (3, 4)), "aten.native_batch_norm.default": (5, (3, 4)),
    "aten.instance_norm.default": (5, (3, 4)),
}
"""Ops whose schema does not say they write: op -> (position of the flag that makes them write (training,
use_input_stats), positions of the tensors they then update in place (running mean and variance))."""


def written_args(node: torch.fx.Node) -> list[str]:
    """The names of the arguments an ATen node writes in place (empty for functional nodes), including the
    running statistics that :data:`HIDDEN_WRITES` ops update when training."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return []
    written = [a.name for a in node.target._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    flag, tensors = HIDDEN_WRITES.get(str(node.target), (None, ()))
    if flag is not None and len(node.args) > flag and node.args[flag] is True:
        written += [node.target._schema.arguments[i].name for i in tensors
                    if isinstance(node.args[i], torch.fx.Node)]
    return written


class _NotLocal(Exception):
    """A write this module leaves to torch's functionalization."""


def make_local_writes_functional(program: torch.export.ExportedProgram, written: list[torch.fx.Node]) -> bool:
    """Rewrite ``program`` so that none of ``written`` (its nodes that write an argument in place, in graph order)
    writes, and say so; or leave it as it is and return False when one of them is not a local write (see the
    module's docstring). The export's graph signature names nodes: they keep their names, and an output that
    was written is re-pointed at the node of its new value."""
    rewritten = functional_copy(program.graph, written)
    if rewritten is None:
        return False
    program.graph_module.graph = rewritten
    outputs = next(node for node in reversed(rewritten.nodes) if node.op == "output").args[0]
    for spec, value in zip(program.graph_signature.output_specs, outputs):
        if isinstance(value, torch.fx.Node) and getattr(spec.arg, "name", value.name) != value.name:
            spec.arg = type(spec.arg)(name=value.name)
    return True


def functional_copy(graph: torch.fx.Graph, written: list[torch.fx.Node]) -> torch.fx.Graph | None:
    """A copy of ``graph`` with each node of ``written`` replaced by functional ops, or None when one of them is
    not a local write; ``graph`` itself is not changed. Nodes keep their names, but for the writes."""
    result = copy.deepcopy(graph)
    by_name = {node.name: node for node in result.nodes}
    try:
        for name in (node.name for node in written):
            _rewrite(result, by_name[name])
    except _NotLocal:
        return None
    return result


def _rewrite(graph: torch.fx.Graph, write: torch.fx.Node) -> None:
    """Replace one in-place ``write`` by its functional twin and the scatters into its base."""
    target = write.args[0] if write.args else None
    if not isinstance(target, torch.fx.Node) or written_args(write) != [_first_arg_name(write)]:
        raise _NotLocal
    chain, base = _view_chain(target)
    order = {node: i for i, node in enumerate(graph.nodes)}
    _check_no_alias_read_after(base, write, order)
    with graph.inserting_before(write.next):  # new nodes in the order made, right after the write
        value = _add_like(graph, write, _functional_twin(write.target), write.args, write.kwargs)
        _check_same_type(value, target)
        new_base = value
        for view in chain:
            new_base = _scatter_into(graph, write, view, new_base)
        written_view = new_base
        if write.users:  # what the write returns: the view, taken again of the new base
            for view in reversed(chain):
                written_view = _add_like(graph, write, view.target, (written_view, *view.args[1:]), view.kwargs)
    later = [user for user in base.users if order.get(user, -1) > order[write]]
    for user in later:
        user.replace_input_with(base, new_base)
    write.replace_all_uses_with(written_view)
    graph.erase_node(write)


def _view_chain(target: torch.fx.Node) -> tuple[list[torch.fx.Node], torch.fx.Node]:
    """The slice/select views from ``target`` up to the tensor they view (innermost first), and that tensor,
    which must be a tensor the forward made (not an input, parameter, buffer or another view)."""
    chain = []
    node = target
    while node.op == "call_function" and str(node.target) in SCATTER_OF_VIEW:
        chain.append(node)
        node = node.args[0]
    if not _fresh(node):
        raise _NotLocal
    return chain, node


def _fresh(node: Any) -> bool:
    """Whether ``node`` is a new tensor of the forward: no view of another tensor (:func:`_aliases`), made by an op
    that writes nothing."""
    if not isinstance(node, torch.fx.Node) or node.op != "call_function" or _aliases(node):
        return False
    producer = node.args[0] if node.target is operator.getitem else node
    return isinstance(producer, torch.fx.Node) and producer.op == "call_function" and not written_args(producer)


def _check_no_alias_read_after(base: torch.fx.Node, write: torch.fx.Node, order: dict) -> None:
    """Refuse the write when a view of ``base`` made before it is read after it (that read, the graph's
    output included, would need the view recomputed from the new value)."""
    seen, stack = {base}, [base]
    while stack:
        node = stack.pop()
        for user in node.users:
            if user in seen or not _aliases(user):
                continue
            seen.add(user)
            stack.append(user)
            if user is not write and order.get(user, -1) < order[write] and \
                    any(order.get(reader, -1) > order[write] for reader in user.users):
                raise _NotLocal


def _aliases(node: torch.fx.Node) -> bool:
    """Whether ``node``'s value is a view of (or is) one of its arguments."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return isinstance(node.args[0], torch.fx.Node) and _aliases(node.args[0])
    if not isinstance(node.target, torch._ops.OpOverload):
        return True  # unknown: assume the worst
    return any(ret.alias_info is not None for ret in node.target._schema.returns)


def _first_arg_name(node: torch.fx.Node) -> str:
    return node.target._schema.arguments[0].name


def _functional_twin(op: torch._ops.OpOverload) -> torch._ops.OpOverload:
    """``aten.add.Tensor`` for ``aten.add_.Tensor``: the same op returning a new tensor, with the same
    arguments."""
    namespace, name = op._schema.name.split("::")
    packet = getattr(getattr(torch.ops, namespace), name[:-1], None) if name.endswith("_") else None
    twin = getattr(packet, op._overloadname, None) if packet is not None else None
    if twin is None or [a.name for a in twin._schema.arguments] != [a.name for a in op._schema.arguments]:
        raise _NotLocal
    return twin


def _scatter_into(graph: torch.fx.Graph, write: torch.fx.Node, view: torch.fx.Node,
                  value: torch.fx.Node) -> torch.fx.Node:
    """The view's base with ``value`` written where ``view`` looks (``slice_scatter`` / ``select_scatter``)."""
    scatter, names, defaults = SCATTER_OF_VIEW[str(view.target)]
    given = view.args[1:]
    args = [given[i] if i < len(given) else view.kwargs.get(name, default)
            for i, (name, default) in enumerate(zip(names, defaults))]
    new_base = _add_like(graph, write, scatter, (view.args[0], value, *args), {})
    _check_same_type(new_base, view.args[0])
    return new_base


def _add_like(graph: torch.fx.Graph, write: torch.fx.Node, op, args: tuple, kwargs: dict) -> torch.fx.Node:
    """A node calling ``op`` where the write was, with the write's module path and source line, and its value's
    fake tensor computed as export would."""
    node = graph.call_function(op, tuple(args), dict(kwargs))
    node.meta = {k: v for k, v in write.meta.items() if k not in ("val", "tensor_meta")}
    node.meta["val"] = _fake_value(op, args, kwargs)
    return node


def _fake_value(op, args: tuple, kwargs: dict) -> torch.Tensor:
    vals = torch.fx.node.map_arg((tuple(args), kwargs), lambda n: n.meta.get("val"))
    fake_mode = torch._guards.detect_fake_mode(torch.utils._pytree.tree_leaves(vals))
    if fake_mode is None:
        raise _NotLocal
    try:
        with fake_mode:
            return op(*vals[0], **vals[1])
    except Exception:  # the functional twin refuses what the in-place op took: leave it to torch
        raise _NotLocal from None


def _check_same_type(new: torch.fx.Node, old: torch.fx.Node) -> None:
    """The functional value replaces ``old``: it must have its shape and dtype (``x.add_(y)`` keeps ``x``'s
    dtype where ``add`` would promote)."""
    a, b = new.meta["val"], old.meta.get("val")
    if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
        raise _NotLocal
