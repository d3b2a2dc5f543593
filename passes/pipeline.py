"""Pipeline parallelism: cut the SBP graph into stages, split the loss into microbatches, schedule.

Two passes run last (``decompose, layouts, propagate, boxing, grad_sync, pipeline, schedule``):
layouts are chosen on the ``world`` mesh (the strategy's mesh without ``pp``), then ``pipeline``
does steps 1-3 and ``schedule`` step 4:

1. **Microbatches.** The graph comes to describe one microbatch, and its loss becomes the
   microbatch's *share* of the full-batch loss, so that summing the shares (and accumulating
   their gradients) gives exactly the full-batch step. A mean written as ``sum / count`` (what
   ``decompose`` makes of a mean cross entropy) keeps its per-microbatch sum but divides by the
   count of the *whole* batch: the nodes computing the count are cloned and marked
   ``whole_batch`` (run once per step on the whole batch). Other means are divided by the number
   of microbatches (equal microbatches make that exact); sums need nothing. A cross entropy that
   ``decompose`` left as a mean (class weights, label smoothing) is refused: microbatches count
   different numbers of targets, so the mean of their means would not be the full mean, and so is a
   training BatchNorm: each microbatch would be normalised with its own statistics.
2. **Stages.** K = pp x virtual_stages stages, cut where a module begins (``"stages":
   ["blocks.2"]``), at layer ranges (``"stage_layers": [[0, 1], [2, 3]]``), or where the
   per-op FLOP estimate (:func:`cost.ops.op_flops`) is best balanced. Stage s runs on
   mesh ``stage<s>``: the devices of pipeline position ``s % pp`` (``stage_devices`` overrides),
   with the non-pp axes. Parameters used on several stages get a copy per stage, their gradients
   summed after backward (``attr tied_params``). Values computed from inputs and constants only
   (position ids, causal masks, rotary tables) are computed on each stage that reads them rather
   than relayed, so unmodified models cut anywhere send only their residual stream.
3. **Transfers.** Every value live across a cut crosses it in a ``comm.send_recv`` node (values
   needed further on are relayed stage by stage). The crossing values are ordered in *slots*: a
   value passed on keeps its slot and a new value takes the slot of one that died, so when every
   cut carries the same slot types (a residual stream) any stage can be skipped (identity) or
   reordered, which SkipPipe and inference through a subset of stages need.
4. **Schedule.** GPipe, 1F1B, interleaved 1F1B, the zero-bubble ZB-H1, ZB-V and DualPipeV
   (``ir.schedules.SCHEDULES``; the V-shaped ones put stages s and 2p-1-s on position s) or SkipPipe paths
   (``passes.skippipe``; ``skip_ratio``, timed with the per-stage FLOP estimate recorded in
   ``attr pipeline`` and the cluster's links) give each pipeline position its action list; every device
   of a position runs that list, talking to the device at the same mesh coordinates of the peer
   position. :func:`ir.schedules.check_deadlock` checks each lane of devices.
"""
from __future__ import annotations

import bisect
import math
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import sympy

from cost.ops import op_flops
from cost.partition import balanced_cuts
from ir.core import Graph, Node, Value
from ir.layers import LayerStructure, find_layers
from ir.ops.pipeline_ops import (SEND_RECV, WHOLE_BATCH, Action, pipeline_stages, schedule_attr, stage_index,
                                 stage_mesh_name)
from ir.sbp import Split
from ir.schedules import (build_path_schedule, build_pipeline_schedule, check_deadlock,
                          pipeline_schedule, stage_positions, stages_per_position)
from ir.types import Mesh, TensorType, dim_symbol
from passes.decompose import BATCH_STATISTICS_ATTR
from passes.manager import PassContext, register_pass
from passes.skippipe import SkipPipeProblem, format_skip_plan, plan_skip_paths
from strategy import PIPELINE_AXIS, MeshSpec, Strategy, StrategyError, closest

MEAN_LOSS_OPS = ("aten.mean.default", "aten.mean.dim", "aten.mse_loss.default", "aten.l1_loss.default",
                 "aten.binary_cross_entropy_with_logits.default", "aten.smooth_l1_loss.default")
"""Means over every element: with equal microbatches, the full mean is the mean of their means."""
RATIO_LOSS_OPS = ("aten.cross_entropy_loss.default", "aten.nll_loss.default", "aten.nll_loss_forward.default")
"""Means over counted targets that ``decompose`` left alone (class weights, label smoothing)."""
SUM_LOSS_OPS = ("aten.sum.default", "aten.sum.dim_IntList")
CONSTANT_SCALINGS = ("aten.div.Tensor", "aten.div.Scalar", "aten.mul.Tensor", "aten.mul.Scalar")
BACKWARD_FLOP_FACTOR = 2.0
"""Backward costs about twice the forward (the usual 6ND = 2ND forward + 4ND backward)."""
DEFAULT_LINK = (1e-5, 1e10)
"""(latency s, bandwidth B/s) used for SkipPipe timing when the context has no cluster."""


