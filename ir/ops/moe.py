"""Expert parallelism: the token dispatch and combine of a mixture-of-experts layer, and its experts' matmul.

The ``experts`` pass writes a MoE layer whose experts are split over a mesh axis as

    %rows, %route = moe.dispatch(%hidden, %top_k_index, experts=E, axis="ep", ranks=n)
    %h = moe.expert_mm(%rows, %w1, %route, axis="ep")      (and the activation, the second matmul)
    %out = moe.combine(%y, %top_k_index, %top_k_weights, %route, axis="ep")

On logical tensors: ``rows`` are the (token, expert) pairs' hidden states sorted by expert (stably;
``T * k`` rows), ``route[s, e]`` counts the pairs of token block ``s`` (of ``n`` equal blocks) routed to
expert ``e``, ``expert_mm`` multiplies each expert's rows by its matrix and ``combine`` puts the rows back
in pair order and sums each token's ``k`` rows weighted by the router.

On their ``axis`` (tokens and experts split, ``S(0)``) dispatch and combine are the all-to-all of expert
parallelism (``backends/runtime/moe.py``): rank ``d`` ends up with the rows of its own experts, from every
rank's tokens, expert by expert. Those rows are *routed*: ``S(0)`` in uneven, data-dependent pieces
(the routing decides how many rows each rank gets), so no boxing may convert them; they flow only through
row-wise ops into ``moe.expert_mm`` and ``moe.combine`` (a verifier rule). ``route`` is ``S(1)`` there
(each rank holds the counts of its experts, per source). On another batch axis (``dp``) every group of
ranks routes its own tokens (rows ``S(0)`` the same way, ``route`` partial sums); on other axes
(``tp``) the experts' matrices split like a matmul's.
"""
from __future__ import annotations

from dataclasses import dataclass

from ir.core import Node, Value
from ir.ops.registry import LocalCall, LocalContext, Signature, all_b, register
from ir.ops.schema import arg
from ir.sbp import B, P, Split
from ir.types import EXPERT_AXIS, Mesh

DISPATCH, EXPERT_MM, COMBINE = "moe.dispatch", "moe.expert_mm", "moe.combine"
"""The op names."""
SCHEMAS = {
    DISPATCH: "moe::dispatch(Tensor hidden, Tensor top_k_index, *, int experts, str axis, int ranks, int chunks=1) "
              "-> (Tensor, Tensor)",
    EXPERT_MM: "moe::expert_mm(Tensor rows, Tensor weight, Tensor route, *, str axis) -> Tensor",
    COMBINE: "moe::combine(Tensor rows, Tensor top_k_index, Tensor top_k_weights, Tensor route, *, int experts, "
             "str axis, int chunks=1) -> Tensor",
}
"""Their arguments, read by name like an ATen op's (``ir.ops.schema.arg``)."""
EXCHANGING = (DISPATCH, COMBINE)
"""The ops whose ranks exchange rows on their axis (all-to-all)."""
TOKEN_AXES = ("dp", EXPERT_AXIS)
"""Mesh axes that split the batch (the strategy's data and expert axes): off its own axis, a MoE op keeps a
token split on these (each group of ranks routes its own tokens)."""


GROUPED_MMS = ("transformers.grouped_mm_fallback.default", "aten._grouped_mm.default")
"""Grouped matmuls of stacked experts in transformers' default experts implementation (``grouped_mm``): its own
op, or ``torch._grouped_mm`` where that runs (bf16)."""
SORTS = ("aten.sort.default", "aten.sort.stable")


def grouped_matmuls(sort: Node) -> list[Node]:
    """The grouped matmuls whose expert offsets come from this sort's sorted expert ids (none: not a MoE
    layer): ``cumsum(histc(sorted ids as float))``."""
    out = []
    frontier = [sort.outputs[0]]
    for _ in range(4):  # _to_copy -> histc -> cumsum -> grouped_mm
        frontier = [o for v in frontier for u in v.uses for o in u.outputs]
        out += [u for v in frontier for u in v.uses if u.op in GROUPED_MMS and len(u.input_values()) > 2
                and u.input_values()[2] is v]
    return list(dict.fromkeys(out))


