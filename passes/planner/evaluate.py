"""Pricing a strategy on a captured (not yet laid out) graph, without running the passes.

:class:`ModelView` holds what the planner derives once per graph: the graph with cross entropy
decomposed (per ``vocab_parallel`` setting, as the ``decompose`` pass would do it), its layer
structure, its example sizes, and a cache of solved layouts. :meth:`ModelView.evaluate` turns a
strategy into numbers: the tensor-parallel layouts of one data-parallel replica are solved by
:mod:`passes.planner.intra_op` with the strategy's own choices as constraints (pinned parameters,
activation layouts, sequence parallelism for norms, vocabulary-parallel embeddings; everything else
at its optimum), and the estimator adds data parallelism, the pipeline and memory.
"""
from __future__ import annotations

import copy
import fnmatch
import functools
import hashlib
from dataclasses import dataclass, replace
from typing import Any

import sympy

from cluster import Cluster
from cost.estimate import Estimate, PlanOptions, optimizer_name
from cost.experts import EXPERT_AXIS, ExpertBlocks, expert_blocks, with_expert_parallelism
from cost.ops import Precision
from cost.placement import DATA_AXIS, PlanShape, axis_groups, plan_shape
from cost.segments import BATCH_SYMBOL, CostContext, Profile, compute_record, op_kind, ring_exchange_items
from ir.core import Graph
from ir.layers import POST, PRE, LayerStructure, find_layers
from ir.sbp import B, Split
from ir.types import CONTEXT_AXIS, Mesh
from passes.manager import PassContext
from passes.planner.intra_op import LayoutRequest, LayoutSolution, layout_profile, solve_layouts
from passes.propagate import last_nodes_of_modules
from strategy import AUTO, Strategy, normalize

NORM_OPS = ("aten.layer_norm.default", "aten.rms_norm.default")
TENSOR_AXIS = "tp"


@dataclass
class Evaluation:
    """A strategy priced: the estimate and the shape/profile it came from."""

    strategy: Strategy
    shape: PlanShape
    profile: Profile
    estimate: Estimate
    layouts: LayoutSolution | None = None


BLOCK_COUNT_ATTR = "block_count"
"""Graph attribute: the number of identical blocks the captured graph stands for. The view prices the
first block and one shared cost for every later block (:func:`~passes.planner.intra_op.layout_profile`),
so a model captured with a few blocks (at least two) prices exactly as the deep one: this lets the
published-runs benchmark capture 2 blocks of a 128-block model."""


