"""Intra-op SBP assignment: one layout per op (and per parameter) minimising time, solved exactly.

The problem (a :class:`~passes.planner.pairwise.PairwiseProblem`): every op picks one of its N-D
signatures (``ir.ops.registry.nd_signatures``), at the cost of its forward and backward compute on the
local shards; every value flowing from a producer to a consumer costs the cheapest boxing between the
producer's output layout and the layout the consumer reads (``passes.boxing.boxing_path`` with
:class:`cost.boxing.ClusterBoxingCost`, which prices each collective on the devices of its mesh axis,
its backward adjoint included when the value carries a gradient: the cost ``compile()`` chooses
chains by, so the compiled program runs what was priced here); a parameter left to the planner
picks its storage layout, and a ``B`` storage costs the all-reduce of its gradient over that axis.

**Repeated blocks.** A stack of ``N`` identical blocks is solved as one block: the problem holds the
prologue, block 0 and the epilogue; the block's unary and internal edge costs count ``N`` times, the
edge from the prologue into the block once, and a *loop edge* from the block's output back to its own
input ``N - 1`` times (that is what block ``k`` reads from block ``k - 1``). The optimum is the best
assignment that gives every block the same layouts, which is what a strategy's ``blocks.*`` globs
express; :func:`passes.planner.pairwise.solve_dp` solves it exactly (the loop edge only joins the
block's output to its input in the elimination).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Callable

from cluster import Cluster, Device
from cost.boxing import ClusterBoxingCost
from cost.collectives import collective_time
from cost.ops import Precision, compute_seconds, peak_flops
from cost.segments import (BATCH_SYMBOL, CommRecord, ComputeRecord, CostContext, Profile, compute_record,
                           concrete_shape, keeps_for_backward, op_kind, op_work, param_record, region_inputs,
                           segment_cost)
from ir.core import Graph, Node, Value
from ir.recompute import RECOMPUTE_ATTR
from ir.gradients import GradientFlow, gradient_flow
from ir.layers import POST, PRE, LayerStructure
from ir.ops.comm import LOCAL_COMM_OPS
from ir.ops.registry import nd_signatures, splits_divide
from ir.sbp import B, Split, format_nd_sbp
from ir.types import Mesh, TensorType
from passes.boxing import BoxingError, boxing_path
from passes.grad_sync import DEFAULT_BUCKET_BYTES
from passes.planner.pairwise import PairEdge, PairwiseProblem, Solution, solve_dp, solve_ilp, solve_z3


# --------------------------------------------------------------------------------------------------
# What to assign
# --------------------------------------------------------------------------------------------------


@dataclass
class LayoutRequest:
    """What to assign: the mesh, where its axes run, the device that computes, and the constraints."""

    mesh: Mesh
    cluster: Cluster
    groups: tuple
    """Per mesh axis, the devices of one group along it (collectives are priced on these)."""
    device: Device
    dims: dict
    """Symbol bindings at the reference microbatch (``batch`` included)."""
    precision: Precision
    train: bool = True
    fixed: dict = field(default_factory=dict)
    """Value name -> N-D SBP for sources whose layout is given (inputs, buffers, pinned parameters)."""
    free_params: bool = False
    """Whether parameters not in ``fixed`` are decision variables (else they are stored ``B``)."""
    hints: dict = field(default_factory=dict)
    """Node name -> required N-D SBP of its first output (``None`` entries: free)."""
    prices: dict = field(default_factory=dict, compare=False, repr=False)
    """Conversions and op times already priced, and values' types at ``dims``. Both depend only on the mesh,
    cluster, groups, device, dims, precision and ``train``, so requests that share those (the planner's switches
    on one degree) may share this dict; the constraints (``fixed``, ``hints``) never enter them."""
    blocks: int | None = None
    """Identical blocks the graph's stack stands for (None: the captured number): a model captured with two
    blocks standing for more (``BLOCK_COUNT_ATTR``) weighs its block against the rest of the graph as the whole
    stack would, and so gets the whole stack's layouts."""

    def boxing_cost(self, backward: bool) -> ClusterBoxingCost:
        """The boxing cost for values with (or without) a gradient (one per request: it remembers the
        collectives it priced)."""
        key = ("boxing cost", backward and self.train)
        if key not in self.prices:
            self.prices[key] = ClusterBoxingCost(self.cluster, tuple((tuple(g),) for g in self.groups),
                                                 self.precision.scale, backward and self.train)
        return self.prices[key]


