"""Per-segment costs of a laid-out graph, affine in the microbatch size.

Both the planner and the simulator price a plan the same way: each segment (``pre``, each block,
``post``; see :mod:`ir.layers`) becomes a :class:`SegmentCost` holding, per op, its
forward/backward FLOPs and bytes (:func:`cost.ops.op_flops` / ``op_bytes`` on the *local*
shapes one device computes), the collectives it runs on each mesh axis (forward, and their adjoints in
backward), the activation bytes it keeps for backward, and its parameters' local bytes and gradient
reduction axes. Every quantity is stored as ``(constant, per batch element)``: shapes are linear in
the batch dimension, so one :class:`SegmentCost` prices every microbatch size.

Costs come from *records*: a :class:`ComputeRecord` per op (the op, its global types and the N-D SBP of
each input and output) and a :class:`CommRecord` per collective step. :func:`ir_profile` reads them
from a graph the passes have laid out; the planner makes them from its own assignment
(:mod:`passes.planner.intra_op`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

import numpy as np

from cluster import Device
from cost.ops import (MASK_SAVED_OPS, OUTPUT_SAVED_OPS, Precision, compute_seconds, normalize_op_name, numel,
                      op_backward_bytes, op_backward_flops, op_bytes, op_category, op_flops, op_overheads, peak_flops,
                      weight_gradient_share)
from ir.core import Graph, Node, Value
from ir.gradients import GradientFlow, gradient_flow
from ir.layers import LayerStructure, find_layers
from ir.ops.attention import RING_ATTENTION, ring_inputs, runs_ring
from ir.ops.comm import ADJOINTS, REGATHER_KWARG
from ir.ops.moe import DISPATCH, EXCHANGING, EXPERT_MM, exchanges
from ir.ops.schema import SchemaError, arg
from ir.recompute import RECOMPUTE_ATTR
from ir.sbp import Broadcast, Split
from ir.types import Mesh, TensorType, dim_symbol, dtype_size

BATCH_SYMBOL = "batch"
COMM_PREFIX = "comm."
UNDISPATCHED_OPS = frozenset({"getitem", "sym_size", "_assert_tensor_metadata"})
"""View-category ops that are Python bookkeeping, not dispatched tensor ops."""


# --------------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=65536)
def _concrete(t: TensorType, dims: tuple) -> tuple:
    bindings = {dim_symbol(k): v for k, v in dims}
    out = []
    for d in t.shape:
        value = d.subs(bindings) if getattr(d, "free_symbols", None) else d
        out.append(float(value))
    return tuple(out)


def concrete_shape(t: TensorType, dims: dict) -> tuple:
    """The shape with named symbols bound (floats: a batch split finer than the batch stays fractional)."""
    return _concrete(t, tuple(sorted(dims.items())))


def split_ways(nd: Sequence, mesh_shape: Sequence[int], ndim: int) -> list[int]:
    """How many ways each tensor dim is split by an N-D SBP."""
    ways = [1] * ndim
    for s, n in zip(nd, mesh_shape):
        if isinstance(s, Split) and s.dim < ndim:
            ways[s.dim] *= n
    return ways


def local_shape(shape: tuple, nd: Sequence, mesh_shape: Sequence[int]) -> tuple:
    """One device's shard of a concrete shape."""
    ways = split_ways(nd, mesh_shape, len(shape))
    return tuple(d / w for d, w in zip(shape, ways))


def concrete_axis_bytes(shape: tuple, nd: Sequence, mesh_shape: Sequence[int], axis: int, element_bytes: float
                        ) -> float:
    """Bytes of a tensor of concrete ``shape`` as the devices along ``axis`` see it (split by the other axes
    only; :func:`cost.boxing.axis_bytes` for a tensor type)."""
    others = [s if i != axis else None for i, s in enumerate(nd)]
    local = local_shape(shape, [s for s in others], mesh_shape)
    return float(np.prod(local)) * element_bytes if local else element_bytes


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


@dataclass
class ComputeRecord:
    """One op as every device of the mesh runs it: global types and the N-D SBP of each tensor."""

    op: str
    in_types: tuple
    in_sbps: tuple
    out_types: tuple
    out_sbps: tuple
    has_grad: bool
    recomputed: bool = False
    """In a region the program recomputes in backward (``attrs["recompute"]``)."""
    reads_param: bool = False
    """Reads a parameter (or its gathered copy): part of its backward is the weight gradient."""
    attrs: tuple = ()
    """``(name, value)`` pairs of the op's arguments its cost depends on (see :func:`cost_attrs`)."""
    param_inputs: tuple = ()
    """Per input, whether it is a parameter (or its gathered copy): not an activation backward keeps."""
    region_inputs: tuple = ()
    """For an op of a recomputed region: the activations the region reads from outside through this op (first
    reads only), as (type, N-D SBP) pairs. The checkpoint keeps them until the region's backward recomputes
    from them."""
    kept_sbps: tuple = ()
    """Per input, the N-D SBP of what backward keeps of it where that differs from how it is read (an activation
    all-gathered for this op under ``regather_activations`` is kept as the shard it was gathered from), else
    None; empty: every input is kept as read."""
    grad_inputs: tuple = ()
    """Per input, whether backward computes its gradient (:meth:`ir.gradients.GradientFlow.input_grads`); empty:
    every input's."""
    accumulated_inputs: tuple = ()
    """Per input, whether autograd adds the gradient computed for it to another of the same value
    (:meth:`ir.gradients.GradientFlow.accumulating_inputs`): one more elementwise addition in backward."""


def reads_param(node: Node) -> bool:
    """Whether ``node`` reads a parameter, directly or as the output of a collective on it (FSDP's gather)."""
    return any(param_inputs(node))


