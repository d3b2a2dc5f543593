"""The planner: layer structure, exact intra-op solvers (DP vs ILP vs z3), search, and the acceptance
criteria of issue 5 (auto vs the Megatron grid on dgx-a100:2, heterogeneous clusters)."""
from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster import Cluster
from compiler.api import compile
from compiler.simulate import simulate
from cost.estimate import PlanOptions
from cost.ops import Precision
from cost.placement import axis_groups
from frontend.torch_capture import capture
from ir.core import Graph
from ir.layers import LayerStructure, block_param_name, find_layers
from ir.sbp import B
from ir.types import Mesh, TensorType
from passes.planner import SearchError, search
from passes.planner.evaluate import BLOCK_COUNT_ATTR, ModelView
from passes.planner.intra_op import LayoutProblem, LayoutRequest, solve_layouts
from passes.planner.pairwise import PairEdge, PairwiseProblem, solve_dp, solve_ilp, solve_z3
from passes.planner.search import _fixed_parts
from tests.models import assert_close_to_eager, gpt_inputs, gpt_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import gpt_configs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MEGATRON = {"blocks.*.attn.qkv.weight": {"tp": "S(0)"}, "blocks.*.attn.qkv.bias": {"tp": "S(0)"},
            "blocks.*.attn.proj.weight": {"tp": "S(1)"}, "blocks.*.mlp.fc.weight": {"tp": "S(0)"},
            "blocks.*.mlp.fc.bias": {"tp": "S(0)"}, "blocks.*.mlp.proj.weight": {"tp": "S(1)"}}
MIXED = {"precision": "bf16"}
BATCH = 32


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-7, abs_tol=1e-12)


# --------------------------------------------------------------------------------------------------
# Pairwise solvers
# --------------------------------------------------------------------------------------------------


@st.composite
def pairwise_problems(draw, max_vars: int = 30):
    n = draw(st.integers(2, max_vars))
    unary = [[draw(st.floats(0, 1)) for _ in range(draw(st.integers(1, 4)))] for _ in range(n)]
    edges = []
    for b in range(1, n):
        for a in draw(st.sets(st.integers(max(0, b - 4), b - 1), min_size=1, max_size=2)):
            a_keys = [draw(st.integers(0, 2)) for _ in unary[a]]
            b_keys = [draw(st.integers(0, 2)) for _ in unary[b]]
            costs = {(x, y): draw(st.floats(0, 1)) for x in set(a_keys) for y in set(b_keys)}
            edges.append(PairEdge(a, b, a_keys, b_keys, costs))
    return PairwiseProblem(unary, edges)


@settings(max_examples=40, deadline=None)
@given(pairwise_problems())
def test_dp_matches_the_ilp_on_random_problems(problem):
    dp, ilp = solve_dp(problem), solve_ilp(problem)
    assert dp.exact and close(dp.cost, ilp.cost)
    assert close(problem.total(dp.assignment), dp.cost)


@settings(max_examples=8, deadline=None)
@given(pairwise_problems(max_vars=6))
def test_dp_matches_z3_on_tiny_problems(problem):
    assert close(solve_dp(problem).cost, solve_z3(problem).cost)


def test_dp_handles_back_edges_and_rejects_empty_choices():
    problem = PairwiseProblem([[0.0, 1.0], [0.0, 0.0], [0.5, 0.0]],
                              [PairEdge(0, 2, [0, 1], [0, 1], {(0, 0): 5.0, (0, 1): 0.0, (1, 0): 0.0, (1, 1): 5.0})])
    assert close(solve_dp(problem).cost, 0.0) and solve_dp(problem).assignment == [0, 0, 1]
    with pytest.raises(ValueError, match="no admissible choice"):
        solve_dp(PairwiseProblem([[1.0], []]))


# --------------------------------------------------------------------------------------------------
# Layout problems on real ops
# --------------------------------------------------------------------------------------------------

CLUSTER = Cluster.load("dgx-a100:1")
WIDTHS = (8, 16, 32)


