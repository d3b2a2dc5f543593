"""SBP propagation: choose each node's signature, cheapest boxing of its inputs first.

Greedy in execution order, as OneFlow does: for every node, among the N-D signatures of its op
rule, take the one whose required input layouts are cheapest to reach from the layouts the inputs
already have, breaking ties by the local compute size and against partial outputs. Activation hints
from the strategy (``activations``, ``sequence_parallel``) restrict the choice for their nodes.

**Solved layouts.** With ``solved_layouts`` (which every ``"auto"`` plan with a tensor axis says), the
tensor axis is not laid out greedily: :meth:`passes.planner.evaluate.ModelView.strategy_layouts` solves
it exactly, by the cluster's cost, with the strategy's choices as constraints, the solve the planner
prices every candidate with. Each node then takes the signature its solved tensor-axis layouts allow
(the other axes still greedily), so the compiled program runs the layouts and collectives the planner
priced, whether compiled from ``"auto"`` or from the plan's text.

Elsewhere signatures are compared by the bytes their conversions move (at each dtype's element size),
not by time on the cluster: a greedy choice sees one node at a time, and on small tensors, where latency
dominates, time would prefer gathering a whole activation over all-reducing a few statistics (then
pay for it in every later node). Bytes grow with the tensors, as the work a wrong layout costs does.
The collectives that convert between the chosen layouts are then picked by the cluster's cost in the
``boxing`` pass (:func:`passes.boxing.boxing_cost`), as the planner prices them.
"""
from __future__ import annotations

import fnmatch
import logging

from ir.core import Graph, Node
from ir.ops.moe import routed_rows
from ir.ops.registry import nd_signatures, splits_divide
from ir.ops.shape_ops import _magnitude
from ir.sbp import IN_SBP_ATTR, PINNED_ATTR, B, Partial, Split, format_nd_sbp
from ir.types import Mesh
from cost.boxing import bytes_cost
from passes.boxing import BoxingError, at_example_dims, boxing_path
from passes.context_parallel import cp_attention_hints
from passes.manager import PassContext, register_pass
from strategy import Strategy, StrategyError, closest

PINNED_PENALTY = 1e30
NORM_OPS = ("aten.layer_norm.default", "aten.rms_norm.default")
PLAN_OPTIONS = "plan_options"
"""``PassContext.options`` key: the :class:`cost.estimate.PlanOptions` the planner priced with (the
tensor axis is solved with them; default ``PlanOptions()`` at the strategy's precision)."""
LOG = logging.getLogger("sbpc.propagate")


@register_pass("propagate", requires=("decomposed", "laid_out"), produces=("propagated",))
def propagate_pass(graph: Graph, ctx: PassContext) -> None:
    """Give every node output an SBP; record the input layouts each node needs (``in_sbp``) for boxing."""
    hints = _activation_hints(graph, ctx.strategy)
    pinned = graph.attrs.get(PINNED_ATTR, {})
    dims = graph.attrs.get("example_dims") or {}
    solved = _solved_tensor_axis(graph, ctx)
    routed = routed_rows(graph)
    for node in graph.nodes:
        mesh_name = _mesh_of(node, graph)
        mesh = graph.meshes[mesh_name]
        candidates = nd_signatures(node, mesh)
        if any(id(v) in routed for v in node.input_values()):
            candidates = _keeping_routed_rows(node, candidates, routed)
        hint = hints.get(id(node))
        if hint is not None:
            candidates = [c for c in candidates if _matches(c[1][0], hint)] or _no_hint_fit(node, hint)
        if node.name in solved and ctx.strategy.tensor_axis in mesh.axes:
            candidates = _on_axis(candidates, solved[node.name], mesh.axis_index(ctx.strategy.tensor_axis))
        ins, outs = min(candidates, key=lambda c: _score(node, c, mesh, pinned, dims))
        if ins:
            node.attrs[IN_SBP_ATTR] = list(ins)
        for v, s in zip(node.outputs, outs):
            v.sbp, v.mesh = s, mesh_name


def _solved_tensor_axis(graph: Graph, ctx: PassContext) -> dict[str, tuple]:
    """Node name -> (input SBPs, output SBPs) on the tensor axis, as the planner's solver lays it out for
    this strategy on ``ctx.cluster``; empty unless the strategy says ``solved_layouts`` and there is a cluster
    and a tensor axis of more than one device."""
    strategy, cluster = ctx.strategy, ctx.cluster
    axis = strategy.tensor_axis
    if not strategy.options.solved_layouts or cluster is None or axis is None or strategy.mesh_spec.size(axis) == 1:
        return {}
    from cost.estimate import PlanOptions
    from passes.planner.evaluate import ModelView
    options = ctx.options.get(PLAN_OPTIONS) or PlanOptions().for_plan_precision(strategy.precision)
    try:
        solution = ModelView(graph, ctx.train).strategy_layouts(strategy, cluster, options)
    except ValueError as error:  # a layout the solver cannot honour: the greedy choice reports it below
        LOG.info("tensor axis %s not solved (%s); laying it out greedily", axis, error)
        return {}
    return {name: (tuple(i[0] for i in ins), tuple(o[0] for o in outs))
            for name, (ins, outs) in solution.every_node_choice().items()}


