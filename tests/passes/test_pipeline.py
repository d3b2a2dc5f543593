"""The pipeline pass: stage cuts, stage meshes, transfers, tied copies, the loss split and schedules."""
from __future__ import annotations


import pytest
import torch

from cost.timeline import simulate
from ir.ops.pipeline_ops import (SEND_RECV, WHOLE_BATCH, Action, pipeline_stages, schedule_actions,
                                 stage_mesh_name)
from ir.layers import find_layers
from ir.parser import parse
from ir.schedules import ScheduleDeadlock, ScheduleError, build_1f1b, build_gpipe, check_deadlock
from ir.verifier import verify
from passes.manager import PassContext, PassFailed
from passes.pipeline import lanes, node_costs, pipeline_config, schedule_pass, stage_starts
from passes.skippipe import parse_skip_plan
from strategy import Strategy, StrategyError
from tests.capture_cache import compile_cached
from tests.models import gpt_inputs, gpt_model

GPT4 = gpt_model(n_layer=4)
GPT4_INPUTS = gpt_inputs(batch=8, seq=8)


def gpt_plan(world: int = 2, **strategy):
    """The 4-layer GPT compiled with ``strategy`` (mesh pp=world unless given)."""
    strategy.setdefault("mesh", {"pp": world})
    return compile_cached(GPT4, GPT4_INPUTS, world, strategy)


def stage_list(graph) -> list[int]:
    return [node.attrs["stage"] for node in graph.nodes]


# -- cutting ---------------------------------------------------------------------------------------

def test_a_stage_begins_at_the_named_module():
    plan = gpt_plan(stages=["blocks.2"], microbatches=4)
    graph = plan.graph
    first = next(i for i, n in enumerate(graph.nodes) if n.attrs.get("module", "").startswith("blocks.2."))
    stages = stage_list(graph)
    transfers = [n for n in graph.nodes if n.op == SEND_RECV]
    assert set(stages[:first - len(transfers)]) == {0} and set(stages[first:]) == {1}
    assert sorted(graph.meshes) == ["stage0", "stage1"]
    assert graph.meshes["stage0"].devices == (0,) and graph.meshes["stage1"].devices == (1,)
    # only the residual stream crosses the cut
    assert [(n.kwargs["src"], n.kwargs["dst"], n.kwargs["slot"]) for n in transfers] == [("stage0", "stage1", 0)]
    assert transfers[0].outputs[0].type.shape[-1] == 64
    assert all(v.mesh.startswith("stage") for v in graph.all_values())


def test_pipelined_ir_prints_parses_and_verifies():
    text = gpt_plan(stages=["blocks.2"], microbatches=4, schedule="gpipe").ir
    again = parse(text)
    verify(again)
    assert str(again) == text
    assert "comm.send_recv(" in text and "attr schedule = {r0 = \"F0@s0 " in text


def test_a_transfer_that_changes_layout_is_rejected_by_the_verifier():
    graph = parse(gpt_plan(stages=["blocks.2"], microbatches=2).ir)
    transfer = next(n for n in graph.nodes if n.op == SEND_RECV)
    transfer.kwargs["dst"] = "stage0"
    with pytest.raises(ValueError, match="kwargs must name the meshes"):
        verify(graph)


def test_layer_ranges_cut_where_module_names_do():
    by_name = gpt_plan(world=2, stages=["blocks.3"], microbatches=2)
    by_layers = gpt_plan(world=2, stage_layers=[[0, 2], [3, 3]], microbatches=2)
    assert stage_list(by_layers.graph) == stage_list(by_name.graph)
    layers = find_layers(by_name.graph)
    assert (layers.prefix, layers.num_layers) == ("blocks", 4)


def test_cuts_the_graph_does_not_have_are_refused():
    # compile() validates names against the model first; the pass checks them against the graph too
    graph = compile_cached(GPT4, GPT4_INPUTS, 1, "dp").graph
    with pytest.raises(StrategyError, match=r"stage cut 'blocks\.1': it begins before the previous cut"):
        stage_starts(graph, Strategy.from_dict({"stages": ["blocks.3", "blocks.1"]}), 3)
    with pytest.raises(StrategyError, match=r"stage cut 'block\.2': no node comes from it; did you mean blocks\.2"):
        stage_starts(graph, Strategy.from_dict({"stages": ["block.2"]}), 2)
    with pytest.raises(StrategyError, match="2 stages but the mesh asks for 4"):
        stage_starts(graph, Strategy.from_dict({"stages": ["blocks.2"]}), 4)


