"""Step time, memory and traffic of a plan: a :class:`~cost.segments.Profile` placed by a
:class:`~cost.placement.PlanShape` on a cluster (the estimator the planner and the simulator share).

Per stage, forward and backward times are the segments' compute (slowest device kind of the stage)
plus their collectives, priced with :func:`cost.collectives.collective_time` on every group of the mesh axis they
run on (the slowest group counts); recomputed segments run their forward again in backward. The
pipeline is timed with :func:`cost.timeline.simulate` on the schedule's real action lists (point-to-point
transfers between the stages' devices included), or, with ``exact=False``, with the closed form
``sum_k (F_k + B_k) + (m - 1) max_k (F_k + B_k)`` used to rank candidates quickly (less the bubble
the zero-bubble schedules fill, see :func:`_closed_form`). Their split backwards run the weight-gradient part of each backward (``W``: the parameter-gradient share of the
segments' backward ops, :meth:`~cost.segments.SegmentCost.weight_gradient_time`) as its own action. Gradient
all-reduces run per pipeline rank during its last backward, hiding behind it as far as the devices'
``comm_overlap`` allows (the rest is exposed after it); the optimizer
step follows. Memory per device is :class:`cost.memory.MemoryEstimate` with the activations kept by the
microbatches in flight on that rank under the schedule: from a stage's forward to the end of its backward,
for a split backward to its ``W`` (the runtime keeps the stage's autograd graph, all of its activations,
until then).

Data parallelism the profile leaves to the estimator (``profile.analytic_axes``) splits the batch over
``dp`` and, with ``fsdp``, gathers each segment's parameters before use, frees them after, gathers them
again for backward and reduce-scatters the gradients, as the emitted programs do (one segment's gathered
parameters are alive at a time). Those programs prefetch the gathers: the next segment's gathers run while
the current segment computes, so only what its compute does not hide is exposed (see
:meth:`Estimator.prefetch_hidden`); the reduce-scatters are waited for where backward produces them.
"""
from __future__ import annotations

import functools
from collections import Counter, defaultdict
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from cluster import Cluster, Device
from cost.boxing import distinct_groups
from cost.collectives import collective_time, collective_traffic, p2p_time
from cost.memory import OPTIMIZER_STATES, MemoryEstimate, optimizer_step_bytes
from cost.ops import Precision, compute_seconds, peak_flops
from cost.placement import DATA_AXIS, PlanShape, axis_groups
from cost.segments import Profile, SegmentCost, at
from cost.timeline import ScheduleTimeline, simulate
from ir.types import CONTEXT_AXIS
from ir.schedules import SCHEDULES, build_pipeline_schedule


GRAD_ACCUMULATIONS = ("autograd", "fused", "fp32_buffer")
"""The ways :attr:`PlanOptions.grad_accumulation` sums a step's microbatches' gradients."""
FP32_BUFFER_PASSES = 4
"""fp32 elements ``fp32_buffer`` accumulation moves per gradient element and microbatch, besides reading the
gradient: DeepSpeed's ``hp_grad.add_(lp.grad.to(float32))`` writes the copy, reads it and the buffer, writes the
buffer (deepspeed/runtime/bf16_optimizer.py, ``update_hp_grads``)."""
FSDP_PART = "fsdp gathers and reduce-scatters"
"""The breakdown's part for FSDP's parameter collectives (what of them is exposed)."""
ACCUMULATION_PART = "gradient accumulation"
"""The breakdown's part for summing the microbatches' gradients (:attr:`PlanOptions.grad_accumulation`)."""


@dataclass
class PlanOptions:
    """How to price plans: numbers the graph does not say."""

    global_batch: int | None = None
    """Samples per step (default: the example inputs' batch size)."""
    precision: str | Precision | None = None
    """None: the model's own dtypes (each tensor at its size, compute at the model dtype's peak); or a
    what-if: ``fp32``/``tf32``, or mixed ``bf16``/``fp16`` (2-byte activations and weights, fp32 master
    copy and optimizer state), or ``bf16-mixed``/``fp16-mixed`` (the same with gradients reduced in fp32), or a
    :class:`cost.ops.Precision` for a combination no name gives — see :meth:`cost.ops.Precision.resolve`."""
    optimizer: str = "adamw"
    """Optimizer state to budget memory for: ``sgd``, ``sgd_momentum``, ``adam`` or ``adamw``."""
    reference_batch: int = 1
    """Samples per replica at which layouts are solved (their costs are then affine in the batch)."""
    overhead_s: float | None = None
    """Per-op launch time (backward ops count twice); None: what each device measured (``sbpc
    calibrate``), else :data:`~cost.ops.DEFAULT_OP_OVERHEAD_S`."""
    memory_headroom: float = 0.9
    """Fraction of each device's memory a plan may use."""
    solver: str = "dp"
    """Intra-op solver: ``dp`` (fast, exact), ``ilp`` or ``z3`` (exact, slow)."""
    overlap_grad_sync: bool = True
    """Gradient all-reduces overlap the last microbatch's backward (DDP-style bucketing); False: they
    start after it, as in a runtime that synchronises once backward is done."""
    moe_imbalance: float = 1.0
    """Expert parallelism's routing imbalance: rows the busiest rank gets over the balanced share (>= 1); its
    experts' matmuls and its all-to-all bytes scale by it. 1: tokens spread evenly over the experts."""
    prefetch_gathers: bool = True
    """FSDP's parameter gathers are launched one segment ahead and run while the previous segment computes
    (as the emitted runtime does); False: each is waited for where it is used (all of it exposed)."""
    distributed_optimizer: bool | str = False
    """A what-if for comparing with Megatron-LM's ``--use-distributed-optimizer`` (ZeRO-1): each
    data-parallel rank keeps and updates only its share of the optimizer state and master weights; gradients
    are reduce-scattered (in the reduce dtype) instead of all-reduced and the updated parameters all-gathered
    (overlapping the next forward as ``--overlap-param-gather`` does, when ``overlap_grad_sync``). ``"all_reduce"``:
    the same sharded state, but every rank all-reduces the whole gradient before updating its share, as
    DeepSpeed's BF16 optimizer does at ZeRO stage 0 (its "own zero stage 1 equivalent"). sbpc's own programs
    shard optimizer state only with FSDP."""

    grad_accumulation: str = "autograd"
    """How the step's microbatches' weight gradients are summed: ``autograd`` (each microbatch after the first
    adds its gradient into the previous ones', a memory-bound read of both and write of the sum priced with the
    backward: what sbpc's programs run), ``fused`` (inside the weight-gradient GEMMs, at no cost of its own:
    Megatron-LM's ``--gradient-accumulation-fusion``) or ``fp32_buffer`` (every microbatch's gradient is cast to
    fp32 and added into an fp32 buffer the optimizer owns: DeepSpeed's BF16 optimizer, ``update_hp_grads``
    after each backward)."""

    def __post_init__(self):
        if self.grad_accumulation not in GRAD_ACCUMULATIONS:
            raise ValueError(f"expected grad_accumulation in {GRAD_ACCUMULATIONS}, found {self.grad_accumulation!r}")
        if self.distributed_optimizer not in (False, True, "all_reduce"):
            raise ValueError(f"expected distributed_optimizer True, False or 'all_reduce', found "
                             f"{self.distributed_optimizer!r}")

    def for_plan_precision(self, precision: Any) -> "PlanOptions":
        """These options for a plan of ``precision`` (a :class:`strategy.Precision` or None): a mixed
        precision is priced as the plan runs (its compute dtype) unless these options name one."""
        if precision is not None and precision.mixed and self.precision is None:
            return replace(self, precision=precision.compute)
        return self

    def key(self) -> tuple:
        """A hashable summary (cache keys): every option, in field order."""
        return tuple(getattr(self, f.name) for f in fields(self))

    def estimator(self, profile: Profile, cluster: Cluster) -> Estimator:
        """An :class:`Estimator` of ``profile`` on ``cluster`` with these options."""
        return Estimator(profile, cluster, self)