@st.composite
def op_graphs(draw, max_ops: int = 40):
    """Random chains / DAGs of linear, elementwise, norm and residual ops ending in a sum loss."""
    graph = Graph(name="random")
    width = draw(st.sampled_from(WIDTHS))
    x = graph.add_input("x", TensorType.of([8, width], "f32"))
    values = [x]
    for i in range(draw(st.integers(1, max_ops - 1))):
        kind = draw(st.sampled_from(["linear", "linear", "gelu", "relu", "add", "mul", "norm", "mm"]))
        a = draw(st.sampled_from(values[-3:]))  # residual-style reuse keeps the DAG's frontier narrow
        d = int(a.type.shape[1])
        if kind == "linear":
            out = draw(st.sampled_from(WIDTHS))
            w = graph.add_param(f"w{i}", TensorType.of([out, d], "f32"), f"w{i}")
            b = graph.add_param(f"b{i}", TensorType.of([out], "f32"), f"b{i}")
            node = graph.create_node("aten.linear.default", [a, w, b], {}, [TensorType.of([8, out], "f32")])
        elif kind == "mm":
            out = draw(st.sampled_from(WIDTHS))
            w = graph.add_param(f"m{i}", TensorType.of([d, out], "f32"), f"m{i}")
            node = graph.create_node("aten.mm.default", [a, w], {}, [TensorType.of([8, out], "f32")])
        elif kind in ("add", "mul"):
            partners = [v for v in values[-3:] if v.type == a.type] or [a]
            b = draw(st.sampled_from(partners))
            node = graph.create_node(f"aten.{kind}.Tensor", [a, b], {}, [a.type])
        elif kind == "norm":
            w = graph.add_param(f"g{i}", TensorType.of([d], "f32"), f"g{i}")
            b = graph.add_param(f"h{i}", TensorType.of([d], "f32"), f"h{i}")
            node = graph.create_node("aten.layer_norm.default", [a, [d], w, b, 1e-5, False], {}, [a.type])
        else:
            node = graph.create_node(f"aten.{kind}.default", [a], {}, [a.type])
        values.append(node.outputs[0])
    loss = graph.create_node("aten.sum.default", [values[-1]], {}, [TensorType.of([], "f32")]).outputs[0]
    graph.outputs, graph.loss = [loss], loss
    return graph


def request_for(mesh: Mesh, free_params: bool = True) -> LayoutRequest:
    groups = tuple(tuple(g) for g in (axis_groups(range(mesh.size), mesh.axes, mesh.shape, a)[0] for a in mesh.axes))
    return LayoutRequest(mesh, CLUSTER, groups, CLUSTER.device(0), {}, Precision.of("fp32"), True,
                         free_params=free_params)


MESHES = [Mesh.make(["tp"], [2]), Mesh.make(["tp"], [4]), Mesh.make(["dp", "tp"], [2, 2])]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(op_graphs(), st.sampled_from(MESHES))
def test_exact_solver_and_dp_agree_on_small_graphs(graph, mesh):
    """Candidates from nd_signatures, conversions priced by boxing_path on real links: DP == ILP."""
    problem = LayoutProblem(graph, LayerStructure.flat(graph.nodes), request_for(mesh)).pairwise()
    assert len(graph.nodes) <= 50
    dp, ilp = solve_dp(problem), solve_ilp(problem)
    assert dp.exact and close(dp.cost, ilp.cost)


@settings(max_examples=5, deadline=None)
@given(op_graphs(max_ops=4), st.sampled_from(MESHES[:1]))
def test_z3_agrees_on_tiny_graphs(graph, mesh):
    problem = LayoutProblem(graph, LayerStructure.flat(graph.nodes), request_for(mesh)).pairwise()
    assert close(solve_dp(problem).cost, solve_z3(problem).cost)