def test_automatic_cuts_balance_the_flop_estimate():
    plan = gpt_plan(world=2, microbatches=2)
    graph = plan.graph
    transfer = next(i for i, n in enumerate(graph.nodes) if n.op == SEND_RECV)
    assert graph.nodes[transfer + 1].attrs["module"].endswith(".ln_1")  # a layer boundary
    fresh = compile_cached(GPT4, GPT4_INPUTS, 1, "dp").graph
    costs = node_costs(fresh)
    starts = [i for i, n in enumerate(fresh.nodes) if n.attrs.get("module", "").endswith(".ln_1")]
    worst = [max(sum(costs[:s]), sum(costs[s:])) for s in starts[1:]]
    flops = plan.graph.attrs["pipeline"]["stage_flops"]
    assert max(flops) * 2 == pytest.approx(min(worst), rel=1e-5)  # per-microbatch numbers, 2 microbatches


# -- meshes, parameters, buckets ------------------------------------------------------------------------

@pytest.mark.parametrize("mesh, expected", [
    ({"pp": 2, "tp": 2}, [(0, 1), (2, 3)]),
    ({"dp": 2, "pp": 2}, [(0, 2), (1, 3)]),
])
def test_each_stage_gets_the_devices_of_its_pp_coordinate(mesh, expected):
    graph = gpt_plan(world=4, mesh=mesh, stages=["blocks.2"], microbatches=2).graph
    assert [graph.meshes[stage_mesh_name(s)].devices for s in range(2)] == expected
    axis = next(a for a in mesh if a != "pp")
    assert all(m.axes == (axis,) and m.shape == (2,) for m in graph.meshes.values())


def test_stage_devices_override_the_placement():
    graph = gpt_plan(world=4, mesh={"pp": 2, "dp": 2}, stages=["blocks.2"], stage_devices=[[3, 1], [0, 2]],
                     microbatches=2).graph
    assert graph.meshes["stage0"].devices == (3, 1) and graph.meshes["stage1"].devices == (0, 2)


def test_stages_of_different_sizes_are_refused_plainly():
    with pytest.raises(NotImplementedError, match="different sizes"):
        pipeline_config(Strategy.from_dict({"mesh": {"pp": 2, "dp": 2}, "stage_devices": [[0], [1, 2]]}), 4)


def test_interleaved_stages_share_their_positions_devices():
    graph = gpt_plan(world=2, schedule="interleaved", virtual_stages=2, microbatches=4).graph
    assert graph.attrs["pipeline"]["positions"] == [0, 1, 0, 1]
    assert [graph.meshes[stage_mesh_name(s)].devices for s in range(4)] == [(0,), (1,), (0,), (1,)]


def test_v_shaped_stages_and_their_devices():
    """zbv and dualpipev: stage s and 2pp-1-s share a position, so the first and the last (with the tied embedding
    and head copies) run on one device; ``stage_devices`` per stage must follow the V."""
    graph = gpt_plan(world=2, schedule="zbv", microbatches=4).graph
    assert graph.attrs["pipeline"]["positions"] == [0, 1, 1, 0]
    assert [graph.meshes[stage_mesh_name(s)].devices for s in range(4)] == [(0,), (1,), (1,), (0,)]
    (group,) = graph.attrs["tied_params"]
    assert [p.mesh for p in group] == ["stage0", "stage3"]
    config = pipeline_config(Strategy.from_dict({"mesh": {"pp": 2}, "schedule": "dualpipev",
                                                 "stage_devices": [[1], [0], [0], [1]]}), 2)
    assert config.position_devices == ((1,), (0,)) and config.position_of(3) == 0
    with pytest.raises(StrategyError, match=r"stage 2 shares position 1 with stage 1, so it needs the same devices "
                                            r"\[0\], found \[1\]"):
        pipeline_config(Strategy.from_dict({"mesh": {"pp": 2}, "schedule": "zbv",
                                            "stage_devices": [[1], [0], [1], [0]]}), 2)


@pytest.mark.parametrize("strategy, fragment", [
    ({"schedule": "zbv", "virtual_stages": 3}, "the schedule is zbv, which always runs 2 stages per position; drop"),
    ({"schedule": "zb-h1", "virtual_stages": 2}, "the schedule is zb-h1; add `schedule interleaved`"),
    ({"schedule": "zbv", "skip_ratio": 0.5}, r"skip_ratio \(SkipPipe\) runs with schedule 'gpipe' or '1f1b', not 'zbv'"),
    ({"schedule": "zb_h1"}, r"unknown schedule 'zb_h1' \(did you mean 'zb-h1'\?\)"),
])
def test_zero_bubble_strategy_errors(strategy, fragment):
    with pytest.raises(StrategyError, match=fragment):
        pipeline_config(Strategy.from_dict({"mesh": {"pp": 2}, **strategy}), 2)