# --------------------------------------------------------------------------------------------------
# The compact problem
# --------------------------------------------------------------------------------------------------


@dataclass
class _Unit:
    """An op of the compact problem: its segment (pre / block / post) and how often it runs."""

    node: Node
    segment: str
    weight: int


@dataclass
class _Source:
    """Where a consumer's input comes from: a value of the compact problem, counted ``weight`` times;
    ``boundary``: which block copies see it (``first``, ``rest`` or ``all``)."""

    value: Value
    weight: int
    boundary: str = "all"


class LayoutProblem:
    """The pairwise problem of one graph (compacted over its repeated blocks) for one request."""

    def __init__(self, graph: Graph, structure: LayerStructure, request: LayoutRequest):
        self.graph = graph
        self.structure = structure
        self.request = request
        self.gradients = gradient_flow(graph)
        self.grad = self.gradients.values
        self.repeated = structure.uniform and structure.num_layers >= 2
        self.units = self._units()
        self.unit_of = {id(u.node): k for k, u in enumerate(self.units)}
        self.vars: list = []          # ("node", unit index) or ("param", value)
        self.choices: list = []       # per var: list of (inputs, outputs)
        self.unary: list = []
        self.edges: list = []
        self.edge_info: list = []     # per edge: (value, consumer unit, input position, weight, boundary, producer side)
        self.fixed_boxing: list = []  # (unit, input position, value, src sbp, weight, boundary)
        self.self_boxing: list = []   # (unit, input position, value, weight, boundary): reads its own output
        self._unit_key: dict = {}     # unit index -> the key its variable is remembered by in the prices
        self._build()

    # -- structure ------------------------------------------------------------------------------
    def _units(self) -> list[_Unit]:
        s = self.structure
        if not self.repeated:
            return [_Unit(n, PRE, 1) for n in self.graph.nodes]
        n = self.request.blocks or s.num_layers
        return ([_Unit(x, PRE, 1) for x in s.pre] + [_Unit(x, "block", n) for x in s.blocks[0]]
                + [_Unit(x, POST, 1) for x in s.post])

    def sources(self, unit: _Unit, position: int, value: Value) -> list[_Source]:
        """The compact values a consumer input stands for, with how often each is read."""
        s = self.structure
        if not self.repeated:
            return [_Source(value, 1)]
        n = self.request.blocks or s.num_layers
        if unit.segment == POST and value.producer is not None and id(value.producer) not in self.unit_of:
            return [_Source(self._in_block0(value), 1)]  # the last block's output: block 0's, by position
        if unit.segment != "block":
            return [_Source(value, 1)]
        twin = s.blocks[1][s.position(unit.node)]
        twin_value = twin.input_values()[position]
        producer = twin_value.producer
        if producer is not None and s.segment_of(producer) == ("block", 0):
            return [_Source(value, 1, "first"), _Source(self._in_block0(twin_value), n - 1, "rest")]
        return [_Source(value, n)]

    def _in_block0(self, value: Value) -> Value:
        s = self.structure
        node = value.producer
        twin = s.blocks[0][s.position(node)]
        return twin.outputs[node.outputs.index(value)]

    # -- building -------------------------------------------------------------------------------
    def _build(self) -> None:
        param_var: dict[int, int] = {}
        for k, unit in enumerate(self.units):
            for position, value in enumerate(unit.node.input_values()):
                if self._is_free_param(value) and id(value) not in param_var:
                    param_var[id(value)] = self._add_param_var(value, unit)
            self._add_node_var(k, unit)
        self.param_var = param_var
        self._unit_var = {ref[1]: v for v, ref in enumerate(self.vars) if ref[0] == "node"}
        for k, unit in enumerate(self.units):
            for position, value in enumerate(unit.node.input_values()):
                for source in self.sources(unit, position, value):
                    self._connect(k, position, source, param_var)

    def _is_free_param(self, value: Value) -> bool:
        return self.request.free_params and value.kind == "param" and value.name not in self.request.fixed

    def _add_param_var(self, value: Value, unit: _Unit) -> int:
        req = self.request
        options = [tuple(c) for c in itertools.product(*[_storage_options(value.type, n) for n in req.mesh.shape])]
        options = [o for o in options if splits_divide(value.type, o, req.mesh)]
        weight = unit.weight if unit.segment == "block" else 1
        costs = [weight * self._param_sync_seconds(value, o) for o in options]
        self.vars.append(("param", value))
        self.choices.append([((), (o,)) for o in options])
        self.unary.append(costs)
        return len(self.vars) - 1

    def _param_sync_seconds(self, value: Value, storage: tuple) -> float:
        """What storing ``value`` as ``storage`` adds to the gradient all-reduces: its bytes' share of a bucket
        (``grad_sync`` reduces gradients in buckets, so a small parameter does not pay a call's latency)."""
        req = self.request
        if not req.train:
            return 0.0
        record = param_record(value, storage, req.mesh, True, req.precision)
        total = 0.0
        nbytes = record.reduced_bytes
        for axis in record.grad_axes:
            group = req.groups[req.mesh.axis_index(axis)]
            total += collective_time("all_reduce", DEFAULT_BUCKET_BYTES + nbytes, group, req.cluster) - \
                collective_time("all_reduce", DEFAULT_BUCKET_BYTES, group, req.cluster)
        return total

    def _add_node_var(self, k: int, unit: _Unit) -> None:
        """The variable of ``unit``'s op: its layouts (those the request's hint allows) and the seconds of every
        run of it under each. Both are remembered with the prices: the refinement solves the same graph again
        under other parameter storages, which change only what converting the parameters costs."""
        req = self.request
        hint = req.hints.get(unit.node.name)
        key = ("unit", id(self.graph), unit.node.name, unit.segment, unit.weight, hint)
        self._unit_key[k] = key
        if key not in req.prices:
            candidates = self._candidates(unit, hint)
            req.prices[key] = (candidates, [self._unit_seconds(unit, c) for c in candidates])
        candidates, seconds = req.prices[key]
        self.vars.append(("node", k))
        self.choices.append(candidates)
        self.unary.append(list(seconds))  # connecting adds the conversions from fixed layouts to it

    def _candidates(self, unit: _Unit, hint: tuple | None) -> list:
        """The layouts (inputs, outputs) of ``unit``'s op on the request's mesh that ``hint`` allows."""
        mesh = self.request.mesh
        candidates = [c for c in nd_signatures(unit.node, mesh) if _uses_real_axes(c, mesh)]
        if hint is not None:
            candidates = [c for c in candidates if all(h is None or a == h for a, h in zip(c[1][0], hint))]
            if not candidates:
                wanted = ", ".join("*" if h is None else str(h) for h in hint)
                raise ValueError(f"the layout ({wanted}) asked for %{unit.node.name} ({unit.node.op}, module "
                                 f"{unit.node.attrs.get('module', '?')}) is not a valid layout of that op")
        return candidates

    def later_twin(self, node: Node) -> Node:
        """For an op of block 0, the op that stands for it in the blocks after the first: block 1's, at the same
        position. It reads its input from a block where block 0 reads the prefix's, so autograd may compute and
        sum other gradients for it (block 0's input may have none)."""
        s = self.structure
        return s.blocks[1][s.position(node)]

    def _unit_seconds(self, unit: _Unit, choice: tuple) -> float:
        """Seconds of every run of ``unit``'s op with layouts ``choice``: a block's op runs once as block 0 runs
        it and ``weight - 1`` times as the later blocks do."""
        if unit.segment != "block":
            return unit.weight * self._op_seconds(unit.node, choice)
        first = self._op_seconds(unit.node, choice)
        twin = self.later_twin(unit.node)
        later = first if self.gradients.same_flow(unit.node, twin) else self._op_seconds(twin, choice)
        return first + (unit.weight - 1) * later

    def _op_seconds(self, node: Node, choice: tuple) -> float:
        key = ("op", id(self.graph), node.name, choice, self.gradients.has_grad(node))
        if key not in self.request.prices:
            self.request.prices[key] = self._price_op(node, choice)
        return self.request.prices[key]

    def _price_op(self, node: Node, choice: tuple) -> float:
        req = self.request
        record = compute_record(node, choice[0], choice[1], self.gradients)
        flops, nbytes, backward, backward_bytes = op_work(record, req.dims, req.mesh, req.precision)
        peak, bandwidth = peak_flops(req.device, req.precision), req.device.memory_bandwidth_Bps
        fwd_efficiency, bwd_efficiency = req.device.efficiency_of(*op_kind(record.op), flops=flops)
        seconds = float(compute_seconds(flops, nbytes, peak, bandwidth, fwd_efficiency))
        if record.has_grad and req.train:
            seconds += float(compute_seconds(backward, backward_bytes, peak, bandwidth, bwd_efficiency))
        return seconds

    def _connect(self, k: int, position: int, source: _Source, param_var: dict) -> None:
        value = source.value
        consumer = self._var_of_unit(k)
        if value.producer is not None and id(value.producer) in self.unit_of:
            producing_unit = self.unit_of[id(value.producer)]
            producer = self._var_of_unit(producing_unit)
            out_index = value.producer.outputs.index(value)
            src_keys = [c[1][out_index] for c in self.choices[producer]]
            ends = (self._unit_key[producing_unit], out_index, self._unit_key[k], position)
        elif id(value) in param_var:
            producer = param_var[id(value)]
            src_keys = [c[1][0] for c in self.choices[producer]]
            ends = None  # a parameter's layouts are what the refinement's trials change
        else:
            src = self._fixed_sbp(value)
            costs = self.unary[consumer]
            for c, choice in enumerate(self.choices[consumer]):
                costs[c] += source.weight * self.boxing_seconds(value, src, choice[0][position])
            self.fixed_boxing.append((k, position, value, src, source.weight, source.boundary))
            return
        dst_keys = [c[0][position] for c in self.choices[consumer]]
        if producer == consumer:  # an op reading its own output of the previous block
            for c, (src, dst) in enumerate(zip(src_keys, dst_keys)):
                self.unary[consumer][c] += source.weight * self.boxing_seconds(value, src, dst)
            self.self_boxing.append((k, position, value, source.weight, source.boundary))
            return
        table = self._edge_table(value, src_keys, dst_keys, source.weight, ends)
        if producer < consumer:
            edge = PairEdge(producer, consumer, src_keys, dst_keys, table)
        else:  # a loop edge: the block's output feeds its own input in the next block
            edge = PairEdge(consumer, producer, dst_keys, src_keys, {(b, a): c for (a, b), c in table.items()})
        self.edges.append(edge)
        self.edge_info.append((value, k, position, source.weight, source.boundary, producer < consumer))

    def _edge_table(self, value: Value, src_keys: list, dst_keys: list, weight: int, ends: tuple | None) -> dict:
        """The seconds of converting ``value`` between each of its producer's layouts (``src_keys``) and each its
        consumer reads it in (``dst_keys``), ``weight`` times. Remembered with the prices when both ends are ops
        (``ends``: their variables' keys and the output and input positions; None for a parameter's edge), whose
        layouts the refinement's trials do not change."""
        key = None if ends is None else ("edge", id(self.graph), value.name, weight, ends)
        if key in self.request.prices:
            return self.request.prices[key]
        table = {(a, b): weight * self.boxing_seconds(value, a, b) for a in set(src_keys) for b in set(dst_keys)}
        if key is not None:
            self.request.prices[key] = table
        return table

    def _var_of_unit(self, k: int) -> int:
        return self._unit_var[k]

    def _fixed_sbp(self, value: Value) -> tuple:
        fixed = self.request.fixed.get(value.name)
        return tuple(fixed) if fixed is not None else tuple(B for _ in self.request.mesh.shape)

    def boxing_seconds(self, value: Value, src: tuple, dst: tuple) -> float:
        """Seconds to convert ``value`` from ``src`` to ``dst`` (forward, plus backward when it has a gradient)."""
        if src == dst:
            return 0.0
        path = self._boxing_path(value, src, dst)
        return math.inf if path is None else path[0]

    def boxing_steps(self, value: Value, src: tuple, dst: tuple) -> list:
        """The collective steps of the cheapest conversion (as ``boxing_path`` returns them)."""
        if src == dst:
            return []
        path = self._boxing_path(value, src, dst)
        if path is None:
            raise BoxingError(f"no conversion of %{value.name} from {format_nd_sbp(src)} to {format_nd_sbp(dst)}")
        return path[1]

    def _boxing_path(self, value: Value, src: tuple, dst: tuple):
        """``boxing_path``'s (seconds, steps), or None where no conversion exists; priced once per concrete
        type, layouts and gradient (many values of a model share a shape)."""
        concrete, sizes = self._concrete(value)
        grad = id(value) in self.grad
        key = ("boxing", sizes, concrete.dtype, src, dst, grad)
        prices = self.request.prices
        if key not in prices:
            try:
                prices[key] = boxing_path(concrete, src, dst, self.request.mesh, self.request.boxing_cost(grad))
            except BoxingError:
                prices[key] = None
        return prices[key]

    def _concrete_type(self, value: Value) -> TensorType:
        return self._concrete(value)[0]

    def _concrete(self, value: Value) -> tuple[TensorType, tuple]:
        """The value's type at the request's dims, and its sizes as plain ints (a cheap key); remembered with
        the prices (they share the dims), so problems solved again under other constraints reuse it."""
        key = ("type", id(self.graph), id(value))
        prices = self.request.prices
        if key not in prices:
            sizes = tuple(max(1, int(round(d))) for d in concrete_shape(value.type, self.request.dims))
            prices[key] = (TensorType.of(list(sizes), value.type.dtype), sizes)
        return prices[key]

    def pairwise(self) -> PairwiseProblem:
        """The problem for the generic solvers (variables in graph order, parameters before first use)."""
        names = [f"%{self.units[ref[1]].node.name}" if ref[0] == "node" else f"param {ref[1].target}"
                 for ref in self.vars]
        return PairwiseProblem(self.unary, self.edges, names)