class ModelView:
    """A captured graph prepared for pricing many strategies quickly."""

    def __init__(self, graph: Graph, train: bool = True):
        self.graph = graph
        self.train = train and graph.loss is not None
        self.example_dims = dict(graph.attrs.get("example_dims") or {})
        self.fingerprint = hashlib.sha256(str(graph).encode()).hexdigest()[:16]
        self._variants: dict[bool, tuple[Graph, LayerStructure]] = {}
        self._solved: dict[tuple, LayoutSolution] = {}
        self._profiles: dict[tuple, Profile] = {}
        self._prices: dict[tuple, dict] = {}
        self.solves = 0

    # -- graph variants ----------------------------------------------------------------------------
    def variant(self, vocab_parallel: bool) -> tuple[Graph, LayerStructure]:
        """The graph as the ``decompose`` pass leaves it for this ``vocab_parallel`` setting."""
        if vocab_parallel not in self._variants:
            from passes.decompose import decompose_pass
            graph = self.graph.copy()  # decompose rewrites it
            decompose_pass(graph, PassContext(Strategy(), 1, self.train), vocab_parallel=vocab_parallel)
            self._variants[vocab_parallel] = (graph, find_layers(graph))
        return self._variants[vocab_parallel]

    @property
    def structure(self) -> LayerStructure:
        """The layer structure (of the plain variant)."""
        return self.variant(False)[1]

    @property
    def num_layers(self) -> int:
        """Identical blocks in the stack, as the layout problem prices them (0 when the graph has no two or
        more *uniform* blocks: then everything is one segment, as :class:`LayoutProblem` solves it); a graph
        whose ``attrs[BLOCK_COUNT_ATTR]`` is set stands for that many identical blocks."""
        structure = self.structure
        if not (structure.uniform and structure.num_layers >= 2):
            return 0
        return int(self.graph.attrs.get(BLOCK_COUNT_ATTR) or structure.num_layers)

    def global_batch(self, options: PlanOptions) -> int:
        """Samples per step."""
        return int(options.global_batch or self.example_dims.get(BATCH_SYMBOL, 1))

    # -- layouts -----------------------------------------------------------------------------------
    def layouts(self, cluster: Cluster, tp_group: tuple, options: PlanOptions, *, vocab_parallel: bool,
                sequence_parallel: bool, pins: dict | None = None, hints: dict | None = None,
                free_params: bool = True) -> LayoutSolution:
        """Solved tensor-parallel layouts of one replica (cached)."""
        pins, hints = dict(pins or {}), dict(hints or {})
        key = (cluster.fingerprint(), tp_group, cluster.device(tp_group[0]).kind, options.key(), vocab_parallel,
               sequence_parallel, tuple(sorted((k, str(v)) for k, v in pins.items())),
               tuple(sorted((k, str(v)) for k, v in hints.items())), free_params)
        if key not in self._solved:
            graph, structure = self.variant(vocab_parallel)
            tp = len(tp_group)
            mesh = Mesh.make([TENSOR_AXIS], [tp])
            fixed = {v.name: (B,) for v in graph.inputs}
            fixed.update({p.name: (B,) for p in graph.params if p.kind == "buffer"})
            by_target = {p.target: p for p in graph.params}
            for target, sbp in pins.items():
                fixed[by_target[target].name] = (sbp,)
            if vocab_parallel and tp > 1:
                for target in embedding_tables(graph, tp):
                    fixed.setdefault(by_target[target].name, (Split(0),))
            node_hints = {name: (sbp,) for name, sbp in hints.items()}
            if tp > 1:
                node_hints.update(norm_hints(graph, sequence_parallel))
            dims = {k: v for k, v in self.example_dims.items()}
            dims[BATCH_SYMBOL] = options.reference_batch
            prices = self._prices.setdefault(key[:4], {})  # the switches and constraints change no price
            request = LayoutRequest(mesh, cluster, (tuple(tp_group),), cluster.device(tp_group[0]), dims,
                                    Precision.resolve(options.precision, self.graph), self.train, fixed, free_params,
                                    node_hints, prices, blocks=self.num_layers or None)
            self._solved[key] = solve_layouts(graph, structure, request, options.solver)
            self.solves += 1
        return self._solved[key]

    def profile(self, solution: LayoutSolution, data_parallel: int, options: PlanOptions,
                context_parallel: int = 1, regather: bool = False) -> Profile:
        """The profile of solved layouts, for ``data_parallel`` replicas of ``context_parallel`` ranks each
        (``regather``: see :func:`~passes.planner.intra_op.layout_profile`)."""
        key = (id(solution), context_parallel, regather)
        if key not in self._profiles:
            if context_parallel > 1:  # the layouts' profile, with the ring's exchange
                plain = self.profile(solution, 1, options, regather=regather)
                self._profiles[key] = with_ring_attention(plain, solution, context_parallel)
            else:
                self._profiles[key] = layout_profile(solution, data_parallel=1, global_batch=self.global_batch(options),
                                                     num_layers=self.num_layers, regather=regather)
        return replace(self._profiles[key], batch_divisor=data_parallel * context_parallel)

    @functools.cached_property
    def sequence_length(self) -> int | None:
        """The example sequence length a cp axis would split (dim 1 of the batch-like inputs), None when the
        model has no attention or its inputs no common sequence dim."""
        if not any(op_kind(n.op)[1] == "attention" for n in self.graph.nodes):
            return None
        lengths = {sympy.sympify(v.type.shape[1]) for v in self.graph.inputs
                   if v.type.ndim > 1 and not v.type.shape[0].is_Integer}
        if len(lengths) != 1:
            return None
        length = lengths.pop()
        length = length.subs({s: self.example_dims[str(s)] for s in length.free_symbols if str(s) in self.example_dims})
        return int(length) if length.is_Integer else None

    # -- strategies --------------------------------------------------------------------------------
    def evaluate(self, strategy: Strategy | dict | str, cluster: Cluster, options: PlanOptions | None = None,
                 exact: bool = True) -> Evaluation:
        """Price a concrete strategy on ``cluster`` (anything :func:`strategy.normalize` reads)."""
        options = options or PlanOptions()
        strategy = normalize(strategy, cluster.world_size)
        shape = self.shape_of(strategy, cluster, options)
        tp_axis = strategy.tensor_axis
        solution = self.strategy_layouts(strategy, cluster, options, shape)
        ep = shape.size(EXPERT_AXIS)
        profile = self.profile(solution, shape.size(DATA_AXIS) * ep, options, shape.size(CONTEXT_AXIS),
                               strategy.regather_activations)
        if tp_axis and tp_axis != TENSOR_AXIS:
            profile = _rename_axis(profile, TENSOR_AXIS, tp_axis)
        if ep > 1 and self.experts(options) is not None:
            profile = with_expert_parallelism(profile, self.experts(options), ep, options.moe_imbalance,
                                              strategy.moe_overlap_chunks)
        estimate = options.estimator(profile, cluster).estimate(shape, exact)
        return Evaluation(strategy, shape, profile, estimate, solution)

    def strategy_layouts(self, strategy: Strategy, cluster: Cluster, options: PlanOptions,
                         shape: PlanShape | None = None) -> LayoutSolution:
        """The tensor-axis layouts a concrete strategy runs: solved on its first tensor-parallel group with
        the strategy's own choices as constraints (pinned parameters, activation layouts, sequence
        parallelism), everything else at its optimum. The planner prices these, and ``compile()``'s
        propagation lays the tensor axis out by them (one home for the choice)."""
        shape = shape or self.shape_of(strategy, cluster, options)
        tp_axis = strategy.tensor_axis
        tp_group = tuple(axis_groups(shape.stage_devices[0], shape.axes, shape.shape, tp_axis)[0]) if tp_axis \
            else (shape.stage_devices[0][0],)
        pins, hints = self.pins_and_hints(strategy, tp_axis)
        return self.layouts(cluster, tp_group, options, vocab_parallel=strategy.vocab_parallel,
                            sequence_parallel=strategy.sequence_parallel, pins=pins, hints=hints, free_params=False)

    def experts(self, options: PlanOptions) -> ExpertBlocks | None:
        """The blocks' mixture-of-experts layers (None: none, or no repeated blocks)."""
        if not self.num_layers:
            return None
        return expert_blocks(self.graph, self.structure.prefix, Precision.resolve(options.precision, self.graph))

    def shape_of(self, strategy: Strategy, cluster: Cluster, options: PlanOptions) -> PlanShape:
        """The numbers of a strategy on this model (see :func:`plan_shape`)."""
        return plan_shape(strategy, cluster.world_size, self.num_layers, self.structure.prefix,
                          self.global_batch(options), optimizer_name(options.optimizer))

    def pins_and_hints(self, strategy: Strategy, tp_axis: str | None) -> tuple[dict, dict]:
        """Tensor-axis layouts the strategy fixes: parameter targets -> SBP, node names -> output SBP."""
        if tp_axis is None:
            return {}, {}
        graph, _ = self.variant(strategy.vocab_parallel)
        pins = {}
        aliases = graph.attrs.get("aliases", {})
        for layout in strategy.params:
            sbp = layout.on(tp_axis)
            if sbp in (None, AUTO):
                continue
            for p in graph.params:
                names = [p.target] + [a for a, c in aliases.items() if c == p.target]
                if any(fnmatch.fnmatchcase(n, layout.glob) for n in names):
                    pins[p.target] = sbp
        hints = {}
        for layout in strategy.activations:
            sbp = layout.on(tp_axis)
            if sbp in (None, AUTO):
                continue
            for node in last_nodes_of_modules(graph, layout.glob):
                hints[node.name] = sbp
        return pins, hints