def expert_weight(node: Node) -> Value:
    """The stacked parameter behind a grouped matmul's weight (read through transposes and copies)."""
    w = node.input_values()[1]
    while w.producer is not None and w.producer.input_values():
        w = w.producer.input_values()[0]
    return w


def expert_layers(graph) -> list[tuple[Node, list[Node]]]:
    """transformers' grouped-experts MoE layers of a captured graph: (the sort of the pairs' expert ids, the
    grouped matmuls using its offsets)."""
    layers = [(n, grouped_matmuls(n)) for n in graph.nodes if n.op in SORTS]
    return [(sort, matmuls) for sort, matmuls in layers if matmuls]


def exchanges(node: Node, mesh: Mesh, hidden_sbp: tuple) -> bool:
    """Whether the ranks of the node's axis exchange rows: its token input is split there."""
    axis = arg(node, "axis")
    return axis in mesh.axes and hidden_sbp[mesh.axis_index(axis)] == Split(0) and mesh.shape[mesh.axis_index(axis)] > 1


def routed_values(node: Node) -> list:
    """The values of a dispatch that hold routed rows, and those computed row by row from them up to the
    combine (the rows no collective may convert)."""
    seen, stack = {}, [node.outputs[0]]
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen[id(v)] = v
        for user in v.uses:
            if user.op != COMBINE:  # the combine's output holds tokens again
                stack.extend(o for o in user.outputs if o.type.ndim >= 1)
    return list(seen.values())


@dataclass(frozen=True)
class OverlappedLayer:
    """A MoE layer run in ``chunks`` chunks of tokens (``moe_overlap_chunks``): the experts' nodes between its
    dispatch and combine run once per chunk, so one chunk's all-to-all overlaps another's compute."""

    dispatch: Node
    experts: tuple[Node, ...]
    """The nodes reading routed rows (the experts' matmuls, their activation), in graph order."""
    combine: Node

    @property
    def chunks(self) -> int:
        """Chunks of tokens the layer's dispatch and combine are split into."""
        return int(arg(self.dispatch, "chunks"))

    @property
    def expert_rows(self) -> Value:
        """What the experts compute per chunk: the rows the combine sends back."""
        return self.combine.input_values()[0]


class OverlapError(ValueError):
    """A MoE layer whose routed rows are read after its combine: it cannot run chunk by chunk (named)."""


def overlapped_layer(graph, dispatch: Node) -> OverlappedLayer:
    """The chunked layer of a dispatch: the nodes reading its routed rows, and its combine; raises
    :class:`OverlapError` when a value they compute is read outside them (the layer cannot be run in chunks)."""
    routed = {id(v) for v in routed_values(dispatch)}
    combine = next((u for u in dispatch.outputs[1].uses if u.op == COMBINE), None)
    experts = [n for n in graph.nodes if n is not dispatch and n is not combine
               and any(id(v) in routed for v in n.input_values())]
    inside = {id(n) for n in experts} | {id(combine)}
    outside = [u for n in experts for o in n.outputs for u in o.uses if id(u) not in inside]
    outside += [u for u in dispatch.outputs[1].uses if id(u) not in inside]
    if combine is None or outside or any(o in graph.outputs for n in experts for o in n.outputs):
        where = f"%{dispatch.name} (module {dispatch.attrs.get('module', '?')})"
        raise OverlapError(f"MoE layer at {where}: moe_overlap_chunks runs its experts chunk by chunk, but "
                           f"{', '.join('%' + u.name for u in outside) or 'a graph output'} reads their rows outside "
                           "the layer; drop moe_overlap_chunks for this model")
    return OverlappedLayer(dispatch, tuple(experts), combine)


def overlapped_layers(graph) -> dict[int, OverlappedLayer]:
    """Every layer that exchanges rows in more than one chunk, by the ids of its dispatch, expert nodes and
    combine (what the backends run as one chunked unit at the combine's place)."""
    out = {}
    for node in graph.nodes:
        if node.op == DISPATCH and arg(node, "chunks") > 1 \
                and exchanges(node, graph.meshes[node.outputs[0].mesh], node.input_values()[0].sbp):
            layer = overlapped_layer(graph, node)
            for n in (layer.dispatch, *layer.experts, layer.combine):
                out[id(n)] = layer
    return out


