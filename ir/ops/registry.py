"""Registry of op rules and the mechanical 1-D to N-D expansion of signatures."""
from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import sympy

from ir.core import Node, map_structure
from ir.ops.schema import with_arg
from ir.sbp import B, NdSbp, Partial, Split
from ir.types import CONTEXT_AXIS, Mesh, TensorType


class Signature(NamedTuple):
    """A valid layout of one op on one mesh axis: one SBP per tensor input and per output."""

    inputs: tuple
    outputs: tuple


@dataclass
class LocalCall:
    """What one rank runs: ``fn(*args, **kwargs)``; ``fn`` names a torch op (``aten.*`` or a custom op) or a
    ``kernels.*`` function.

    Args may hold values (the rank's local tensors), and sympy expressions over the dims and the
    rank's mesh coordinates (symbols ``coord_<axis>``), evaluated by the backend.
    """

    fn: str
    args: list
    kwargs: dict = field(default_factory=dict)


SignatureFn = Callable[[Node], list]
LocalFn = Callable[[Node, "LocalContext"], LocalCall]
AxisSignatureFn = Callable[[Node, str], list]


@dataclass
class OpRule:
    """How the compiler handles one op."""

    name: str
    signatures: SignatureFn
    """1-D signatures of a node (for one mesh axis); all-``B`` must be among them."""
    local: LocalFn | None = None
    """How a rank computes its shard; None: the same op with shape arguments localised."""
    doc: str = ""
    on_axis: AxisSignatureFn | None = None
    """Further 1-D signatures valid only on one mesh axis, by name (``fn(node, axis)``): a split of the
    sequence on the context-parallel axis, a ring op on the axis it communicates over."""


RULES: dict[str, OpRule] = {}
_WARNED: set[str] = set()


def register(*names: str, local: LocalFn | None = None, doc: str = "", on_axis: AxisSignatureFn | None = None):
    """Decorator: register a signature function for one or more op names (``on_axis``: see :class:`OpRule`)."""
    def wrap(fn: SignatureFn) -> SignatureFn:
        for name in names:
            RULES[name] = OpRule(name, fn, local, doc, on_axis)
        return fn
    return wrap


def broadcast_only(node: Node) -> list[Signature]:
    """The signature of an op without rules: every tensor broadcast."""
    return [all_b(node)]


def all_b(node: Node) -> Signature:
    """All inputs and outputs ``B``."""
    return Signature(tuple(B for _ in node.input_values()), tuple(B for _ in node.outputs))


def rule_for(op: str) -> OpRule:
    """The rule of ``op``; an unknown op gets broadcast-only rules and one warning naming it."""
    if op in RULES:
        return RULES[op]
    if op not in _WARNED:
        _WARNED.add(op)
        warnings.warn(_no_rules_message(op), stacklevel=2)
    return OpRule(op, broadcast_only)


def _no_rules_message(op: str) -> str:
    from ir.ops.custom import is_custom
    if not is_custom(op):
        return f"sbpc: op {op} has no SBP rules; it runs on broadcast (replicated) inputs"
    return (f"sbpc: custom op {op} (torch.library) has no SBP rules; it runs replicated: every rank runs it on "
            f"whole (broadcast) inputs. Register rules for it with ir.ops.register, or give it a decomposition "
            f"(a CompositeImplicitAutograd kernel or torch._decomp.register_decomposition) that "
            f"compile(decompose_custom_ops=True) inlines")


def known_ops() -> list[str]:
    """Every op with registered rules."""
    return sorted(RULES)


# -- N-D expansion ------------------------------------------------------------------------------

def nd_signatures(node: Node, mesh: Mesh) -> list[tuple[tuple, tuple]]:
    """Every N-D signature: one 1-D signature per mesh axis, keeping only sound combinations.

    Returns ``(input NdSbps, output NdSbps)`` pairs. Nodes that look alike to the rules (same op, input
    types and kinds, output types, non-value arguments, mesh), such as the same op in every layer of a
    model, share one computation.
    """
    key = _signature_key(node, mesh)
    cached = _ND_SIGNATURES.get(key)
    if cached is None:
        if len(_ND_SIGNATURES) >= _ND_SIGNATURES_LIMIT:
            _ND_SIGNATURES.clear()
        cached = _ND_SIGNATURES[key] = tuple(_expand_nd_signatures(node, mesh))
    return list(cached)


_ND_SIGNATURES: dict = {}
_ND_SIGNATURES_LIMIT = 100_000


def _signature_key(node: Node, mesh: Mesh) -> tuple:
    """What the op rules read of a node: values by position, type and kind; other arguments by repr."""
    ins = node.input_values()
    position = {id(v): i for i, v in enumerate(ins)}
    arguments = repr(map_structure((node.args, node.kwargs), lambda v: f"%{position[id(v)]}"))
    return (node.op, tuple((v.type, v.kind) for v in ins), tuple(o.type for o in node.outputs), arguments,
            mesh.axes, mesh.shape)