def stacked_graph(blocks: int, width: int = 16) -> Graph:
    """``blocks`` residual MLP blocks (module paths blocks.<i>.fc / .proj) and a sum loss."""
    graph = Graph(name="stack")
    x = graph.add_input("x", TensorType.of([8, width], "f32"))
    for i in range(blocks):
        w1 = graph.add_param(f"w1_{i}", TensorType.of([4 * width, width], "f32"), f"blocks.{i}.fc.weight")
        w2 = graph.add_param(f"w2_{i}", TensorType.of([width, 4 * width], "f32"), f"blocks.{i}.proj.weight")
        h = graph.create_node("aten.linear.default", [x, w1], {}, [TensorType.of([8, 4 * width], "f32")],
                              attrs={"module": f"blocks.{i}.fc"}).outputs[0]
        g = graph.create_node("aten.gelu.default", [h], {}, [h.type]).outputs[0]
        y = graph.create_node("aten.linear.default", [g, w2], {}, [x.type], attrs={"module": f"blocks.{i}.proj"})
        x = graph.create_node("aten.add.Tensor", [x, y.outputs[0]], {}, [x.type]).outputs[0]
    loss = graph.create_node("aten.sum.default", [x], {}, [TensorType.of([], "f32")]).outputs[0]
    graph.outputs, graph.loss = [loss], loss
    return graph


@pytest.mark.parametrize("mesh", MESHES)
def test_repeated_block_dp_equals_exact_solver_on_the_unrolled_graph(mesh):
    """The compact problem (one block weighted N times, loop edge N-1 times) has the optimum of the
    unrolled problem restricted to identical blocks (ties enforced in the ILP)."""
    graph = stacked_graph(3)
    structure = find_layers(graph)
    assert structure.uniform and structure.num_layers == 3 and structure.prefix == "blocks"
    compact = solve_layouts(graph, structure, request_for(mesh))
    unrolled = LayoutProblem(graph, LayerStructure.flat(graph.nodes), request_for(mesh))
    problem = unrolled.pairwise()
    index = {(_var_key(unrolled, v)): v for v in range(len(unrolled.vars))}
    big = 1e6
    for v, ref in enumerate(unrolled.vars):
        key = _var_key(unrolled, v)
        twin = ("blocks.0",) + key[1:] if key[0].startswith("blocks.") else None
        if twin and twin != key:
            n = len(problem.unary[v])
            problem.edges.append(PairEdge(index[twin], v, list(range(n)), list(range(n)),
                                          {(a, b): 0.0 if a == b else big for a in range(n) for b in range(n)}))
    tied = solve_ilp(problem)
    assert close(compact.cost, tied.cost)


def _var_key(problem: LayoutProblem, v: int) -> tuple:
    """(block, position inside it) for block vars; the name otherwise."""
    ref = problem.vars[v]
    if ref[0] == "param":
        name = ref[1].target
        return (".".join(name.split(".")[:2]), name.split(".", 2)[-1]) if name.startswith("blocks.") else (name,)
    node = problem.units[ref[1]].node
    structure = find_layers(problem.graph)
    kind, block = structure.segment_of(node)[:2]
    return (f"blocks.{block}", "node", structure.position(node)) if kind == "block" else (node.name,)


# --------------------------------------------------------------------------------------------------
# Layer structure
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gpt():
    model = gpt_model(n_layer=3)
    inputs = gpt_inputs(batch=8, seq=16)
    captured = capture(model, inputs, train=True)
    captured.graph.attrs["example_dims"] = {"batch": 8, "seq": 16}
    return model, inputs, captured.graph


def test_layers_of_the_gpt_example(tiny_gpt):
    _, _, graph = tiny_gpt
    s = find_layers(graph)
    assert s.prefix == "blocks" and s.num_layers == 3 and s.uniform
    assert [n.attrs.get("module") for n in s.pre if n.attrs.get("module")] == ["tok_emb", "pos_emb"]
    assert s.post[0].attrs["module"] == "ln_f" and s.blocks[1][0].attrs["module"] == "blocks.1.ln_1"
    assert block_param_name("blocks.7.attn.qkv.weight", "blocks") == "blocks.*.attn.qkv.weight"
    assert block_param_name("tok_emb.weight", "blocks") == "tok_emb.weight"