def test_dualpipev_with_too_few_microbatches_names_the_schedule():
    with pytest.raises(PassFailed, match="schedule 'dualpipev': .*at least as many microbatches as stages \\(4\\)"):
        gpt_plan(world=2, schedule="dualpipev", microbatches=2)


def test_the_tied_weight_gets_a_copy_on_each_stage_using_it():
    graph = gpt_plan(stages=["blocks.2"], microbatches=2).graph
    (group,) = graph.attrs["tied_params"]
    assert [p.name for p in group] == ["tok_emb.weight", "tok_emb.weight.stage1"]
    assert [p.target for p in group] == ["tok_emb.weight"] * 2
    assert [p.mesh for p in group] == ["stage0", "stage1"]
    head = next(n for n in graph.nodes if n.attrs.get("module") == "lm_head")
    assert group[1] in head.input_values()


def test_gradient_buckets_stay_within_a_stage():
    graph = gpt_plan(world=4, mesh={"pp": 2, "dp": 2}, stages=["blocks.2"], microbatches=2).graph
    buckets = graph.attrs["grad_buckets"]
    assert all(len({p.mesh for p in b["params"]}) == 1 and b["axes"] == ["dp"] for b in buckets)
    bucketed = [p.name for b in buckets for p in b["params"]]
    assert sorted(bucketed) == sorted(p.name for p in graph.params if p.kind == "param")


# -- microbatches ------------------------------------------------------------------------------------

def test_a_mean_loss_divides_by_the_whole_batch_count():
    graph = gpt_plan(stages=["blocks.2"], microbatches=4).graph
    assert graph.attrs["pipeline"]["loss_split"] == "global_denominator"
    whole = [n for n in graph.nodes if n.attrs.get(WHOLE_BATCH)]
    assert {n.op for n in whole} >= {"aten.ne.Scalar", "aten.sum.default"}
    assert all(n.attrs["stage"] == 1 for n in whole)
    loss = graph.loss.producer
    assert loss.op == "aten.div.Tensor" and loss.args[1].producer.attrs.get(WHOLE_BATCH)


# -- schedules ------------------------------------------------------------------------------------------

def position_schedule(graph) -> dict[int, list[Action]]:
    """The schedule of the first device of every position (peers renamed to positions)."""
    actions = schedule_actions(graph)
    devices = [graph.meshes[stage_mesh_name(s)].devices[0] for s in range(graph.attrs["pipeline"]["stages"])]
    position = {d: graph.attrs["pipeline"]["positions"][s] for s, d in enumerate(devices)}
    return {position[d]: [a if a.peer is None else Action(a.kind, a.stage, a.microbatch, position[a.peer])
                          for a in actions[d]] for d in sorted(set(devices))}


@pytest.mark.parametrize("schedule, builder", [("gpipe", build_gpipe), ("1f1b", build_1f1b)])
def test_the_dump_holds_the_built_schedule(schedule, builder):
    graph = gpt_plan(world=4, stages=["blocks.1", "blocks.2", "blocks.3"], microbatches=8, schedule=schedule).graph
    assert position_schedule(graph) == builder(4, 8, [0, 1, 2, 3])


def test_every_device_of_a_stage_runs_the_same_list_with_its_own_peers():
    graph = gpt_plan(world=4, mesh={"pp": 2, "tp": 2}, stages=["blocks.2"], microbatches=4).graph
    actions = schedule_actions(graph)
    assert [str(a) for a in actions[1][:2]] == ["F0@s0", "SEND_F0@s0->r3"]
    assert [a.peer for a in actions[0] if a.peer is not None] == [2] * len([a for a in actions[0] if a.peer])
    for lane in lanes(actions, [(0, 1), (2, 3)]):
        check_deadlock(lane)


