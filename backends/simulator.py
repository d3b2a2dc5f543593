"""The simulator backend: how long a training step of a compiled plan takes on its cluster, and what it holds.

:func:`price_ir` prices a plan from its SBP-annotated IR: every op's time is the roofline
(:func:`cost.ops.compute_seconds`) on the local shards the device computes (slowest device kind of a
stage), every collective of the IR (and its backward adjoint) is priced with
:func:`cost.collectives.collective_time` on the real device groups of its mesh axis, gradient buckets
are all-reduced over their axes after the last backward, pipeline stages run the schedule's action
lists through :func:`cost.timeline.simulate`, and memory counts parameters, gradients, optimizer state
and the activations kept by the microbatches in flight (recomputed blocks keep only their input).

:func:`report` turns an estimate into a :class:`SimReport`: ``step_time_s``, ``tokens_per_s`` /
``samples_per_s``, ``mfu``, ``peak_memory_bytes`` per device, ``comm_bytes_by_link_class``, and a
per-device timeline written as a Chrome/Perfetto trace (:meth:`SimReport.write_trace`) or a PNG Gantt
chart (:meth:`SimReport.write_gantt_png`). ``plan.simulate()`` (:func:`compiler.simulate.simulate`)
is the entry point; it also prices strategies on graphs the passes have not laid out.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from cluster import Cluster
from cost.estimate import Estimate, PlanOptions, optimizer_name
from cost.ops import Precision, peak_flops
from cost.placement import PlanShape, plan_shape
from cost.segments import Profile, ir_profile
from cost.timeline import TimelineEvent
from ir.core import Graph
from ir.layers import LayerStructure, find_layers
from strategy import PIPELINE_AXIS, MeshSpec, Strategy

CATEGORIES = ("compute", "comm", "idle")
COLORS = {"compute": "#4C72B0", "comm": "#DD8452", "idle": "#DDDDDD"}
MAX_GANTT_ROWS = 64


@dataclass
class SimReport:
    """The simulated cost of one training step (see the module docstring)."""

    step_time_s: float
    samples_per_s: float
    tokens_per_s: float | None
    mfu: float
    peak_memory_bytes: dict
    """Device -> bytes at the peak of the step."""
    fits: bool
    """Every device's peak is under its memory (with the options' headroom)."""
    comm_bytes_by_link_class: dict
    flops_per_step: float
    bubble_fraction: float
    stage_times: list
    """Per stage: forward/backward compute and communication seconds per microbatch."""
    cluster: str
    strategy: Strategy
    source: str
    """``ir`` (priced from the plan's laid-out IR) or ``strategy`` (layouts solved from the strategy)."""
    notes: list = field(default_factory=list)
    estimate: Estimate | None = field(default=None, repr=False)
    shape: PlanShape | None = field(default=None, repr=False)
    precision: str = ""
    """What was priced: the compute dtype and bytes per element (:meth:`cost.ops.Precision.describe`)."""
    breakdown: dict = field(default_factory=dict)
    """Where the step goes, seconds by part, summing to ``step_time_s`` (the pipeline rank that finishes
    last; see :meth:`cost.estimate.Estimator.breakdown`): forward/backward compute, recompute,
    embedding/loss compute, exposed collectives by kind and axis, FSDP gathers, pipeline p2p and bubble,
    exposed gradient reduction, optimizer step."""
    stage_segments: dict = field(default_factory=dict, repr=False)
    """Pipeline rank -> per segment, seconds per microbatch (:meth:`cost.estimate.Estimator.segment_times`)."""

    def summary(self) -> str:
        """A few lines for people."""
        peak = max(self.peak_memory_bytes.values(), default=0.0)
        lines = [f"step {self.step_time_s * 1e3:.2f} ms, {self.samples_per_s:.2f} samples/s"
                 + (f", {self.tokens_per_s:,.0f} tokens/s" if self.tokens_per_s else "")
                 + f", MFU {self.mfu * 100:.1f}%",
                 f"peak memory {format_bytes(peak)} per device ({'fits' if self.fits else 'DOES NOT FIT'}), "
                 f"pipeline bubble {self.bubble_fraction * 100:.1f}%",
                 "traffic per step: " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in
                                                  sorted(self.comm_bytes_by_link_class.items()))]
        if self.precision:
            lines.append(f"priced with {self.precision}")
        if self.breakdown:
            lines.append("step breakdown: " + self.breakdown_text())
        return "\n".join(lines + self.notes)

    def breakdown_text(self) -> str:
        """The breakdown in one line, largest part first: ``backward compute 61.2 ms (52%), ...``."""
        total = self.step_time_s or 1.0
        return ", ".join(f"{name} {seconds * 1e3:.2f} ms ({seconds / total:.0%})"
                         for name, seconds in sorted(self.breakdown.items(), key=lambda kv: -kv[1]))

    # -- timelines -------------------------------------------------------------------------------
    def device_events(self) -> dict[int, list[TimelineEvent]]:
        """Per device, its step as compute / comm / idle intervals covering ``[0, step_time_s]``."""
        if self.estimate is None or self.shape is None:
            return {}
        per_rank = _rank_events(self.estimate, self.shape)
        out = {}
        for rank, devices in enumerate(self.shape.stage_devices):
            filled = _fill_idle(per_rank.get(rank, []), self.step_time_s)
            for d in devices:
                out[d] = filled
        return dict(sorted(out.items()))

    def write_trace(self, path: str | Path) -> Path:
        """Write the timeline as Chrome/Perfetto trace JSON (open in ui.perfetto.dev or chrome://tracing)."""
        events = []
        for device, intervals in self.device_events().items():
            events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": device,
                           "args": {"name": f"device {device}"}})
            for e in intervals:
                events.append({"name": e.name, "cat": e.category, "ph": "X", "pid": 0, "tid": device,
                               "ts": e.start_s * 1e6, "dur": max(e.end_s - e.start_s, 0.0) * 1e6})
        events.append({"name": "process_name", "ph": "M", "pid": 0, "args": {"name": f"sbpc simulation on "
                                                                                    f"{self.cluster}"}})
        events += self._breakdown_events()
        path = Path(path)
        path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms",
                                    "otherData": {"step_time_s": self.step_time_s, "mfu": self.mfu,
                                                  "breakdown_s": self.breakdown}}))
        return path

    def _breakdown_events(self) -> list[dict]:
        """The breakdown as one track of back-to-back slices (pid 1), a stacked bar of the step."""
        if not self.breakdown:
            return []
        events = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "step breakdown"}},
                  {"name": "thread_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "critical rank"}}]
        clock = 0.0
        for name, seconds in sorted(self.breakdown.items(), key=lambda kv: -kv[1]):
            events.append({"name": name, "cat": "breakdown", "ph": "X", "pid": 1, "tid": 0, "ts": clock * 1e6,
                           "dur": seconds * 1e6})
            clock += seconds
        return events

    def write_gantt_png(self, path: str | Path, max_rows: int = MAX_GANTT_ROWS) -> Path:
        """Write a Gantt chart (one row per device; per pipeline rank when there are too many devices)."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch

        rows = self.device_events()
        if len(rows) > max_rows and self.shape is not None:
            rows = {devices[0]: rows[devices[0]] for devices in self.shape.stage_devices}
        fig, ax = plt.subplots(figsize=(12, 0.35 * len(rows) + 1.5))
        for y, (device, intervals) in enumerate(rows.items()):
            for category in CATEGORIES:
                bars = [(e.start_s * 1e3, (e.end_s - e.start_s) * 1e3) for e in intervals if e.category == category]
                ax.broken_barh(bars, (y - 0.4, 0.8), facecolors=COLORS[category])
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([f"dev {d}" for d in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("time (ms)")
        ax.set_title(f"{self.cluster}: step {self.step_time_s * 1e3:.1f} ms, MFU {self.mfu * 100:.1f}%")
        ax.legend(handles=[Patch(color=COLORS[c], label=c) for c in CATEGORIES], loc="upper right", fontsize=8)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


# --------------------------------------------------------------------------------------------------
# Pricing a laid-out plan
# --------------------------------------------------------------------------------------------------


def is_laid_out(graph: Graph) -> bool:
    """Whether the passes have laid the graph out (a mesh, and an SBP on every value)."""
    return bool(graph.meshes) and all(v.sbp is not None for v in graph.all_values())


def _with_unit_axes(strategy: Strategy, mesh) -> Strategy:
    """The strategy with the size-1 axes the IR's stage mesh has and it does not name (``{"pp": 8}`` lays
    each stage out on a ``dp=1`` mesh), in the IR's order after ``pp``."""
    given = strategy.mesh_spec.as_dict()
    missing = [a for a, n in zip(mesh.axes, mesh.shape) if int(n) == 1 and a not in given]
    if not missing:
        return strategy
    axes = {a: n for a, n in given.items() if a == PIPELINE_AXIS}
    axes |= {a: given.get(a, 1) for a in mesh.axes} | {a: n for a, n in given.items() if a not in axes}
    return replace(strategy, mesh=MeshSpec.of(axes))