def test_tensor_parallel_layouts_at_real_width_refined_for_the_whole_step(monkeypatch):
    """At real width the weights split over tp (the 64-wide example's microsecond GEMMs are cheaper replicated on
    the calibrated dgx-a100, so it would rightly stay B). The layout solver weighs a once-a-step gradient
    all-reduce as much as one reference microbatch; the planner then changes the storage it chose while the
    whole step prices faster: here it gets faster, and what it was priced at is what the strategy simulates to."""
    planner_search = sys.modules[search.__module__]
    graph = captured_config("1.3B", batch=8)
    cluster, options, fixed = Cluster.load("dgx-a100:1"), {"global_batch": 64, **MIXED}, {"mesh": {"dp": 2, "tp": 4}}
    strategy, report = search(graph, cluster, fixed, use_cache=False, **options)
    params = strategy.to_dict()["params"]
    assert report.layouts and report.chosen.fits
    assert params["blocks.*.mlp.fc.weight"] == {"tp": "S(0)"} and params["blocks.*.mlp.proj.weight"] == {"tp": "S(1)"}
    # attention: Megatron's split of the heads' weights, or (sequence-parallel) the weights kept whole and the
    # sequences exchanged for heads by all-to-all (DeepSpeed-Ulysses) where that prices faster
    attention = (params.get("blocks.*.attn.qkv.weight"), params.get("blocks.*.attn.proj.weight"))
    assert attention in ((None, None), ({"tp": "S(0)"}, {"tp": "S(1)"}))
    assert close(simulate((graph, strategy, cluster), **options).step_time_s, report.chosen.step_time_s)
    refined = [n for n in report.notes if n.startswith("refined for the whole step")]  # what changed, and the gain
    assert len(refined) == 1 and f"-> {report.chosen.step_time_s:.4g} s)" in refined[0] and " -> B" in refined[0]
    # the descent goes one storage change at a time from the solver's layouts: it ends within two tenths of a
    # percent of Megatron's layout on the same degrees and switches (0.8292 s against 0.8284: it keeps the attention
    # weights whole, whose optimizer step over every tp rank costs 4.2 ms more), not necessarily below
    megatron = {**{k: v for k, v in strategy.to_dict().items() if k != "solved_layouts"}, "params": MEGATRON}
    assert report.chosen.step_time_s <= simulate((graph, megatron, cluster), **options).step_time_s * 1.002
    monkeypatch.setattr(planner_search, "REFINED_SETTINGS", 0)
    solved, solved_report = search(graph, cluster, fixed, use_cache=False, **options)
    assert report.chosen.step_time_s < solved_report.chosen.step_time_s and solved.params != strategy.params


def test_layouts_solved_again_under_other_storages_equal_solves_from_scratch():
    """The refinement solves one graph's layouts again with each parameter stored another way, reusing every op's
    layouts and seconds and the conversion tables between two ops from the solves before (only a parameter's
    conversions change): each of those solves chooses the same layouts, at the same objective, as a solve in a
    fresh view."""
    graph, cluster = captured_config("1.3B", batch=8), Cluster.load("dgx-a100:1")
    options, tp_group = PlanOptions(global_batch=64, **MIXED), (0, 1, 2, 3)
    switches = {"vocab_parallel": False, "sequence_parallel": False}
    view = ModelView(graph)
    first = view.layouts(cluster, tp_group, options, **switches)
    stored = {t: sbp[0] for t, sbp in first.param_sbp.items() if sbp[0] != B}
    moves = [(target, storage[0]) for target, storages in sorted(first.storage_options().items())
             for storage in storages if storage[0] != stored.get(target, B)]
    assert len(moves) >= 4
    for target, storage in moves[:6]:
        pins = {**{t: sbp for t, sbp in stored.items() if t != target}, **({} if storage == B else {target: storage})}
        again = view.layouts(cluster, tp_group, options, **switches, pins=pins, free_params=False)
        fresh = ModelView(graph).layouts(cluster, tp_group, options, **switches, pins=pins, free_params=False)
        assert (again.node_choice, again.param_sbp, again.cost) == (fresh.node_choice, fresh.param_sbp, fresh.cost)