def param_inputs(node: Node) -> tuple[bool, ...]:
    """Per input value of ``node``: a parameter, directly or as the output of a collective on it."""
    out = []
    for v in node.input_values():
        source = v.producer
        out.append(v.kind == "param" or (source is not None and source.op.startswith(COMM_PREFIX)
                                         and any(u.kind == "param" for u in source.input_values())))
    return tuple(out)


_NOTHING_SAVED = frozenset({"add", "sub", "neg", "rsub", "sum", "mean", "cat", "stack", "clone", "contiguous",
                            "_to_copy", "to", "copy", "index_select", "embedding", "full", "triu", "zeros", "ones"})
"""Ops whose backward reads no saved activation (only shapes, indices or the output gradient)."""


def kept_inputs(op: str, param_inputs: Sequence[bool]) -> tuple[bool, ...]:
    """Per input of ``op`` (``param_inputs``: which are parameters), whether its backward keeps it: the activation
    inputs of matmuls, GELU and other nonlinear elementwise ops and attention; a norm's or loss's first activation
    input (weights, targets and statistics are small); none of an op that keeps its output, a mask or nothing
    (see :func:`saved_for_backward`)."""
    name = normalize_op_name(op)
    if name in _NOTHING_SAVED or name in MASK_SAVED_OPS or name in OUTPUT_SAVED_OPS \
            or op_category(op) in ("view", "copy", "reduction", "embedding"):
        return (False,) * len(param_inputs)
    kept = [not p for p in param_inputs]
    if op_category(op) in ("norm", "loss") and True in kept:
        first = kept.index(True)
        kept = [i == first for i in range(len(kept))]
    return tuple(kept)


def keeps_for_backward(consumer: Node, position: int) -> bool:
    """Whether ``consumer`` keeps its input ``position`` for its own backward (:func:`kept_inputs`), outside a
    recomputed region: a gathered activation it reads there is what ``regather_activations`` keeps as a shard
    (the rule the ``regather`` pass marks gathers by and the planner prices them by)."""
    if consumer.op.startswith(COMM_PREFIX) or RECOMPUTE_ATTR in consumer.attrs:
        return False
    return kept_inputs(consumer.op, param_inputs(consumer))[position]


def saved_for_backward(record: ComputeRecord) -> tuple[list, list, int]:
    """What autograd keeps of one op for its backward: (types, SBPs, bytes per element override or 0).
    Its :func:`kept_inputs` (as :attr:`ComputeRecord.kept_sbps` says where that is not as read), the output
    (softmax and ops whose derivative is written with it; attention also keeps its output), a one-byte mask
    (dropout), or nothing (additions, copies, reductions, views). A value read by two ops counts twice; the
    all-gathered input of a matmul counts gathered unless it is kept as its shard. Ring attention keeps only
    its own blocks (its record's key/value layouts are those of the work: whole)."""
    if record.op == RING_ATTENTION:  # its own query, key and value blocks (laid out like the queries) and output
        return [*record.in_types[:3], *record.out_types[:1]], [record.in_sbps[0]] * 3 + list(record.out_sbps[:1]), 0
    name = normalize_op_name(record.op)
    if name in MASK_SAVED_OPS:
        return list(record.out_types[:1]), list(record.out_sbps[:1]), 1
    kept = kept_inputs(record.op, record.param_inputs or (False,) * len(record.in_types))
    as_kept = record.kept_sbps or (None,) * len(record.in_types)
    types = [t for t, k in zip(record.in_types, kept) if k]
    sbps = [shard or nd for nd, shard, k in zip(record.in_sbps, as_kept, kept) if k]
    if name in OUTPUT_SAVED_OPS or op_category(record.op) == "attention":
        types, sbps = types + list(record.out_types[:1]), sbps + list(record.out_sbps[:1])
    return types, sbps, 0


@dataclass
class CommRecord:
    """One collective step on mesh axis ``axis`` (index) converting a tensor whose SBP was ``sbp``."""

    op: str
    axis: int
    type: TensorType
    sbp: tuple
    has_grad: bool
    param: bool = False
    """A parameter's all-gather (FSDP): emitted programs free the gathered weight after its use and
    gather it again for backward, so it costs a second all-gather instead of activation memory."""
    recomputed: bool = False
    overlaps: "ComputeRecord | None" = None
    """For ring attention's key/value exchange: the attention whose blocks the transfers run under (each of
    the key and the value exchange overlaps half of its work); None for a plain collective."""
    routed: bool = False
    """Expert parallelism's exchange of routed rows (``moe.dispatch`` / ``moe.combine``): its bytes grow with the
    routing's imbalance (:attr:`CostContext.moe_imbalance`)."""
    chunks: int = 1
    """Routed rows exchanged in this many chunks of tokens (``moe_overlap_chunks``), overlapping the layer's
    expert compute (:func:`chunked_exchange_hidden_flops`)."""
    saved_by: "ComputeRecord | None" = None
    """For an activation's all-gather whose result backward keeps as the shard (``regather_activations``): the op
    that saves it. Backward gathers it again, launched ahead of that op's backward (the emitted runtime starts it
    when backward takes the activation gathered after it in forward, or, for the last one, when backward
    reaches the forward's outputs), so it is priced under that op's backward work."""