@pytest.mark.parametrize("strategy", [
    dict(world=2, schedule="gpipe", microbatches=4),
    dict(world=2, schedule="1f1b", microbatches=8),
    dict(world=2, schedule="interleaved", virtual_stages=2, microbatches=4),
    dict(world=4, schedule="1f1b", skip_ratio=0.5, microbatches=8),
    dict(world=4, schedule="zb-h1", microbatches=8),
    dict(world=2, schedule="zbv", microbatches=4),
    dict(world=2, schedule="dualpipev", microbatches=4),
], ids=["gpipe", "1f1b", "interleaved", "skippipe", "zb-h1", "zbv", "dualpipev"])
def test_every_built_in_schedule_passes_the_deadlock_check(strategy):
    graph = gpt_plan(**strategy).graph
    count = graph.attrs["pipeline"]["stages"]
    paths = graph.attrs.get("paths") or [list(range(count))] * graph.attrs["pipeline"]["microbatches"]
    order = check_deadlock(schedule_actions(graph), paths)
    assert len(order) == sum(len(a) for a in schedule_actions(graph).values())


def test_a_hand_broken_schedule_is_rejected():
    actions = schedule_actions(gpt_plan(stages=["blocks.2"], microbatches=4).graph)
    receives = [i for i, a in enumerate(actions[1]) if a.is_recv]
    swapped = list(actions[1])
    swapped[receives[0]], swapped[receives[1]] = swapped[receives[1]], swapped[receives[0]]
    with pytest.raises(ScheduleError):
        check_deadlock({0: actions[0], 1: swapped})
    # rank 1 waits for the gradient of microbatch 0 before sending it: both ranks block
    waits = [a for a in actions[0] if a.kind == "RECV_B"]
    stuck = [a for a in actions[0] if a not in waits[:1]]
    stuck.insert(0, waits[0])
    with pytest.raises(ScheduleDeadlock, match="rank 0 waits at action #0 RECV_B0@s1<-r1"):
        check_deadlock({0: stuck, 1: actions[1]})


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("m", [4, 8])
def test_simulated_bubble_matches_the_closed_form(schedule, m):
    p = 4
    graph = gpt_plan(world=p, stages=["blocks.1", "blocks.2", "blocks.3"], microbatches=m, schedule=schedule).graph
    timeline = simulate(position_schedule(graph), 1.0, 2.0)
    assert timeline.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=0.01)


# -- SkipPipe ---------------------------------------------------------------------------------------------

def test_skip_paths_and_their_estimate_are_in_the_dump():
    graph = gpt_plan(world=4, stages=["blocks.1", "blocks.2", "blocks.3"], microbatches=8, skip_ratio=0.5).graph
    plan = parse_skip_plan(graph.attrs["skip_plan"])
    assert plan.paths == graph.attrs["paths"]
    assert all(path[0] == 0 and path[-1] == 3 and len(path) == 2 for path in plan.paths)
    assert graph.attrs["estimated_iteration_time_s"] == plan.estimated_iteration_time_s > 0
    assert "estimated_iteration_time_s=" in str(graph)


def test_skip_ratio_zero_schedules_exactly_the_plain_pipeline():
    cuts = dict(world=4, stages=["blocks.1", "blocks.2", "blocks.3"], microbatches=8)
    assert gpt_plan(skip_ratio=0.0, **cuts).graph.attrs["schedule"] == gpt_plan(**cuts).graph.attrs["schedule"]


def test_skipping_needs_cuts_that_carry_the_same_values():
    with pytest.raises(PassFailed, match="skip_ratio > 0 needs stages that can be skipped"):
        gpt_plan(world=3, stages=["blocks.1.attn.proj", "blocks.3"], microbatches=3, skip_ratio=0.5)


def test_the_schedule_pass_needs_only_the_dump():
    plan = gpt_plan(world=4, stages=["blocks.1", "blocks.2", "blocks.3"], microbatches=8, skip_ratio=0.25)
    graph = parse(plan.ir)
    for key in ("schedule", "paths", "skip_plan", "estimated_iteration_time_s"):
        del graph.attrs[key]
    schedule_pass(graph, PassContext(plan.strategy, 4, cluster=plan.cluster))
    assert str(graph) == plan.ir
    with pytest.raises(ValueError, match="run the 'pipeline' pass first"):
        schedule_pass(compile_cached(GPT4, GPT4_INPUTS, 1, "dp").graph, PassContext(plan.strategy, 4))


def test_stage_entries_and_exits_line_up_by_slot():
    graph = gpt_plan(world=4, stages=["blocks.1", "blocks.2", "blocks.3"], microbatches=4).graph
    stages = pipeline_stages(graph)
    assert [len(s.entries) for s in stages] == [0, 1, 1, 1] and [len(s.exits) for s in stages] == [1, 1, 1, 0]
    assert [s.inputs[0].name for s in (stages[0], stages[3])] == ["idx", "targets"]
    assert torch.Size([int(d) for d in stages[1].exits[0].type.shape[2:]]) == torch.Size([64])