def price_ir(graph: Graph, strategy: Strategy, cluster: Cluster, options: PlanOptions, exact: bool = True
             ) -> tuple[Estimate, PlanShape, Profile]:
    """The estimate of a laid-out graph compiled with the (normalised) ``strategy``, and the plan shape and
    profile it priced."""
    structure = find_layers(graph)
    dims = graph.attrs.get("example_dims") or {}
    batch = int(options.global_batch or dims.get("batch", 1))
    profile = ir_profile(graph, Precision.resolve(options.precision, graph), global_batch=batch, structure=structure,
                         moe_imbalance=options.moe_imbalance)
    cut = _stage_layers_of_ir(structure)
    if cut is not None:  # the pipeline pass chose (or honoured) the cut: price the stages it made
        strategy = replace(strategy, pipeline=replace(strategy.pipeline, stage_layers=tuple(map(tuple, cut))))
    strategy = replace(strategy, recompute=False)  # the IR's recompute marks are priced op by op
    strategy = _with_unit_axes(strategy, profile.mesh)
    shape = plan_shape(strategy, cluster.world_size, structure.num_layers, structure.prefix, batch,
                       optimizer_name(options.optimizer))
    mesh = profile.mesh
    if tuple(mesh.axes) != tuple(shape.axes) or tuple(mesh.shape) != tuple(shape.shape):
        raise ValueError(f"the plan's IR mesh {dict(zip(mesh.axes, mesh.shape))} differs from its strategy's stage "
                         f"mesh {dict(zip(shape.axes, shape.shape))}; simulate (graph, strategy, cluster) instead")
    estimate = options.estimator(profile, cluster).estimate(shape, exact)
    return estimate, shape, profile