def _expand_nd_signatures(node: Node, mesh: Mesh) -> list[tuple[tuple, tuple]]:
    per_axis = [axis_signatures(node, axis) for axis in mesh.axes]
    out = []
    for combo in itertools.product(*per_axis):
        ins = tuple(tuple(sig.inputs[i] for sig in combo) for i in range(len(combo[0].inputs)))
        outs = tuple(tuple(sig.outputs[i] for sig in combo) for i in range(len(combo[0].outputs)))
        types = [v.type for v in node.input_values()] + [v.type for v in node.outputs]
        if all(splits_divide(t, s, mesh) for t, s in zip(types, ins + outs)):
            out.append((ins, outs))
    return out


def axis_signatures(node: Node, axis: str) -> list[Signature]:
    """The 1-D signatures of a node on one mesh axis: the op's own, and those valid on that axis only."""
    rule = rule_for(node.op)
    sigs = rule.signatures(node) + (rule.on_axis(node, axis) if rule.on_axis else [])
    return [s for s in _dedupe(sigs) if partials_are_numbers(node, s)]


def partials_are_numbers(node: Node, sig: Signature) -> bool:
    """False when a signature holds a bool value as partial: bools have no sum (nor useful max)."""
    values = node.input_values() + list(node.outputs)
    return not any(isinstance(s, Partial) and v.type.dtype == "bool"
                   for v, s in zip(values, sig.inputs + sig.outputs))


def _dedupe(sigs: list[Signature]) -> list[Signature]:
    seen, out = set(), []
    for s in sigs:
        key = (tuple(map(str, s.inputs)), tuple(map(str, s.outputs)))
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def splits_divide(t: TensorType, nd: NdSbp, mesh: Mesh) -> bool:
    """False when a static dim is split by mesh axes whose product does not divide it."""
    for dim in set(s.dim for s in nd if isinstance(s, Split)):
        if dim >= t.ndim:
            return False
        ways = 1
        for s, n in zip(nd, mesh.shape):
            if isinstance(s, Split) and s.dim == dim:
                ways *= n
        size = t.shape[dim]
        if size.is_Integer and int(size) % ways != 0:
            return False
    return True


# -- local execution -----------------------------------------------------------------------------

@dataclass
class LocalContext:
    """What a local rule needs to know about the node's placement."""

    mesh: Mesh
    mesh_name: str
    in_sbps: list
    """The N-D SBP of each input value, in ``node.input_values()`` order."""
    out_sbps: list
    sequences: frozenset = frozenset()
    """The graph's sequence lengths (:func:`sequence_sizes`): on the cp axis their splits are load-balanced."""


def coord_symbol(axis: str) -> sympy.Symbol:
    """The symbol bound to a rank's coordinate on a mesh axis."""
    return sympy.Symbol(f"coord_{axis}", integer=True, nonnegative=True)


def local_shape(t: TensorType, nd: NdSbp, mesh: Mesh) -> tuple:
    """The shape of one rank's shard (sympy dims)."""
    shape = list(t.shape)
    for s, n in zip(nd, mesh.shape):
        if isinstance(s, Split):
            shape[s.dim] = shape[s.dim] / n
    return tuple(sympy.simplify(d) for d in shape)


def shard_start(t: TensorType, nd: NdSbp, mesh: Mesh, dim: int) -> sympy.Expr:
    """The global index where this rank's shard of ``dim`` begins (in coordinate symbols)."""
    block, ways = sympy.Integer(0), 1
    for s, n, axis in zip(nd, mesh.shape, mesh.axes):
        if isinstance(s, Split) and s.dim == dim:
            block = block * n + coord_symbol(axis)
            ways *= n
    return sympy.simplify(block * t.shape[dim] / ways)


def sequence_sizes(graph) -> frozenset:
    """The sequence lengths of a graph with a cp axis: the sizes of the input dims split over it (empty without).

    On the cp axis a split of a dim of one of these sizes is load-balanced for causal attention: of ``2n`` equal
    chunks, rank ``c`` of ``n`` holds chunks ``c`` and ``2n - 1 - c`` (as Megatron-Core and torchtitan lay
    out context parallelism), so every rank attends as many earlier positions. Other splits are contiguous.
    The logical tensor stays in sequence order; only which rows a rank holds changes. Parameters and buffers
    (sharded over cp by FSDP) are stored in contiguous shards."""
    sizes = set()
    for v in graph.inputs:
        mesh = graph.meshes.get(v.mesh) if v.mesh else None
        if mesh is None or CONTEXT_AXIS not in mesh.axes or not v.sbp:
            continue
        s = v.sbp[mesh.axis_index(CONTEXT_AXIS)]
        if isinstance(s, Split):
            sizes.add(sympy.sympify(v.type.shape[s.dim]))
    return frozenset(sizes)