# --------------------------------------------------------------------------------------------------
# Search behaviour
# --------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def private_plan_cache(tmp_path, monkeypatch):
    """compile() plans with the default cache: keep it out of the home directory."""
    monkeypatch.setenv("SBPC_CACHE_DIR", str(tmp_path / "plans"))


def test_auto_plan_compiles_and_matches_eager(tiny_gpt):
    """A planner-chosen tensor-parallel plan is a normal strategy: it compiles and computes the right loss
    and gradients."""
    model, inputs, _ = tiny_gpt
    plan = compile(model, inputs, cluster="local:4", strategy={"mesh": {"dp": "auto", "tp": 2}})
    assert plan.search_report is not None and plan.strategy.mesh.size("tp") == 2
    assert_close_to_eager(plan.run_virtual(*inputs), model, inputs)
    text = plan.explain()
    assert "tensor parallel 2" in text and "Best alternatives" in text and "tp groups" in text


def test_fixed_parts_progress_budget_and_cache(tiny_gpt, tmp_path):
    _, _, graph = tiny_gpt
    cluster = Cluster.load("dgx-a100:1")
    messages = []
    fixed = {"mesh": {"dp": "auto", "tp": 2}, "sequence_parallel": True, "microbatches": 2}
    strategy, report = search(graph, cluster, fixed, cache_dir=tmp_path, progress=messages.append, global_batch=16)
    assert strategy.mesh.as_dict() == {"dp": 4, "tp": 2} and strategy.options.sequence_parallel is True
    assert strategy.pipeline.microbatches == 2 and messages and "chose" in messages[-1] and not report.cached
    again, cached = search(graph, cluster, fixed, cache_dir=tmp_path, global_batch=16)
    assert again == strategy and cached.cached
    other, fresh = search(graph, Cluster.load("dgx-a100:2"), fixed, cache_dir=tmp_path, global_batch=16)
    assert not fresh.cached and other.mesh.as_dict() == {"dp": 8, "tp": 2}
    quick, truncated = search(graph, cluster, "auto", time_budget_s=0.0, use_cache=False, global_batch=16)
    assert truncated.truncated and quick.mesh
    assert _fixed_parts({"mesh": "auto", "recompute": "auto", "schedule": "1f1b"}).to_dict() == {"schedule": "1f1b"}


def test_impossible_constraints_are_reported(tiny_gpt):
    _, _, graph = tiny_gpt
    with pytest.raises(SearchError, match="searches the mesh axes"):
        search(graph, Cluster.load("local:2"), {"mesh": {"model": "auto"}}, use_cache=False)
    tiny = Cluster.from_dict({"name": "tiny", "device_kinds": {"small": {"peak_flops": {"fp32": 1e9}, "memory": "64KiB"}},
                              "nodes": [{"device": "small", "devices": 2,
                                         "intra_link": {"class": "loopback", "bandwidth": "1GB/s", "latency": "1us"}}]})
    with pytest.raises(SearchError, match="no plan fits in memory on tiny"):
        search(graph, tiny, "auto", use_cache=False)


# --------------------------------------------------------------------------------------------------
# Planning at scale without weights
# --------------------------------------------------------------------------------------------------


def test_meta_model_plans_without_weights():
    model = gpt_configs.meta_model("1.3B", n_layer=4)
    plan = compile(model, gpt_configs.example_batch(16), cluster="dgx-a100:2",
                   strategy={"mesh": {"dp": "auto", "tp": "auto"}})
    assert all(w.is_meta for w in plan.weights.values())
    report = plan.simulate()
    assert report.step_time_s > 0 and report.tokens_per_s > 0 and set(report.peak_memory_bytes) == set(range(16))
    from backends.torch_distributed import EmitError
    with pytest.raises(EmitError, match="meta device"):
        plan.emit("unused-dir")