def routed_rows(graph) -> dict[int, tuple]:
    """Every value holding routed rows in ``graph``, by id: ``(value, the dispatch that routed them)``."""
    return {id(v): (v, node) for node in graph.nodes if node.op == DISPATCH for v in routed_values(node)}


def _dispatch(node: Node) -> list[Signature]:
    return [all_b(node)]


def _dispatch_on_axis(node: Node, axis: str) -> list[Signature]:
    if axis == arg(node, "axis"):
        return [Signature((Split(0), Split(0)), (Split(0), Split(1)))]
    return [Signature((Split(0), Split(0)), (Split(0), P))] if axis in TOKEN_AXES else []


def _expert_mm(node: Node) -> list[Signature]:
    """Experts' matrices split over N (column-parallel) or K (row-parallel, partial sums)."""
    return [all_b(node), Signature((B, Split(2), B), (Split(1),)), Signature((Split(1), Split(1), B), (P,)),
            Signature((P, B, B), (P,))]


def _expert_mm_on_axis(node: Node, axis: str) -> list[Signature]:
    if axis == arg(node, "axis"):
        return [Signature((Split(0), Split(0), Split(1)), (Split(0),))]
    return [Signature((Split(0), B, P), (Split(0),))] if axis in TOKEN_AXES else []


def _combine(node: Node) -> list[Signature]:
    """Linear in the rows: partial rows give partial tokens, rows split over features split them alike."""
    return [all_b(node), Signature((P, B, B, B), (P,)), Signature((Split(1), B, B, B), (Split(1),))]


def _combine_on_axis(node: Node, axis: str) -> list[Signature]:
    if axis == arg(node, "axis"):
        return [Signature((Split(0), Split(0), Split(0), Split(1)), (Split(0),))]
    return [Signature((Split(0), Split(0), Split(0), P), (Split(0),))] if axis in TOKEN_AXES else []


def _run_by_backends(node: Node, ctx: LocalContext) -> LocalCall:
    raise NotImplementedError(f"{node.op} is run by the backends (backends/runtime/moe.py), not as a local call")


def _expert_mm_local(node: Node, ctx: LocalContext) -> LocalCall:
    return LocalCall("kernels.expert_mm", [arg(node, "rows"), arg(node, "weight"), arg(node, "route")])


register(DISPATCH, local=_run_by_backends, on_axis=_dispatch_on_axis,
         doc="expert parallelism's dispatch: (token, expert) rows sorted by expert; all-to-all on its axis")(_dispatch)
register(EXPERT_MM, local=_expert_mm_local, on_axis=_expert_mm_on_axis,
         doc="the grouped matmul of the experts on rows sorted by expert")(_expert_mm)
register(COMBINE, local=_run_by_backends, on_axis=_combine_on_axis,
         doc="expert parallelism's combine: rows back to their tokens, weighted and summed; all-to-all on its "
             "axis")(_combine)


def logical_op(name: str):
    """A MoE op on meta tensors, for types: its output shapes and dtypes. Its values come from the backends
    (``backends/runtime/moe.py``, which the virtual mesh runs too)."""
    import torch

    def typed_only(fn):
        def run(*args, **kwargs):
            if any(isinstance(a, torch.Tensor) and a.device.type != "meta" for a in args):
                raise NotImplementedError(f"{name} is computed by the backends (virtual mesh, emitted programs); "
                                          "called here on real tensors, it types them only (meta tensors)")
            return fn(*args, **kwargs)
        return run

    def dispatch(hidden, top_k_index, *, experts: int, axis: str, ranks: int, chunks: int = 1):
        rows = hidden.new_empty(top_k_index.numel(), hidden.shape[-1])
        return rows, torch.empty(ranks, experts, dtype=torch.int64, device=hidden.device)

    def expert_mm(rows, weight, route, *, axis: str):
        return rows.new_empty(rows.shape[0], weight.shape[2], dtype=torch.promote_types(rows.dtype, weight.dtype))

    def combine(rows, top_k_index, top_k_weights, route, *, experts: int, axis: str, chunks: int = 1):
        dtype = torch.promote_types(rows.dtype, top_k_weights.dtype)
        return rows.new_empty(top_k_index.shape[0], rows.shape[-1], dtype=dtype)

    return typed_only({DISPATCH: dispatch, EXPERT_MM: expert_mm, COMBINE: combine}[name])