@dataclass
class ParamRecord:
    """A parameter: the elements each device stores, their size, and the mesh axes its gradient is summed over."""

    name: str
    local_elements: float
    grad_axes: tuple
    trainable: bool = True
    """False for a frozen parameter: stored, but no gradient and no optimizer state."""
    element_bytes: int = 4
    """Bytes per element as priced (the parameter's dtype, or a what-if precision's); its gradient has as many."""
    reduce_bytes: int | None = None
    """Bytes per gradient element as gradient reductions move it (None: :attr:`element_bytes`)."""

    @property
    def local_bytes(self) -> float:
        """Bytes each device stores (and, trainable, the bytes of its gradient)."""
        return self.local_elements * self.element_bytes

    @property
    def reduced_bytes(self) -> float:
        """Bytes of the gradient as a reduction moves it (the precision's reduce dtype)."""
        return self.local_elements * (self.reduce_bytes or self.element_bytes)


@dataclass
class CommItem:
    """A collective of a segment: ``kind`` over ``axis`` (a name), ``nbytes`` affine in the batch."""

    kind: str
    axis: str
    nbytes: np.ndarray
    backward: bool
    """True for collectives that run in the backward pass."""
    hidden_flops: np.ndarray | None = None
    """FLOPs (affine in the batch) of the computation the transfers overlap (ring attention's blocks): only
    the transfer time beyond that computation's is exposed. None: not overlapped."""
    chunks: int = 1
    """Run as this many collectives of ``nbytes / chunks`` each, pipelined with ``hidden_flops`` (MoE
    dispatch and combine under ``moe_overlap_chunks``): each chunk pays the collective's latency, and at least
    one chunk's transfer is exposed (the first dispatched, the last combined)."""
    fsdp: bool = False
    """One of an FSDP parameter's collectives: its gathers (which programs prefetch, see
    :meth:`cost.estimate.Estimator.prefetch_hidden`) or its gradient's reduce-scatter."""


@dataclass
class SegmentCost:
    """What one segment costs per microbatch on one device; arrays are ``[..., (constant, per batch)]``."""

    name: str
    fwd_flops: np.ndarray
    fwd_bytes: np.ndarray
    bwd_flops: np.ndarray
    bwd_bytes: np.ndarray
    fwd_ops: int
    bwd_ops: int
    fwd_kinds: tuple
    """Per row of the forward arrays: (op name, cost category), to look up the device's efficiency."""
    bwd_kinds: tuple
    """The same for the backward rows."""
    bwd_sizes: np.ndarray
    """Per backward row, the forward FLOPs of its op (what size-dependent efficiencies are read at)."""
    comms: list
    saved_bytes: np.ndarray
    output_bytes: np.ndarray
    """Bytes of the values this segment hands to later segments (what a pipeline cut after it sends)."""
    params: list
    model_flops: np.ndarray
    """Forward + backward FLOPs of the whole (unsplit) segment, for MFU."""
    recomputed_part: "SegmentCost | None" = None
    """The ops of this segment the program recomputes in backward (their forward runs twice; what
    they keep for backward is alive only while their backward runs), or None."""
    bwd_weight_share: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Per backward row, the share that computes parameter gradients (:func:`~cost.ops.weight_gradient_share`)."""
    region_input_bytes: np.ndarray = field(default_factory=lambda: np.zeros(2))
    """Bytes of the activations its recomputed ops' regions read from outside (:attr:`ComputeRecord.region_inputs`):
    kept for each microbatch in flight, while what the recomputed ops save is not."""

    def kept_bytes(self, batch: float) -> float:
        """Activation bytes it keeps for each microbatch in flight at ``batch`` samples: what its ops save for
        backward, less what its recomputed ops save (:meth:`rematerialised_bytes`), plus the inputs of its
        recomputed regions."""
        if self.recomputed_part is None:
            return at(self.saved_bytes, batch)
        return (at(self.saved_bytes, batch) - self.rematerialised_bytes(batch)
                + at(self.recomputed_part.region_input_bytes, batch))

    def rematerialised_bytes(self, batch: float) -> float:
        """What its recomputed ops save for backward: alive only while their backward runs."""
        if self.recomputed_part is None:
            return 0.0
        return min(at(self.saved_bytes, batch), at(self.recomputed_part.saved_bytes, batch))

    def param_elements(self, trainable_only: bool = False) -> float:
        """Parameter elements one device stores for this segment (``trainable_only``: those with a
        gradient and optimizer state)."""
        return sum(p.local_elements for p in self.params if p.trainable or not trainable_only)

    def param_bytes(self, trainable_only: bool = False) -> float:
        """Bytes of the parameters one device stores for this segment (``trainable_only``: as above); a
        trainable parameter's gradient has as many."""
        return sum(p.local_bytes for p in self.params if p.trainable or not trainable_only)

    def reduced_grad_bytes(self) -> float:
        """Bytes of this segment's gradients as a reduction moves them (the precision's reduce dtype)."""
        return sum(p.reduced_bytes for p in self.params if p.trainable)

    def compute_time(self, batch: float, device: Device, precision: Precision,
                     overhead_s: float | None = None) -> tuple[float, float]:
        """(forward, backward) seconds of this segment's ops on ``device`` at batch size ``batch``: each
        op's roofline divided by the device's efficiency for it, plus a dispatch overhead per op
        (``overhead_s`` forward and twice that backward when given, else the device's measured pair)."""
        fwd_overhead, bwd_overhead = op_overheads(device, overhead_s)
        fwd_eff, bwd_eff = self._efficiencies(device, batch)
        return (_rows_seconds(self.fwd_flops, self.fwd_bytes, batch, device, precision, fwd_eff)
                + self.fwd_ops * fwd_overhead,
                _rows_seconds(self.bwd_flops, self.bwd_bytes, batch, device, precision, bwd_eff)
                + self.bwd_ops * bwd_overhead)

    def weight_gradient_time(self, batch: float, device: Device, precision: Precision,
                             overhead_s: float | None = None) -> float:
        """Seconds of the backward (part of :meth:`compute_time`'s) that compute parameter gradients:
        what a split backward's ``W`` runs, the rest being its ``B``."""
        if not len(self.bwd_weight_share) or not self.bwd_weight_share.any():
            return 0.0
        _, bwd_overhead = op_overheads(device, overhead_s)
        _, bwd_eff = self._efficiencies(device, batch)
        seconds = _rows_seconds(self.bwd_flops, self.bwd_bytes, batch, device, precision, bwd_eff,
                                self.bwd_weight_share)
        return seconds + float(np.count_nonzero(self.bwd_weight_share)) * bwd_overhead

    def _efficiencies(self, device: Device, batch: float) -> tuple:
        """Per-row efficiency arrays of ``device`` at batch size ``batch`` (1.0 when it lists none)."""
        if not device.efficiency:
            return 1.0, 1.0
        fwd_sizes = self.fwd_flops[:, 0] + self.fwd_flops[:, 1] * batch if len(self.fwd_flops) else []
        bwd_sizes = self.bwd_sizes[:, 0] + self.bwd_sizes[:, 1] * batch if len(self.bwd_sizes) else []
        return (np.array([device.efficiency_of(*kind, flops=f)[0] for kind, f in zip(self.fwd_kinds, fwd_sizes)]),
                np.array([device.efficiency_of(*kind, flops=f)[1] for kind, f in zip(self.bwd_kinds, bwd_sizes)]))