# -- configuration ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class PipelineConfig:
    """The pipeline part of a strategy, resolved against the device count."""

    positions: int
    """Pipeline positions (the ``pp`` size): groups of devices that each hold stages."""
    virtual_stages: int
    """Stages per position (interleaved, V-shaped schedules); the stage count is positions x virtual_stages."""
    microbatches: int
    """Microbatches per step."""
    schedule: str
    """A name of :data:`ir.schedules.SCHEDULES` (``gpipe``, ``1f1b``, ``interleaved``, ``zb-h1``, ...)."""
    skip_ratio: float | None
    """SkipPipe's share of stages a microbatch may skip; None for a plain schedule."""
    position_devices: tuple
    """Per position, its device ids in mesh order (the devices of its stage meshes)."""

    @property
    def num_stages(self) -> int:
        """K, the number of stages."""
        return self.positions * self.virtual_stages

    def position_of(self, stage: int) -> int:
        """The position holding ``stage`` (s mod pp; V-shaped schedules: s, then back from 2pp-1-s)."""
        return stage_positions(self.schedule, self.positions, self.num_stages)[stage]


def pipeline_config(strategy: Strategy, world_size: int) -> PipelineConfig:
    """The pipeline record of a strategy resolved against the device count: ``pp``, microbatches,
    schedule, virtual stages, skip ratio and stage devices (:func:`strategy.normalize` has checked
    the values; what is left here is what the pass cannot do)."""
    pipeline, mesh = strategy.pipeline, strategy.mesh_spec
    sizes = {len(ds) for ds in pipeline.stage_devices or ()}
    if len(sizes) > 1:
        raise NotImplementedError(f"stage_devices gives stages {sorted(sizes)} devices: stages on meshes of "
                                  "different sizes need resharding transfers, which the pipeline pass does not "
                                  "make yet; give every stage the same number of devices")
    if PIPELINE_AXIS not in mesh:
        raise StrategyError(f"a pipelined strategy needs a 'pp' mesh axis (the number of pipeline positions); "
                            f"the mesh is {mesh.as_dict()}: add e.g. 'pp': 2 and shrink the other axes to match")
    positions = strategy.positions
    schedule = pipeline.schedule_name
    try:
        virtual = stages_per_position(schedule, pipeline.virtual_stages if isinstance(pipeline.virtual_stages, int)
                                      else None)
    except ValueError as error:
        raise StrategyError(str(error)) from None
    if pipeline.skip_ratio is not None and not pipeline_schedule(schedule).takes_paths:
        raise StrategyError(f"skip_ratio (SkipPipe) runs with schedule 'gpipe' or '1f1b', not {schedule!r}")
    devices = _position_devices(mesh, world_size, pipeline.stage_devices, positions,
                                stage_positions(schedule, positions, positions * virtual))
    return PipelineConfig(positions, virtual, pipeline.microbatch_count(positions), schedule, pipeline.skip_ratio,
                          devices)


def _position_devices(mesh: MeshSpec, world_size: int, stage_devices, positions: int, placed: list[int]) -> tuple:
    axes, sizes = list(mesh.axes), [int(n) for n in mesh.sizes]
    full = Mesh.make(axes, sizes)
    pp = axes.index("pp")
    by_position: list[list[int]] = [[] for _ in range(positions)]
    for d in range(world_size):
        by_position[full.coords(d)[pp]].append(d)
    if not stage_devices:
        return tuple(tuple(ds) for ds in by_position)
    per_stage = [list(ds) for ds in stage_devices]
    if len(per_stage) not in (positions, len(placed)):
        raise StrategyError(f"stage_devices lists {len(per_stage)} stages; expected {positions} (one per pipeline "
                            f"position) or {len(placed)} (one per stage)")
    size = len(by_position[0])
    for s, ds in enumerate(per_stage):
        if len(ds) != size:
            raise StrategyError(f"stage_devices[{s}] = {ds} has {len(ds)} devices, but every stage runs on a mesh "
                                f"of {size} (the non-pp axes of {mesh.as_dict()}); stages of different sizes are not "
                                "supported")
        if ds != per_stage[placed[s]]:
            raise StrategyError(f"stage {s} shares position {placed[s]} with stage {placed[s]}, so it needs "
                                f"the same devices {per_stage[placed[s]]}, found {ds}")
        if any(not 0 <= d < world_size for d in ds):
            raise StrategyError(f"stage_devices[{s}] = {ds} names devices outside 0..{world_size - 1}")
    used = [d for ds in per_stage[:positions] for d in ds]
    if len(set(used)) != len(used):
        raise StrategyError(f"stage_devices gives one device to two pipeline positions: {per_stage[:positions]}")
    return tuple(tuple(ds) for ds in per_stage[:positions])


# -- the pass -------------------------------------------------------------------------------------------

