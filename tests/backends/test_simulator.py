"""The simulator backend: reports, per-op and per-collective pricing, pipelines, memory, traces."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from cluster import Cluster
from compiler.simulate import simulate
from cost.estimate import PlanOptions, _peak_pending_bytes
from cost.placement import PlanShape
from cost.ops import Precision, op_category, op_time
from cost.placement import axis_groups
from cost.segments import concrete_shape, costed_op, ir_profile, is_view
from frontend.dsl import load_plan
from frontend.torch_capture import capture
from ir.schedules import build_pipeline_schedule
from ir.types import dtype_size
from passes.planner.search import search
from strategy import StrategyError
from tests.capture_cache import compile_cached
from tests.models import gpt_inputs, gpt_model

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import gpt_configs  # noqa: E402

MEGATRON = load_plan(str(ROOT / "examples" / "plans" / "megatron_tp.sbp")).to_dict()["params"]
MIXED = {"precision": "bf16"}


@pytest.fixture(scope="module")
def small():
    model, inputs = gpt_model(n_layer=2), gpt_inputs(batch=8, seq=16)
    return model, inputs


@pytest.fixture(scope="module")
def dp_plan(small):
    model, inputs = small
    return compile_cached(model, inputs, cluster="local:2", strategy="dp")


@pytest.fixture(scope="module")
def big_graph():
    """A 4-block GPT of 1.3B width on the meta device: no weights allocated."""
    graph = capture(gpt_configs.meta_model("1.3B", n_layer=4), gpt_configs.example_batch(16), train=True).graph
    graph.attrs["example_dims"] = {"batch": 16, "seq": gpt_configs.SEQUENCE}
    return graph


def test_measured_efficiency_and_overhead_price_the_ops(small):
    """A calibrated device: each op's roofline is divided by its measured efficiency (by name, then by
    category) and every op pays the measured dispatch overhead."""
    model, inputs = small
    spec = Cluster.local(1).to_dict()
    kind = spec["device_kinds"]["cpu"]
    kind["efficiency"] = {"matmul": {"forward": 0.5, "backward": 0.25}, "default": 0.8}
    kind["op_overhead"] = {"forward": 1e-5, "backward": 3e-5}
    measured = Cluster.from_dict(spec)
    baseline = simulate(compile_cached(model, inputs, cluster="local:1", strategy="dp"), overhead_s=0.0)
    plan = compile_cached(model, inputs, cluster=measured, strategy="dp")
    priced = simulate(plan)
    forward = 0.0
    fwd_ops = 0
    device = measured.device(0)
    for node in plan.graph.nodes:
        if node.op.startswith("comm."):
            continue
        fwd_ops += 1  # views too: no work, but dispatched
        forward += 1e-5
        if is_view(costed_op(node)):
            continue
        ins = [concrete_shape(v.type, {"batch": 8, "seq": 16}) for v in node.input_values()]
        outs = [concrete_shape(v.type, {"batch": 8, "seq": 16}) for v in node.outputs]
        sizes = [dtype_size(v.type.dtype) for v in (*node.input_values(), *node.outputs)]  # int64 ids: 8 bytes
        seconds = float(op_time(costed_op(node), ins, outs, {}, device, dtype_bytes=sizes))
        matmul = op_category(node.op) == "matmul"
        forward += seconds / (0.5 if matmul else 0.8)
    stage = priced.stage_times[0]
    assert math.isclose(stage["fwd_compute_s"], forward, rel_tol=1e-9)
    assert stage["bwd_compute_s"] > 2 * baseline.stage_times[0]["bwd_compute_s"]  # matmul backward at 1/4
    assert simulate(plan, overhead_s=0.0).stage_times[0]["fwd_compute_s"] == \
        pytest.approx(forward - fwd_ops * 1e-5)  # an explicit overhead wins over the measured one


def test_measured_comm_overlap_sets_how_much_gradient_sync_hides(small):
    """comm_overlap 1: the gradient all-reduce hides behind the last backward; 0: all of it is exposed;
    in between, that fraction of the overlappable time hides."""
    model, inputs = small
    exposed = {}
    for overlap in (0.0, 0.25, 1.0):
        spec = Cluster.local(2).to_dict()
        spec["device_kinds"]["cpu"]["comm_overlap"] = overlap
        report = simulate(compile_cached(model, inputs, cluster=Cluster.from_dict(spec), strategy="dp"))
        total, exposed[overlap] = report.estimate.grad_sync_s[0]
        backward = report.stage_times[0]["bwd_compute_s"] + report.stage_times[0]["bwd_comm_s"]
    assert exposed[0.0] == pytest.approx(total)
    assert exposed[1.0] == pytest.approx(max(0.0, total - backward))
    assert exposed[0.25] == pytest.approx(total - 0.25 * min(total, backward))


def test_report_of_a_compiled_plan(dp_plan):
    report = simulate(dp_plan)
    assert report.source == "ir" and report.step_time_s > 0 and report.fits
    assert math.isclose(report.samples_per_s, 8 / report.step_time_s)
    assert math.isclose(report.tokens_per_s, 8 * 16 / report.step_time_s)
    assert 0 < report.mfu < 1
    assert set(report.peak_memory_bytes) == {0, 1} and min(report.peak_memory_bytes.values()) > 0
    assert report.comm_bytes_by_link_class["loopback"] > 0  # the gradient all-reduce
    assert "step" in report.summary()
    serial = simulate(dp_plan, overlap_grad_sync=False)  # all-reduce after backward, not during it
    assert serial.step_time_s > report.step_time_s


def test_forward_time_is_the_sum_of_cost_model_op_times(small):
    """On one device, the forward of every segment is sum(op_time) over the ops on their shapes, each tensor
    at its dtype's element size."""
    model, inputs = small
    plan = compile_cached(model, inputs, cluster="local:1", strategy="dp")
    report = simulate(plan, overhead_s=0.0)
    device = plan.cluster.device(0)
    expected = 0.0
    for node in plan.graph.nodes:
        if is_view(costed_op(node)) or node.op.startswith("comm."):
            continue
        ins = [concrete_shape(v.type, {"batch": 8, "seq": 16}) for v in node.input_values()]
        outs = [concrete_shape(v.type, {"batch": 8, "seq": 16}) for v in node.outputs]
        sizes = [dtype_size(v.type.dtype) for v in (*node.input_values(), *node.outputs)]
        expected += float(op_time(costed_op(node), ins, outs, {}, device, dtype_bytes=sizes))
    simulated = sum(s["fwd_compute_s"] for s in report.stage_times)
    assert math.isclose(simulated, expected, rel_tol=1e-9)