def test_fake_tensor_mode_model_plans_too():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = gpt_configs.GPT(gpt_configs.config("1.3B", n_layer=2))
    plan = compile(model, gpt_configs.example_batch(8), cluster="dgx-a100:1", strategy="dp")
    assert all(w.is_meta for w in plan.weights.values()) and plan.simulate().step_time_s > 0
    assert "lm_head.weight" in plan.aliases  # the tied head stays tied


# --------------------------------------------------------------------------------------------------
# Acceptance: GPT 1.3B .. 13B on dgx-a100:2 against every Megatron-style grid point
# --------------------------------------------------------------------------------------------------


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@functools.cache
def captured_config(name: str, batch: int = BATCH, blocks: int | None = 2) -> Graph:
    """The meta-device GPT ``name`` captured for ``batch`` (once per session: the planner only reads it): with
    ``blocks`` blocks standing for all of the configuration's (:data:`BLOCK_COUNT_ATTR`, as the published-runs
    benchmark captures its models; they price exactly as the whole stack, see
    :func:`test_two_captured_blocks_price_as_the_whole_stack`), or every block (``blocks=None``)."""
    layers = gpt_configs.CONFIGS[name].n_layer
    graph = capture(gpt_configs.meta_model(name, n_layer=blocks), gpt_configs.example_batch(batch), train=True).graph
    graph.attrs["example_dims"] = {"batch": batch, "seq": gpt_configs.SEQUENCE}
    if blocks is not None:
        graph.attrs[BLOCK_COUNT_ATTR] = layers
    return graph