def _uses_real_axes(candidate: tuple, mesh: Mesh) -> bool:
    """False when a signature splits or sums over an axis of size 1 (the same as broadcasting there)."""
    for nd in list(candidate[0]) + list(candidate[1]):
        if any(n == 1 and s != B for s, n in zip(nd, mesh.shape)):
            return False
    return True


def _storage_options(t: TensorType, axis_size: int) -> list:
    """How a parameter may be stored on one axis: ``B``, or split on a dim the axis divides."""
    options = [B]
    if axis_size > 1:
        options += [Split(d) for d, size in enumerate(t.shape) if size.is_Integer and int(size) % axis_size == 0]
    return options


# --------------------------------------------------------------------------------------------------
# Solving and turning the result into costs
# --------------------------------------------------------------------------------------------------

SOLVERS: dict[str, Callable[[PairwiseProblem], Solution]] = {"dp": solve_dp, "ilp": solve_ilp, "z3": solve_z3}


@dataclass
class LayoutSolution:
    """The solved layouts: per node its (input SBPs, output SBPs), per free parameter its storage SBP."""

    problem: LayoutProblem
    solution: Solution
    node_choice: dict
    """Node name -> (input N-D SBPs, output N-D SBPs)."""
    param_sbp: dict
    """Parameter ``state_dict`` name -> stored N-D SBP (free and fixed parameters)."""

    @property
    def cost(self) -> float:
        """The objective (seconds per step of the solved part, one microbatch at the reference size)."""
        return self.solution.cost

    def storage_options(self) -> dict:
        """The parameters whose storage the solver chose: ``state_dict`` name -> the storages it could
        have chosen (N-D SBPs; the chosen one among them)."""
        return {ref[1].target: [choice[1][0] for choice in self.problem.choices[v]]
                for v, ref in enumerate(self.problem.vars) if ref[0] == "param"}

    def storage_groups(self) -> list[tuple[str, ...]]:
        """The parameters of :meth:`storage_options` that one op reads together (a norm's weight and bias, a
        linear layer's weight and bias), as tuples of ``state_dict`` names."""
        free = self.storage_options()
        groups = {tuple(sorted({v.target for v in node.input_values() if v.kind == "param" and v.target in free}))
                  for node in self.problem.graph.nodes}
        return sorted(g for g in groups if len(g) > 1)

    def every_node_choice(self) -> dict:
        """:attr:`node_choice` for every node of the graph: the nodes of blocks 1.. take their block-0
        twin's layouts (the compact problem solves one block for all)."""
        choices = dict(self.node_choice)
        problem = self.problem
        if problem.repeated:
            first = problem.structure.blocks[0]
            for block in problem.structure.blocks[1:]:
                for twin, node in zip(first, block):
                    choices[node.name] = self.node_choice[twin.name]
        return choices


