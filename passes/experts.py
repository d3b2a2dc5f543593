"""Expert parallelism: mixture-of-experts layers whose experts are split over a mesh axis dispatch their
tokens by all-to-all.

transformers' experts (``grouped_mm_experts_forward``) sort the (token, expert) pairs by expert, gather
their hidden states, run the grouped matmuls (``transformers.grouped_mm_fallback``) with the cumulative
row counts per expert, weight the rows by the router and put them back in token order. When the stacked
expert weights of such a layer are split over an axis (``S(0)``, laid out by the strategy), this pass
writes the layer as ``moe.dispatch`` -> ``moe.expert_mm`` (each grouped matmul, the activation between
them unchanged) -> ``moe.combine`` on that axis (``ir/ops/moe.py``): propagation then keeps the tokens
split over the axis, and the ranks exchange rows with one all-to-all each way instead of gathering
every token and summing partial results.
"""
from __future__ import annotations

import warnings

import sympy

from ir.core import Graph, Node, Value
from ir.ops.moe import COMBINE, DISPATCH, EXPERT_MM, OverlapError, expert_layers, expert_weight, overlapped_layer
from ir.sbp import PINNED_ATTR, Split
from ir.types import Mesh, TensorType
from passes.manager import PassContext, register_pass



class ExpertsPatternError(ValueError):
    """A MoE layer with split experts whose graph is not transformers' grouped experts (named); it keeps the
    grouped matmul's own expert-parallel rule (``kernels.grouped_mm_of_experts``, partial sums)."""


@register_pass("experts", requires=("laid_out",), produces=("expert_dispatch",))
def experts_pass(graph: Graph, ctx: PassContext) -> None:
    """Each MoE layer whose experts are split over a mesh axis: dispatch and combine by all-to-all there (in the
    strategy's ``moe_overlap_chunks`` chunks of tokens)."""
    mesh = graph.meshes[next(iter(graph.meshes))]
    for sort, matmuls in expert_layers(graph):
        axis = _expert_axis(matmuls, mesh, graph.attrs.get(PINNED_ATTR, {}))
        if axis is not None:
            try:
                dispatch = _rewrite(graph, sort, matmuls, axis, mesh)
            except ExpertsPatternError as err:  # still correct: rows gathered, experts' results summed
                warnings.warn(f"sbpc: {err}; its experts run on gathered rows with partial sums instead", stacklevel=2)
                continue
            _chunk(graph, dispatch, ctx.strategy.moe_overlap_chunks)


def _chunk(graph: Graph, dispatch: Node, chunks: int) -> None:
    """Mark the layer's dispatch and combine to run in ``chunks`` chunks of tokens (where the experts' nodes
    between them can run chunk by chunk; else one warning and one chunk)."""
    if chunks <= 1:
        return
    try:
        layer = overlapped_layer(graph, dispatch)
    except OverlapError as err:
        warnings.warn(f"sbpc: {err}; it runs in one chunk", stacklevel=3)
        return
    for node in (layer.dispatch, layer.combine):
        node.kwargs["chunks"] = chunks


def _users(v: Value, op: str) -> list[Node]:
    return [u for u in v.uses if u.op == op]


def _only(nodes: list[Node], what: str, sort: Node) -> Node:
    if len(nodes) != 1:
        raise ExpertsPatternError(f"MoE layer at %{sort.name} (module {sort.attrs.get('module', '?')}): expected one "
                                  f"{what}, found {len(nodes)}; expert parallelism by all-to-all reads transformers' "
                                  "grouped experts (experts_implementation 'grouped_mm')")
    return nodes[0]


def _expert_axis(matmuls: list[Node], mesh: Mesh, pinned: dict) -> str | None:
    """The mesh axis over which the layer's expert weights are used split (``S(0)``; not FSDP's storage,
    gathered at use), or None."""
    if not matmuls:
        return None
    used = [pinned.get(w.name, w.sbp) or () for w in map(expert_weight, matmuls)]
    axes = {a for layout in used for a, s in zip(mesh.axes, layout) if s == Split(0)}
    return next((a for a in mesh.axes if a in axes and mesh.shape[mesh.axis_index(a)] > 1), None)