def test_plan_and_strategy_paths_agree(small, dp_plan):
    model, inputs = small
    graph = capture(model, inputs, train=True).graph
    graph.attrs["example_dims"] = {"batch": 8, "seq": 16}
    from_ir = simulate(dp_plan)
    from_strategy = simulate((graph, dp_plan.strategy, dp_plan.cluster), optimizer="sgd")
    assert from_strategy.source == "strategy"
    # The strategy path prices data parallelism analytically (batch split, gradient all-reduce); the IR also
    # all-reduces the loss's target count over dp: two latencies, 5% of this toy model's step.
    assert math.isclose(from_ir.step_time_s, from_strategy.step_time_s, rel_tol=0.1)
    tp_plan = compile_cached(model, inputs, cluster="local:2", strategy={"mesh": {"tp": 2}, "params": MEGATRON})
    tp_ir, tp_strategy = simulate(tp_plan), simulate((graph, tp_plan.strategy, tp_plan.cluster), optimizer="sgd")
    assert tp_ir.stage_times[0]["fwd_comm_s"] > 0 and tp_strategy.stage_times[0]["fwd_comm_s"] > 0
    assert math.isclose(tp_ir.step_time_s, tp_strategy.step_time_s, rel_tol=0.15)


def test_collectives_are_priced_on_the_links_they_cross(big_graph):
    cluster = Cluster.load("dgx-a100:2")
    inside = simulate((big_graph, {"mesh": {"dp": 2, "tp": 8}, "params": MEGATRON}, cluster), **MIXED)
    across = simulate((big_graph, {"mesh": {"tp": 8, "dp": 2}, "params": MEGATRON}, cluster), **MIXED)
    assert all(len({cluster.node_of(d) for d in g}) == 1
               for g in axis_groups(range(16), ("dp", "tp"), (2, 8), "tp"))
    assert across.stage_times[0]["fwd_comm_s"] > 2 * inside.stage_times[0]["fwd_comm_s"]
    assert across.comm_bytes_by_link_class["infiniband"] > 2 * inside.comm_bytes_by_link_class["infiniband"]
    assert across.step_time_s > inside.step_time_s


def test_pipeline_bubbles_follow_the_schedule(big_graph):
    cluster = Cluster.load("dgx-a100:1")
    results = {}
    for m in (2, 8):
        strategy = {"mesh": {"pp": 4, "dp": 2}, "microbatches": m, "schedule": "1f1b"}
        results[m] = simulate((big_graph, strategy, cluster), **MIXED)
    assert results[8].bubble_fraction < results[2].bubble_fraction
    for m, report in results.items():  # 1F1B: every stage once, plus m - 1 rounds of the slowest one
        work = [s["fwd_compute_s"] + s["fwd_comm_s"] + s["bwd_compute_s"] + s["bwd_comm_s"] for s in report.stage_times]
        closed_form = sum(work) + (m - 1) * max(work)
        assert closed_form <= report.estimate.pipeline_s <= 1.1 * closed_form
    assert len(results[8].stage_times) == 4 and results[8].stage_times[0]["send_s"] > 0
    interleaved = simulate((big_graph, {"mesh": {"pp": 2, "dp": 4}, "microbatches": 4, "schedule": "interleaved",
                                        "virtual_stages": 2}, cluster), **MIXED)
    assert len(interleaved.stage_times) == 4 and {s["rank"] for s in interleaved.stage_times} == {0, 1}