def with_ring_attention(profile: Profile, solution: LayoutSolution, ways: int) -> Profile:
    """``profile`` with context parallelism over ``ways`` ranks added the way the estimator adds data
    parallelism (axis ``cp`` analytic: each rank a share of every sequence's tokens, gradients summed over it):
    every attention's key/value exchange of ring attention (:func:`cost.segments.ring_exchange_items`) joins
    its segment's collectives."""
    problem = solution.problem
    req = problem.request
    ctx = CostContext(req.mesh, {k: v for k, v in req.dims.items() if k != BATCH_SYMBOL}, req.precision, req.train)
    items: dict[str, list] = {PRE: [], "block": [], POST: []}
    for unit in problem.units:
        node = unit.node
        if op_kind(node.op)[1] != "attention":
            continue
        ins, outs = solution.node_choice[node.name]
        record = compute_record(node, ins, outs, problem.gradients)
        values = node.input_values()
        items[unit.segment] += ring_exchange_items(record, [(values[i].type, ins[i]) for i in (1, 2)], ways,
                                                   CONTEXT_AXIS, ctx)
    count = len(profile.segments)
    segments, copies = [], {}
    for j, segment in enumerate(profile.segments):
        extra = items[PRE if j == 0 else POST if j == count - 1 else "block"]
        if extra and id(segment) not in copies:
            copies[id(segment)] = replace(segment, comms=list(segment.comms) + extra)
        segments.append(copies.get(id(segment), segment))
    return replace(profile, segments=segments, analytic_axes=tuple(profile.analytic_axes) + (CONTEXT_AXIS,))


def embedding_tables(graph: Graph, tp: int) -> list[str]:
    """Embedding weights looked up by graph inputs whose rows split over ``tp`` (vocabulary parallelism)."""
    out = []
    for node in graph.nodes:
        if node.op == "aten.embedding.default":
            weight, ids = node.input_values()[:2]
            if weight.kind == "param" and ids.kind == "input" and int(weight.type.shape[0]) % tp == 0:
                out.append(weight.target)
    return out


def norm_hints(graph: Graph, sequence_parallel: bool) -> dict:
    """Norm outputs on sequence shards (``S(1)``) with sequence parallelism, else replicated: as the
    propagation pass lays them out whenever there is a tensor-parallel axis."""
    layout = Split(1) if sequence_parallel else B
    return {n.name: (layout,) for n in graph.nodes if n.op in NORM_OPS and n.outputs[0].type.ndim >= 3}


def _rename_axis(profile: Profile, old: str, new: str) -> Profile:
    segments = []
    renamed: dict[int, Any] = {}
    for seg in profile.segments:
        if id(seg) not in renamed:
            clone = copy.copy(seg)
            clone.comms = [replace(c, axis=new if c.axis == old else c.axis) for c in seg.comms]
            clone.params = [replace(p, grad_axes=tuple(new if a == old else a for a in p.grad_axes))
                            for p in seg.params]
            renamed[id(seg)] = clone
        segments.append(renamed[id(seg)])
    return replace(profile, segments=segments)