def solve_layouts(graph: Graph, structure: LayerStructure, request: LayoutRequest, solver: str = "dp"
                  ) -> LayoutSolution:
    """Assign layouts to every op of ``graph`` (compacted over its blocks) for ``request``."""
    problem = LayoutProblem(graph, structure, request)
    solution = SOLVERS[solver](problem.pairwise())
    node_choice, param_sbp = {}, {}
    for v, ref in enumerate(problem.vars):
        choice = problem.choices[v][solution.assignment[v]]
        if ref[0] == "node":
            node_choice[problem.units[ref[1]].node.name] = choice
        else:
            param_sbp[ref[1].target] = choice[1][0]
    for p in graph.params:
        if p.kind == "param" and p.target not in param_sbp:
            param_sbp[p.target] = problem._fixed_sbp(p)
    return LayoutSolution(problem, solution, node_choice, param_sbp)


def layout_profile(result: LayoutSolution, *, data_parallel: int, global_batch: int,
                   num_layers: int | None = None, regather: bool = False) -> Profile:
    """The :class:`Profile` of solved layouts: ``pre``, block 0, blocks 1.. (one shared cost), ``post``
    (``num_layers`` blocks in all, default the captured number). Ops the graph marks recomputed
    (``attrs["recompute"]``, e.g. by :func:`passes.recompute.mark_recompute`) form each segment's recomputed part.
    ``regather``: activations all-gathered for an op that saves them are kept as shards and gathered again in
    backward (the strategy's ``regather_activations``, as the ``regather`` pass marks them).

    The solved mesh prices one data-parallel replica; data parallelism (``data_parallel`` replicas, the
    batch split between them) is added by the estimator.
    """
    problem = result.problem
    req = problem.request
    ctx = CostContext(req.mesh, {k: v for k, v in req.dims.items() if k != BATCH_SYMBOL}, req.precision, req.train)
    records_of = [compute_record(unit.node, *result.node_choice[unit.node.name],
                                 problem.gradients, RECOMPUTE_ATTR in unit.node.attrs)
                  for unit in problem.units]
    entered: set = set()
    for unit_index, unit in enumerate(problem.units):
        if RECOMPUTE_ATTR in unit.node.attrs:
            records_of[unit_index] = replace(records_of[unit_index], region_inputs=region_inputs(
                unit.node, entered, lambda v, position, node=unit.node: _planned_layout(result, v, node, position)))
    comms = {key: [] for key in (PRE, "first", "rest", POST)}
    for unit_index, position, value, src, weight, boundary in _boxings(result):
        unit = problem.units[unit_index]
        dst = result.node_choice[unit.node.name][0][position]
        records = [CommRecord(op, axis, value.type, before, id(value) in problem.grad,
                              op == "comm.all_gather" and value.kind == "param")
                   for axis, op, _, before in _steps_with_sources(problem.boxing_steps(value, src, dst), src)
                   if op not in LOCAL_COMM_OPS]
        if regather and _regathered(unit.node, position, value, records, problem.grad):
            saver = records_of[unit_index]
            kept = list(saver.kept_sbps or [None] * len(saver.in_types))
            kept[position] = records[-1].sbp  # kept as the shard its last all-gather started from
            records_of[unit_index] = replace(saver, kept_sbps=tuple(kept))
            records[-1] = replace(records[-1], saved_by=saver)
        for key in _comm_keys(unit.segment, boundary):
            comms[key].extend(records)
    computes = {PRE: [], "block": [], "later": [], POST: []}
    for unit, record in zip(problem.units, records_of):
        computes[unit.segment].append(record)
        if unit.segment == "block":
            computes["later"].append(_with_gradients_of(problem.later_twin(unit.node), record, problem.gradients))
    params = _param_records(result, ctx)
    outputs = _segment_outputs(result)
    segments = [segment_cost(PRE, computes[PRE], comms[PRE], params[PRE], outputs[PRE], ctx)]
    if problem.repeated:
        n = num_layers or problem.structure.num_layers
        prefix = problem.structure.prefix
        first = segment_cost(f"{prefix}.0", computes["block"], comms["first"], params["block"], outputs["block"], ctx)
        rest = segment_cost(f"{prefix}.*", computes["later"], comms["rest"], params["block"], outputs["block"], ctx)
        segments += [first] + [rest] * (n - 1)
    segments.append(segment_cost(POST, computes[POST], comms[POST], params[POST], outputs[POST], ctx))
    tokens = int(req.dims.get("seq", 1))
    profile = Profile(segments, req.mesh, data_parallel, global_batch, tokens, req.train, req.precision,
                      analytic_axes=("dp",))
    if not result.solution.exact:
        profile.notes.append("the layout DP hit its state limit; layouts are near-optimal, not proven optimal")
    return profile


