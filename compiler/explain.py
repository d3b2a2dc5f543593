"""``plan.explain()``: why this plan — degrees, placement, layouts, stages, how much of the work runs
split (:mod:`compiler.parallelism`), and what else was considered."""
from __future__ import annotations

from typing import Any

from backends.simulator import format_bytes
from cluster import LINK_CLASSES, Cluster
from cost.placement import axis_groups, stage_device_lists
from strategy import AUTO, PIPELINE_AXIS, Layout, Strategy

MAX_LAYOUT_LINES = 40


def explain(plan: Any) -> str:
    """A report on ``plan`` (a ``CompiledPlan``): see the module docstring."""
    strategy = plan.strategy
    cluster = plan.cluster
    report = getattr(plan, "search_report", None)
    lines = [f"Plan for {plan.graph.name} on {cluster.name} ({cluster.world_size} devices, "
             f"{len(cluster.nodes)} nodes)"]
    if report is not None:
        how = "from the plan cache" if report.cached else f"in {report.elapsed_s:.1f}s"
        lines.append(f"Chosen by the planner {how}: {report.evaluated} plans priced, {report.layout_solves} "
                     f"layout problems solved" + (" (time budget reached)" if report.truncated else ""))
    else:
        lines.append("Strategy given by the user (not searched).")
    lines += _degrees(strategy)
    lines += _placement(strategy, cluster)
    lines += _layouts(strategy)
    lines += plan.parallelism().lines()
    lines += _pipeline(strategy, cluster)
    lines += _estimate(plan, report)
    if report is not None:
        lines += _alternatives(report)
        if report.layouts:
            lines.append("Layouts of every op of the prologue, one block and the epilogue (tensor axis):")
            lines += [f"  {line}" for line in report.layouts[:MAX_LAYOUT_LINES]]
            if len(report.layouts) > MAX_LAYOUT_LINES:
                lines.append(f"  ... {len(report.layouts) - MAX_LAYOUT_LINES} more")
        lines += report.notes
    return "\n".join(lines)


def _degrees(strategy: Strategy) -> list[str]:
    names = {"dp": "data parallel", "tp": "tensor parallel", PIPELINE_AXIS: "pipeline"}
    parts = [f"{names.get(a, a)} {n}" for a, n in strategy.mesh_spec.items()]
    microbatches = strategy.pipeline.microbatches
    return [f"Degrees: {' x '.join(parts)}; microbatches {1 if microbatches is None else microbatches}"]


def _placement(strategy: Strategy, cluster: Cluster) -> list[str]:
    mesh = strategy.mesh_spec.as_dict()
    stage_devices = stage_device_lists(mesh, cluster.world_size, strategy.pipeline.stage_devices)
    axes = tuple(a for a in mesh if a != PIPELINE_AXIS)
    shape = tuple(int(mesh[a]) for a in axes)
    lines = ["Placement:"]
    for axis in axes:
        if dict(zip(axes, shape))[axis] == 1:
            continue
        groups = [g for devices in stage_devices for g in axis_groups(devices, axes, shape, axis)]
        crossing = _slowest_link(groups, cluster)
        inside = all(len({cluster.node_of(d) for d in g}) == 1 for g in groups)
        lines.append(f"  {axis} groups ({len(groups)} of {len(groups[0])} devices, e.g. {list(groups[0])}): "
                     f"{'inside one node each' if inside else 'span nodes'}, slowest link {crossing}")
    if len(stage_devices) > 1:
        links = [_slowest_link([[a, b]], cluster) for k in range(len(stage_devices) - 1)
                 for a, b in [(stage_devices[k][0], stage_devices[k + 1][0])]]
        lines.append(f"  pipeline cuts cross: {', '.join(links)}")
    return lines if len(lines) > 1 else []


def _slowest_link(groups, cluster: Cluster) -> str:
    worst = "self"
    for g in groups:
        for a in g:
            for b in g:
                if a != b:
                    c = cluster.link(a, b).link_class
                    worst = c if LINK_CLASSES.index(c) > LINK_CLASSES.index(worst) else worst
    return worst


