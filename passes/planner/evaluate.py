"""Pricing a strategy on a captured (not yet laid out) graph, without running the passes.

:class:`ModelView` holds what the planner derives once per graph: the graph with cross entropy
decomposed (per ``vocab_parallel`` setting, as the ``decompose`` pass would do it), its layer
structure, its example sizes, and a cache of solved layouts. :meth:`ModelView.evaluate` turns a
strategy dict into numbers: the tensor-parallel layouts of one data-parallel replica are solved by
:mod:`passes.planner.intra_op` with the strategy's own choices as constraints (pinned parameters,
activation layouts, sequence parallelism for norms, vocabulary-parallel embeddings; everything else
at its optimum), and the estimator adds data parallelism, the pipeline and memory.
"""
from __future__ import annotations

import copy
import fnmatch
import hashlib
from dataclasses import dataclass, replace
from typing import Any

from cluster import Cluster
from ir.core import Graph, Node
from ir.parser import parse
from ir.sbp import B, Split, parse_sbp
from ir.types import Mesh
from passes.manager import PassContext
from passes.planner.costs import BATCH_SYMBOL, Precision, Profile
from passes.planner.estimate import Estimate, Estimator
from passes.planner.intra_op import LayoutRequest, LayoutSolution, layout_profile, solve_layouts
from passes.planner.layers import LayerStructure, find_layers
from passes.planner.placement import (DATA_AXIS, PIPELINE_AXIS, PlacementError, PlanShape, axis_groups,
                                      even_layer_ranges, layer_ranges_from_cuts, recomputed_segments,
                                      stage_device_lists)
from passes.propagate import last_nodes_of_modules
from passes.strategy import normalize_strategy, tensor_axis

NORM_OPS = ("aten.layer_norm.default", "aten.rms_norm.default")
TENSOR_AXIS = "tp"


@dataclass
class PlanOptions:
    """How to price plans: numbers the graph does not say."""

    global_batch: int | None = None
    """Samples per step (default: the example inputs' batch size)."""
    precision: str = "fp32"
    """``fp32``/``tf32`` or mixed ``bf16``/``fp16`` (2-byte activations and weights, fp32 master copy)."""
    optimizer: str = "adamw"
    """Optimizer state to budget memory for: ``sgd``, ``sgd_momentum``, ``adam`` or ``adamw``."""
    reference_batch: int = 1
    """Samples per replica at which layouts are solved (their costs are then affine in the batch)."""
    overhead_s: float | None = None
    """Per-op launch time (backward ops count twice); None: what each device measured (``sbpc
    calibrate``), else :data:`~passes.planner.costs.DEFAULT_OP_OVERHEAD_S`."""
    memory_headroom: float = 0.9
    """Fraction of each device's memory a plan may use."""
    solver: str = "dp"
    """Intra-op solver: ``dp`` (fast, exact), ``ilp`` or ``z3`` (exact, slow)."""
    overlap_grad_sync: bool = True
    """Gradient all-reduces overlap the last microbatch's backward (DDP-style bucketing); False: they
    start after it, as in a runtime that synchronises once backward is done."""

    def key(self) -> tuple:
        """A hashable summary (cache keys)."""
        return (self.global_batch, self.precision, self.optimizer, self.reference_batch, self.overhead_s,
                self.memory_headroom, self.solver, self.overlap_grad_sync)

    def estimator(self, profile: Profile, cluster: Cluster) -> Estimator:
        """An :class:`Estimator` of ``profile`` on ``cluster`` with these options."""
        return Estimator(profile, cluster, self.overhead_s, self.memory_headroom, self.overlap_grad_sync)


def optimizer_name(spec: Any) -> str:
    """``("AdamW", {...})`` / ``"SGD"`` / ``("SGD", {"momentum": 0.9})`` -> a cost-model optimizer name."""
    name, kwargs = (spec if isinstance(spec, tuple) else (spec, {}))
    name = name if isinstance(name, str) else getattr(name, "__name__", str(name))
    name = name.lower()
    if name == "sgd" and (kwargs or {}).get("momentum"):
        return "sgd_momentum"
    return name if name in ("sgd", "adam", "adamw") else "adamw"