def _planned_layout(result: LayoutSolution, value: Value, consumer: Node, position: int) -> tuple:
    """The layout ``value`` has as its producer makes it (before any conversion for ``consumer``'s input
    ``position``); a value without a solved producer, as the consumer reads it."""
    producer = value.producer
    choice = result.node_choice.get(producer.name) if producer is not None else None
    return choice[1][producer.outputs.index(value)] if choice else result.node_choice[consumer.name][0][position]


def _with_gradients_of(node: Node, record: ComputeRecord, gradients: GradientFlow) -> ComputeRecord:
    """``record`` with the gradients autograd computes and sums for ``node`` (another block's copy of its op)."""
    return replace(record, has_grad=gradients.has_grad(node), grad_inputs=gradients.input_grads(node),
                   accumulated_inputs=gradients.accumulating_inputs(node))


def _regathered(node: Node, position: int, value: Value, records: list, grad: set) -> bool:
    """Whether the conversion of ``node``'s input ``position`` (``value``, by ``records``) ends in an all-gather
    of an activation that ``node`` saves for backward, which ``regather_activations`` keeps as the shard (the
    ``regather`` pass's rule, :func:`cost.segments.keeps_for_backward`)."""
    return (bool(records) and records[-1].op == "comm.all_gather" and value.kind not in ("param", "buffer")
            and id(value) in grad and keeps_for_backward(node, position))