@register_pass("pipeline", requires=("boxed",), produces=("stages",))
def pipeline_pass(graph: Graph, ctx: PassContext) -> None:
    """Cut the graph into stages on their own meshes, add transfers and each device's schedule."""
    config = pipeline_config(ctx.strategy, ctx.world_size)
    world = graph.meshes.get("world") or next(iter(graph.meshes.values()))
    if len(config.position_devices[0]) != world.size:
        raise StrategyError(f"each pipeline position has {len(config.position_devices[0])} devices but the "
                            f"layout mesh has {world.size}")
    loss_split = "none"
    if ctx.train and config.microbatches > 1:
        refuse_batch_statistics(graph, config.microbatches)
        if graph.loss is not None:
            loss_split = split_loss_for_microbatches(graph, config.microbatches)
    costs = node_costs(graph)
    starts = stage_starts(graph, ctx.strategy, config.num_stages, costs)
    stage_flops = _stage_flops(costs, starts, config.microbatches)
    _assign_stages(graph, starts)
    _place_input_only_nodes(graph)
    _make_meshes(graph, world, config)
    _place_inputs(graph)
    tied = _place_params(graph)
    _place_buffer_updates(graph)
    slots, skippable = _slots(graph, config.num_stages)
    _insert_transfers(graph, slots)
    _regroup_buckets(graph, tied)
    if tied:
        graph.attrs["tied_params"] = tied
    graph.attrs["pipeline"] = {
        "stages": config.num_stages, "positions": [config.position_of(s) for s in range(config.num_stages)],
        "microbatches": config.microbatches, "schedule": config.schedule, "virtual_stages": config.virtual_stages,
        "loss_split": loss_split, "skippable": skippable, "stage_flops": [float(f"{f:.6g}") for f in stage_flops],
    }


# -- microbatches: the loss as each microbatch's share -----------------------------------------------

BATCH_NORM_OPS = ("aten.batch_norm.default", "aten.native_batch_norm.default",
                  "aten._native_batch_norm_legit.default", "aten._native_batch_norm_legit_functional.default")
"""Batch norms; ``args[5]`` says whether they normalise with statistics of the batch (training)."""


def batch_statistics_node(graph: Graph) -> Node | None:
    """The first node that normalises with statistics of the whole batch (a training BatchNorm, fused or
    as ``decompose`` writes it), if any."""
    def takes_batch_statistics(n: Node) -> bool:
        fused = n.op in BATCH_NORM_OPS and len(n.args) > 5 and n.args[5] is True
        return fused or bool(n.attrs.get(BATCH_STATISTICS_ATTR))
    return next((n for n in graph.nodes if takes_batch_statistics(n)), None)


def refuse_batch_statistics(graph: Graph, microbatches: int) -> None:
    """Refuse microbatches when an op normalises with statistics of the whole batch (training BatchNorm).

    Each microbatch would be normalised with its own mean and variance (and update the running
    statistics once per microbatch), which is not the full-batch step the plan must equal.
    """
    node = batch_statistics_node(graph)
    if node is not None:
        where = f"module {node.attrs['module']}" if node.attrs.get("module") else "the model"
        raise StrategyError(f"cannot split the batch into {microbatches} microbatches: {node.op} (%{node.name}, "
                            f"{where}) normalises with statistics of the whole batch in training, and each "
                            "microbatch would use its own (as torch.distributed.pipelining does), so the step "
                            "would not equal the full-batch step; use microbatches 1, or a norm whose "
                            "statistics do not span the batch (LayerNorm, GroupNorm)")


def split_loss_for_microbatches(graph: Graph, microbatches: int) -> str:
    """Make the loss the share of one microbatch in the full-batch loss; returns how (for the dump).

    ``"global_denominator"``: ``sum / count`` keeps the microbatch's sum over the whole batch's
    count (computed by ``whole_batch`` clones); ``"mean"``: divided by the microbatch count;
    ``"sum"``: unchanged.
    """
    node = _loss_node(graph)
    if node.op == "aten.div.Tensor" and isinstance(node.args[1], Value) and _input_only(node.args[1]):
        _denominator_over_whole_batch(graph, node, node.args[1])
        return "global_denominator"
    node = _reduction_of(node)
    if node.op in RATIO_LOSS_OPS:
        raise StrategyError(f"cannot split the loss into microbatches exactly: {node.op} (%{node.name}) averages "
                            "over its counted targets (class weights, label smoothing), and microbatches count "
                            "different numbers of them; use microbatches 1, or a loss that is sum / count")
    if node.op in MEAN_LOSS_OPS:
        loss = graph.loss
        share = graph.create_node("aten.div.Scalar", [loss, microbatches], {}, [loss.type], ["loss_share"],
                                  dict(_module(node)))
        out = share.outputs[0]
        out.sbp, out.mesh = loss.sbp, loss.mesh
        graph.outputs = [out if o is loss else o for o in graph.outputs]
        graph.loss = out
        return "mean"
    if node.op in SUM_LOSS_OPS:
        return "sum"
    raise StrategyError(f"cannot split the loss into microbatches: it comes from {node.op} (%{node.name}); "
                        "expected a mean (sum / count, mean, a mean-reduced loss) or a sum; use microbatches 1 "
                        "or make the model return such a loss")


def _reduction_of(node: Node) -> Node:
    """The reduction under the loss, through collectives and scalings by constants."""
    while True:
        if node.op.startswith("comm."):
            node = node.input_values()[0].producer
        elif node.op in CONSTANT_SCALINGS and len(node.input_values()) == 1 and isinstance(node.args[0], Value):
            node = node.args[0].producer
        else:
            return node


def _loss_node(graph: Graph) -> Node:
    """The node computing the loss, under the collectives and the rounding to the loss's dtype that follow it
    (a bf16 mean is computed in float32 and rounded last, see ``ir/precision.py``)."""
    node = graph.loss.producer
    while node is not None and (node.op.startswith("comm.") or _is_float_cast(node)):
        node = node.input_values()[0].producer
    if node is None:
        raise StrategyError("the loss is an input or a parameter, not computed; nothing to split into microbatches")
    return node