def _rows_seconds(flops: np.ndarray, nbytes: np.ndarray, batch: float, device: Device, precision: Precision,
                  efficiency, shares: np.ndarray | None = None) -> float:
    """The summed :func:`~cost.ops.compute_seconds` of ``(constant, per batch)`` rows at batch size ``batch``
    (each row weighted by ``shares`` when given)."""
    if not len(flops):
        return 0.0
    seconds = compute_seconds(flops[:, 0] + flops[:, 1] * batch, nbytes[:, 0] + nbytes[:, 1] * batch,
                              peak_flops(device, precision), device.memory_bandwidth_Bps, efficiency)
    return float((seconds * shares).sum() if shares is not None else seconds.sum())


def at(affine: np.ndarray, batch: float) -> float:
    """Evaluate a ``(constant, per batch)`` pair."""
    return float(affine[0] + affine[1] * batch)


# --------------------------------------------------------------------------------------------------
# Building segment costs from records
# --------------------------------------------------------------------------------------------------


@dataclass
class CostContext:
    """What turns records into numbers: the mesh the SBPs refer to, bound dims and the precision."""

    mesh: Mesh
    dims: dict
    """Bindings of the non-batch symbols (``seq``) at the example sizes."""
    precision: Precision
    train: bool = True
    moe_imbalance: float = 1.0
    """Rows the busiest rank of expert parallelism gets, over the balanced share: its experts' matmuls and its
    all-to-all traffic scale by it (1: tokens spread evenly over experts)."""

    def dims_at(self, batch: float) -> dict:
        """The bindings with the batch symbol at ``batch``."""
        return {**self.dims, BATCH_SYMBOL: batch}

    def affine(self, fn) -> np.ndarray:
        """``fn(dims)`` at batch 1 and 2, as (constant, slope)."""
        one, two = fn(self.dims_at(1.0)), fn(self.dims_at(2.0))
        return np.array([2 * one - two, two - one])


def op_work(record: ComputeRecord, dims: dict, mesh: Mesh, precision: Precision, local: bool = True
            ) -> tuple[float, float, float, float]:
    """(forward FLOPs, bytes moved, backward FLOPs, backward bytes moved) of one op, on one device's shards (or
    unsplit); the backward's are 0 for an op without a gradient."""
    ins = [concrete_shape(t, dims) for t in record.in_types]
    outs = [concrete_shape(t, dims) for t in record.out_types]
    if local:
        ins = [local_shape(s, nd, mesh.shape) for s, nd in zip(ins, record.in_sbps)]
        outs = [local_shape(s, nd, mesh.shape) for s, nd in zip(outs, record.out_sbps)]
    element_bytes = tuple(precision.element_bytes(t.dtype) for t in (*record.in_types, *record.out_types))
    gradients = (record.grad_inputs or None, record.accumulated_inputs or (False,) * len(ins))
    return _work(record.op, tuple(ins), tuple(outs), element_bytes, record.has_grad, record.attrs, gradients)


@functools.lru_cache(maxsize=65536)
def _work(op: str, ins: tuple, outs: tuple, element_bytes: tuple, has_grad: bool, attrs: tuple = (),
          gradients: tuple = (None, ())) -> tuple[float, float, float, float]:
    """``element_bytes``: per tensor, the inputs' then the outputs'; ``gradients``: the record's input gradients
    (None: every input's) and which of them autograd adds to another (each such addition reads two gradients and
    writes their sum)."""
    flops = float(op_flops(op, ins, outs, dict(attrs)))
    nbytes = float(op_bytes(op, ins, outs, dtype_bytes=element_bytes))
    if not has_grad:
        return flops, nbytes, 0.0, 0.0
    grad_inputs, accumulated = gradients
    additions = sum(3 * size * float(numel(shape)) for shape, size, added in zip(ins, element_bytes, accumulated)
                    if added)
    return (flops, nbytes, float(op_backward_flops(op, ins, outs, dict(attrs), grad_inputs)),
            float(op_backward_bytes(op, ins, outs, dtype_bytes=element_bytes, grad_inputs=grad_inputs)) + additions)