def is_balanced(size, axis: str, sequences: frozenset) -> bool:
    """Whether a split of a dim of ``size`` over mesh axis ``axis`` is load-balanced (see :func:`sequence_sizes`)."""
    return axis == CONTEXT_AXIS and sympy.sympify(size) in sequences


def balanced_axes(t: TensorType, nd: NdSbp, mesh: Mesh, sequences: frozenset) -> tuple[bool, ...]:
    """Per mesh axis, whether ``t`` laid out in ``nd`` is split there load-balanced."""
    return tuple(isinstance(s, Split) and is_balanced(t.shape[s.dim], axis, sequences)
                 for s, axis in zip(nd, mesh.axes))


def balanced_comm_kwargs(node: Node, sequences: frozenset) -> dict:
    """What a ``comm.*`` node needs to know of load-balanced splits (see :func:`sequence_sizes`): ``balanced``
    (a bool; for ``all_to_all`` a pair: its source and its destination split), or nothing when none is."""
    axis = node.kwargs.get("axis")
    source = node.input_values()[0]
    if source.kind in ("param", "buffer"):
        return {}  # parameters are stored in contiguous shards (see sequence_sizes)
    t = source.type
    if node.op == "comm.all_to_all":
        pair = tuple(is_balanced(t.shape[node.kwargs[k]], axis, sequences) for k in ("src_dim", "dst_dim"))
        return {"balanced": pair} if any(pair) else {}
    if node.op in ("comm.all_gather", "comm.reduce_scatter", "comm.slice") and \
            is_balanced(t.shape[node.kwargs["dim"]], axis, sequences):
        return {"balanced": True}
    return {}


def shard_ranges(t: TensorType, nd: NdSbp, mesh: Mesh, dim: int, sequences: frozenset) -> list[tuple]:
    """The global positions of this rank's shard of ``dim``, as ``(start, length)`` ranges in the order the
    shard holds them (coordinate symbols in the starts): one range for contiguous splits, two for a
    load-balanced one (see :func:`sequence_sizes`)."""
    ranges = [(sympy.Integer(0), sympy.sympify(t.shape[dim]))]
    for s, n, axis in zip(nd, mesh.shape, mesh.axes):
        if not isinstance(s, Split) or s.dim != dim or n == 1:
            continue
        c = coord_symbol(axis)
        if len(ranges) > 1:
            raise ValueError(f"dim {dim} of {t} is split over axis {axis} inside a load-balanced cp split; put "
                             f"the cp axis last in the mesh or split the sequence over cp only")
        start, length = ranges[0]
        if is_balanced(t.shape[dim], axis, sequences):
            part = sympy.simplify(length / (2 * n))
            ranges = [(sympy.simplify(start + c * part), part), (sympy.simplify(start + (2 * n - 1 - c) * part), part)]
        else:
            part = sympy.simplify(length / n)
            ranges = [(sympy.simplify(start + c * part), part)]
    return ranges


def first_coord_is_zero(nd: NdSbp, mesh: Mesh, which) -> sympy.Expr:
    """An expression that is 1 on ranks whose coordinate is 0 on every axis where ``which(sbp)``."""
    expr = sympy.Integer(1)
    for s, axis in zip(nd, mesh.axes):
        if which(s):
            expr = expr * sympy.Piecewise((1, sympy.Eq(coord_symbol(axis), 0)), (0, True))
    return expr


SHAPE_ARGS = {
    "aten.view.default": "size", "aten.reshape.default": "shape", "aten._unsafe_view.default": "size",
    "aten.expand.default": "size", "aten.new_zeros.default": "size", "aten.new_ones.default": "size",
    "aten.new_empty.default": "size", "aten.new_full.default": "size", "aten.zeros.default": "size",
    "aten.ones.default": "size", "aten.empty.memory_format": "size", "aten.full.default": "size",
}
"""Ops whose output shape is an argument (by schema name): a rank passes its shard's shape."""


def default_local(node: Node, ctx: LocalContext) -> LocalCall:
    """The same op, with a shape argument (view, expand, zeros, ...) replaced by the local shape."""
    name = SHAPE_ARGS.get(node.op)
    if name is not None and len(node.outputs) == 1:
        args, kwargs = with_arg(node, name, list(local_shape(node.outputs[0].type, ctx.out_sbps[0], ctx.mesh)))
        return LocalCall(node.op, args, kwargs)
    return LocalCall(node.op, list(node.args), dict(node.kwargs))


def local_call(node: Node, ctx: LocalContext) -> LocalCall:
    """How one rank computes this node's local outputs."""
    rule = rule_for(node.op)
    return (rule.local or default_local)(node, ctx)