def _stage_layers_of_ir(structure: LayerStructure) -> list | None:
    """Block ranges per stage, from the ``stage`` attribute the pipeline pass puts on every node."""
    stages = [{n.attrs.get("stage") for n in block if not n.op.startswith("comm.")} for block in structure.blocks]
    if not stages or any(None in s for s in stages):
        return None
    if any(len(s) != 1 for s in stages):
        raise ValueError("the pipeline pass cut inside a block; the simulator prices whole blocks per stage")
    owner = [next(iter(s)) for s in stages]
    last_stage = max(n.attrs.get("stage", 0) for n in structure.post) if structure.post else owner[-1]
    ranges = []
    for stage in range(last_stage + 1):
        mine = [i for i, o in enumerate(owner) if o == stage]
        start = mine[0] if mine else (ranges[-1][1] + 1 if ranges else 0)
        ranges.append([start, mine[-1] if mine else start - 1])
    return ranges


def report(estimate: Estimate, shape: PlanShape, profile: Profile, cluster: Cluster, strategy: Strategy, source: str,
           options: PlanOptions) -> SimReport:
    """The :class:`SimReport` of an estimate (``source``: ``ir`` or ``strategy``, what was priced)."""
    step = estimate.step_time_s
    samples = profile.global_batch / step if step > 0 else 0.0
    tokens = samples * profile.tokens_per_sample if profile.tokens_per_sample > 1 else None
    peak = sum(peak_flops(d, profile.precision) for d in cluster.devices)
    mfu = estimate.flops_per_step / (step * peak) if step > 0 else 0.0
    stage_times = [{"stage": s.index, "rank": s.rank, "layers": s.layers, "fwd_compute_s": s.fwd_compute_s,
                    "fwd_comm_s": s.fwd_comm_s, "bwd_compute_s": s.bwd_compute_s, "bwd_comm_s": s.bwd_comm_s,
                    "recompute_s": s.recompute_s, "send_s": s.send_s, "weight_s": s.weight_s} for s in estimate.stages]
    estimator = options.estimator(profile, cluster)
    breakdown = estimator.breakdown(shape, estimate)
    segments = {rank: estimator.segment_times(shape, rank) for rank in range(shape.pp)}
    return SimReport(step, samples, tokens, mfu, estimate.peak_memory_bytes, estimate.fits, dict(estimate.comm_bytes),
                     estimate.flops_per_step, estimate.bubble_fraction, stage_times, cluster.name, strategy, source,
                     list(estimate.notes), estimate, shape, profile.precision.describe(), breakdown, segments)