def _rewrite(graph: Graph, sort: Node, matmuls: list[Node], axis: str, mesh: Mesh) -> Node:
    """Replace the layer's sort, gathers, offsets and un-permutation by dispatch and combine (returned: the
    dispatch)."""
    flat_ids = sort.input_values()[0]
    top_k_index = flat_ids.producer.input_values()[0]
    perm = sort.outputs[1]
    divide = _only(_users(perm, "aten.floor_divide.default"), "floor_divide of the sort's permutation", sort)
    gather = _only(_users(divide.outputs[0], "aten.index.Tensor"), "gather of the hidden states", sort)
    hidden = gather.input_values()[0]
    weight_gather = _only([u for u in _users(perm, "aten.index.Tensor") if u.input_values()[0] is not hidden],
                          "gather of the router weights", sort)
    top_k_weights = weight_gather.input_values()[0].producer.input_values()[0]
    weighting = _only(_following(weight_gather.outputs[0], "aten.mul.Tensor"), "router weighting", sort)
    total = _only(_following(weighting.outputs[0], "aten.sum.dim_IntList"), "sum over each token's experts", sort)
    experts = int(expert_weight(matmuls[0]).type.shape[0])
    ranks = mesh.shape[mesh.axis_index(axis)]
    attrs = {"module": sort.attrs.get("module", "")}

    dispatch = graph.create_node(DISPATCH, [hidden, top_k_index], {"experts": experts, "axis": axis, "ranks": ranks},
                                 [gather.outputs[0].type, _route_type(ranks, experts)],
                                 out_names=["routed", "route"], attrs=attrs, before=sort)
    rows, route = dispatch.outputs
    graph.replace_all_uses(gather.outputs[0], rows)
    for mm in matmuls:
        x, w, _ = mm.input_values()
        node = graph.create_node(EXPERT_MM, [x, w, route], {"axis": axis}, [mm.outputs[0].type],
                                 out_names=["expert_mm"], attrs=dict(mm.attrs), before=mm)
        graph.replace_all_uses(mm.outputs[0], node.outputs[0])
    expert_out = next(v for v in weighting.input_values() if not _derives_from(v, weight_gather.outputs[0]))
    combine = graph.create_node(COMBINE, [expert_out, top_k_index, top_k_weights, route],
                                {"experts": experts, "axis": axis}, [total.outputs[0].type], out_names=["combined"],
                                attrs=dict(total.attrs), before=total)
    graph.replace_all_uses(total.outputs[0], combine.outputs[0])
    _remove_dead(graph, start=graph.nodes.index(dispatch), stop=graph.nodes.index(total))
    if not flat_ids.uses:
        graph.remove_node(flat_ids.producer)
    return dispatch


def _route_type(ranks: int, experts: int) -> TensorType:
    """``route``: the counts of pairs per (token block, expert)."""
    return TensorType((sympy.Integer(ranks), sympy.Integer(experts)), "i64")


def _following(v: Value, op: str, depth: int = 4) -> list[Node]:
    """Nodes of ``op`` reading ``v`` or a value computed from it within ``depth`` steps."""
    found, frontier = [], [v]
    for _ in range(depth):
        users = [u for x in frontier for u in x.uses]
        found += [u for u in users if u.op == op]
        frontier = [o for u in users if u.op != op for o in u.outputs]
    return list(dict.fromkeys(found))


def _derives_from(v: Value, source: Value, depth: int = 3) -> bool:
    frontier = [v]
    for _ in range(depth):
        if any(x is source for x in frontier):
            return True
        frontier = [i for x in frontier if x.producer is not None for i in x.producer.input_values()]
    return any(x is source for x in frontier)


def _remove_dead(graph: Graph, start: int, stop: int) -> None:
    """Remove the nodes in ``graph.nodes[start:stop]`` whose outputs nothing reads any more, last first."""
    for node in reversed(graph.nodes[start:stop + 1]):
        if node.op not in (DISPATCH, EXPERT_MM, COMBINE) and not any(o.uses for o in node.outputs) \
                and not any(o in graph.outputs for o in node.outputs):
            graph.remove_node(node)