def _is_float_cast(node: Node) -> bool:
    """A ``_to_copy`` between float dtypes (a rounding that keeps the value)."""
    return node.op == "aten._to_copy.default" and all(
        v.type.torch_dtype.is_floating_point for v in (node.input_values()[0], node.outputs[0]))


def _module(node: Node) -> dict:
    return {"module": node.attrs["module"]} if "module" in node.attrs else {}


def _backward_slice(value: Value) -> list[Node]:
    """Nodes that ``value`` depends on, in no particular order."""
    seen: dict[int, Node] = {}
    stack = [value]
    while stack:
        v = stack.pop()
        node = v.producer
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        stack.extend(node.input_values())
    return list(seen.values())


def _input_only(value: Value) -> bool:
    """True when ``value`` depends on graph inputs and constants only (no parameter, so no gradient)."""
    for node in _backward_slice(value):
        if any(v.kind in ("param", "buffer") for v in node.input_values()):
            return False
    return value.kind not in ("param", "buffer")


def _denominator_over_whole_batch(graph: Graph, div: Node, denominator: Value) -> None:
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    slice_nodes = sorted(_backward_slice(denominator), key=lambda n: order[id(n)])
    clones: dict[int, Value] = {}
    for node in slice_nodes:
        args = _map(node.args, clones)
        kwargs = _map(node.kwargs, clones)
        clone = graph.create_node(node.op, args, kwargs, [o.type for o in node.outputs],
                                  [f"{o.name}_whole" for o in node.outputs], {**node.attrs, WHOLE_BATCH: True},
                                  before=div)
        for o, c in zip(node.outputs, clone.outputs):
            c.sbp, c.mesh = o.sbp, o.mesh
            clones[id(o)] = c
    div.map_values(lambda v: clones[id(v)] if v is denominator else v)
    for node in reversed(slice_nodes):
        if not any(o.uses or o in graph.outputs for o in node.outputs):
            graph.remove_node(node)


def _map(obj: Any, clones: dict[int, Value]) -> Any:
    from ir.core import map_structure
    return map_structure(obj, lambda v: clones.get(id(v), v))


# -- where stages begin -----------------------------------------------------------------------------------

def stage_starts(graph: Graph, strategy: Strategy, num_stages: int, costs: list[float] | None = None) -> list[int]:
    """Indices into ``graph.nodes`` where stages 1 .. K-1 begin (``costs``: :func:`node_costs`, if known)."""
    if num_stages == 1:
        return []
    cuts, layers = strategy.pipeline.stages, strategy.pipeline.stage_layers
    if isinstance(cuts, tuple):
        starts = _starts_at_modules(graph, list(cuts))
    elif layers:
        starts = _starts_at_layers(graph, layers)
    else:
        return balanced_starts(graph, num_stages, costs)
    if len(starts) != num_stages - 1:
        raise StrategyError(f"the strategy cuts the model into {len(starts) + 1} stages but the mesh asks for "
                            f"{num_stages} (pp x virtual_stages); give {num_stages - 1} cut(s)")
    return starts


def _module_of(node: Node) -> str:
    return node.attrs.get("module", "")


def _begins(module: str, path: str) -> bool:
    return module == path or module.startswith(path + ".")


def _starts_at_modules(graph: Graph, names: list[str]) -> list[int]:
    starts, after = [], 1
    for name in names:
        found = next((i for i in range(after, len(graph.nodes)) if _begins(_module_of(graph.nodes[i]), name)), None)
        if found is None:
            modules = sorted({".".join(parts[:i]) for n in graph.nodes if _module_of(n)
                              for parts in [_module_of(n).split(".")] for i in range(1, len(parts) + 1)})
            earlier = any(_begins(_module_of(n), name) for n in graph.nodes[:after])
            why = ("it begins before the previous cut (cuts go in model order)" if earlier else
                   f"no node comes from it{closest(name, modules)}")
            raise StrategyError(f"stage cut {name!r}: {why}")
        starts.append(found)
        after = found + 1
    return starts


def _block_starts(graph: Graph, structure: LayerStructure) -> list[int]:
    """The index in ``graph.nodes`` where each block of ``structure`` begins."""
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    return [index[id(block[0])] for block in structure.blocks]


def _starts_at_layers(graph: Graph, ranges: Sequence) -> list[int]:
    structure = find_layers(graph)
    if not structure.blocks:
        raise StrategyError("stage_layers needs repeated layers (modules named like blocks.0, blocks.1); this "
                            "model has none; cut at module names with 'stages' instead")
    prefix, count = structure.prefix, structure.num_layers
    expected = 0
    for s, (first, last) in enumerate(ranges):
        if first != expected or last < first:
            raise StrategyError(f"stage_layers[{s}] = {[first, last]}: ranges must be contiguous from layer 0, "
                                f"so this one should start at layer {expected}")
        expected = last + 1
    if expected != count:
        raise StrategyError(f"stage_layers covers layers 0..{expected - 1} but {prefix} has {count} layers "
                            f"(0..{count - 1}); the last range must end at layer {count - 1}")
    starts = _block_starts(graph, structure)
    return [starts[int(first)] for first, _ in list(ranges)[1:]]