def test_the_gradient_sum_across_microbatches_is_priced_unless_fused(big_graph):
    """Every microbatch after the first adds each weight gradient into the sum so far (a read of both, a write):
    per microbatch, (m - 1) / m of three elementwise passes over the stage's gradients; nothing with one
    microbatch or with the sum fused into the weight-gradient GEMMs. DeepSpeed's BF16 optimizer instead adds
    every microbatch's gradient, cast to fp32, into an fp32 buffer: the 2-byte gradient read and four fp32
    passes (18 bytes an element against autograd's 3 x 2), with one microbatch too, and the buffer's 4 bytes an
    element held beside the gradients."""
    cluster = Cluster.load("dgx-a100:1")
    extra, buffered, memory = {}, {}, {}
    for m in (1, 2, 4):
        strategy = {"mesh": {"pp": 4, "dp": 2}, "microbatches": m, "schedule": "1f1b"}
        reports = {mode: simulate((big_graph, strategy, cluster), grad_accumulation=mode, **MIXED)
                   for mode in ("autograd", "fused", "fp32_buffer")}
        summed, fused = reports["autograd"], reports["fused"]
        extra[m] = [a["bwd_compute_s"] - b["bwd_compute_s"] for a, b in zip(summed.stage_times, fused.stage_times)]
        buffered[m] = [a["bwd_compute_s"] - b["bwd_compute_s"]
                       for a, b in zip(reports["fp32_buffer"].stage_times, fused.stage_times)]
        memory[m] = {d: reports["fp32_buffer"].peak_memory_bytes[d] - fused.peak_memory_bytes[d]
                     for d in fused.peak_memory_bytes}
        assert [a["fwd_compute_s"] for a in summed.stage_times] == [b["fwd_compute_s"] for b in fused.stage_times]
    assert extra[1] == [0.0] * 4
    device = cluster.device(0)  # the sums run as elementwise passes: at the STREAM fraction of HBM bandwidth
    bandwidth = device.memory_bandwidth_Bps * device.efficiency_of("add", "elementwise")[0]
    model_bytes = 4 * sum(p.numel() for p in gpt_configs.meta_model("1.3B", n_layer=4).parameters())
    for k in range(4):
        assert extra[2][k] > 0 and extra[4][k] == pytest.approx(1.5 * extra[2][k], rel=1e-9)
        assert 2 * extra[2][k] * bandwidth / 3 < model_bytes  # the stage's gradient bytes, under the model's
        for m in (1, 2, 4):
            assert buffered[m][k] == pytest.approx(6 * extra[2][k], rel=1e-9)
    stage_devices = [stage.devices for stage in summed.estimate.stages]
    for m in (1, 2, 4):  # the buffer: 4 bytes for each gradient element the stage's devices hold
        for k, devices in enumerate(stage_devices):
            elements = 2 * extra[2][k] * bandwidth / (3 * 2)
            assert all(memory[m][d] == pytest.approx(4 * elements, rel=1e-9) for d in devices)


def test_plan_options_refuse_unknown_accumulation_and_optimizer_kinds():
    """A misspelt gradient-accumulation or distributed-optimizer kind is one clear error naming what is expected."""
    with pytest.raises(ValueError, match="expected grad_accumulation in .*'fp32_buffer'.*found 'fp32'"):
        PlanOptions(grad_accumulation="fp32")
    with pytest.raises(ValueError, match="expected distributed_optimizer True, False or 'all_reduce', found 'zero1'"):
        PlanOptions(distributed_optimizer="zero1")


ZERO_BUBBLE = ("zb-h1", "zbv", "dualpipev")