def optimizer_name(spec: Any) -> str:
    """``("AdamW", {...})`` / ``"SGD"`` / ``("SGD", {"momentum": 0.9})`` -> a cost-model optimizer name."""
    name, kwargs = (spec if isinstance(spec, tuple) else (spec, {}))
    name = name if isinstance(name, str) else getattr(name, "__name__", str(name))
    name = name.lower()
    if name == "sgd" and (kwargs or {}).get("momentum"):
        return "sgd_momentum"
    return name if name in ("sgd", "adam", "adamw") else "adamw"


class ParamSums(NamedTuple):
    """A segment's parameters as one device stores them."""

    elements: float
    trainable: float
    """Elements with a gradient and optimizer state."""
    nbytes: float


@dataclass
class StageEstimate:
    """One pipeline stage: its work per microbatch and what it keeps."""

    index: int
    rank: int
    layers: tuple
    devices: tuple
    fwd_compute_s: float
    fwd_comm_s: float
    bwd_compute_s: float
    bwd_comm_s: float
    recompute_s: float
    send_s: float
    """Point-to-point time to hand one microbatch's activations to the next stage."""
    weight_s: float = 0.0
    """The part of :attr:`bwd_compute_s` that computes parameter gradients (a split backward's ``W``)."""

    @property
    def fwd_s(self) -> float:
        """Forward seconds per microbatch."""
        return self.fwd_compute_s + self.fwd_comm_s

    @property
    def bwd_s(self) -> float:
        """Backward seconds per microbatch (recomputation included)."""
        return self.bwd_compute_s + self.bwd_comm_s + self.recompute_s


@dataclass
class Estimate:
    """What a plan costs per training step."""

    step_time_s: float
    stages: list
    pipeline_s: float
    """Forward/backward of all microbatches (the schedule's makespan)."""
    bubble_fraction: float
    grad_sync_s: dict
    """Pipeline rank -> (total, exposed) seconds of its gradient all-reduces."""
    optimizer_s: float
    memory: dict
    """Device -> :class:`~cost.memory.MemoryEstimate`."""
    fits: bool
    comm_bytes: dict
    """Link class -> bytes crossing links of that class per step."""
    flops_per_step: float
    rank_end_s: dict
    """Pipeline rank -> when its last backward ends."""
    timeline: ScheduleTimeline | None = None
    """The :class:`~cost.timeline.ScheduleTimeline` (exact estimates of pipelines), else None."""
    notes: list = field(default_factory=list)

    @property
    def peak_memory_bytes(self) -> dict:
        """Device -> bytes at the peak of the step."""
        return {d: float(m.total) for d, m in self.memory.items()}

    @property
    def max_memory_bytes(self) -> float:
        """The largest per-device peak."""
        return max(self.peak_memory_bytes.values(), default=0.0)