def node_costs(graph: Graph) -> list[float]:
    """Forward + backward FLOPs of every node at the example dims (views and collectives cost 0)."""
    bindings = {dim_symbol(k): v for k, v in (graph.attrs.get("example_dims") or {}).items()}
    costs = []
    for node in graph.nodes:
        if node.op.startswith("comm.") or node.attrs.get(WHOLE_BATCH):
            costs.append(0.0)
            continue
        key = tuple(sorted(bindings.items(), key=str))
        ins = [_concrete_cached(v.type, key) for v in node.input_values()]
        outs = [_concrete_cached(v.type, key) for v in node.outputs]
        try:
            flops = float(op_flops(node.op, ins, outs, {}))
        except (TypeError, ValueError, IndexError, KeyError):
            flops = float(sum(math.prod(s) for s in outs))  # an op the cost model cannot price: elementwise
        costs.append(flops * (1.0 + BACKWARD_FLOP_FACTOR))
    return costs


@lru_cache(maxsize=4096)
def _concrete_cached(t: TensorType, bindings: tuple) -> tuple:
    return _concrete(t, dict(bindings))


def _concrete(t: TensorType, bindings: dict) -> tuple:
    out = []
    for d in t.shape:
        value = sympy.sympify(d).subs(bindings)
        out.append(int(value) if value.is_number else 1)
    return tuple(out)


def _candidate_starts(graph: Graph) -> list[int]:
    """Layer boundaries (and the end of the last layer); module boundaries when layers are too few."""
    structure = find_layers(graph)
    if not structure.blocks:
        return []
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    starts = set(_block_starts(graph, structure)) | {index[id(structure.blocks[-1][-1])] + 1}
    return sorted(s for s in starts if 0 < s < len(graph.nodes))


def _module_boundaries(graph: Graph) -> list[int]:
    return [i for i in range(1, len(graph.nodes))
            if _module_of(graph.nodes[i]) and _module_of(graph.nodes[i]) != _module_of(graph.nodes[i - 1])]


def balanced_starts(graph: Graph, num_stages: int, costs: list[float] | None = None) -> list[int]:
    """Cuts that minimise the costliest stage (FLOPs), at layer boundaries when there are enough."""
    costs = node_costs(graph) if costs is None else costs
    candidates = _candidate_starts(graph)
    if len(candidates) < num_stages - 1:
        candidates = _module_boundaries(graph)
    if len(candidates) < num_stages - 1:
        raise StrategyError(f"cannot cut the model into {num_stages} stages: it has only {len(candidates)} module "
                            "boundaries to cut at; use fewer stages")
    return balanced_cuts(costs, candidates, num_stages)


def _stage_flops(costs: list[float], starts: list[int], microbatches: int) -> list[float]:
    bounds = [0] + starts + [len(costs)]
    return [sum(costs[a:b]) / microbatches for a, b in zip(bounds, bounds[1:])]


# -- stages, meshes, placement ----------------------------------------------------------------------------------

def _assign_stages(graph: Graph, starts: list[int]) -> None:
    counts: dict[int, int] = defaultdict(int)
    for i, node in enumerate(graph.nodes):
        stage = bisect.bisect_right(starts, i)
        node.attrs["stage"] = stage
        counts[stage] += 1
    empty = [s for s in range(len(starts) + 1) if not counts[s]]
    if empty:
        raise StrategyError(f"stage(s) {empty} would hold no operation; move the cuts")


def _stage(node: Node) -> int:
    return node.attrs["stage"]


RANDOM_OP_MARKERS = ("rand", "dropout", "bernoulli", "normal", "uniform", "seed")
"""Ops drawing random numbers: copying or moving them would change which numbers each draw gets."""


def _input_only_nodes(graph: Graph) -> set[int]:
    """Ids of the nodes whose outputs depend only on graph inputs and constants (position ids, aranges,
    causal masks, rotary tables): no parameter (a frozen layer is real work, not a table), no buffer the
    step updates, no random draw, and not a step output; whole-batch nodes (the loss count) stay where they are."""
    updated = {id(b) for b in graph.buffer_updates} | {id(v) for v in graph.buffer_updates.values()}
    final = {id(v) for v in graph.outputs} | ({id(graph.loss)} if graph.loss is not None else set())
    found: set[int] = set()
    for node in graph.nodes:
        if (node.op.startswith("comm.") or node.attrs.get(WHOLE_BATCH)
                or any(marker in node.op.lower() for marker in RANDOM_OP_MARKERS)
                or any(id(o) in final or id(o) in updated for o in node.outputs)):
            continue
        if all(id(v.producer) in found if v.producer is not None else v.kind in ("input", "buffer") and id(v) not in updated
               for v in node.input_values()):
            found.add(id(node))
    return found