def _comm_keys(segment: str, boundary: str) -> list[str]:
    if segment != "block":
        return [segment]
    return {"first": ["first"], "rest": ["rest"]}.get(boundary, ["first", "rest"])


def _boxings(result: LayoutSolution):
    """(unit, input position, value, source SBP, weight, boundary) for every conversion the solution needs."""
    problem = result.problem
    for (value, unit_index, position, weight, boundary, forward), edge in zip(problem.edge_info, problem.edges):
        producer_var = edge.a if forward else edge.b
        choice = problem.choices[producer_var][result.solution.assignment[producer_var]]
        ref = problem.vars[producer_var]
        src = choice[1][0] if ref[0] == "param" else choice[1][value.producer.outputs.index(value)]
        yield unit_index, position, value, src, weight, boundary
    yield from problem.fixed_boxing
    for unit_index, position, value, weight, boundary in problem.self_boxing:
        node = problem.units[unit_index].node
        src = result.node_choice[node.name][1][node.outputs.index(value)]
        yield unit_index, position, value, src, weight, boundary


def _steps_with_sources(steps: list, src: tuple):
    """Boxing steps with the SBP each one starts from."""
    before = src
    for axis, op, kwargs, new in steps:
        yield axis, op, kwargs, before
        before = new


def _param_records(result: LayoutSolution, ctx: CostContext) -> dict:
    """Per segment, the records of the parameters it reads first; a parameter the first and the last segment
    both read (a tied embedding) has a record in each, as a pipeline holds a copy on each of their stages."""
    problem = result.problem
    out = {PRE: [], "block": [], POST: []}
    recorded: dict[int, set] = {}
    for unit in problem.units:
        for value in unit.node.input_values():
            if value.kind != "param":
                continue
            segments = recorded.setdefault(id(value), set())
            if segments and not (segments == {PRE} and unit.segment == POST):
                continue
            segments.add(unit.segment)
            out[unit.segment].append(param_record(value, result.param_sbp[value.target], ctx.mesh, ctx.train,
                                                       ctx.precision))
    return out