def test_zero_bubble_schedules_fill_the_bubble_with_weight_gradients(big_graph):
    """Split backwards run each backward's weight-gradient part (about half of a matmul's backward; attention
    and norms have none; an embedding's is all of it: zeroing its table's gradient and scattering into it) as W
    actions that fill 1F1B's bubble; the quick closed form stays near the timeline."""
    cluster = Cluster.load("dgx-a100:1")
    base = {"mesh": {"pp": 2, "dp": 4}, "microbatches": 4}
    reports = {s: simulate((big_graph, {**base, "schedule": s}, cluster), **MIXED) for s in ("1f1b",) + ZERO_BUBBLE}
    assert all(stage["weight_s"] == 0 for stage in reports["1f1b"].stage_times)
    for schedule in ZERO_BUBBLE:
        report = reports[schedule]
        assert all(0.25 < stage["weight_s"] / stage["bwd_compute_s"] < 0.6 for stage in report.stage_times)
        assert report.bubble_fraction < reports["1f1b"].bubble_fraction
        assert report.step_time_s < reports["1f1b"].step_time_s
        kinds = {e.action.kind for events in report.estimate.timeline.events.values() for e in events if e.action}
        assert "W" in kinds
        quick = simulate((big_graph, {**base, "schedule": schedule}, cluster), exact=False, **MIXED)
        assert quick.step_time_s == pytest.approx(report.step_time_s, rel=0.1)
    # ZB-H1 holds up to p microbatches on every rank (counting those waiting for W), as 1F1B's first stage does
    zb_h1, one_f_one_b = reports["zb-h1"].peak_memory_bytes, reports["1f1b"].peak_memory_bytes
    assert zb_h1[0] == pytest.approx(one_f_one_b[0], rel=0.02) and zb_h1[7] > one_f_one_b[7]
    assert {s["rank"] for s in reports["zbv"].stage_times if s["stage"] in (0, 3)} == {0}  # the V


def test_auto_considers_the_zero_bubble_schedules_under_the_memory_limit(big_graph):
    cluster = Cluster.load("dgx-a100:1")
    fixed = {"mesh": {"pp": 2, "dp": 4}}
    strategy, report = search(big_graph, cluster, fixed, use_cache=False, **MIXED)
    priced = [report.chosen] + list(report.alternatives)
    assert strategy.pipeline.schedule in ZERO_BUBBLE and report.chosen.fits
    assert {"zb-h1", "zbv", "1f1b"} <= {c.strategy.pipeline.schedule for c in priced}
    v_shaped, _ = search(big_graph, cluster, {**fixed, "schedule": "dualpipev"}, use_cache=False, **MIXED)
    assert v_shaped.pipeline.schedule == "dualpipev"  # priced too (behind the seven best here: its rank 0 holds
    # the tied embedding twice, a copy for each of its two stages, as the pipeline pass places them)
    # a memory limit the V shapes (rank 0 keeps the head's logits of its last stage) exceed without recomputation
    plain = {**fixed, "microbatches": 4, "recompute": False}
    peaks = {s: max(simulate((big_graph, {**plain, "schedule": s}, cluster), **MIXED).peak_memory_bytes.values())
             for s in ("zb-h1", "zbv")}
    assert peaks["zbv"] > peaks["zb-h1"]
    headroom = (peaks["zb-h1"] + peaks["zbv"]) / 2 / cluster.devices[0].memory_bytes
    limited, limited_report = search(big_graph, cluster, plain, use_cache=False, memory_headroom=headroom, **MIXED)
    assert limited.pipeline.schedule == "zb-h1" and limited_report.chosen.fits
    v_shaped = [c for c in limited_report.alternatives if c.strategy.pipeline.schedule in ("zbv", "dualpipev")]
    assert all(c.fits and c.strategy.fsdp_axis for c in v_shaped)  # they fit only with sharded weights


def test_memory_counts_recompute_schedule_and_sharding(big_graph):
    cluster = Cluster.load("dgx-a100:2")
    base = {"mesh": {"pp": 2, "dp": 8}, "microbatches": 2, "schedule": "1f1b"}

    def run(**changes):
        return simulate((big_graph, {**base, **changes}, cluster), **MIXED)

    plain, recompute = run(), run(recompute=["blocks.*"])
    assert max(recompute.peak_memory_bytes.values()) < max(plain.peak_memory_bytes.values())
    assert recompute.step_time_s > plain.step_time_s
    gpipe = run(schedule="gpipe")
    assert gpipe.peak_memory_bytes[15] > plain.peak_memory_bytes[15]  # the last stage holds all microbatches
    replicated = simulate((big_graph, {"mesh": {"dp": 16}}, cluster), **MIXED)
    sharded = simulate((big_graph, {"mesh": {"dp": 16}, "fsdp": "dp"}, cluster), **MIXED)
    state = lambda r: float(r.estimate.memory[0].parameters + r.estimate.memory[0].optimizer_state)
    assert state(sharded) < state(replicated) / 8