def _place_input_only_nodes(graph: Graph) -> None:
    """Compute input-only values on every stage that reads them instead of relaying them across cuts.

    Position ids, causal masks and rotary tables are computed before the first layer but read by every
    layer; relayed, they would cross each cut once per microbatch (a ``[batch, 1, seq, seq]`` mask
    outweighs the hidden state at long sequences). They cost next to nothing to compute, so each
    stage reading one gets its own copy of the chain computing it (its first reader's stage keeps
    the original; buffers it reads are copied per stage by :func:`_place_params`). The nodes are then
    ordered by stage, which keeps the graph topological since stages only grow along edges.
    """
    movable = _input_only_nodes(graph)
    working = {_stage(n) for n in graph.nodes if id(n) not in movable}
    movable = {id(n) for n in graph.nodes if id(n) in movable and _stage(n) in working}  # no stage left empty
    if not movable:
        return
    readers: dict[int, set[int]] = {}  # node id -> stages reading its outputs (through movable nodes)
    for node in reversed(graph.nodes):
        if id(node) not in movable:
            continue
        stages: set[int] = set()
        for o in node.outputs:
            for user in o.uses:
                stages |= readers.get(id(user), set()) if id(user) in movable else {_stage(user)}
        readers[id(node)] = stages
    copies: dict[tuple[int, int], Value] = {}  # (value id, stage) -> the value computed on that stage
    for node in list(graph.nodes):
        stages = sorted(readers.get(id(node), ()))
        if not stages:
            continue
        for s in stages[1:]:
            clone = graph.create_node(node.op, _map_stage(node.args, copies, s), _map_stage(node.kwargs, copies, s),
                                      [o.type for o in node.outputs], [f"{o.name}_s{s}" for o in node.outputs],
                                      {**node.attrs, "stage": s}, before=node)
            for o, c in zip(node.outputs, clone.outputs):
                c.sbp, c.mesh = o.sbp, o.mesh
                copies[(id(o), s)] = c
        node.map_values(lambda v, s=stages[0]: copies.get((id(v), s), v))
        node.attrs["stage"] = stages[0]
        for o in node.outputs:
            copies[(id(o), stages[0])] = o
    for node in graph.nodes:
        if id(node) not in movable:
            node.map_values(lambda v, s=_stage(node): copies.get((id(v), s), v))
    graph.nodes.sort(key=_stage)


def _map_stage(obj: Any, copies: dict[tuple[int, int], Value], stage: int) -> Any:
    from ir.core import map_structure
    return map_structure(obj, lambda v: copies.get((id(v), stage), v))


def _make_meshes(graph: Graph, world: Mesh, config: PipelineConfig) -> None:
    for name in list(graph.meshes):
        del graph.meshes[name]
    for s in range(config.num_stages):
        devices = config.position_devices[config.position_of(s)]
        graph.meshes[stage_mesh_name(s)] = Mesh.make(world.axes, world.shape, devices)
    for node in graph.nodes:
        for o in node.outputs:
            o.mesh = stage_mesh_name(_stage(node))


def _place_inputs(graph: Graph) -> None:
    """An input lives on the first stage that reads it per microbatch (later ones get it relayed).

    Whole-batch nodes (the loss count) read the step's whole batch, which every device loads, so
    they read an input wherever it lives: an encoder-decoder that shifts its labels into decoder
    inputs on stage 0 and counts them for the loss on the last stage needs no relay of the count.
    """
    for v in graph.inputs:
        stages = sorted({_stage(n) for n in _relayed_uses(v)} or {_stage(n) for n in v.uses})
        v.mesh = stage_mesh_name(stages[0] if stages else 0)


def _place_params(graph: Graph) -> list[list[Value]]:
    """Move each parameter to the stage using it; a copy per further stage. Returns the tied groups
    (copies of a trainable parameter, whose gradients are summed; frozen copies need no sum)."""
    tied = []
    for p in list(graph.params):
        stages = sorted({_stage(n) for n in p.uses}) or [0]
        p.mesh = stage_mesh_name(stages[0])
        copies = [p]
        for s in stages[1:]:
            q = graph.add_param(f"{p.name}.stage{s}", p.type, p.target, p.kind,
                                requires_grad=p.requires_grad, persistent=p.persistent)
            q.sbp, q.mesh = p.sbp, stage_mesh_name(s)
            graph.replace_all_uses(p, q, only=lambda n, s=s: _stage(n) == s)
            copies.append(q)
        if len(copies) > 1 and p.trainable:
            tied.append(copies)
    return tied


def _place_buffer_updates(graph: Graph) -> None:
    """A buffer's new value goes to its copy on the stage that computes the value (each microbatch's
    forward updates it there, as in eager pipelines). Copies read on other stages would keep the old
    value, so that is refused."""
    updates = {}
    for buffer, value in graph.buffer_updates.items():
        copies = [p for p in graph.params if p.kind == "buffer" and p.target == buffer.target]
        home = next((p for p in copies if p.mesh == value.mesh), None)
        elsewhere = sorted(stage_index(p.mesh) for p in copies if p is not home and p.uses)
        if elsewhere:
            raise StrategyError(f"buffer {buffer.target} takes a new value on stage {stage_index(value.mesh)} but is "
                                f"also read on stage(s) {elsewhere}, whose copies would keep the old value; cut the "
                                f"pipeline so that its reads and its update share a stage")
        if home is None:  # nothing reads it (a counter): it lives where it is updated
            home = copies[0]
            home.mesh = value.mesh
        updates[home] = value
    graph.buffer_updates = updates


def _regroup_buckets(graph: Graph, tied: list[list[Value]]) -> None:
    """Gradient buckets hold parameters of one stage (its devices run the all-reduce); copies join."""
    if "grad_buckets" not in graph.attrs:
        return
    copies = {id(group[0]): group for group in tied}
    out = []
    for bucket in graph.attrs["grad_buckets"]:
        by_mesh: dict[str, list[Value]] = {}
        for p in bucket["params"]:
            for q in copies.get(id(p), [p]):
                by_mesh.setdefault(q.mesh, []).append(q)
        for mesh in sorted(by_mesh, key=lambda m: -stage_index(m)):
            out.append({**bucket, "axes": list(bucket["axes"]), "params": by_mesh[mesh]})
    graph.attrs["grad_buckets"] = out