@dataclass
class Evaluation:
    """A strategy priced: the estimate and the shape/profile it came from."""

    strategy: dict
    shape: PlanShape
    profile: Profile
    estimate: Estimate
    layouts: LayoutSolution | None = None


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
        self.solves = 0

    # -- graph variants ----------------------------------------------------------------------------
    def variant(self, vocab_parallel: bool) -> tuple[Graph, LayerStructure]:
        """The graph as the ``decompose`` pass leaves it for this ``vocab_parallel`` setting."""
        if vocab_parallel not in self._variants:
            from passes.decompose import decompose_pass
            graph = parse(str(self.graph))  # a private copy (deepcopy recurses along long use chains)
            decompose_pass(graph, PassContext({"vocab_parallel": vocab_parallel}, 1, self.train))
            self._variants[vocab_parallel] = (graph, find_layers(graph))
        return self._variants[vocab_parallel]

    @property
    def structure(self) -> LayerStructure:
        """The layer structure (of the plain variant)."""
        return self.variant(False)[1]

    @property
    def num_layers(self) -> int:
        """Blocks in the stack (0 when the graph has no repeated blocks)."""
        return self.structure.num_layers

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
            request = LayoutRequest(mesh, cluster, (tuple(tp_group),), cluster.device(tp_group[0]), dims,
                                    Precision.of(options.precision), self.train, fixed, free_params, node_hints)
            self._solved[key] = solve_layouts(graph, structure, request, options.solver)
            self.solves += 1
        return self._solved[key]

    def profile(self, solution: LayoutSolution, data_parallel: int, options: PlanOptions) -> Profile:
        """The profile of solved layouts, for ``data_parallel`` replicas."""
        key = id(solution)
        if key not in self._profiles:
            self._profiles[key] = layout_profile(solution, data_parallel=1, global_batch=self.global_batch(options))
        return replace(self._profiles[key], batch_divisor=data_parallel)

    # -- strategies --------------------------------------------------------------------------------
    def evaluate(self, strategy: dict, cluster: Cluster, options: PlanOptions | None = None,
                 exact: bool = True) -> Evaluation:
        """Price a concrete strategy dict on ``cluster``."""
        options = options or PlanOptions()
        strategy = normalize_strategy(strategy, cluster.world_size)
        shape = self.shape_of(strategy, cluster, options)
        tp_axis = tensor_axis({"mesh": {a: n for a, n in strategy["mesh"].items() if a != PIPELINE_AXIS}})
        tp_group = tuple(axis_groups(shape.stage_devices[0], shape.axes, shape.shape, tp_axis)[0]) if tp_axis \
            else (shape.stage_devices[0][0],)
        pins, hints = self.pins_and_hints(strategy, tp_axis)
        solution = self.layouts(cluster, tp_group, options, vocab_parallel=bool(strategy.get("vocab_parallel")),
                                sequence_parallel=bool(strategy.get("sequence_parallel")), pins=pins, hints=hints,
                                free_params=False)
        profile = self.profile(solution, shape.size(DATA_AXIS), options)
        if tp_axis and tp_axis != TENSOR_AXIS:
            profile = _rename_axis(profile, TENSOR_AXIS, tp_axis)
        estimate = options.estimator(profile, cluster).estimate(shape, exact)
        return Evaluation(strategy, shape, profile, estimate, solution)

    def shape_of(self, strategy: dict, cluster: Cluster, options: PlanOptions) -> PlanShape:
        """The numbers of a strategy on this model (see :func:`plan_shape`)."""
        return plan_shape(strategy, cluster.world_size, self.num_layers, self.structure.prefix,
                          self.global_batch(options), optimizer_name(options.optimizer))

    def pins_and_hints(self, strategy: dict, tp_axis: str | None) -> tuple[dict, dict]:
        """Tensor-axis layouts the strategy fixes: parameter targets -> SBP, node names -> output SBP."""
        if tp_axis is None:
            return {}, {}
        graph, _ = self.variant(bool(strategy.get("vocab_parallel")))
        pins = {}
        aliases = graph.attrs.get("aliases", {})
        for pattern, spec in (strategy.get("params") or {}).items():
            text = spec if isinstance(spec, str) else spec.get(tp_axis)
            if text is None or text == "auto" or (isinstance(spec, str) and len(strategy["mesh"]) > 1):
                continue
            for p in graph.params:
                names = [p.target] + [a for a, c in aliases.items() if c == p.target]
                if any(fnmatch.fnmatchcase(n, pattern) for n in names):
                    pins[p.target] = parse_sbp(text)
        hints = {}
        for pattern, spec in (strategy.get("activations") or {}).items():
            text = spec if isinstance(spec, str) else spec.get(tp_axis)
            if text is None or text == "auto":
                continue
            for node in last_nodes_of_modules(graph, pattern):
                hints[node.name] = parse_sbp(text)
        return pins, hints


def plan_shape(strategy: dict, world_size: int, num_layers: int, prefix: str | None, global_batch: int,
               optimizer: str) -> PlanShape:
    """The numbers of a (normalised) strategy: stage meshes, stages, devices, microbatches, schedule,
    recomputation. Stages default to an even cut of the blocks, 1F1B and one microbatch per pipeline
    position; ``stage_devices`` may list one entry per position or per (virtual) stage."""
    mesh = {a: int(n) for a, n in strategy["mesh"].items()}
    axes = tuple(a for a in mesh if a != PIPELINE_AXIS)
    stage_shape = tuple(mesh[a] for a in axes)
    pp = mesh.get(PIPELINE_AXIS, 1)
    schedule = strategy.get("schedule") or ("1f1b" if pp > 1 else "none")
    if schedule == "auto":
        schedule = "1f1b" if pp > 1 else "none"
    virtual = int(strategy.get("virtual_stages") or 2) if schedule == "interleaved" else 1
    stages = pp * virtual
    if strategy.get("stage_layers"):
        ranges = [tuple(r) for r in strategy["stage_layers"]]
    elif strategy.get("stages"):
        ranges = layer_ranges_from_cuts(strategy["stages"], prefix, num_layers)
    else:
        ranges = even_layer_ranges(num_layers, stages) if stages > 1 or num_layers else [(0, -1)]
    if len(ranges) != stages:
        raise PlacementError(f"the strategy has {len(ranges)} stages but pp x virtual_stages = {stages}")
    given = strategy.get("stage_devices")
    devices = stage_device_lists(mesh, world_size, given[:pp] if given else None)
    microbatches = int(strategy.get("microbatches") or pp)  # the pipeline pass's default: one per position
    dp = mesh.get(DATA_AXIS, 1)
    if global_batch % (dp * microbatches):
        raise PlacementError(f"the global batch {global_batch} does not split into {microbatches} microbatches "
                             f"over dp={dp}; use a batch that is a multiple of {dp * microbatches}")
    fsdp = strategy.get("fsdp") or None
    recompute = recomputed_segments(strategy.get("recompute"), prefix, num_layers)
    return PlanShape(axes, stage_shape, pp, microbatches, schedule if stages > 1 else "none", virtual, ranges,
                     devices, recompute, fsdp, optimizer)


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