def test_fsdp_gathers_parameters_again_for_backward(big_graph, small):
    """FSDP as the emitted programs run it: each segment's parameters are gathered for forward, freed,
    gathered again for backward, and the gradients reduce-scattered; gathered copies are not kept."""
    cluster = Cluster.load("dgx-a100:2")
    sharded = simulate((big_graph, {"mesh": {"dp": 16}, "fsdp": "dp"}, cluster), **MIXED)
    stage = sharded.stage_times[0]
    assert stage["bwd_comm_s"] > stage["fwd_comm_s"] * 1.5  # a gather (as forward) + a reduce-scatter
    gathered = sharded.comm_bytes_by_link_class
    replicated = simulate((big_graph, {"mesh": {"dp": 16}}, cluster), **MIXED)
    assert sum(gathered.values()) > 1.4 * sum(replicated.comm_bytes_by_link_class.values())  # 3 vs 2 passes
    activations = lambda r: float(r.estimate.memory[0].activations)
    full_params = float(replicated.estimate.memory[0].parameters)
    assert 0 < activations(sharded) - activations(replicated) < 0.5 * full_params  # one segment's copy, not all

    model, inputs = small  # the compiled IR prices the same: a backward all-gather per parameter gather
    plan = compile_cached(model, inputs, cluster="local:2", strategy={"mesh": {"dp": 2}, "fsdp": "dp"})
    comms = [c for seg in ir_profile(plan.graph, Precision.of("fp32")).segments for c in seg.comms]
    forward_gathers = [c for c in comms if c.kind == "all_gather" and not c.backward]
    backward_gathers = [c for c in comms if c.kind == "all_gather" and c.backward]
    assert forward_gathers and len(backward_gathers) == len(forward_gathers)


def _gathering_at(latency_s: float) -> Cluster:
    """``local:2`` whose all-gathers take ``latency_s`` each (plus a fast transfer)."""
    spec = Cluster.local(2).to_dict()
    spec["nodes"][0]["intra_link"]["collectives"] = {"all_gather": {"latency": latency_s, "bandwidth": 1e12}}
    return Cluster.from_dict(spec)


@pytest.mark.parametrize("latency_s", [1e-7, 0.05])  # gathers shorter than a segment's compute, and longer
def test_fsdp_gathers_hide_behind_the_previous_segments_compute(small, latency_s):
    """Prefetching: a segment's parameter gathers (one collective per segment, as the runtime gathers a layer) run
    while the segment before it (in that pass) computes, so only what that compute does not cover is exposed;
    forward's first segment waits for all of its own, forward's last is not gathered again for backward.
    Without prefetching every gather is exposed; the breakdown still sums to the step."""
    model, inputs = small
    plan = compile_cached(model, inputs, cluster="local:2", strategy={"mesh": {"dp": 2}, "fsdp": "dp"})
    cluster = _gathering_at(latency_s)
    prefetched = simulate((plan.graph, plan.strategy, cluster))
    waited = simulate((plan.graph, plan.strategy, cluster), prefetch_gathers=False)
    shape = prefetched.shape
    estimator = PlanOptions().estimator(ir_profile(plan.graph, Precision.of("fp32")), cluster)
    segments = shape.segments_of_stage(0, estimator.profile.num_layers)
    gathers = [estimator.param_gathers(shape, 0, j) for j in segments]
    work = [estimator.segment_work(shape, 0, j) for j in segments]
    hidden = estimator.prefetch_hidden(shape, 0, segments)
    assert all(g[0] > 0 and g[1] > 0 for g in gathers)
    if latency_s > 1e-3:  # latency-bound: a block's dozen shards are one collective, one latency, not twelve
        assert latency_s <= gathers[1][0] < 2 * latency_s
    assert hidden[0][0] == 0 and hidden[-1][1] == gathers[-1][1]  # forward's first; forward's last kept for backward
    for p in range(1, len(segments)):
        compute = work[p - 1][0]  # the forward of the segment before
        assert hidden[p][0] == pytest.approx(min(gathers[p][0], compute))
        assert (hidden[p][0] == pytest.approx(gathers[p][0])) == (gathers[p][0] < compute)
    for p in range(len(segments) - 1):
        assert hidden[p][1] == pytest.approx(min(gathers[p][1], work[p + 1][2]))  # backward runs in reverse
    fully_hidden = all(h == pytest.approx(g) for h, g in zip([h[0] for h in hidden[1:]], [g[0] for g in gathers[1:]]))
    assert fully_hidden == (latency_s < 1e-3)
    saved = sum(f + b for f, b in hidden)
    assert waited.step_time_s - prefetched.step_time_s == pytest.approx(saved, rel=1e-6)
    for report in (prefetched, waited):
        assert math.isclose(sum(report.breakdown.values()), report.step_time_s, rel_tol=1e-9), report.breakdown
    part = "fsdp gathers and reduce-scatters"
    assert waited.breakdown[part] - prefetched.breakdown[part] == pytest.approx(saved, rel=1e-6)


@pytest.mark.parametrize("pp, v, m", [(2, 2, 4), (4, 3, 8), (35, 3, 280)])
def test_an_interleaved_rank_holds_its_warm_up_not_each_chunks_peak(pp, v, m):
    """A rank's model chunks peak at different times: its first pipeline position holds the microbatch-chunks of
    Megatron's interleaved warm-up, (p - 1) * 2 + (v - 1) * p, plus the one in flight, not the sum of each chunk's
    own peak."""
    stages = pp * v
    shape = PlanShape(("dp",), (1,), pp, m, "interleaved", v, [(k, k) for k in range(stages)], [(r,) for r in range(pp)])
    held = _peak_pending_bytes(shape, {k: 1.0 for k in range(stages)})
    assert held[0] == min(m * v, (pp - 1) * 2 + (v - 1) * pp + 1)