def megatron_grid(graph: Graph, cluster: Cluster, layers: int, batch: int):
    """Every dp x tp x pp x microbatch point with Megatron layouts, 1F1B and an even cut, with or without
    full recomputation; yields (strategy, simulation)."""
    world = cluster.world_size
    for tp in divisors(world):
        for pp in [p for p in divisors(world // tp) if p <= layers]:
            dp = world // (tp * pp)
            if batch % dp:
                continue
            for m in divisors(batch // dp):
                for recompute in (False, ["blocks.*"]):
                    mesh = {"pp": pp, "dp": dp, "tp": tp} if pp > 1 else {"dp": dp, "tp": tp}
                    strategy = {"mesh": mesh, "microbatches": m, "recompute": recompute,
                                **({"params": MEGATRON} if tp > 1 else {}), **({"schedule": "1f1b"} if pp > 1 else {})}
                    try:
                        yield strategy, simulate((graph, strategy, cluster), **MIXED)
                    except ValueError:  # e.g. heads that do not split over tp
                        continue


@pytest.mark.parametrize("name", list(gpt_configs.CONFIGS))
def test_auto_beats_every_megatron_grid_point(name):
    cluster = Cluster.load("dgx-a100:2")
    graph = captured_config(name)
    strategy, report = search(graph, cluster, "auto", use_cache=False, **MIXED)
    auto = simulate((graph, strategy, cluster), **MIXED)
    assert auto.fits and max(auto.peak_memory_bytes.values()) <= 0.9 * 80 * 2**30
    grid = [(sim.step_time_s, s) for s, sim in megatron_grid(graph, cluster, gpt_configs.CONFIGS[name].n_layer, BATCH)
            if sim.fits]
    best_time, best = min(grid, key=lambda g: g[0])
    assert len(grid) > 20
    assert auto.step_time_s <= best_time * (1 + 1e-9), (name, report.chosen.summary, best)


def test_two_captured_blocks_price_as_the_whole_stack():
    """A GPT captured with two blocks standing for its 24 (``BLOCK_COUNT_ATTR``, as the planner's acceptance tests
    and the published-runs benchmark capture models) prices every Megatron grid point (dp, tp, pp up to 16
    stages, microbatches, full recomputation) exactly as the GPT captured with all 24 blocks, in step time and
    memory, and ``auto`` chooses the same plan on both."""
    cluster, layers = Cluster.load("dgx-a100:2"), gpt_configs.CONFIGS["1.3B"].n_layer
    deep, stand_in = captured_config("1.3B", blocks=None), captured_config("1.3B")
    grid = list(megatron_grid(deep, cluster, layers, BATCH))
    assert len(grid) > 100
    for strategy, whole in grid:
        two = simulate((stand_in, strategy, cluster), **MIXED)
        assert close(two.step_time_s, whole.step_time_s), strategy
        assert two.fits == whole.fits and close(max(two.peak_memory_bytes.values()),
                                                max(whole.peak_memory_bytes.values())), strategy
    deep_plan, _ = search(deep, cluster, "auto", use_cache=False, **MIXED)
    assert search(stand_in, cluster, "auto", use_cache=False, **MIXED)[0] == deep_plan


# --------------------------------------------------------------------------------------------------
# Acceptance: heterogeneous clusters
# --------------------------------------------------------------------------------------------------


def homogeneous_view(cluster: Cluster) -> Cluster:
    """The cluster as a planner that ignores heterogeneity sees it: every node like the first."""
    spec = cluster.to_dict()
    first = spec["nodes"][0]
    spec["nodes"] = [dict(first, name=f"node{i}") for i in range(len(spec["nodes"]))]
    spec["device_kinds"] = {first["device"]: spec["device_kinds"][first["device"]]}
    return Cluster.from_dict(spec)


@pytest.mark.parametrize("spec", ["hetero-ib-ethernet.yaml", "hetero-a100-v100.yaml"])
def test_heterogeneous_clusters(spec):
    cluster = Cluster.load(ROOT / "examples" / "clusters" / spec)
    graph = captured_config("6.7B")  # the grid test's capture, priced at a global batch of 64
    options = {**MIXED, "global_batch": 64}
    aware, _ = search(graph, cluster, "auto", use_cache=False, **options)
    naive, _ = search(graph, homogeneous_view(cluster), "auto", use_cache=False, **options)
    auto = simulate((graph, aware, cluster), **options)
    blind = simulate((graph, naive, cluster), **options)
    blind_time = blind.step_time_s if blind.fits else math.inf
    assert auto.fits and auto.step_time_s < blind_time
    shape = auto.shape
    for devices in shape.stage_devices:
        for group in axis_groups(devices, shape.axes, shape.shape, "tp") if "tp" in shape.axes else []:
            assert len({cluster.node_of(d) for d in group}) == 1
    kinds = [{cluster.device(d).kind for d in devices} for devices in shape.stage_devices]
    if shape.pp > 1 and all(len(k) == 1 for k in kinds) and len(set().union(*kinds)) > 1:
        layers = {kind: [] for kind in set().union(*kinds)}
        for (first, last), kind in zip(shape.stage_layers, kinds):
            layers[next(iter(kind))].append(last - first + 1)
        assert min(layers["a100-80gb"]) > max(layers["v100-32gb"])  # faster devices get larger stages


def test_progress_option_prints_a_line_per_step(capsys):
    from passes.planner.search import _say
    _say(True, "planning x")
    _say(None, "silent")
    seen = []
    _say(seen.append, "to a callable")
    assert capsys.readouterr().err == "planning x\n" and seen == ["to a callable"]
    with pytest.raises(TypeError, match="progress is True, False or a callable"):
        _say("yes", "bad")


def test_auto_never_splits_a_batch_whose_norm_needs_all_of_it():
    """A training BatchNorm normalises with statistics of the whole batch, so compile() refuses microbatches:
    the planner prices only one microbatch per step for it, and its plan equals eager."""
    from tests.models import bn_cnn_model, cnn_inputs
    model, inputs = bn_cnn_model(), cnn_inputs(batch=8)
    plan = compile(model, inputs, cluster=Cluster.local(2), strategy="auto", search_options={"use_cache": False})
    report = plan.search_report
    assert report.evaluated >= 1
    assert all(c.strategy.pipeline.microbatches == 1 for c in [report.chosen, *report.alternatives])
    assert_close_to_eager(plan.run_virtual(*inputs), bn_cnn_model(), inputs)
    with pytest.raises(SearchError, match="statistics of the whole batch"):
        compile(model, inputs, cluster=Cluster.local(2), strategy={"mesh": "auto", "microbatches": 2},
                search_options={"use_cache": False})