# -- values crossing cuts ------------------------------------------------------------------------------

def _liveness(graph: Graph, num_stages: int) -> dict[int, tuple[Value, int, int]]:
    """value id -> (value, stage that holds it first, last stage that reads it)."""
    final = {id(v) for v in graph.outputs} | ({id(graph.loss)} if graph.loss is not None else set())
    out = {}
    values = list(graph.inputs) + [o for n in graph.nodes for o in n.outputs]
    for v in values:
        home = stage_index(v.mesh)
        last = max([_stage(n) for n in _relayed_uses(v)] + [home])
        if id(v) in final:
            last = num_stages - 1
        out[id(v)] = (v, home, last)
    return out


def _reads_relayed(node: Node, v: Value) -> bool:
    """Whether ``node`` reads ``v`` per microbatch, so that a later stage needs ``v`` relayed to it.

    Whole-batch nodes read graph inputs whole, where every device loads them (:func:`_place_inputs`).
    """
    return not (v.kind == "input" and node.attrs.get(WHOLE_BATCH))


def _relayed_uses(v: Value) -> list[Node]:
    return [n for n in v.uses if _reads_relayed(n, v)]


def _slots(graph: Graph, num_stages: int) -> tuple[list[list[Value]], bool]:
    """Per cut, the values crossing it in slot order; and whether every cut carries the same slot types."""
    live = _liveness(graph, num_stages)
    order = {id(v): i for i, (v, _, _) in enumerate(live.values())}
    slots: list[list[Value]] = []
    skippable = True
    for cut in range(num_stages - 1):
        crossing = sorted((v for v, home, last in live.values() if home <= cut < last), key=lambda v: order[id(v)])
        if not slots:
            slots.append(crossing)
            continue
        aligned = _align(slots[-1], crossing)
        if aligned is None:
            skippable = False
            aligned = [v for v in slots[-1] if v in crossing] + [v for v in crossing if v not in slots[-1]]
        slots.append(aligned)
    return slots, skippable and len({len(s) for s in slots}) <= 1


def _same_kind(a: Value, b: Value) -> bool:
    return a.type == b.type and a.sbp == b.sbp


def _align(previous: list[Value], crossing: list[Value]) -> list[Value] | None:
    """Keep passed-on values in their slots; put each new value in a freed slot of the same type."""
    kept = {id(v) for v in crossing}
    out: list[Value | None] = [v if id(v) in kept else None for v in previous]
    fresh = [v for v in crossing if all(v is not p for p in previous)]
    for i, v in enumerate(out):
        if v is None:
            match = next((f for f in fresh if _same_kind(f, previous[i])), None)
            if match is None:
                return None
            fresh.remove(match)
            out[i] = match
    return None if fresh else out


def _insert_transfers(graph: Graph, slots: list[list[Value]]) -> None:
    current: dict[int, Value] = {}
    for cut, values in enumerate(slots):
        anchor = next(n for n in graph.nodes if _stage(n) == cut + 1)
        for slot, v in enumerate(values):
            source = current.get(id(v), v)
            node = graph.create_node(SEND_RECV, [source], {"src": stage_mesh_name(cut),
                                                           "dst": stage_mesh_name(cut + 1), "slot": slot},
                                     [v.type], [f"{v.name}.s{cut + 1}"], {"stage": cut + 1}, before=anchor)
            out = node.outputs[0]
            out.sbp, out.mesh = v.sbp, stage_mesh_name(cut + 1)
            graph.replace_all_uses(source, out, only=lambda n, node=node, cut=cut, v=v:
                                   n is not node and _stage(n) > cut and _reads_relayed(n, v))
            current[id(v)] = out
    graph.outputs = [current.get(id(o), o) for o in graph.outputs]
    if graph.loss is not None:
        graph.loss = current.get(id(graph.loss), graph.loss)


# -- schedules -------------------------------------------------------------------------------------------

@register_pass("schedule", requires=("stages",), produces=("scheduled",))
def schedule_pass(graph: Graph, ctx: PassContext) -> None:
    """Each device's action list (``attr schedule``): a schedule of :data:`ir.schedules.SCHEDULES` or SkipPipe paths.

    Reads what the ``pipeline`` pass recorded; SkipPipe plans with the per-stage FLOPs of the dump,
    the cluster's links and the size of what crosses a cut, and records the paths and their
    estimated iteration time. Every lane of devices passes :func:`check_deadlock`.
    """
    info = graph.attrs.get("pipeline")
    if not isinstance(info, dict):
        raise ValueError("the schedule pass needs a graph cut into stages; run the 'pipeline' pass first")
    config = pipeline_config(ctx.strategy, ctx.world_size)
    k, m, p = config.num_stages, config.microbatches, config.positions
    paths = None
    if config.skip_ratio is not None:
        if config.skip_ratio > 0 and not info["skippable"]:
            raise StrategyError("skip_ratio > 0 needs stages that can be skipped: every cut must carry values of "
                                "the same types (a residual stream); cut at layer boundaries (e.g. 'stage_layers')")
        plan = plan_skip_paths(_skip_problem(graph, config, ctx), config.skip_ratio,
                               order="gpipe" if config.schedule == "gpipe" else "1f1b")
        per_position, paths = plan.actions, plan.paths
        graph.attrs["paths"] = paths
        graph.attrs["skip_plan"] = format_skip_plan(plan)
        graph.attrs["estimated_iteration_time_s"] = plan.estimated_iteration_time_s
    else:
        try:
            per_position = build_pipeline_schedule(config.schedule, p, k, m)
        except ValueError as error:  # e.g. too few microbatches for the schedule
            raise StrategyError(f"schedule {config.schedule!r}: {error}") from None
    # a position whose stages no path visits (SkipPipe) still gets its (empty) list
    per_position = {q: per_position.get(q, []) for q in range(p)}
    per_device = expand_to_devices(per_position, config.position_devices)
    for lane in lanes(per_device, config.position_devices):
        check_deadlock(lane, paths or [list(range(k))] * m)
    graph.attrs["schedule"] = schedule_attr(per_device)