@pytest.mark.parametrize("schedule, pp, v, m", [("zb-h1", 4, 1, 8), ("interleaved", 2, 2, 4), ("interleaved", 4, 2, 8),
                                                 ("zbv", 4, 2, 8), ("dualpipev", 2, 2, 6), ("dualpipev", 4, 2, 12)])
def test_a_ranks_peak_is_the_most_its_actions_hold_at_once(schedule, pp, v, m):
    """The held-microbatch states walked once per schedule shape give, for any per-stage sizes, the largest
    sum the rank holds after one of its compute actions (a forward adds its stage's size; the last backward
    pass of a microbatch, B or W, frees it)."""
    stages = pp * v
    shape = PlanShape(("dp",), (1,), pp, m, schedule, v, [(k, k) for k in range(stages)], [(r,) for r in range(pp)])
    actions = build_pipeline_schedule(schedule, pp, stages, m)
    for trial in range(3):
        sizes = {k: float((7 * k + 3 * trial) % 5 + 1) for k in range(stages)}
        for rank, rank_actions in actions.items():
            last = {a.value[1:]: a.kind for a in rank_actions if a.kind in ("B", "W")}
            held, peak = 0.0, 0.0
            for action in rank_actions:
                if action.kind == "F":
                    held += sizes[action.stage]
                elif action.is_compute and last[action.value[1:]] == action.kind:
                    held -= sizes[action.stage]
                if action.is_compute:
                    peak = max(peak, held)
            assert _peak_pending_bytes(shape, sizes)[rank] == pytest.approx(peak)


def test_slower_devices_take_longer_per_layer(big_graph):
    cluster = Cluster.load(ROOT / "examples" / "clusters" / "hetero-a100-v100.yaml")
    report = simulate((big_graph, {"mesh": {"pp": 2, "dp": 16}, "microbatches": 1, "stage_layers": [[0, 1], [2, 3]]},
                       cluster), **MIXED)
    a100, v100 = report.stage_times
    assert v100["fwd_compute_s"] > 2 * a100["fwd_compute_s"]  # 125 vs 312 TFLOPS (and the head is there)
    limits = {d: 0.9 * cluster.device(d).memory_bytes for d in range(32)}
    assert report.fits == all(report.peak_memory_bytes[d] <= limits[d] for d in range(32))