def cost_attrs(node: Node) -> tuple:
    """The arguments of ``node`` its cost depends on, as ``(name, value)`` pairs: ``is_causal`` of attention
    (a fused causal kernel does half the work; ring attention skips the key blocks its mask hides)."""
    if node.op == RING_ATTENTION:
        return (("is_causal", bool(arg(node, "causal"))),)
    if op_category(node.op) == "attention" and node.op.startswith("aten."):
        try:
            return (("is_causal", bool(arg(node, "is_causal"))),)
        except SchemaError:  # an attention op without that argument
            return ()
    return ()


def compute_record(node: Node, in_sbps: tuple, out_sbps: tuple, gradients: GradientFlow, recomputed: bool = False,
                   kept_sbps: tuple = ()) -> ComputeRecord:
    """The :class:`ComputeRecord` of ``node`` computed with the given layouts (the op as it costs, see
    :func:`costed_op`, and its :func:`cost_attrs`; which gradients its backward computes and sums, as ``gradients``
    says; ``kept_sbps``: see :attr:`ComputeRecord.kept_sbps`); the simulator and the planner both make them here."""
    return ComputeRecord(costed_op(node), tuple(v.type for v in node.input_values()), tuple(in_sbps),
                         tuple(o.type for o in node.outputs), tuple(out_sbps), gradients.has_grad(node), recomputed,
                         reads_param(node), cost_attrs(node), param_inputs(node), kept_sbps=tuple(kept_sbps),
                         grad_inputs=gradients.input_grads(node),
                         accumulated_inputs=gradients.accumulating_inputs(node))


def regathers(node: Node) -> bool:
    """Whether ``node`` is an activation's all-gather whose result backward keeps as the shard and gathers again
    (``regather_activations``, see :data:`ir.ops.comm.REGATHER_KWARG`)."""
    return node.op == "comm.all_gather" and bool(node.kwargs.get(REGATHER_KWARG))


def region_inputs(node: Node, seen: set, layout_of) -> tuple:
    """For a node of a recomputed region: (type, N-D SBP) of the activations its region reads from outside
    through it, looked for through the region's own collectives (``seen``: ids already counted; ``layout_of(value,
    position)``: the layout a value entering at input ``position`` has). See :attr:`ComputeRecord.region_inputs`."""
    region = node.attrs.get(RECOMPUTE_ATTR)
    out = []
    for position, (v, is_param) in enumerate(zip(node.input_values(), param_inputs(node))):
        source = v
        while source.producer is not None and source.producer.op.startswith(COMM_PREFIX) \
                and source.producer.attrs.get(RECOMPUTE_ATTR) == region:
            source = source.producer.input_values()[0]
        inside = source.producer is not None and source.producer.attrs.get(RECOMPUTE_ATTR) == region
        if is_param or inside or source.kind in ("param", "buffer") or id(source) in seen:
            continue
        seen.add(id(source))
        out.append((source.type, layout_of(source, position)))
    return tuple(out)


def _kept_as_shards(node: Node) -> tuple:
    """Per input of ``node``, the SBP it was gathered from where a regathering all-gather made it, else None;
    empty where none did (:attr:`ComputeRecord.kept_sbps`)."""
    kept = tuple(v.producer.input_values()[0].sbp if v.producer is not None and regathers(v.producer) else None
                 for v in node.input_values())
    return kept if any(s is not None for s in kept) else ()


@functools.lru_cache(maxsize=4096)
def op_kind(op: str) -> tuple[str, str]:
    """(op name, cost category): the keys a device's efficiency table is looked up by."""
    return normalize_op_name(op), op_category(op)


def is_view(op: str) -> bool:
    """Ops that move no data (views, metadata)."""
    return op_category(op) == "view"