# --------------------------------------------------------------------------------------------------
# Timeline construction
# --------------------------------------------------------------------------------------------------


def _rank_events(estimate: Estimate, shape: PlanShape) -> dict[int, list[TimelineEvent]]:
    """Per pipeline rank: forward/backward (compute, then the collectives they wait on), point-to-point
    waits, the exposed gradient all-reduce and the optimizer step."""
    stages = {s.index: s for s in estimate.stages}
    out: dict[int, list[TimelineEvent]] = {r: [] for r in range(shape.pp)}
    if estimate.timeline is not None:
        for rank, events in estimate.timeline.events.items():
            for e in events:
                action = e.action
                if action.is_compute:
                    out[rank].extend(_split_compute(e.start_s, e.end_s, stages[action.stage], action.kind,
                                                    action.microbatch))
                elif action.is_recv and e.end_s > e.start_s:
                    out[rank].append(TimelineEvent(e.start_s, e.end_s, "idle", f"wait {action}", action))
    else:
        stage = estimate.stages[0]
        clock = 0.0
        for m in range(shape.microbatches):
            for kind, seconds in (("F", stage.fwd_s), ("B", stage.bwd_s)):
                out[0].extend(_split_compute(clock, clock + seconds, stage, kind, m))
                clock += seconds
    finish = max(estimate.rank_end_s[r] + estimate.grad_sync_s[r][1] for r in range(shape.pp))
    for rank in range(shape.pp):
        total, exposed = estimate.grad_sync_s[rank]
        end = estimate.rank_end_s[rank] + exposed
        if exposed > 0:
            out[rank].append(TimelineEvent(end - exposed, end, "comm", "gradient all-reduce (exposed)"))
        if estimate.optimizer_s > 0:
            out[rank].append(TimelineEvent(finish, finish + estimate.optimizer_s, "compute", "optimizer step"))
    return out


def _split_compute(start: float, end: float, stage, kind: str, microbatch: int) -> list[TimelineEvent]:
    """A forward/backward interval as its compute part followed by its collectives (a W has none)."""
    comm = {"F": stage.fwd_comm_s, "B": stage.bwd_comm_s}.get(kind, 0.0)
    compute_end = max(start, end - comm)
    label = f"{kind}{microbatch}@s{stage.index}"
    events = [TimelineEvent(start, compute_end, "compute", label)]
    if end > compute_end:
        events.append(TimelineEvent(compute_end, end, "comm", f"{label} collectives"))
    return events


def format_bytes(nbytes: float) -> str:
    """``12.34 GiB`` / ``56.7 MiB``: the unit that keeps the number readable."""
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _fill_idle(events: list[TimelineEvent], step_s: float) -> list[TimelineEvent]:
    out, clock = [], 0.0
    for e in sorted(events, key=lambda e: e.start_s):
        if e.start_s > clock + 1e-12:
            out.append(TimelineEvent(clock, e.start_s, "idle", "idle"))
        out.append(e)
        clock = max(clock, e.end_s)
    if step_s > clock + 1e-12:
        out.append(TimelineEvent(clock, step_s, "idle", "idle"))
    return out
