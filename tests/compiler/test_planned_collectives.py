"""The compiled program runs what the planner priced: on a cluster, ``compile_cached()`` lays the tensor axis out
with the planner's own solver (passes/propagate.py) and chooses boxing chains by the same cluster cost
(cost/boxing.py), so an auto plan's compiled IR holds the planner's layouts and tensor-parallel collectives."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from cluster import Cluster
from cost.ops import Precision
from cost.segments import Profile, at, ir_profile, is_view
from frontend.torch_capture import capture
from ir.sbp import format_nd_sbp
from passes.planner.evaluate import ModelView
from passes.recompute import mark_recompute
from tests.capture_cache import compile_cached
from tests.models import gpt, gpt_inputs

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "clusters"
LAYOUT_LINE = re.compile(r"^%(?P<name>\S+) (?P<op>\S+) \[.*\]: (?P<outs>.*)$")


def planned_layouts(lines: list[str]) -> dict[str, tuple[str, str]]:
    """Node name -> (op, tensor-axis output layouts) from a search report's ``layouts`` lines."""
    found = {}
    for line in lines:
        match = LAYOUT_LINE.match(line)
        found[match["name"]] = (match["op"], match["outs"])
    return found


def tensor_collectives(profile: Profile, axis: str, batch: float) -> list[Counter]:
    """Per segment: the collectives on ``axis`` as (kind, in backward, bytes) at ``batch`` samples."""
    return [Counter((c.kind, c.backward, round(at(c.nbytes, batch))) for c in segment.comms if c.axis == axis)
            for segment in profile.segments]


@pytest.mark.parametrize("cluster_name", ["dgx-a100:2", str(EXAMPLES / "hetero-a100-v100.yaml")],
                         ids=["dgx-a100:2", "hetero-a100-v100"])
def test_compiled_ir_holds_the_layouts_and_collectives_the_planner_priced(cluster_name, tmp_path):
    cluster = Cluster.load(cluster_name)
    # wide enough that splitting over tp pays on the calibrated clusters (a 64-wide toy runs replicated)
    model = gpt.GPT(gpt.GPTConfig(n_layer=2, n_embd=1024, n_head=16, block_size=64, vocab_size=512))
    inputs = gpt_inputs(batch=16, seq=16)
    graph = capture(model, inputs, train=True).graph
    graph.attrs["example_dims"] = {"batch": 16, "seq": 16}
    plan = compile_cached(model, inputs, cluster=cluster, strategy={"mesh": {"dp": "auto", "tp": 4}},
                   search_options={"cache_dir": tmp_path})
    mesh = plan.graph.meshes["world"]
    tp, dp = mesh.axis_index("tp"), plan.strategy.mesh.size("dp")
    nodes = {n.name: n for n in plan.graph.nodes}

    # Layouts: every op the planner prices work for (views cost nothing either way, so a tie between
    # gathering before or after a transpose may fall either way) runs in the layout the planner chose.
    planned = planned_layouts(plan.search_report.layouts)
    # A scalar's layout (the loss: left P(sum) or all-reduced) moves 4 bytes either way; since the calibrated
    # clusters price that all-reduce by its latency, the planner and compile_cached() may settle that tie apart.
    compute_ops = {name: planned[name] for name in planned if not is_view(planned[name][0])
                   and any(o.type.ndim for o in nodes[name].outputs)}
    assert len(compute_ops) > 10
    for name, (op, outs) in compute_ops.items():
        compiled = ", ".join(format_nd_sbp((o.sbp[tp],)) for o in nodes[name].outputs)
        assert compiled == outs, f"%{name} ({op}): the planner priced {outs}, the compiled IR holds {compiled}"

    # Collectives: per segment, the tensor-parallel collectives the planner priced for this strategy
    # (forward and backward, with their sizes) are the ones in the compiled IR.
    priced = ModelView(graph).evaluate(plan.strategy, cluster).profile
    compiled = ir_profile(plan.graph, Precision.of("fp32"))
    want, got = tensor_collectives(priced, "tp", 16 / dp), tensor_collectives(compiled, "tp", 16)
    assert sum(len(c) for c in want) > 0
    assert got == want

    # The plan's text (which says solved_layouts) compiles to the same program.
    assert "solved_layouts" in plan.to_dsl()
    if cluster_name == "dgx-a100:2":
        assert compile_cached(model, inputs, cluster=cluster, strategy=plan.to_dsl()).ir == plan.ir


@pytest.mark.parametrize("recompute, regathered", [(False, 4), (["blocks.*.mlp"], 2)], ids=["plain", "mlp_recomputed"])
def test_regathered_activations_are_priced_as_the_program_runs_them(recompute, regathered):
    """With ``regather_activations`` the planner prices what the compiled IR runs: sequence parallelism's gathered
    norm outputs saved as shards (less activation memory per block) and gathered once more in backward; a
    recomputed MLP keeps its region's input (the norm output's shard) and gathers it inside the region instead."""
    cluster = Cluster.load("dgx-a100:2")
    model = gpt.GPT(gpt.GPTConfig(n_layer=2, n_embd=1024, n_head=16, block_size=64, vocab_size=512))
    inputs = gpt_inputs(batch=16, seq=16)
    graph = capture(model, inputs, train=True).graph
    graph.attrs["example_dims"] = {"batch": 16, "seq": 16}
    strategy = {"mesh": {"dp": 4, "tp": 4}, "sequence_parallel": True, "solved_layouts": True,
                "regather_activations": True, "recompute": recompute}
    plan = compile_cached(model, inputs, cluster=cluster, strategy=strategy)
    assert sum(n.kwargs.get("regather", False) for n in plan.graph.nodes) == regathered  # matmul inputs kept
    if recompute:  # the planner prices a module's recomputation from the marks on its graph (as selective rows do)
        mark_recompute(graph, recompute)
    view = ModelView(graph)
    priced = view.evaluate(replace(plan.strategy, recompute=False), cluster).profile
    compiled = ir_profile(plan.graph, Precision.of("fp32"))
    assert tensor_collectives(compiled, "tp", 16) == tensor_collectives(priced, "tp", 4)
    assert [s.kept_bytes(16) for s in compiled.segments] == [s.kept_bytes(4) for s in priced.segments]
    if recompute:
        return
    block = tensor_collectives(compiled, "tp", 16)[1]
    # a block's backward: the adjoints of its two reduce-scatters, and its two saved inputs gathered again
    assert block[("all_gather", True, 262144)] == 4 and block[("reduce_scatter", False, 262144)] == 2
    whole = view.evaluate({**strategy, "regather_activations": False}, cluster).profile
    # each block keeps its two gathered inputs (16 x 16 x 1024 fp32) as quarters: 3/4 of 2 MiB less
    assert whole.segments[1].kept_bytes(4) - priced.segments[1].kept_bytes(4) == 2 * 3 / 4 * 4 * 16 * 1024 * 4