def test_trace_and_gantt_cover_every_device(big_graph, tmp_path):
    cluster = Cluster.load("dgx-a100:1")
    report = simulate((big_graph, {"mesh": {"pp": 2, "dp": 2, "tp": 2}, "params": MEGATRON, "microbatches": 4},
                       cluster), **MIXED)
    trace = json.loads(report.write_trace(tmp_path / "step.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["pid"] == 0]
    assert {e["cat"] for e in spans} == {"compute", "comm", "idle"}
    assert {e["tid"] for e in spans} == set(range(8))
    parts = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["pid"] == 1]  # the breakdown track
    assert {e["name"] for e in parts} == set(report.breakdown) and trace["otherData"]["breakdown_s"] == report.breakdown
    assert math.isclose(sum(e["dur"] for e in parts), report.step_time_s * 1e6, rel_tol=1e-9)
    for device, events in report.device_events().items():
        assert events[0].start_s == 0 and math.isclose(events[-1].end_s, report.step_time_s)
        assert all(math.isclose(a.end_s, b.start_s, abs_tol=1e-12) for a, b in zip(events, events[1:]))
    png = report.write_gantt_png(tmp_path / "step.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_targets_are_explained(big_graph):
    with pytest.raises(TypeError, match="CompiledPlan or"):
        simulate((big_graph,))
    with pytest.raises(StrategyError, match="the mesh dp=3 has 3 devices, but the world has 2"):
        simulate((big_graph, {"mesh": {"dp": 3}}, Cluster.load("local:2")))
    with pytest.raises(ValueError, match="does not split into 3 microbatches"):
        simulate((big_graph, {"mesh": {"dp": 2}, "microbatches": 3}, Cluster.load("local:2")))


def test_reshape_of_a_transposed_tensor_is_priced_as_a_copy(dp_plan):
    reshapes = [n for n in dp_plan.graph.nodes if n.op == "aten.reshape.default"]
    after_transpose = [n for n in reshapes if n.input_values()[0].producer is not None
                       and n.input_values()[0].producer.op == "aten.transpose.int"]
    assert after_transpose and all(costed_op(n) == "aten.clone.default" for n in after_transpose)
    views = [n for n in dp_plan.graph.nodes if n.op == "aten.view.default"]
    assert views and all(costed_op(n) == n.op for n in views)


def test_recomputed_regions_of_the_ir_are_priced_op_by_op(small):
    """The simulator prices what the program recomputes: whole blocks, or only the MLPs."""
    model, inputs = small
    reports = {}
    for name, recompute in (("none", False), ("mlp", ["blocks.*.mlp"]), ("blocks", True)):
        plan = compile_cached(model, inputs, cluster="local:2", strategy={"mesh": {"dp": 2}, "recompute": recompute})
        reports[name] = simulate(plan)
    again = {k: r.stage_times[0]["recompute_s"] for k, r in reports.items()}
    peak = {k: max(r.peak_memory_bytes.values()) for k, r in reports.items()}
    assert again["none"] == 0 < again["mlp"] < again["blocks"]
    assert peak["blocks"] < peak["mlp"] < peak["none"]
    assert reports["none"].step_time_s < reports["mlp"].step_time_s < reports["blocks"].step_time_s
    # recomputing the blocks repeats less than the whole forward (embeddings and head are not recomputed)
    plain_forward = reports["none"].stage_times[0]["fwd_compute_s"]
    assert again["blocks"] < plain_forward + reports["none"].stage_times[0]["fwd_comm_s"]


@pytest.mark.parametrize("strategy", [
    {"mesh": {"dp": 8}},
    {"mesh": {"dp": 2, "tp": 4}, "params": MEGATRON, "sequence_parallel": True, "recompute": ["blocks.*"]},
    {"mesh": {"pp": 2, "dp": 2, "tp": 2}, "params": MEGATRON, "microbatches": 4, "schedule": "1f1b"},
    {"mesh": {"dp": 8}, "fsdp": "dp", "recompute": ["blocks.*"]},
])
def test_step_breakdown_sums_to_the_step_and_never_exceeds_peak(big_graph, strategy):
    """The breakdown covers the whole step (the rank that finishes last), each part where the plan has it;
    the simulated step never runs faster than the plan's FLOPs at the devices' peak."""
    cluster = Cluster.load("dgx-a100:1")
    for overlap in (True, False):
        report = simulate((big_graph, strategy, cluster), overlap_grad_sync=overlap, **MIXED)
        parts = report.breakdown
        assert math.isclose(sum(parts.values()), report.step_time_s, rel_tol=1e-9), parts
        assert all(v > 0 for v in parts.values())
        assert {"forward compute", "backward compute", "optimizer step", "embedding/loss compute"} <= set(parts)
        assert 0 < report.mfu < 1
        assert report.flops_per_step <= report.step_time_s * 8 * 312e12
        assert "step breakdown: " in report.summary()
    mesh = strategy["mesh"]
    assert ("all_reduce over tp (exposed)" in parts or "all_gather over tp (exposed)" in parts) == ("tp" in mesh)
    assert ("recompute" in parts) == ("recompute" in strategy)
    assert ("pipeline bubble" in parts and "pipeline point-to-point" in parts) == ("pp" in mesh)
    assert ("fsdp gathers and reduce-scatters" in parts) == ("fsdp" in strategy)
    assert ("gradient reduction (exposed)" in parts) == ("fsdp" not in strategy)  # overlap=False: all exposed
    # autograd's sums of the microbatches' gradients: their own part, not backward compute
    assert ("gradient accumulation" in parts) == (strategy.get("microbatches", 1) > 1)
    if "gradient accumulation" in parts:
        fused = simulate((big_graph, strategy, cluster), overlap_grad_sync=False, grad_accumulation="fused", **MIXED)
        assert parts["backward compute"] == pytest.approx(fused.breakdown["backward compute"], rel=1e-9)


def test_cpu_ranks_sharing_cores_compute_at_their_share(big_graph):
    """Four CPU ranks on two cores take turns on them: every compute part of a dp x tp step takes twice as
    long as with a core each; collectives, which calibration measures with the ranks sharing, are unchanged."""
    def local(cores):
        node = {"device": "cpu", "devices": 4, "intra_link": {"class": "loopback", "bandwidth": "2GB/s",
                                                             "latency": "50us"}}
        return Cluster.from_dict({"name": "local", "nodes": [{**node, **({"cpu_cores": cores} if cores else {})}]})
    strategy = {"mesh": {"dp": 2, "tp": 2}, "params": MEGATRON}
    alone, shared = (simulate((big_graph, strategy, local(cores))).breakdown for cores in (None, 2))
    for part in ("forward compute", "backward compute", "embedding/loss compute", "optimizer step"):
        assert shared[part] == pytest.approx(2 * alone[part]), part
    collectives = [part for part in alone if " over tp " in part]
    assert collectives and all(shared[part] == pytest.approx(alone[part]) for part in collectives)


def test_explain_shows_the_breakdown(dp_plan):
    text = dp_plan.explain()
    assert "Where the step goes" in text and "backward compute" in text and "optimizer step" in text


def test_a_pipeline_mesh_naming_only_pp_is_priced():
    """``{"mesh": {"pp": 8}}`` lays each stage out on a ``dp=1`` mesh the strategy does not name: the compiled
    plan is priced with that unit axis (it was refused as a different mesh)."""
    plan = compile_cached(gpt_model(n_layer=8), gpt_inputs(), cluster="dgx-a100:1",
                   strategy={"mesh": {"pp": 8}, "microbatches": 4})
    report = plan.simulate()
    assert report.step_time_s > 0 and len(report.peak_memory_bytes) == 8


def test_a_tied_embedding_split_over_pipeline_stages_pays_one_gradient_all_reduce():
    """The GPT's embedding, tied to its head, has a copy on the first and on the last stage: after the last
    backward the two gradients are summed (as the emitted program and Megatron do), one all-reduce of the
    embedding between the two stages' devices; untied, the pipeline has no gradient reduction at all."""
    from cost.collectives import collective_time
    cluster = Cluster.local(2)
    strategy = {"mesh": {"pp": 2}, "microbatches": 4}
    tied = compile_cached(gpt_model(), gpt_inputs(), cluster=cluster, strategy=strategy)
    untied_model = gpt_model()
    untied_model.lm_head.weight = torch.nn.Parameter(untied_model.lm_head.weight.detach().clone())
    untied = compile_cached(untied_model, gpt_inputs(), cluster=cluster, strategy=strategy)
    assert tied.graph.attrs["tied_params"] and not untied.graph.attrs.get("tied_params")
    embedding = tied.weights["tok_emb.weight"]
    expected = collective_time("all_reduce", embedding.numel() * embedding.element_size(), (0, 1), cluster)
    assert tied.simulate().breakdown["gradient reduction (exposed)"] == pytest.approx(expected, rel=1e-9)
    assert "gradient reduction (exposed)" not in untied.simulate().breakdown
    assert tied.simulate().step_time_s > untied.simulate().step_time_s - 1e-12


def test_identical_blocks_sharing_their_records_are_no_copies_to_sum(big_graph):
    """The planner's view prices every later identical block with block 0's records: one parameter each, so a
    pipeline over those blocks sums no block gradients between its ranks (only the tied embedding's copies)."""
    from cost.estimate import PlanOptions, _copied_params
    from passes.planner.evaluate import ModelView
    evaluation = ModelView(big_graph).evaluate({"mesh": {"pp": 2, "dp": 4}, "microbatches": 4},
                                               Cluster.load("dgx-a100:1"), PlanOptions(**MIXED))
    shared = [record for segment in evaluation.profile.segments[1:] for record in segment.params
              if record.name.startswith("blocks.")]
    assert len({id(record) for record in shared}) < len(shared)  # later blocks reuse block 0's records
    assert not any(name.startswith("blocks.") for name in _copied_params(evaluation.profile))


def test_the_planner_view_prices_a_tied_embedding_as_the_compiled_pipeline_does():
    """The planner prices the captured graph, before the pipeline pass copies parameters: the embedding tied to
    the head is read by the first and the last segment, so a pipeline holds a copy on each end stage and sums
    their gradients after backward (the same all-reduce the compiled plan is priced with), while a one-stage
    plan holds it once."""
    from cost.estimate import PlanOptions
    from passes.planner.evaluate import ModelView
    cluster = Cluster.local(2)
    strategy = {"mesh": {"pp": 2}, "microbatches": 4}
    graph = capture(gpt_model(), gpt_inputs(), train=True).graph
    batch, seq = gpt_inputs()[0].shape
    graph.attrs["example_dims"] = {"batch": batch, "seq": seq}
    view = ModelView(graph)
    compiled = compile_cached(gpt_model(), gpt_inputs(), cluster=cluster, strategy=strategy)
    options = PlanOptions(global_batch=batch)

    def held(evaluation, rank: int) -> list[str]:
        estimator = options.estimator(evaluation.profile, cluster)
        return [record.name for record in estimator._stage_params(evaluation.shape, rank)]

    pipelined = view.evaluate(strategy, cluster, options)
    estimator = options.estimator(pipelined.profile, cluster)
    priced = estimator.breakdown(pipelined.shape, pipelined.estimate)["gradient reduction (exposed)"]
    assert priced == pytest.approx(compiled.simulate().breakdown["gradient reduction (exposed)"], rel=1e-9)
    assert held(pipelined, 0).count("tok_emb.weight") == held(pipelined, 1).count("tok_emb.weight") == 1
    assert held(view.evaluate({"mesh": {"dp": 2}}, cluster, options), 0).count("tok_emb.weight") == 1