def segment_cost(name: str, computes: Sequence[ComputeRecord], comms: Sequence[CommRecord],
                 params: Sequence[ParamRecord], output_values: Sequence[tuple[TensorType, tuple]],
                 ctx: CostContext, *, split_recomputed: bool = True) -> SegmentCost:
    """The :class:`SegmentCost` of a segment's records (``output_values``: (type, SBP) handed on);
    records marked recomputed also form its ``recomputed_part``."""
    fwd_flops, fwd_bytes, bwd_flops, bwd_bytes, bwd_sizes, weight_shares = [], [], [], [], [], []
    fwd_kinds, bwd_kinds = [], []
    fwd_ops = bwd_ops = 0
    saved = np.zeros(2)
    region_inputs = np.zeros(2)
    model = np.zeros(2)
    for record in computes:
        if record.region_inputs and ctx.train:  # a view too may be where a recomputed region reads its input
            region_inputs += _local_bytes(*zip(*record.region_inputs), ctx)
        if is_view(record.op):  # no work, but a dispatched op (and a backward node) all the same
            dispatched = op_kind(record.op)[0] not in UNDISPATCHED_OPS
            fwd_ops += dispatched
            bwd_ops += dispatched and record.has_grad and ctx.train
            continue
        work = ctx.affine(lambda d, r=record: np.array(op_work(r, d, ctx.mesh, ctx.precision)))
        if record.op == EXPERT_MM:
            work = work * ctx.moe_imbalance
        kind = op_kind(record.op)
        fwd_flops.append(work[:, 0])
        fwd_bytes.append(work[:, 1])
        fwd_kinds.append(kind)
        fwd_ops += 1
        if record.has_grad and ctx.train:
            bwd_flops.append(work[:, 2])
            bwd_bytes.append(work[:, 3])
            bwd_sizes.append(work[:, 0])
            bwd_kinds.append(kind)
            weight_shares.append(weight_gradient_share(record.op, record.param_inputs, record.grad_inputs or None)
                                 if record.reads_param else 0.0)
            bwd_ops += 1
            types, sbps, element_bytes = saved_for_backward(record)
            saved += _local_bytes(types, sbps, ctx, element_bytes)
        full = ctx.affine(lambda d, r=record: np.array(op_work(r, d, ctx.mesh, ctx.precision, local=False)))
        model += full[:, 0] + (full[:, 2] if ctx.train else 0.0)
    items = []
    expert_hidden = _expert_hidden_flops(computes, comms, ctx)
    for record in comms:
        kind = record.op[len(COMM_PREFIX):]
        nbytes = ctx.affine(lambda d, r=record: _comm_bytes(r, d, ctx)) * (ctx.moe_imbalance if record.routed else 1.0)
        axis = ctx.mesh.axes[record.axis]
        fwd_hidden, bwd_hidden = expert_hidden(record) if record.chunks > 1 else _hidden_flops(record, ctx)
        items.append(CommItem(kind, axis, nbytes, False, fwd_hidden, record.chunks, fsdp=record.param))
        if record.has_grad and ctx.train:
            items.append(CommItem(ADJOINTS[record.op][len(COMM_PREFIX):], axis, nbytes, True, bwd_hidden,
                                  record.chunks, fsdp=record.param))
        if kind == "all_gather" and record.has_grad and ctx.train and record.saved_by is not None:
            # an activation kept as its shard, gathered again under the backward of the op that saved it
            items.append(CommItem(kind, axis, nbytes, True, _regather_hidden_flops(record.saved_by, ctx)))
        elif kind == "all_gather" and record.has_grad and ctx.train and (record.param or record.overlaps is not None):
            # a parameter gathered again for backward; a ring's key/value blocks passed around again
            items.append(CommItem(kind, axis, nbytes, True, bwd_hidden, fsdp=record.param))
    output = np.zeros(2)
    for t, nd in output_values:
        output += _local_bytes((t,), (nd,), ctx)
    part = None
    if split_recomputed and any(r.recomputed for r in (*computes, *comms)):
        part = segment_cost(f"{name} (recomputed)", [r for r in computes if r.recomputed],
                            [r for r in comms if r.recomputed], [], [], ctx, split_recomputed=False)
    return SegmentCost(name, _stack(fwd_flops), _stack(fwd_bytes), _stack(bwd_flops), _stack(bwd_bytes), fwd_ops,
                       bwd_ops, tuple(fwd_kinds), tuple(bwd_kinds), _stack(bwd_sizes), items, saved, output,
                       list(params), model, part, np.array(weight_shares), region_inputs)


def chunked_exchange_hidden_flops(expert_flops: np.ndarray, chunks: int) -> np.ndarray:
    """The FLOPs one of a MoE layer's two row exchanges (dispatch or combine) in ``chunks`` chunks runs under,
    of its experts' ``expert_flops``: while one chunk computes, the next chunk's dispatch and the previous
    chunk's combine are in flight, so ``chunks - 1`` chunks' compute hides transfers, shared by the two
    exchanges (half each). One chunk of each exchange stays exposed (:attr:`CommItem.chunks`)."""
    return expert_flops * (chunks - 1) / chunks / 2


def _expert_hidden_flops(computes: Sequence[ComputeRecord], comms: Sequence[CommRecord], ctx: CostContext):
    """A function giving a chunked routed exchange's (forward, backward) hidden FLOPs: the segment's expert
    matmuls (``moe.expert_mm``) per chunked layer (each has a dispatch and a combine)."""
    layers = sum(r.routed and r.chunks > 1 for r in comms) / 2
    if not layers:
        return lambda record: (None, None)
    work = [ctx.affine(lambda d, r=r: np.array(op_work(r, d, ctx.mesh, ctx.precision))) * ctx.moe_imbalance
            for r in computes if r.op == EXPERT_MM]
    total = sum(work) / layers if work else np.zeros((2, 4))
    return lambda record: (chunked_exchange_hidden_flops(total[:, 0], record.chunks),
                           chunked_exchange_hidden_flops(total[:, 2], record.chunks))


def _regather_hidden_flops(saved_by: ComputeRecord, ctx: CostContext) -> np.ndarray:
    """The backward FLOPs a regathered activation's all-gather runs under: those of the op that saved it."""
    return ctx.affine(lambda d: np.array(op_work(saved_by, d, ctx.mesh, ctx.precision)))[:, 2]


def _hidden_flops(record: CommRecord, ctx: CostContext) -> tuple:
    """The (forward, backward) FLOPs a ring exchange overlaps, affine in the batch (None, None otherwise).

    Under the load-balanced split every one of the ring's ``n`` steps computes the same share of the rank's
    (causal: half) work, and ``n - 1`` of them have a block in flight; the key and the value transfer share
    that computation, half each."""
    if record.overlaps is None:
        return None, None
    return _ring_hidden_flops(record.overlaps, ctx.mesh.shape[record.axis], ctx)


def _ring_hidden_flops(attention: ComputeRecord, ways: int, ctx: CostContext) -> tuple:
    """(forward, backward) FLOPs of ``attention`` that one of its key or value transfers on a ring of ``ways``
    ranks runs under (see :func:`_hidden_flops`)."""
    work = ctx.affine(lambda d: np.array(op_work(attention, d, ctx.mesh, ctx.precision)) * (ways - 1) / ways / 2)
    return work[:, 0], work[:, 2]