def _on_axis(candidates: list, solved: tuple, axis: int) -> list:
    """The candidates whose layouts on ``axis`` are the solved ones (all of them when none is)."""
    ins, outs = solved
    matching = [c for c in candidates if len(c[0]) == len(ins) and len(c[1]) == len(outs)
                and all(a[axis] == b for a, b in zip(c[0], ins)) and all(a[axis] == b for a, b in zip(c[1], outs))]
    if not matching:  # e.g. the other axes' layouts rule it out at the example sizes
        LOG.info("no signature keeps the solved tensor-axis layouts %s; choosing greedily", solved)
    return matching or candidates


def _keeping_routed_rows(node: Node, candidates: list, routed: set[int]) -> list:
    """Signatures that read routed rows split over dim 0 exactly where they are: their pieces are uneven and
    data-dependent, so no collective may split or gather their rows (other dims convert as usual)."""
    def keeps(cand) -> bool:
        return all(id(v) not in routed or all((s == Split(0)) == (w == Split(0)) for s, w in zip(v.sbp, want))
                   for v, want in zip(node.input_values(), cand[0]))
    return [c for c in candidates if keeps(c)] or candidates


def _mesh_of(node: Node, graph: Graph) -> str:
    for v in node.input_values():
        if v.mesh is not None:
            return v.mesh
    return next(iter(graph.meshes))


def _score(node: Node, cand, mesh: Mesh, pinned: dict, dims: dict) -> tuple[float, float]:
    """(bytes converted, local output size): communication first, compute only breaks ties.

    Parameters whose layout at use is pinned (given by the user; gathered, for fsdp) are used in that
    layout whenever some signature allows it.
    """
    ins, outs = cand
    comm = 0.0
    for v, want in zip(node.input_values(), ins):
        if v.name in pinned and pinned[v.name] != want:
            comm += PINNED_PENALTY
        try:
            comm += boxing_path(at_example_dims(v.type, dims), v.sbp, want, mesh, bytes_cost)[0]
        except BoxingError:
            return float("inf"), 0.0
    # a symbolic dim (batch, sequence) that a split does not divide at the example sizes would fail at run time
    if not all(splits_divide(at_example_dims(v.type, dims), s, mesh) for v, s in zip(node.outputs, outs)):
        return float("inf"), 0.0
    compute = 0.0
    for v, s in zip(node.outputs, outs):
        ways = 1
        for entry, n in zip(s, mesh.shape):
            ways *= n if isinstance(entry, Split) else 1
        partial = any(isinstance(entry, Partial) for entry in s)
        compute += _magnitude(v.type.numel()) / ways * (1.01 if partial else 1.0)
    return round(comm, bytes_cost.digits), compute


def _matches(actual: tuple, hint: tuple) -> bool:
    return all(h is None or a == h for a, h in zip(actual, hint))


def _no_hint_fit(node: Node, hint: tuple):
    wanted = ", ".join("*" if h is None else str(h) for h in hint)
    raise StrategyError(f"activation layout ({wanted}) asked for %{node.name} ({node.op}, module "
                        f"{node.attrs.get('module', '?')}) is not a valid layout of that op")


def _activation_hints(graph: Graph, strategy: Strategy) -> dict[int, tuple]:
    """Per node id, the wanted output layout (None entries: free)."""
    mesh = graph.meshes[next(iter(graph.meshes))]
    hints: dict[int, tuple] = {}
    axis = strategy.tensor_axis  # sequence parallelism has one: strategy.normalize checks it
    if axis is not None:
        # Megatron-LM: norms run on sequence shards with sequence parallelism, else replicated.
        a = mesh.axis_index(axis)
        norm_layout = Split(1) if strategy.sequence_parallel else B
        for node in graph.nodes:
            if node.op in NORM_OPS and node.outputs[0].type.ndim >= 3:
                hints[id(node)] = tuple(norm_layout if i == a else None for i in range(mesh.ndim))
    hints.update(cp_attention_hints(graph, strategy))
    for layout in strategy.activations:
        last = last_nodes_of_modules(graph, layout.glob)
        if not last:
            modules = sorted({n.attrs.get("module", "") for n in graph.nodes} - {""})
            raise StrategyError(f"activation pattern {layout.glob!r} matches no module{closest(layout.glob, modules)}")
        per_axis = layout.per_axis()
        for node in last:
            hints[id(node)] = tuple(per_axis.get(a) for a in mesh.axes)
    return hints


def last_nodes_of_modules(graph: Graph, pattern: str) -> list[Node]:
    """The last node of every module matching ``pattern`` (an activation layout applies to its output)."""
    last: dict[str, Node] = {}
    for node in graph.nodes:
        module = node.attrs.get("module", "")
        if module and fnmatch.fnmatchcase(module, pattern):
            last[module] = node
    return list(last.values())


def format_choice(node: Node) -> str:
    """The chosen layouts of a node, for error messages and explanations."""
    return ", ".join(format_nd_sbp(v.sbp) for v in node.outputs)