def _segment_outputs(result: LayoutSolution) -> dict:
    """Per segment: the (type, SBP) of values a pipeline cut right after it would send."""
    problem = result.problem
    out: dict[str, dict] = {PRE: {}, "block": {}, POST: {}}
    for unit in problem.units:
        for position, value in enumerate(unit.node.input_values()):
            for source in problem.sources(unit, position, value):
                produced = source.value.producer
                if produced is None or id(produced) not in problem.unit_of:
                    continue
                origin = problem.units[problem.unit_of[id(produced)]].segment
                sbp = result.node_choice[produced.name][1][produced.outputs.index(source.value)]
                entry = (source.value.type, sbp)
                if origin == PRE and unit.segment != PRE:
                    out[PRE][id(source.value)] = entry
                    if unit.segment == "block" and source.boundary == "all":
                        out["block"][id(source.value)] = entry  # read by every block: crosses every cut
                elif origin == "block" and (source.boundary == "rest" or unit.segment == POST):
                    out["block"][id(source.value)] = entry
    return {segment: list(entries.values()) for segment, entries in out.items()}


def describe_layouts(result: LayoutSolution) -> list[str]:
    """Human-readable lines: each op's chosen output layout (for explanations and debugging)."""
    lines = []
    for unit in result.problem.units:
        outs = result.node_choice[unit.node.name][1]
        module = unit.node.attrs.get("module", "")
        lines.append(f"%{unit.node.name} {unit.node.op} [{module}]: {', '.join(format_nd_sbp(o) for o in outs)}")
    return lines