def ring_exchange_items(attention: ComputeRecord, key_value: Sequence[tuple], ways: int, axis: str,
                        ctx: CostContext) -> list[CommItem]:
    """The key/value exchange of ring attention over a cp axis that the estimator adds like data parallelism
    (``ways`` ranks; ``ctx``'s mesh has no cp axis and the batch symbol stands for each rank's share of the
    tokens, ``profile.batch_divisor`` counting the cp ranks): per key and value (``key_value``: their
    (type, SBP)), a forward all-gather and in training a backward all-gather and reduce-scatter, hidden behind
    the blocks' computation as in a compiled plan (:func:`_hidden_flops`)."""
    fwd_hidden, bwd_hidden = _ring_hidden_flops(attention, ways, ctx)
    items = []
    for t, nd in key_value:
        nbytes = ways * _local_bytes((t,), (nd,), ctx)  # the gathered blocks: the whole sequence
        items.append(CommItem("all_gather", axis, nbytes, False, fwd_hidden))
        if attention.has_grad and ctx.train:
            items += [CommItem("reduce_scatter", axis, nbytes, True, bwd_hidden),
                      CommItem("all_gather", axis, nbytes, True, bwd_hidden)]
    return items


def _stack(rows: list) -> np.ndarray:
    return np.array(rows) if rows else np.zeros((0, 2))


def _local_bytes(types: Iterable[TensorType], sbps: Iterable, ctx: CostContext, element_bytes: int = 0
                 ) -> np.ndarray:
    """Bytes of one device's shards of the float tensors among ``types``, each at its element size (or at
    ``element_bytes`` when given: dropout keeps a one-byte mask)."""
    total = np.zeros(2)
    for t, nd in zip(types, sbps):
        if t.torch_dtype.is_floating_point:
            size = element_bytes or ctx.precision.element_bytes(t.dtype)
            total += ctx.affine(lambda d, t=t, nd=nd, size=size: float(
                np.prod(local_shape(concrete_shape(t, d), nd, ctx.mesh.shape))) * size)
    return total


def _comm_bytes(record: CommRecord, dims: dict, ctx: CostContext) -> float:
    """Bytes in the cost model's convention: the full buffer (all-reduce, gather output, scatter input);
    each rank's send buffer for all-to-all."""
    shape = concrete_shape(record.type, dims)
    full = concrete_axis_bytes(shape, record.sbp, ctx.mesh.shape, record.axis,
                               ctx.precision.element_bytes(record.type.dtype))
    if record.op == "comm.all_to_all":
        return full / ctx.mesh.shape[record.axis]
    return full


def param_record(value: Value, sbp: tuple, mesh: Mesh, train: bool, precision: Precision | None = None
                 ) -> ParamRecord:
    """A parameter stored with ``sbp``: local elements and their size (its dtype's, or ``precision``'s), and
    the axes where it is ``B`` (its gradient is a partial sum there and gets all-reduced; none for a frozen
    parameter)."""
    shape = tuple(float(d) for d in value.type.shape)
    local = float(np.prod(local_shape(shape, sbp, mesh.shape))) if shape else 1.0
    axes = tuple(a for a, s, n in zip(mesh.axes, sbp, mesh.shape) if not isinstance(s, Split) and n > 1)
    size = precision.element_bytes(value.type.dtype) if precision else dtype_size(value.type.dtype)
    return ParamRecord(value.target or value.name, local, axes if train and value.trainable else (), value.trainable,
                       size, precision.reduce_bytes if precision else None)


# --------------------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------------------


@dataclass
class Profile:
    """A model's segments in order (``pre``, one per block, ``post``) and how to read their batch size.

    ``batch_divisor``: the segments' batch symbol counts samples per ``batch_divisor`` of the global
    microbatch (1 when the SBPs already split the batch over data parallelism; the data-parallel degree
    when the planner priced one replica and handles data parallelism itself).
    """

    segments: list
    mesh: Mesh
    batch_divisor: int
    global_batch: int
    tokens_per_sample: int
    train: bool
    precision: Precision
    analytic_axes: tuple = ()
    """Mesh axes the segments do not model (data parallelism the estimator adds itself)."""
    notes: list = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        """Blocks between ``pre`` and ``post``."""
        return len(self.segments) - 2

    def param_element_bytes(self) -> float:
        """Bytes per parameter element, averaged over every parameter (4.0 for a model without any)."""
        elements = sum(s.param_elements() for s in self.segments)
        return sum(s.param_bytes() for s in self.segments) / elements if elements else 4.0


def ir_profile(graph: Graph, precision: Precision, *, global_batch: int | None = None,
               structure: LayerStructure | None = None, moe_imbalance: float = 1.0) -> Profile:
    """The profile of a graph the layout passes have annotated (every value has an SBP on one mesh);
    ``moe_imbalance``: see :attr:`CostContext.moe_imbalance`."""
    if not graph.meshes:
        raise ValueError("expected a laid-out graph (run the layout passes first); found no mesh")
    mesh = next(iter(graph.meshes.values()))
    dims = {k: v for k, v in (graph.attrs.get("example_dims") or {}).items() if k != BATCH_SYMBOL}
    train = graph.loss is not None
    ctx = CostContext(mesh, dims, precision, train, moe_imbalance)
    structure = structure or find_layers(graph)
    gradients = gradient_flow(graph)
    first_use = _first_use_segment(graph, structure)
    params_by_segment: dict[int, list] = {}
    for p in graph.params:
        if p.kind == "param" and id(p) in first_use:
            params_by_segment.setdefault(first_use[id(p)], []).append(param_record(p, p.sbp, mesh, train, precision))
    crossing = _crossing_values(graph, structure)
    segments = []
    for index, (name, nodes) in enumerate(structure.segments()):
        computes, comms = _records(nodes, mesh, gradients)
        segments.append(segment_cost(name, computes, comms, params_by_segment.get(index, []),
                                     [(v.type, v.sbp) for v in crossing.get(index, [])], ctx))
    batch = global_batch or int((graph.attrs.get("example_dims") or {}).get(BATCH_SYMBOL, 1))
    tokens = int(dims.get("seq", 1))
    return Profile(segments, mesh, 1, batch, tokens, train, precision)