def _layouts(strategy: Strategy) -> list[str]:
    lines = []
    if strategy.params or strategy.activations:
        lines.append("Layouts (anything not listed is replicated, B):")
        lines += [f"  param {layout.glob}: {_spec(layout)}" for layout in strategy.params]
        lines += [f"  activation {layout.glob}: {_spec(layout)}" for layout in strategy.activations]
    switches = []
    if strategy.tensor_axis is not None:
        switches.append(f"sequence parallel {'on' if strategy.sequence_parallel else 'off'}")
        switches.append(f"vocabulary parallel {'on' if strategy.vocab_parallel else 'off'}")
    switches.append(f"fsdp {'over ' + strategy.fsdp_axis if strategy.fsdp_axis else 'off'}")
    if strategy.regather_activations:
        switches.append("gathered activations kept as shards, gathered again in backward")
    lines.append("Switches: " + ", ".join(switches))
    return lines


def _spec(layout: Layout) -> str:
    return AUTO if layout.sbp == AUTO else ", ".join(f"{a}={s}" for a, s in layout.sbp)


def _pipeline(strategy: Strategy, cluster: Cluster) -> list[str]:
    if strategy.positions == 1:
        return [f"No pipeline; recompute: {_recompute(strategy)}"]
    pipeline = strategy.pipeline
    stage_devices = stage_device_lists(strategy.mesh_spec.as_dict(), cluster.world_size, pipeline.stage_devices)
    lines = [f"Pipeline: schedule {pipeline.schedule_name}"
             + (f" with {pipeline.virtual_stages} virtual stages per rank" if pipeline.virtual_stages else "")
             + f", recompute: {_recompute(strategy)}"]
    ranges = pipeline.stage_layers or (pipeline.stages if isinstance(pipeline.stages, tuple) else ())
    for k, layers in enumerate(ranges):
        devices = stage_devices[k % len(stage_devices)]
        kinds = sorted({cluster.device(d).kind for d in devices})
        text = f"layers {layers[0]}..{layers[1]}" if isinstance(layers, (list, tuple)) else f"from {layers}"
        lines.append(f"  stage {k}: {text} on devices {devices[0]}..{devices[-1]} ({', '.join(kinds)})")
    return lines


def _recompute(strategy: Strategy) -> str:
    value = strategy.recompute
    if not value:
        return "none"
    if value is True:
        return "everything"
    return ", ".join(value) if len(value) <= 6 else f"{len(value)} blocks ({value[0]} .. {value[-1]})"


def _estimate(plan: Any, report) -> list[str]:
    if report is not None:
        chosen = report.chosen
        return [f"Estimated (planner): {chosen.step_time_s * 1e3:.1f} ms per step, peak memory "
                f"{format_bytes(chosen.max_memory_bytes)} per device"]
    try:
        sim = plan.simulate()
    except (ValueError, KeyError, NotImplementedError) as error:  # e.g. a plan the simulator cannot place
        return [f"Estimate unavailable: {error}"]
    lines = ["Estimated (simulator): " + sim.summary().replace("\n", "; ")]
    if sim.breakdown:
        lines.append("Where the step goes (simulated, the rank that finishes last):")
        lines += [f"  {name:40s} {seconds * 1e3:10.2f} ms  {seconds / sim.step_time_s:6.1%}"
                  for name, seconds in sorted(sim.breakdown.items(), key=lambda kv: -kv[1])]
    return lines


def _alternatives(report) -> list[str]:
    if not report.alternatives:
        return ["No other plan fitted in memory."]
    best = report.chosen.step_time_s
    lines = ["Best alternatives considered (simulated step time, peak memory per device):"]
    for c in report.alternatives:
        slower = (c.step_time_s / best - 1) * 100 if best > 0 else 0.0
        lines.append(f"  {c.step_time_s * 1e3:9.1f} ms (+{slower:5.1f}%)  {format_bytes(c.max_memory_bytes):>10}  "
                     f"{c.summary}")
    return lines