def expand_to_devices(per_position: dict[int, list[Action]], position_devices: Sequence[Sequence[int]]
                      ) -> dict[int, list[Action]]:
    """Every device of a position runs its list; peers are the devices at the same mesh index."""
    out: dict[int, list[Action]] = {}
    for position, actions in per_position.items():
        for index, device in enumerate(position_devices[position]):
            out[device] = [a if a.peer is None else Action(a.kind, a.stage, a.microbatch,
                                                          position_devices[a.peer][index]) for a in actions]
    return dict(sorted(out.items()))


def lanes(per_device: dict[int, list[Action]], position_devices: Sequence[Sequence[int]]) -> list[dict]:
    """The schedule split into lanes: the devices at one mesh index of every position (a whole pipeline)."""
    width = len(position_devices[0])
    return [{ds[i]: per_device[ds[i]] for ds in position_devices} for i in range(width)]


def _skip_problem(graph: Graph, config: PipelineConfig, ctx: PassContext) -> SkipPipeProblem:
    cluster = ctx.cluster
    first = [ds[0] for ds in config.position_devices]
    width = len(config.position_devices[0])

    def peak(device: int) -> float:
        if cluster is None:
            return 1e12
        flops = cluster.devices[device].peak_flops
        return float(flops.get("fp32") or max(flops.values()))

    def link(a: int, b: int) -> tuple[float, float]:
        if cluster is None:
            return DEFAULT_LINK
        found = cluster.link(first[a], first[b])
        return found.latency_s, (found.bandwidth_Bps if math.isfinite(found.bandwidth_Bps) else 1e15)

    stage_flops = graph.attrs["pipeline"]["stage_flops"]
    forward = [f / (1.0 + BACKWARD_FLOP_FACTOR) / width / peak(first[config.position_of(s)])
               for s, f in enumerate(stage_flops)]
    dims = {dim_symbol(k): v for k, v in (graph.attrs.get("example_dims") or {}).items()}
    crossing = pipeline_stages(graph)[0].exits
    message = sum(math.prod(_concrete(v.type, dims)) * v.type.torch_dtype.itemsize for v in crossing)
    message /= config.microbatches * max(1, _split_ways(crossing, graph))
    return SkipPipeProblem([(s,) for s in range(config.num_stages)], forward, link, float(message),
                           config.microbatches, backward_time_s=[BACKWARD_FLOP_FACTOR * f for f in forward])


def _split_ways(values: list[Value], graph: Graph) -> int:
    """How many ways the first crossing value is sharded (per-device message size)."""
    if not values:
        return 1
    v = values[0]
    mesh = graph.meshes[v.mesh]
    return math.prod(n for s, n in zip(v.sbp, mesh.shape) if isinstance(s, Split))


def apply_paths(graph: Graph, paths: Sequence[Sequence[int]], order: str = "1f1b") -> None:
    """Give each microbatch an explicit stage path (SkipPipe) and rebuild every device's schedule.

    For experiments and tests: ``paths[m]`` must start at stage 0, end at the last stage and visit
    each stage at most once; the graph's stages must be skippable.
    """
    info = graph.attrs["pipeline"]
    if not info.get("skippable"):
        raise StrategyError("this pipeline's stages cannot be skipped or reordered (cuts carry different values)")
    k, m = int(info["stages"]), int(info["microbatches"])
    if len(paths) != m:
        raise ValueError(f"expected one path per microbatch ({m}), found {len(paths)}")
    for i, path in enumerate(paths):
        if path[0] != 0 or path[-1] != k - 1:
            raise ValueError(f"path {i} = {list(path)} must start at stage 0 and end at stage {k - 1}")
    if int(info.get("virtual_stages", 1)) != 1:
        raise ValueError("explicit paths need one stage per pipeline position (no virtual stages)")
    position_devices = [graph.meshes[stage_mesh_name(s)].devices for s in range(k)]
    per_position = build_path_schedule([list(p) for p in paths], list(range(k)), order)
    per_position = {q: per_position.get(q, []) for q in range(k)}
    per_device = expand_to_devices(per_position, position_devices)
    for lane in lanes(per_device, position_devices):
        check_deadlock(lane, paths)
    graph.attrs["paths"] = [list(p) for p in paths]
    graph.attrs["schedule"] = schedule_attr(per_device)