def _records(nodes: Sequence[Node], mesh: Mesh, gradients: GradientFlow) -> tuple[list, list]:
    computes, comms = [], []
    regathered = {}  # id of a regathered activation -> the index of its all-gather's record, until an op saves it
    entered = set()  # ids of the activations recomputed regions read from outside, counted once
    for node in nodes:
        has_grad = gradients.has_grad(node)
        if node.op.startswith(COMM_PREFIX):
            if node.op in ADJOINTS:  # boxing collectives; pipeline transfers are the estimator's
                source = node.input_values()[0]
                if regathers(node):
                    regathered[id(node.outputs[0])] = len(comms)
                comms.append(CommRecord(node.op, mesh.axis_index(node.kwargs["axis"]), source.type, source.sbp,
                                        has_grad, node.op == "comm.all_gather" and source.kind == "param",
                                        RECOMPUTE_ATTR in node.attrs))
            continue
        ins = node.input_values()
        if node.op in EXCHANGING and exchanges(node, mesh, ins[0].sbp):
            comms += _expert_exchanges(node, mesh, has_grad)
            continue
        ring = node.op == RING_ATTENTION and runs_ring(node, mesh, ins[0].sbp)
        record = compute_record(node, _ring_work_layouts(node, mesh) if ring else tuple(v.sbp for v in ins),
                                tuple(o.sbp for o in node.outputs), gradients, RECOMPUTE_ATTR in node.attrs,
                                _kept_as_shards(node))
        if record.recomputed:
            record = replace(record, region_inputs=region_inputs(node, entered, lambda v, _: v.sbp))
        computes.append(record)
        for position, v in enumerate(ins):
            if id(v) in regathered and keeps_for_backward(node, position):
                index = regathered.pop(id(v))
                comms[index] = replace(comms[index], saved_by=record)
        if ring:
            comms += _ring_exchanges(node, mesh, record)
    return computes, comms


def _expert_exchanges(node: Node, mesh: Mesh, has_grad: bool) -> list[CommRecord]:
    """A MoE dispatch or combine exchanging rows on its axis: one all-to-all of each rank's rows (adjoint: the
    reverse all-to-all), the dispatch's small all-to-all of split sizes first (no gradient)."""
    axis = mesh.axis_index(arg(node, "axis"))
    rows = node.outputs[0] if node.op == DISPATCH else node.input_values()[0]
    exchange = CommRecord("comm.all_to_all", axis, rows.type, rows.sbp, has_grad, routed=True,
                          chunks=int(arg(node, "chunks")))
    if node.op != DISPATCH:
        return [exchange]
    route = node.outputs[1]
    return [CommRecord("comm.all_to_all", axis, route.type, route.sbp, False), exchange]


def _ring_work_layouts(node: Node, mesh: Mesh) -> tuple:
    """What ring attention on sequence shards computes costs like: each rank's queries against every key and
    value (keys and values whole on the ring axis)."""
    axis = mesh.axis_index(arg(node, "axis"))
    key, value = ring_inputs(node)[1:3]
    return tuple(tuple(Broadcast() if i == axis and v in (key, value) else s for i, s in enumerate(v.sbp))
                 for v in node.input_values())


def _ring_exchanges(node: Node, mesh: Mesh, attention: ComputeRecord) -> list[CommRecord]:
    """The key/value blocks travel the ring ``n - 1`` hops forward (as much traffic as all-gathering them) and
    again with their gradients backward (an all-gather's and a reduce-scatter's), under the blocks' work."""
    axis = mesh.axis_index(arg(node, "axis"))
    return [CommRecord("comm.all_gather", axis, v.type, v.sbp, attention.has_grad, False, attention.recomputed,
                       overlaps=attention) for v in ring_inputs(node)[1:3]]


_STRIDE_CHANGING = ("transpose", "permute", "t")


def costed_op(node: Node) -> str:
    """The op as it costs: ``reshape`` of a transposed or permuted tensor copies it (a view cannot
    express it), so it is priced as ``clone``."""
    if op_kind(node.op)[0] == "reshape":
        source = node.input_values()[0].producer
        if source is not None and op_kind(source.op)[0] in _STRIDE_CHANGING:
            return "aten.clone.default"
    return node.op


def _segment_index(structure: LayerStructure) -> dict[int, int]:
    out = {}
    for index, (_, nodes) in enumerate(structure.segments()):
        for node in nodes:
            out[id(node)] = index
    return out


def _first_use_segment(graph: Graph, structure: LayerStructure) -> dict[int, int]:
    where = _segment_index(structure)
    first: dict[int, int] = {}
    for node in graph.nodes:
        for v in node.input_values():
            if v.kind in ("param", "buffer") and id(node) in where:
                first.setdefault(id(v), where[id(node)])
    return first


def _crossing_values(graph: Graph, structure: LayerStructure) -> dict[int, list]:
    """Per segment index k: the values produced at or before k and read after k (a cut after k sends them)."""
    where = _segment_index(structure)
    last_reader: dict[int, int] = {}
    for node in graph.nodes:
        for v in node.input_values():
            if v.producer is not None and id(node) in where:
                last_reader[id(v)] = max(last_reader.get(id(v), -1), where[id(node)])
    out: dict[int, list] = {}
    for node in graph.nodes:
        if id(node) not in where:
            continue
        for v in node.outputs:
            for k in range(where[id(node)], last_reader.get(id(v), -1)):
                out.setdefault(k, []).append(v)
    return out