class Estimator:
    """Prices plans of one profile on one cluster (caches collective and device look-ups)."""

    def __init__(self, profile: Profile, cluster: Cluster, options: PlanOptions | None = None):
        self.profile = profile
        self.cluster = cluster
        self.options = options or PlanOptions()
        """How to price (launch overheads, memory headroom, overlaps, optimizer sharding, gradient sums)."""
        self._collectives: dict[tuple, float] = {}
        self._work: dict[tuple, tuple] = {}
        self._groups_cache: dict[tuple, tuple] = {}
        self._pinned: list = []  # device tuples whose ids key self._work
        self._memo: dict[tuple, Any] = {}  # sums, sends, device limits, rank layouts: by what they read
        self._copied = _copied_params(profile)

    # -- per stage ---------------------------------------------------------------------------------
    def microbatch_size(self, shape: PlanShape) -> float:
        """The value of the batch symbol in the profile's segments for one microbatch."""
        divisor = self.profile.batch_divisor
        return self.profile.global_batch / (shape.microbatches * divisor)

    def segment_work(self, shape: PlanShape, rank: int, j: int) -> tuple[float, float, float, float]:
        """(forward compute, forward comm, backward compute, backward comm) seconds per microbatch of
        segment ``j`` on pipeline rank ``rank`` (compute on the slowest device kind there)."""
        segment = self.profile.segments[j]
        devices = shape.stage_devices[rank]
        batch = self.microbatch_size(shape)
        key = (id(segment), id(devices), batch, shape.axes, shape.shape, shape.fsdp_axis)
        cache = self._work
        if key not in cache:
            self._pinned.append(devices)  # keeps the id unique while it keys the cache
            prof = self.profile
            times = [segment.compute_time(batch, d, prof.precision, self.options.overhead_s)
                     for d in _representatives(devices, self.cluster)]
            fwd, bwd = max(t[0] for t in times), max(t[1] for t in times)
            bwd += self.accumulation_time(segment, shape, devices)
            fwd_comm, bwd_comm = self._segment_comm(segment, shape, devices, batch)
            cache[key] = (fwd, fwd_comm, bwd, bwd_comm)
        return cache[key]

    def stage(self, shape: PlanShape, k: int) -> StageEstimate:
        """Forward/backward time per microbatch of stage ``k``."""
        rank = shape.rank_of_stage(k)
        totals = np.zeros(4)
        recompute = 0.0
        segments = shape.segments_of_stage(k, self.profile.num_layers)
        for j, (fwd_hidden, bwd_hidden) in zip(segments, self.prefetch_hidden(shape, rank, segments)):
            work = self.segment_work(shape, rank, j)
            totals += work
            totals[1] -= fwd_hidden
            totals[3] -= bwd_hidden
            recompute += self._recompute_time(shape, rank, j, work)
        send = self._send_time(shape, k, segments[-1], self.microbatch_size(shape))
        weight = sum(self.segment_weight_time(shape, rank, j) for j in segments) if _splits(shape) else 0.0
        return StageEstimate(k, rank, shape.stage_layers[k], shape.stage_devices[rank], *map(float, totals),
                             recompute, send, weight)

    def segment_weight_time(self, shape: PlanShape, rank: int, j: int) -> float:
        """Seconds of segment ``j``'s backward that compute parameter gradients, per microbatch on ``rank``."""
        segment = self.profile.segments[j]
        batch = self.microbatch_size(shape)
        devices = shape.stage_devices[rank]
        return self._remembered(("weight", id(segment), tuple(devices), batch), lambda: max(
            segment.weight_gradient_time(batch, d, self.profile.precision, self.options.overhead_s)
            for d in _representatives(devices, self.cluster)) + self.accumulation_time(segment, shape, devices))

    def accumulation_time(self, segment: SegmentCost, shape: PlanShape, devices: tuple) -> float:
        """Seconds per microbatch of summing ``segment``'s weight gradients across the step's microbatches
        (:attr:`PlanOptions.grad_accumulation`), as elementwise passes (:meth:`_elementwise_seconds`): with
        ``autograd``, each microbatch after the first reads its gradient and the sum so far and writes the new sum
        (averaged over the microbatches; 0 with one microbatch); with ``fp32_buffer``, every microbatch reads its
        gradient, writes its fp32 copy, reads that and the buffer and writes the buffer; 0 without training or
        where the sum is fused into the weight-gradient GEMMs."""
        m = shape.microbatches
        mode = self.options.grad_accumulation
        if mode == "fused" or not self.profile.train or (mode == "autograd" and m < 2):
            return 0.0
        params = [p for p in segment.params if p.trainable]
        if mode == "fp32_buffer":
            nbytes = sum(p.local_elements * (p.element_bytes + 4 * FP32_BUFFER_PASSES) for p in params)
        else:
            grad_bytes = self.profile.precision.grad_bytes
            nbytes = (m - 1) / m * 3 * sum(p.local_elements * grad_bytes(p.element_bytes) for p in params)
        return self._elementwise_seconds(nbytes / self.fsdp_shards(shape), devices)

    def _recomputed_part_forward(self, shape: PlanShape, rank: int, j: int) -> float:
        """Seconds of forward (compute and collectives) that segment ``j``'s recomputed ops run again."""
        part = self.profile.segments[j].recomputed_part
        devices = shape.stage_devices[rank]
        batch = self.microbatch_size(shape)
        compute = max(part.compute_time(batch, d, self.profile.precision, self.options.overhead_s)[0]
                      for d in _representatives(devices, self.cluster))
        return compute + self._segment_comm(part, shape, devices, batch)[0]

    def _segment_comm(self, segment, shape: PlanShape, devices: tuple, batch: float) -> tuple[float, float]:
        fwd = bwd = 0.0
        for item in segment.comms:
            if item.fsdp:
                continue
            seconds = self._exposed_seconds(item, devices, shape, batch)
            if item.backward:
                bwd += seconds
            else:
                fwd += seconds
        for (kind, axis, backward), seconds in self._grouped_fsdp(segment, shape, devices, batch).items():
            fwd, bwd = (fwd, bwd + seconds) if backward else (fwd + seconds, bwd)
        if self.fsdp_analytic(shape):  # gather for forward, gather again for backward, reduce-scatter grads
            gather = self._fsdp_gather(segment, shape, devices)
            fwd += gather
            grads = segment.reduced_grad_bytes()
            bwd += gather + self._collective("reduce_scatter", grads, devices, shape, shape.fsdp_axis)
        return fwd, bwd

    def _grouped_fsdp(self, segment, shape: PlanShape, devices: tuple, batch: float) -> dict:
        """(kind, axis, backward) -> seconds of the segment's FSDP parameter collectives of that kind: one
        collective of all their bytes, as the emitted runtime gathers a layer's shards (and reduce-scatters
        their gradients) together."""
        nbytes: dict[tuple, float] = defaultdict(float)
        for item in segment.comms:
            if item.fsdp:
                nbytes[(item.kind, item.axis, item.backward)] += at(item.nbytes, batch)
        return {key: self._collective(key[0], n, devices, shape, key[1]) for key, n in nbytes.items()}

    def prefetch_hidden(self, shape: PlanShape, rank: int, segments: Sequence[int]) -> list[tuple[float, float]]:
        """Per segment of ``segments`` (one stage's, in forward order), the (forward, backward) seconds of its FSDP
        parameter gathers that run while the segment before it in that pass computes, per microbatch.

        The program launches a segment's gathers when the previous one starts computing (forward: segment
        ``i - 1``; backward, which runs the segments in reverse: segment ``i + 1``), so a gather waits only for
        what that compute does not cover, as far as the devices hide communication behind compute at all
        (``comm_overlap``). Forward's first segment has nothing to hide behind; forward's last is not gathered
        again for backward (its parameters are kept: all of its backward gather is saved). A plan priced without
        prefetching (:attr:`PlanOptions.prefetch_gathers`) hides nothing."""
        if (not self.options.prefetch_gathers or len(segments) < 2
                or not (self.fsdp_analytic(shape) or self._gathers_params)):
            return [(0.0, 0.0)] * len(segments)
        devices = shape.stage_devices[rank]
        overlap = self._least(devices, "comm_overlap")
        work = [self.segment_work(shape, rank, j) for j in segments]
        gathers = [self.param_gathers(shape, rank, j) for j in segments]
        last = len(segments) - 1
        return [(overlap * min(fwd, work[p - 1][0]) if p > 0 else 0.0,
                 overlap * min(bwd, work[p + 1][2]) if p < last else bwd)
                for p, (fwd, bwd) in enumerate(gathers)]

    @functools.cached_property
    def _gathers_params(self) -> bool:
        """Whether the profile's own collectives gather parameters (an FSDP plan's IR)."""
        return any(item.fsdp for segment in self.profile.segments for item in segment.comms)

    def param_gathers(self, shape: PlanShape, rank: int, j: int) -> tuple[float, float]:
        """(forward, backward) seconds of segment ``j``'s FSDP parameter gathers per microbatch on ``rank``: the
        IR's parameter all-gathers, or the estimator's own gather of the segment (analytic FSDP)."""
        segment = self.profile.segments[j]
        devices = shape.stage_devices[rank]
        batch = self.microbatch_size(shape)
        fwd = bwd = self._fsdp_gather(segment, shape, devices)
        for (kind, _, backward), seconds in self._grouped_fsdp(segment, shape, devices, batch).items():
            if kind == "all_gather":
                fwd, bwd = (fwd, bwd + seconds) if backward else (fwd + seconds, bwd)
        return fwd, bwd

    def _fsdp_gather(self, segment, shape: PlanShape, devices: tuple) -> float:
        """Seconds of one all-gather of the segment's parameters over the FSDP axis (0 without FSDP)."""
        if not self.fsdp_analytic(shape):
            return 0.0
        return self._collective("all_gather", self.param_sums(segment).nbytes, devices, shape, shape.fsdp_axis)

    def param_sums(self, segment: SegmentCost) -> "ParamSums":
        """The parameter elements, trainable elements and bytes one device stores for ``segment`` (a segment of
        this estimator's profile, or its recomputed part), summed once."""
        return self._remembered(("params", id(segment)), lambda: ParamSums(
            segment.param_elements(), segment.param_elements(trainable_only=True), segment.param_bytes()))

    @functools.cached_property
    def param_element_bytes(self) -> float:
        """Bytes per parameter element over the whole profile (:meth:`~cost.segments.Profile.param_element_bytes`)."""
        return self.profile.param_element_bytes()

    def _recompute_time(self, shape: PlanShape, rank: int, j: int, work: tuple) -> float:
        """Seconds segment ``j`` spends recomputing its forward in backward (a whole recomputed segment runs
        its forward again without a gather of its own: the backward's FSDP gather serves it)."""
        if j in shape.recompute:
            return work[0] + work[1] - self._fsdp_gather(self.profile.segments[j], shape, shape.stage_devices[rank])
        if self.profile.segments[j].recomputed_part is not None:
            return self._recomputed_part_forward(shape, rank, j)
        return 0.0

    def _exposed_seconds(self, item, devices: tuple, shape: PlanShape, batch: float) -> float:
        """Seconds of one collective of a segment that the step waits for: all of it, or for ring attention's
        transfers and MoE exchanges in chunks (``moe_overlap_chunks``), what the computation does not hide."""
        chunks = item.chunks  # MoE exchanges in chunks: each chunk pays the latency, one stays exposed
        seconds = chunks * self._collective(item.kind, at(item.nbytes, batch) / chunks, devices, shape, item.axis)
        if item.hidden_flops is not None:  # transfers run under computation (ring attention's blocks, experts)
            exposed = seconds / chunks if chunks > 1 else 0.0
            seconds = max(exposed, seconds - self._hidden_seconds(item.hidden_flops, devices, batch))
        return seconds

    def _hidden_seconds(self, flops, devices: tuple, batch: float) -> float:
        """Seconds of the computation a transfer overlaps, on the slowest device (at peak: the transfer
        hides behind at most that)."""
        return min(at(flops, batch) / peak_flops(d, self.profile.precision)
                   for d in _representatives(devices, self.cluster))

    def _batch_axes(self, shape: PlanShape) -> tuple:
        """The axes the estimator adds whose ranks share the parameters and sum their gradients by all-reduce:
        data parallelism and context parallelism (each rank a share of the tokens) where the profile leaves
        them to it, except the FSDP axis (whose reduce-scatter is priced with the segments)."""
        fsdp = shape.fsdp_axis if self.fsdp_analytic(shape) else None
        return tuple(a for a in (DATA_AXIS, CONTEXT_AXIS)
                     if a in self.profile.analytic_axes and a != fsdp and shape.size(a) > 1)

    def fsdp_analytic(self, shape: PlanShape) -> bool:
        """Whether the estimator adds FSDP itself (the profile does not model the fsdp axis)."""
        return bool(shape.fsdp_axis) and shape.fsdp_axis in self.profile.analytic_axes \
            and shape.size(shape.fsdp_axis) > 1

    def fsdp_shards(self, shape: PlanShape) -> int:
        """How many ways the estimator's FSDP splits each parameter, gradient and optimizer state (1 without)."""
        return shape.size(shape.fsdp_axis) if self.fsdp_analytic(shape) else 1

    def _collective(self, kind: str, nbytes: float, devices: tuple, shape: PlanShape, along) -> float:
        """Seconds of a collective run by every group along ``along`` at once (the slowest group)."""
        if nbytes <= 0:
            return 0.0
        groups = self._groups(devices, shape, along)
        return self._slowest_group(kind, nbytes, groups) if groups else 0.0

    def _slowest_group(self, kind: str, nbytes: float, groups: "_Groups") -> float:
        """Seconds of a collective of ``nbytes`` run by every group of ``groups`` at once (the slowest one; groups
        alike on the cluster priced once)."""
        key = (kind, nbytes, groups)
        if key not in self._collectives:
            distinct = self._remembered(("distinct", groups), lambda: distinct_groups(groups, self.cluster))
            self._collectives[key] = max(collective_time(kind, nbytes, g, self.cluster) for g in distinct)
        return self._collectives[key]

    def _groups(self, devices: tuple, shape: PlanShape, along) -> "_Groups":
        """Groups (of two or more devices) along the axes ``along`` of a stage's mesh."""
        along = (along,) if isinstance(along, str) else tuple(along)
        along = tuple(a for a in along if a in shape.axes)
        if not along:
            return _Groups()
        key = (id(devices), shape.axes, shape.shape, along)
        if key not in self._groups_cache:
            self._pinned.append(devices)  # keeps the id unique while it keys the cache
            self._groups_cache[key] = _Groups(g for g in axis_groups(devices, shape.axes, shape.shape, along)
                                              if len(g) > 1)
        return self._groups_cache[key]

    def _send_time(self, shape: PlanShape, k: int, last_segment: int, batch: float) -> float:
        if k == shape.num_stages - 1:
            return 0.0
        nbytes = at(self.profile.segments[last_segment].output_bytes, batch)
        src = shape.stage_devices[shape.rank_of_stage(k)]
        dst = shape.stage_devices[shape.rank_of_stage(k + 1)]
        if nbytes <= 0 or src == dst:
            return 0.0
        return self._remembered(("send", nbytes, tuple(src), tuple(dst)),
                                lambda: max(p2p_time(nbytes, a, b, self.cluster) for a, b in zip(src, dst)))

    def _elementwise_seconds(self, nbytes: float, devices: tuple) -> float:
        """Seconds of memory-bound passes moving ``nbytes`` on the slowest of ``devices`` (gradient accumulation,
        the optimizer step): at the device's memory bandwidth and the efficiency it reaches on elementwise ops,
        as an elementwise op is priced (the STREAM fraction a built-in GPU cites; on a CPU, what calibration
        measured)."""
        def slowest() -> float:
            return max(compute_seconds(0.0, 1.0, 1.0, d.memory_bandwidth_Bps or 1e11,
                                       d.efficiency_of("add", "elementwise")[0])
                       for d in _representatives(devices, self.cluster))

        return nbytes * self._remembered(("elementwise", tuple(devices)), slowest)

    def _least(self, devices: tuple, attribute: str) -> float:
        """The smallest ``attribute`` of the devices."""
        def least() -> float:
            return min(getattr(self.cluster.device(d), attribute) for d in devices)

        return self._remembered(("least", attribute, tuple(devices)), least)

    def _remembered(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()``, once per ``key`` (which holds everything the value reads) for this estimator."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    # -- where the time goes -----------------------------------------------------------------------
    def segment_times(self, shape: PlanShape, rank: int) -> list[dict]:
        """Per segment of pipeline rank ``rank`` (in stage order), seconds per microbatch: ``forward_s`` and
        ``backward_s`` (collectives included; backward with the recomputed forward) and their parts."""
        rows = []
        for k in range(shape.num_stages):
            if shape.rank_of_stage(k) != rank:
                continue
            segments = shape.segments_of_stage(k, self.profile.num_layers)
            for j, (fwd_hidden, bwd_hidden) in zip(segments, self.prefetch_hidden(shape, rank, segments)):
                work = fwd, fwd_comm, bwd, bwd_comm = self.segment_work(shape, rank, j)
                recompute = self._recompute_time(shape, rank, j, work)
                fwd_comm, bwd_comm = fwd_comm - fwd_hidden, bwd_comm - bwd_hidden
                rows.append({"segment": self.profile.segments[j].name, "index": j, "stage": k,
                             "forward_compute_s": fwd, "forward_comm_s": fwd_comm, "backward_compute_s": bwd,
                             "backward_comm_s": bwd_comm, "recompute_s": recompute,
                             "forward_s": fwd + fwd_comm, "backward_s": bwd + bwd_comm + recompute})
        return rows

    def breakdown(self, shape: PlanShape, estimate: Estimate) -> dict[str, float]:
        """Where the step's time goes on the pipeline rank that finishes last: seconds by part, summing to
        ``estimate.step_time_s``. Parts: forward/backward compute of the blocks, recomputation, the
        embedding/loss layers (prologue and epilogue compute), the sums of the microbatches' gradients (memory-bound
        passes run with the backward), exposed collectives by kind and axis (tensor
        and sequence parallelism; every collective of a stage is on its critical path), FSDP gathers and
        gradient reduce-scatters, pipeline point-to-point transfers and bubble, the exposed part of the
        gradient reduction, and the optimizer step."""
        finish = {r: estimate.rank_end_s[r] + estimate.grad_sync_s[r][1] for r in range(shape.pp)}
        rank = max(finish, key=finish.get)
        m = shape.microbatches
        parts: dict[str, float] = defaultdict(float)
        last = len(self.profile.segments) - 1
        for row in self.segment_times(shape, rank):
            j = row["index"]
            devices = shape.stage_devices[rank]
            accumulation = self.accumulation_time(self.profile.segments[j], shape, devices)
            backward = row["backward_compute_s"] - accumulation
            if j in (0, last):
                parts["embedding/loss compute"] += m * (row["forward_compute_s"] + backward)
            else:
                parts["forward compute"] += m * row["forward_compute_s"]
                parts["backward compute"] += m * backward
            parts[ACCUMULATION_PART] += m * accumulation
            parts["recompute"] += m * row["recompute_s"]
            batch = self.microbatch_size(shape)
            comms = self.profile.segments[j].comms
            plain = [item for item in comms if not item.fsdp]
            for item in plain:
                parts[f"{item.kind} over {item.axis} (exposed)"] += m * self._exposed_seconds(item, devices, shape, batch)
            if self.fsdp_analytic(shape) or len(plain) < len(comms):
                # the layers' gathers and reduce-scatters (the IR's, or the estimator's own), less what prefetching hides
                parts[FSDP_PART] += m * (row["forward_comm_s"] + row["backward_comm_s"]) \
                    - m * sum(self._exposed_seconds(i, devices, shape, batch) for i in plain)
        busy = sum(parts.values())
        sends = sum(2 * m * s.send_s for s in estimate.stages if s.rank == rank)
        idle = max(estimate.rank_end_s[rank] - busy, 0.0)
        parts["pipeline point-to-point"] = min(sends, idle)
        parts["pipeline bubble"] = idle - parts["pipeline point-to-point"]
        parts["gradient reduction (exposed)"] = estimate.grad_sync_s[rank][1]
        parts["optimizer step"] = estimate.optimizer_s
        return {k: float(v) for k, v in parts.items() if v > 0}

    # -- whole step --------------------------------------------------------------------------------
    def estimate(self, shape: PlanShape, exact: bool = True) -> Estimate:
        """Step time, memory and traffic of ``shape`` (``exact=False``: closed-form pipeline time)."""
        prof = self.profile
        stages = [self.stage(shape, k) for k in range(shape.num_stages)]
        timeline = None
        if shape.num_stages == 1:
            makespan = shape.microbatches * (stages[0].fwd_s + stages[0].bwd_s)
            rank_end = {0: makespan}
            bubble = 0.0
        elif exact:
            timeline = _simulate(_actions(shape.schedule, shape.num_stages, shape.microbatches, shape.pp), stages, shape)
            makespan = timeline.makespan
            rank_end = {r: max((e.end_s for e in events if e.action.kind in ("B", "W")), default=0.0)
                        for r, events in timeline.events.items()}
            bubble = timeline.bubble_fraction
        else:
            makespan, rank_end = _closed_form(stages, shape)
            busy = sum(shape.microbatches * (s.fwd_s + s.bwd_s) for s in stages)
            bubble = 1 - busy / (shape.pp * makespan) if makespan else 0.0
        grad_sync = {r: self._grad_sync(shape, r, stages) for r in range(shape.pp)}
        optimizer = max(self._optimizer_time(shape, r) for r in range(shape.pp))
        finish = max(rank_end[r] + grad_sync[r][1] for r in range(shape.pp))
        memory = self.memory(shape)
        fits = self.fits(memory)
        flops = sum(at(seg.model_flops, self.microbatch_size(shape)) for seg in prof.segments) \
            * prof.batch_divisor * shape.microbatches
        comm = self._traffic(shape, stages) if exact else {}
        return Estimate(finish + optimizer, stages, makespan, bubble, grad_sync, optimizer, memory, fits, comm, flops,
                        rank_end, timeline, list(prof.notes))

    def fits(self, memory: dict) -> bool:
        """Whether every device's peak stays under the headroom of its memory."""
        devices = self.cluster.devices
        return all(float(m.total) <= self.options.memory_headroom * devices[d].memory_bytes for d, m in memory.items())

    def _stage_params(self, shape: PlanShape, rank: int) -> list:
        """The parameter records a device of pipeline rank ``rank`` holds, stage by stage. A parameter with
        records in several segments (a tied embedding, read by the first and the last segment) is one tensor
        within a stage and a copy on each further stage, as the pipeline pass places it."""
        params = []
        for segments in self._rank_stages(shape, rank):
            held = set()
            for j in segments:
                for p in self.profile.segments[j].params:
                    if p.name in self._copied:
                        if p.name in held:
                            continue
                        held.add(p.name)
                    params.append(p)
        return params

    def _rank_stages(self, shape: PlanShape, rank: int) -> tuple[tuple[int, ...], ...]:
        """The segments of each stage pipeline rank ``rank`` runs."""
        def by_rank() -> dict[int, tuple]:
            stages: dict[int, list] = defaultdict(list)
            for k in range(shape.num_stages):
                stages[shape.rank_of_stage(k)].append(tuple(shape.segments_of_stage(k, self.profile.num_layers)))
            return {r: tuple(held) for r, held in stages.items()}

        key = ("segments", tuple(map(tuple, shape.stage_layers)), shape.pp, shape.schedule)
        return self._remembered(key, by_rank).get(rank, ())

    def _rank_key(self, shape: PlanShape, rank: int) -> tuple:
        """What a sum over the rank's parameters depends on: its stages' segments and the stage mesh."""
        return (self._rank_stages(shape, rank), shape.axes, shape.shape, shape.fsdp_axis)

    def _grad_sync(self, shape: PlanShape, rank: int, stages: list) -> tuple[float, float]:
        """(total, exposed) seconds of the rank's gradient reductions after its last backward (with a
        distributed optimizer, also the parameter all-gathers before the next forward)."""
        if not self.profile.train:
            return 0.0, 0.0
        devices = shape.stage_devices[rank]
        reduction = gather = 0.0
        for kind, nbytes, axes in self._sync_collectives(shape, rank):
            seconds = self._collective(kind, nbytes, devices, shape, axes)
            reduction, gather = (reduction, gather + seconds) if kind == "all_gather" else (reduction + seconds, gather)
        total = reduction + gather + self._copies_sum(shape, rank)
        if not self.options.overlap_grad_sync:
            return total, total
        overlap = self._least(devices, "comm_overlap")
        last_backward = min((s.bwd_s for s in stages if s.rank == rank), default=0.0)
        first_forward = min((s.fwd_s for s in stages if s.rank == rank), default=0.0)
        hidden = overlap * (min(reduction, last_backward) + min(gather, first_forward))
        return total, total - hidden

    def _sync_collectives(self, shape: PlanShape, rank: int) -> list[tuple[str, float, tuple]]:
        """(kind, bytes, mesh axes) of the collectives that sum the rank's gradients: one all-reduce per group of
        axes; with a distributed optimizer (:attr:`PlanOptions.distributed_optimizer`), a group that includes
        the data axis is a reduce-scatter (DeepSpeed's kind: an all-reduce) of the gradients and an all-gather of
        the updated parameters."""
        return self._remembered(("sync",) + self._rank_key(shape, rank), lambda: self._summed_gradients(shape, rank))

    def _summed_gradients(self, shape: PlanShape, rank: int) -> list[tuple[str, float, tuple]]:
        reduced: dict[tuple, float] = defaultdict(float)
        gathered: dict[tuple, float] = defaultdict(float)
        for p in self._stage_params(shape, rank):
            axes = self._batch_axes(shape) + tuple(p.grad_axes)
            if axes:
                reduced[axes] += p.reduced_bytes
                gathered[axes] += p.local_bytes
        out = []
        for axes, nbytes in reduced.items():
            if self.options.distributed_optimizer and DATA_AXIS in axes:
                reduction = "all_reduce" if self.options.distributed_optimizer == "all_reduce" else "reduce_scatter"
                out += [(reduction, nbytes, axes), ("all_gather", gathered[axes], axes)]
            else:
                out.append(("all_reduce", nbytes, axes))
        return out

    def optimizer_shards(self, shape: PlanShape) -> int:
        """Data-parallel ranks that split the optimizer state and update between them: the data axis's size with
        a distributed optimizer (:attr:`PlanOptions.distributed_optimizer`) where parameters' gradients are
        summed over it (not FSDP's, sharded by the plan itself), else 1."""
        if not self.options.distributed_optimizer or shape.size(DATA_AXIS) < 2:
            return 1
        summed = DATA_AXIS in self._batch_axes(shape) or self._grads_summed_over_data
        return shape.size(DATA_AXIS) if summed else 1

    @functools.cached_property
    def _grads_summed_over_data(self) -> bool:
        """Whether the profile's own layouts sum some parameter's gradient over the data axis (a dp plan's IR)."""
        return any(DATA_AXIS in p.grad_axes for segment in self.profile.segments for p in segment.params)

    def _copies_sum(self, shape: PlanShape, rank: int) -> float:
        """Seconds of summing the gradients of parameters with a copy on this and on other pipeline ranks (a
        tied embedding on the first and the last stage): one all-reduce among the ranks holding a copy, device
        by device, after the last backward — Megatron's embedding all-reduce, the emitted programs' tied sum."""
        seconds = 0.0
        for name, segments in self._copied.items():
            ranks = sorted({shape.rank_of_stage(k) for k in range(shape.num_stages)
                            for j in shape.segments_of_stage(k, self.profile.num_layers) if j in segments})
            if rank not in ranks or len(ranks) < 2:
                continue
            nbytes = segments[min(segments)].reduced_bytes
            groups = _Groups(tuple(shape.stage_devices[r][i] for r in ranks) for i in range(len(shape.stage_devices[rank])))
            seconds += self._slowest_group("all_reduce", nbytes, groups)
        return seconds

    def _optimizer_time(self, shape: PlanShape, rank: int) -> float:
        if not self.profile.train:
            return 0.0
        key = ("optimizer", shape.optimizer, tuple(shape.stage_devices[rank])) + self._rank_key(shape, rank)
        return self._remembered(key, lambda: self._optimizer_seconds(shape, rank))

    def _optimizer_seconds(self, shape: PlanShape, rank: int) -> float:
        optimizer = shape.optimizer if shape.optimizer in OPTIMIZER_STATES else "adamw"
        master = self.profile.precision.master_weights
        moved = sum(p.local_elements * optimizer_step_bytes(optimizer, p.element_bytes, master)
                    for p in self._stage_params(shape, rank) if p.trainable)
        moved /= self.fsdp_shards(shape) if self.fsdp_analytic(shape) else self.optimizer_shards(shape)
        return self._elementwise_seconds(moved, shape.stage_devices[rank])

    def _param_elements(self, shape: PlanShape, rank: int, trainable_only: bool = False, in_bytes: bool = False
                        ) -> float:
        """Parameter elements (``in_bytes``: their bytes) a device of pipeline rank ``rank`` stores."""
        key = ("elements", trainable_only, in_bytes) + self._rank_key(shape, rank)
        return self._remembered(key, lambda: self._summed_elements(shape, rank, trainable_only, in_bytes))

    def _summed_elements(self, shape: PlanShape, rank: int, trainable_only: bool, in_bytes: bool) -> float:
        return sum(p.local_bytes if in_bytes else p.local_elements for p in self._stage_params(shape, rank)
                   if p.trainable or not trainable_only) / self.fsdp_shards(shape)

    # -- memory ------------------------------------------------------------------------------------
    def memory(self, shape: PlanShape) -> dict:
        """Device -> :class:`~cost.memory.MemoryEstimate` at the peak of the step."""
        prof = self.profile
        batch = self.microbatch_size(shape)
        kept_by_stage = {k: self._stage_activations(shape, k, batch) for k in range(shape.num_stages)}
        per_microbatch = {k: kept[0] for k, kept in kept_by_stage.items()}
        pending = _peak_pending_bytes(shape, per_microbatch)
        out = {}
        for rank in range(shape.pp):
            # one backward at a time re-materialises a recomputed segment or holds a gathered one
            kept = pending[rank] + max(kept_by_stage[k][1] for k in range(shape.num_stages)
                                       if shape.rank_of_stage(k) == rank)
            elements = self._param_elements(shape, rank)
            stored = self._param_elements(shape, rank, in_bytes=True)
            per_element = stored / elements if elements else 4.0
            if prof.train:
                estimate = self.training_memory(shape, elements, kept, per_element,
                                                self._param_elements(shape, rank, trainable_only=True))
            else:
                estimate = MemoryEstimate(stored, 0.0, 0.0, kept)
            for d in shape.stage_devices[rank]:
                out[d] = estimate
        return out

    def training_memory(self, shape: PlanShape, elements: float, activations: float, param_bytes: float,
                        trainable: float | None = None) -> MemoryEstimate:
        """The memory of a device training ``elements`` parameters of ``param_bytes`` each (``trainable`` of them
        with gradients and optimizer state; default all) and keeping ``activations`` bytes, under this profile's
        precision (master weights, gradients at the reduce dtype where wider, an fp32 buffer beside them with
        ``fp32_buffer`` accumulation), the plan's optimizer and the distributed optimizer's split of its state."""
        precision = self.profile.precision
        optimizer = shape.optimizer if shape.optimizer in OPTIMIZER_STATES else "adamw"
        grad_bytes = precision.grad_bytes(param_bytes) + (4 if self.options.grad_accumulation == "fp32_buffer" else 0)
        return MemoryEstimate.estimate(elements, activations, optimizer=optimizer, param_dtype_bytes=param_bytes,
                                       master_weights=precision.master_weights, grad_dtype_bytes=grad_bytes,
                                       trainable_params=trainable, optimizer_shards=self.optimizer_shards(shape))

    def _stage_activations(self, shape: PlanShape, k: int, batch: float) -> tuple[float, float]:
        """(bytes per in-flight microbatch, bytes at most once) that stage ``k`` keeps: per microbatch, each
        segment's activations (or only its input when it recomputes; where some of its ops recompute, what the
        others keep and the inputs of the recomputed regions); once, a recomputed segment re-materialised
        during its backward and, with FSDP, one segment's gathered parameters (freed after use, gathered
        again for backward)."""
        prof = self.profile
        segments = shape.segments_of_stage(k, prof.num_layers)
        per_microbatch = rematerialised = gathered = 0.0
        for j in segments:
            segment = prof.segments[j]
            if self.fsdp_analytic(shape):
                gathered = max(gathered, self.param_sums(segment).nbytes)
            if j in shape.recompute:
                per_microbatch += at(prof.segments[j - 1].output_bytes, batch) if j > 0 else 0.0
                rematerialised = max(rematerialised, at(segment.saved_bytes, batch))
            else:
                per_microbatch += segment.kept_bytes(batch)
                rematerialised = max(rematerialised, segment.rematerialised_bytes(batch))
        if not prof.train:
            return per_microbatch, gathered
        return per_microbatch, rematerialised + gathered

    # -- traffic -----------------------------------------------------------------------------------
    def _traffic(self, shape: PlanShape, stages: list) -> dict:
        prof = self.profile
        batch = self.microbatch_size(shape)
        traffic: Counter = Counter()
        m = shape.microbatches
        for stage in stages:
            for j in shape.segments_of_stage(stage.index, prof.num_layers):
                segment = prof.segments[j]
                rerun = segment.comms if j in shape.recompute else \
                    segment.recomputed_part.comms if segment.recomputed_part is not None else []
                for item in segment.comms + [i for i in rerun if not i.backward]:  # recomputed forwards again
                    self._add_traffic(traffic, item.kind, at(item.nbytes, batch), stage.devices, shape, item.axis, m)
                if self.fsdp_analytic(shape):
                    self._add_traffic(traffic, "all_gather", segment.param_bytes(), stage.devices, shape,
                                      shape.fsdp_axis, 2 * m)
                    grads = segment.reduced_grad_bytes()
                    self._add_traffic(traffic, "reduce_scatter", grads, stage.devices, shape, shape.fsdp_axis, m)
            if stage.index < shape.num_stages - 1:
                nxt = shape.stage_devices[shape.rank_of_stage(stage.index + 1)]
                nbytes = at(prof.segments[shape.segments_of_stage(stage.index, prof.num_layers)[-1]].output_bytes,
                            batch)
                for a, b in zip(stage.devices, nxt):
                    if a != b and nbytes > 0:
                        traffic[self.cluster.link(a, b).link_class] += 2 * m * nbytes
        for rank in range(shape.pp):
            for kind, nbytes, axes in self._sync_collectives(shape, rank) if prof.train else ():
                self._add_traffic(traffic, kind, nbytes, shape.stage_devices[rank], shape, axes, 1)
        return dict(traffic)

    def _add_traffic(self, traffic: Counter, kind: str, nbytes: float, devices: tuple, shape: PlanShape, along,
                     times: int) -> None:
        if nbytes <= 0:
            return
        for group in self._groups(devices, shape, along):
            for link_class, moved in collective_traffic(kind, nbytes, group, self.cluster).items():
                traffic[link_class] += times * moved


def _copied_params(profile: Profile) -> dict[str, dict]:
    """Trainable parameters with copies in several segments (the pipeline pass's copies for other stages, such
    as a tied embedding: records of their own under one name): name -> {segment index: its record}. A record
    several segments share (the planner's view prices every later identical block with block 0's records) is
    one parameter, not copies."""
    held: dict[str, dict] = defaultdict(dict)
    for j, segment in enumerate(profile.segments):
        for record in segment.params:
            if record.trainable:
                held[record.name][j] = record
    return {name: segments for name, segments in held.items() if len({id(r) for r in segments.values()}) > 1}


class _Groups(tuple):
    """The device groups of one collective that runs on all of them at once, hashed once: they key the
    estimator's caches on every pricing call, and a stage of a large cluster has thousands of devices."""

    def __hash__(self) -> int:
        cached = self.__dict__.get("hash")
        if cached is None:
            cached = self.__dict__["hash"] = tuple.__hash__(self)
        return cached


def _representatives(devices: Sequence[int], cluster: Cluster) -> list[Device]:
    """One device of each kind among ``devices``."""
    return list(_representatives_cached(tuple(devices), cluster))


@functools.lru_cache(maxsize=1024)
def _representatives_cached(devices: tuple, cluster: Cluster) -> tuple:
    seen = {}
    all_devices = cluster.devices
    for d in devices:
        seen.setdefault(all_devices[d].kind, all_devices[d])
    return tuple(seen.values())


def _splits(shape: PlanShape) -> bool:
    """Whether the shape's schedule splits backwards into B and W."""
    return shape.schedule in SCHEDULES and SCHEDULES[shape.schedule].split_backward


@functools.lru_cache(maxsize=256)
def _actions(schedule: str, num_stages: int, microbatches: int, pp: int) -> dict:
    """The action lists of the strategy's schedule, one per pipeline rank."""
    return build_pipeline_schedule(schedule, pp, num_stages, microbatches)


def _simulate(actions: dict, stages: list, shape: PlanShape):
    fwd = {s.index: s.fwd_s for s in stages}
    bwd = {s.index: s.bwd_s for s in stages}
    weight = {s.index: s.weight_s for s in stages}
    sends: dict[tuple, float] = {}
    for s in stages:
        if s.index + 1 < shape.num_stages:
            pair = (s.rank, shape.rank_of_stage(s.index + 1))
            sends[pair] = max(sends.get(pair, 0.0), s.send_s)
            sends[pair[::-1]] = max(sends.get(pair[::-1], 0.0), s.send_s)
    return simulate(actions, fwd, bwd, lambda a, b: sends.get((a, b), 0.0),
                    link_busy_time=lambda a, b: sends.get((a, b), 0.0), weight_time=weight)


def _closed_form(stages: list, shape: PlanShape) -> tuple[float, dict]:
    """Makespan of a pipeline (1F1B/GPipe: the sum of stage times plus m - 1 bottlenecks; ZB-H1 fills
    2(p - 1) W's of that bubble; the V shapes leave only the fill of the V, p - 1 forwards), and per-rank
    end of the last backward (earlier ranks finish last)."""
    per_rank = defaultdict(float)
    sends = sum(2 * s.send_s for s in stages)
    for s in stages:
        per_rank[s.rank] += s.fwd_s + s.bwd_s
    bottleneck = max(per_rank.values())
    m = shape.microbatches
    spec = SCHEDULES.get(shape.schedule)
    if spec is not None and spec.v_shape:
        makespan = m * bottleneck + (shape.pp - 1) * max(s.fwd_s for s in stages) + sends
    elif shape.virtual_stages > 1:
        makespan = m * bottleneck + (shape.pp - 1) * bottleneck / shape.virtual_stages + sends
    else:
        makespan = sum(s.fwd_s + s.bwd_s for s in stages) + (m - 1) * bottleneck + sends
        if spec is not None and spec.split_backward:
            makespan -= 2 * (shape.pp - 1) * min(s.weight_s for s in stages)
    ends, drain = {}, 0.0
    for rank in range(shape.pp):
        ends[rank] = makespan - drain
        drain += sum(s.bwd_s for s in stages if s.rank == rank)
    return makespan, ends


def _peak_pending_bytes(shape: PlanShape, per_microbatch: dict) -> dict:
    """Pipeline rank -> the most bytes its stages keep at once for microbatches whose forward is done and whose
    backward (a split one: its W) is pending, each stage ``k``'s microbatch keeping ``per_microbatch[k]``. With
    several stages per rank (interleaved, V shapes) their peaks come at different times: the rank's own
    actions are walked (once per schedule shape, see :func:`_held_counts`), not each stage's peak summed."""
    if shape.num_stages == 1:
        return {0: per_microbatch[0]}
    if shape.schedule == "gpipe":
        return {r: shape.microbatches * sum(per_microbatch[k] for k in range(shape.num_stages)
                                            if shape.rank_of_stage(k) == r) for r in range(shape.pp)}
    if shape.schedule == "1f1b":  # stage k holds at most pp - k microbatches
        return {shape.rank_of_stage(k): min(shape.pp - k, shape.microbatches) * per_microbatch[k]
                for k in range(shape.num_stages)}
    held = _held_counts(shape.schedule, shape.num_stages, shape.microbatches, shape.pp)
    return {rank: float((counts @ np.array([per_microbatch[k] for k in stages])).max(initial=0.0))
            for rank, (stages, counts) in held.items()}


@functools.lru_cache(maxsize=4096)
def _held_counts(schedule: str, num_stages: int, microbatches: int, pp: int) -> dict:
    """Pipeline rank -> (its stages, the distinct counts of microbatches each of them holds after one of the
    rank's compute actions: one row per distinct state). A rank's peak under any per-microbatch sizes is the
    largest row times the sizes, so the schedule is walked once per shape, not once per priced plan."""
    out = {}
    for rank, rank_actions in _actions(schedule, num_stages, microbatches, pp).items():
        stages = sorted({a.stage for a in rank_actions if a.is_compute})
        column = {k: i for i, k in enumerate(stages)}
        last = {a.value[1:]: a.kind for a in rank_actions if a.kind in ("B", "W")}
        counts, states = [0] * len(stages), set()
        for action in rank_actions:
            if action.kind == "F":
                counts[column[action.stage]] += 1
            elif action.is_compute and last[action.value[1:]] == action.kind:
                counts[column[action.stage]] -= 1
            if action.is_compute:
                states.add(tuple(counts))
        out[rank] = (stages, np.array(sorted(states), dtype=float).reshape(-1, len(stages)))
    return out
