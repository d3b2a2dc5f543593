"""Issue 16, items 2-3: expert parallelism with all-to-all token dispatch and combine.

transformers' MoE layers (Mixtral, Qwen3-MoE, DeepSeek-V3's routed experts beside its shared ones) whose
stacked expert weights are split over a mesh axis are written as ``moe.dispatch`` -> ``moe.expert_mm`` ->
``moe.combine`` (``passes/experts.py``, ``ir/ops/moe.py``): on the virtual mesh and under torchrun the ranks
of the axis exchange (token, expert) rows with one all-to-all each way (after one small all-to-all of split
sizes), and loss and every gradient (router included, the auxiliary load-balancing loss in the loss) equal
eager.
"""
from __future__ import annotations

import datetime
import re
import socket

import pytest
import torch
import torch.distributed as dist

from ir.ops.moe import COMBINE, DISPATCH, EXPERT_MM, exchanges
from ir.sbp import format_nd_sbp
from tests.launch import assert_state_close, train_eager, train_emitted
from tests.capture_cache import capture_once, compile_cached
from tests.models import assert_close_to_eager, eager_loss_and_grads
from tests.zoo import DECODER, LLAMA_ATTENTION_TP, MOE_EXPERTS_TP, _causal_lm, _lm_inputs

AUX_LOSS = {"output_router_logits": True, "router_aux_loss_coef": 0.02}
"""The router's load-balancing loss is part of the loss (and of the router's gradient)."""
MOE_MODELS = {
    "mixtral": _causal_lm("MixtralForCausalLM", "MixtralConfig", num_local_experts=4, num_experts_per_tok=2,
                          router_jitter_noise=0.0, **AUX_LOSS, **DECODER),
    "qwen3_moe": _causal_lm("Qwen3MoeForCausalLM", "Qwen3MoeConfig", head_dim=8, num_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                            norm_topk_prob=True, **AUX_LOSS, **DECODER),
    "deepseek_v3": _causal_lm("DeepseekV3ForCausalLM", "DeepseekV3Config", n_routed_experts=4, num_experts_per_tok=2,
                              n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=0,
                              moe_intermediate_size=32, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                              qk_nope_head_dim=8, v_head_dim=8, routed_scaling_factor=1.0,
                              **{**DECODER, "num_key_value_heads": 4}),
}
"""Tiny MoE language models in transformers' default experts implementation (``grouped_mm``); DeepSeek-V3 with a
shared expert beside the routed ones (replicated: a plain MLP) and no auxiliary loss (it balances with a bias)."""
EXPERTS = ("lm.model.layers.*.mlp.experts.gate_up_proj", "lm.model.layers.*.mlp.experts.down_proj")
"""The stacked (experts, ...) weights of every MoE layer."""


def expert_parallel(axis: str, mesh: dict, **more) -> dict:
    """A strategy on ``mesh`` with the experts split over ``axis`` (each rank holds experts/n of every layer)."""
    return {"mesh": mesh, "params": {name: {axis: "S(0)"} for name in EXPERTS}, **more}


def expert_and_tensor_parallel() -> dict:
    """ep2 x tp2: experts over ep, each expert's matrices split over tp (column- then row-parallel), Megatron
    attention on tp."""
    params = {name: {"tp": sbp} for name, sbp in LLAMA_ATTENTION_TP.items()}
    params |= {name: {"ep": "S(0)", "tp": sbp} for name, sbp in MOE_EXPERTS_TP.items()}
    return {"mesh": {"ep": 2, "tp": 2}, "params": params}


PLANS = {"dp2": (2, "dp"),
         "ep2": (2, expert_parallel("ep", {"ep": 2})),
         # 2 chunks per layer, every block recomputed (the chunked layer inside a checkpointed region)
         "ep2_chunks2_recompute": (2, expert_parallel("ep", {"ep": 2}, moe_overlap_chunks=2, recompute=True)),
         "experts_over_dp2": (2, expert_parallel("dp", {"dp": 2})),
         "dp2_ep2": (4, expert_parallel("ep", {"dp": 2, "ep": 2})),
         # each layer's dispatch and combine in 2 chunks of tokens, overlapping the experts' compute
         "dp2_ep2_chunks2": (4, expert_parallel("ep", {"dp": 2, "ep": 2}, moe_overlap_chunks=2)),
         # FSDP over dp: every parameter stored sharded, the experts over dp and ep (gathered over dp at use)
         "dp2_ep2_fsdp": (4, expert_parallel("ep", {"dp": 2, "ep": 2}, fsdp="dp")),
         "fsdp4": (4, "fsdp"),
         "ep2_tp2": (4, expert_and_tensor_parallel()),
         # one microbatch: the auxiliary loss balances over the whole batch (not a mean of microbatches' losses)
         "pp2_ep2": (4, expert_parallel("ep", {"pp": 2, "ep": 2}, stages=["lm.model.layers.1"], microbatches=1,
                                        schedule="1f1b"))}

ACCEPTANCE_PLANS = ("dp2", "fsdp4", "ep2", "dp2_ep2", "ep2_tp2", "pp2_ep2")
"""The plans every MoE model is checked under (the issue's acceptance)."""

_MOE: dict[str, tuple] = {}


def moe_model_and_reference(name: str) -> tuple:
    """One model instance per name (its capture is shared by the plans), its inputs, eager (loss, grads)."""
    if name not in _MOE:
        inputs = _lm_inputs()
        _MOE[name] = (MOE_MODELS[name](), inputs, eager_loss_and_grads(MOE_MODELS[name](), inputs))
    return _MOE[name]


def layer_nodes(plan, layer: int) -> list:
    return [n for n in plan.graph.nodes if n.attrs.get("module", "").startswith(f"lm.model.layers.{layer}.mlp")]


@pytest.mark.slow
def test_one_moe_layer_under_ep2_dispatches_and_combines_with_one_all_to_all_each():
    """The collectives of one MoE layer in an ep2 plan: one dispatch and one combine exchanging rows on ep (each
    an all-to-all; the dispatch's split sizes go first), the experts' matmuls local, nothing else."""
    model, inputs, _ = moe_model_and_reference("mixtral")
    plan = compile_cached(model, inputs, 2, PLANS["ep2"][1])
    mesh = plan.graph.meshes["world"]
    nodes = layer_nodes(plan, 0)
    ops = [n.op for n in nodes]
    assert ops.count(DISPATCH) == 1 and ops.count(COMBINE) == 1 and ops.count(EXPERT_MM) == 2
    assert [n.op for n in nodes if n.op.startswith("comm.")] == []
    assert all(exchanges(n, mesh, n.input_values()[0].sbp) for n in nodes if n.op in (DISPATCH, COMBINE))
    assert "transformers.grouped_mm_fallback.default" not in ops and "aten.sort.default" not in ops
    text = str(plan.graph)
    assert re.search(r'moe\.dispatch\(%view_\d+, %topk_1, experts=4, axis="ep", ranks=2\)', text)
    dispatch = next(n for n in nodes if n.op == DISPATCH)
    assert [format_nd_sbp(v.sbp) for v in dispatch.outputs] == ["(S(0))", "(S(1))"]


@pytest.mark.slow
def test_verifier_refuses_a_collective_moving_routed_rows_between_ranks():
    """Routed rows are split unevenly by the routing: an all-gather of them over ep (as a layout asking for the
    experts' rows whole would box) is refused with one error naming the collective, the rows, the dispatch, the
    axis and what to do."""
    from ir.parser import parse
    from ir.verifier import VerificationError, verify
    model, inputs, _ = moe_model_and_reference("mixtral")
    text = str(compile_cached(model, inputs, 2, PLANS["ep2"][1]).graph)
    verify(parse(text))
    first_mm = next(line for line in text.splitlines() if "= moe.expert_mm(" in line)
    gather = ('  %routed_whole: f32[`2*batch*seq`, 32] (B) @world = comm.all_gather(%routed, axis="ep", dim=0) '
              '{module = "lm.model.layers.0.mlp.experts"}')
    with pytest.raises(VerificationError) as refused:
        verify(parse(text.replace(first_mm, gather + "\n" + first_mm)))
    message = str(refused.value)
    assert message.startswith("node %routed_whole (comm.all_gather, module lm.model.layers.0.mlp.experts) moves rows "
                              "of %routed between the ranks of axis 'ep' (comm.all_gather on dim 0), but those rows "
                              "were routed to their experts by %routed (moe.dispatch on axis 'ep'): the routing splits "
                              "them unevenly, so no collective may split or gather them"), message
    assert message.endswith("Keep the experts' activations split S(0) on that axis (remove the layout or collective "
                            "that gathers them), or do not split the experts over it")


class _CountingExchanges:
    """``dist.all_to_all_single`` counted, by phase (forward, backward)."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, str]] = []
        self.phase = "forward"
        real = dist.all_to_all_single

        def counted(out, x, *args, **kwargs):
            self.calls.append((self.phase, "counts" if x.dtype == torch.int64 else "rows"))
            return real(out, x, *args, **kwargs)
        monkeypatch.setattr(dist, "all_to_all_single", counted)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_emitted_dispatch_and_combine_exchange_split_sizes_then_rows_and_reverse_in_backward(monkeypatch):
    """The emitted runtime (``backends/runtime/moe.py``) on a gloo group: forward exchanges the split sizes, the
    rows (dispatch) and the rows back (combine); backward only the two row exchanges reversed (the adjoints)."""
    from backends.runtime import moe
    from backends.runtime.core import GROUPS
    store = dist.TCPStore("127.0.0.1", _free_port(), 1, True, timeout=datetime.timedelta(seconds=30))
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        monkeypatch.setitem(GROUPS, "ep", (dist.group.WORLD, [0], 0))
        exchanges_seen = _CountingExchanges(monkeypatch)
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(6, 4, generator=g, requires_grad=True)
        index = torch.randint(0, 4, (6, 2), generator=g)
        weights = torch.rand(6, 2, generator=g)
        w = torch.randn(4, 4, 3, generator=g)
        rows, received = moe.moe_dispatch(hidden, index, experts=4, axis="ep")
        from ir.kernels import expert_mm
        out = moe.moe_combine(expert_mm(rows, w, received), index, weights, received, experts=4, axis="ep")
        expected = sum(weights[:, j:j + 1] * torch.einsum("tk,tkn->tn", hidden, w[index[:, j]]) for j in range(2))
        torch.testing.assert_close(out, expected)
        assert exchanges_seen.calls == [("forward", "counts"), ("forward", "rows"), ("forward", "rows")]
        exchanges_seen.phase = "backward"
        out.sum().backward()
        assert exchanges_seen.calls[3:] == [("backward", "rows"), ("backward", "rows")]
    finally:
        dist.destroy_process_group()


def test_overlapped_chunks_start_every_dispatch_then_combine_each_chunk_and_equal_one_chunk(monkeypatch):
    """``moe_overlapped`` (``moe_overlap_chunks=2``) on a gloo group: the split sizes of both chunks in one
    all-to-all, both chunks' rows sent at once (async), each chunk's outputs sent back after its experts; backward
    sends the four row exchanges back. Output and gradients equal the unchunked dispatch, experts and combine."""
    from backends.runtime import moe
    from backends.runtime.core import GROUPS
    from ir.kernels import expert_mm
    store = dist.TCPStore("127.0.0.1", _free_port(), 1, True, timeout=datetime.timedelta(seconds=30))
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        monkeypatch.setitem(GROUPS, "ep", (dist.group.WORLD, [0], 0))
        g = torch.Generator().manual_seed(2)
        hidden = torch.randn(7, 4, generator=g, requires_grad=True)  # 7 tokens: chunks of 4 and 3
        index, weights = torch.randint(0, 4, (7, 2), generator=g), torch.rand(7, 2, generator=g)
        w = torch.randn(4, 4, 3, generator=g, requires_grad=True)
        rows, received = moe.moe_dispatch(hidden, index, experts=4, axis="ep")
        whole = moe.moe_combine(expert_mm(rows, w, received), index, weights, received, experts=4, axis="ep")
        expected = torch.autograd.grad(whole.square().sum(), (hidden, w))
        seen = _CountingExchanges(monkeypatch)
        started = []
        real = dist.all_to_all_single
        monkeypatch.setattr(dist, "all_to_all_single", lambda *a, **kw: started.append(kw.get("async_op", False))
                            or real(*a, **kw))
        out = moe.moe_overlapped(hidden, index, weights, lambda r, got: expert_mm(r, w, got), experts=4, axis="ep",
                                 chunks=2)
        assert seen.calls == [("forward", "counts")] + [("forward", "rows")] * 4 and started == [False] + [True] * 4
        seen.phase = "backward"
        grads = torch.autograd.grad(out.square().sum(), (hidden, w))
        assert seen.calls[5:] == [("backward", "rows")] * 4 and started[5:] == [True] * 4
        torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_moe_overlap_chunks_run_each_layer_in_chunks_and_equal_eager(tmp_path):
    """Mixtral ep2 with ``moe_overlap_chunks 2`` (and every block recomputed): the plan round-trips, every dispatch
    and combine carries ``chunks=2``, the emitted forward runs each layer's experts as a nested function of one
    chunk's rows under ``moe_overlapped`` (inside the block's checkpointed function), and the virtual mesh (which
    runs the same chunks) equals eager."""
    import ast
    from frontend.dsl import parse_plan
    model, inputs, reference = moe_model_and_reference("mixtral")
    plan = compile_cached(model, inputs, 2, PLANS["ep2_chunks2_recompute"][1])
    assert "moe_overlap_chunks 2" in plan.to_dsl() and parse_plan(plan.to_dsl()).moe_overlap_chunks == 2
    exchanging = [n for n in plan.graph.nodes if n.op in (DISPATCH, COMBINE)]
    assert len(exchanging) == 4 and all(n.kwargs["chunks"] == 2 for n in exchanging)
    assert 'axis="ep", ranks=2, chunks=2)' in str(plan.graph)
    from ir.parser import parse
    assert str(parse(str(plan.graph))) == str(plan.graph)  # the IR text prints and parses the chunks
    plan.emit(tmp_path)
    forward = (tmp_path / "main.py").read_text().split("\ndef forward(")[1]
    ast.parse("def forward(" + forward)
    assert forward.count("moe_overlapped(") == 2 and "moe_dispatch(" not in forward
    assert "        def lm_model_layers_0_mlp_experts_chunk(routed, route):" in forward  # nested in the checkpoint
    assert_close_to_eager(plan.run_virtual(*inputs), model, inputs, reference=reference)


@pytest.mark.slow
def test_simulator_prices_chunked_dispatch_and_combine_under_the_experts_compute():
    """``moe_overlap_chunks``: each row exchange runs as K all-to-alls (K latencies) overlapping the experts'
    compute of the other chunks, one chunk exposed. Where the exchange is bandwidth-bound (4096 samples) the
    exposed all-to-all time and the step fall with K; where it is latency-bound (8 samples) K costs more; K=1 is
    today's plan and price (no chunks in the IR, every exchange wholly exposed)."""
    from compiler.simulate import simulate
    model, inputs, _ = moe_model_and_reference("mixtral")
    plans = {k: compile_cached(model, inputs, 2, expert_parallel("ep", {"ep": 2}, moe_overlap_chunks=k))
             for k in (2, 4)}
    plans[1] = compile_cached(model, inputs, 2, PLANS["ep2"][1])

    def all_to_all(report) -> float:
        return sum(v for key, v in report.breakdown.items() if "all_to_all" in key)
    heavy = {k: simulate(plan, global_batch=4096) for k, plan in plans.items()}
    assert heavy[4].step_time_s < heavy[2].step_time_s < heavy[1].step_time_s
    assert all_to_all(heavy[4]) < all_to_all(heavy[2]) < 0.6 * all_to_all(heavy[1])
    light = {k: simulate(plan, global_batch=8) for k, plan in plans.items()}
    assert all_to_all(light[1]) < all_to_all(light[2]) < all_to_all(light[4])
    one = compile_cached(model, inputs, 2, expert_parallel("ep", {"ep": 2}, moe_overlap_chunks=1))
    assert [str(n) for n in one.graph.nodes] == [str(n) for n in plans[1].graph.nodes]
    assert simulate(one, global_batch=4096).step_time_s == heavy[1].step_time_s
    # the planner's pricing of a strategy (experts folded over ep of the captured model) falls alike
    from compiler import Cluster
    graph, cluster = captured_graph("mixtral"), Cluster.load("local:2")
    steps = [simulate((graph, PLANS["ep2"][1] | {"moe_overlap_chunks": k}, cluster), global_batch=4096).step_time_s
             for k in (1, 2, 4)]
    assert steps[2] < steps[1] < steps[0]


def test_routing_in_process_equals_the_logical_grouped_experts():
    """The virtual mesh's exchange (two sources) gives each destination its experts' rows, expert by expert, and
    combining them back gives every token its weighted experts' sum; so does one rank holding everything."""
    from backends.runtime.moe import (combine_in_process, dispatch_in_process, moe_replicated_combine,
                                      moe_replicated_dispatch)
    from ir.kernels import expert_mm
    g = torch.Generator().manual_seed(1)
    hidden, index = torch.randn(8, 4, generator=g), torch.randint(0, 4, (8, 2), generator=g)
    weights, w = torch.rand(8, 2, generator=g), torch.randn(4, 4, 3, generator=g)
    rows, received = dispatch_in_process(list(hidden.chunk(2)), list(index.chunk(2)), 4)
    flat = index.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    torch.testing.assert_close(torch.cat(rows), hidden[order // 2])  # the logical rows: sorted by expert
    assert [int(r.sum()) for r in received] == [int((flat < 2).sum()), int((flat >= 2).sum())]
    outs = [expert_mm(r, w[2 * d:2 * d + 2], got) for d, (r, got) in enumerate(zip(rows, received))]
    combined = torch.cat(combine_in_process(outs, received, list(index.chunk(2)), list(weights.chunk(2)), 4))
    expected = sum(weights[:, j:j + 1] * torch.einsum("tk,tkn->tn", hidden, w[index[:, j]]) for j in range(2))
    torch.testing.assert_close(combined, expected)
    # a rank holding every token and expert (the ops' all-B layout) computes the same, locally
    rows, route = moe_replicated_dispatch(hidden, index, 4, 2)
    assert route.shape == (2, 4) and torch.equal(route.sum(0), torch.bincount(flat, minlength=4))
    alone = moe_replicated_combine(expert_mm(rows, w, route), index, weights, route, 4)
    torch.testing.assert_close(alone, expected)


@pytest.mark.slow
@pytest.mark.parametrize("name, plan_name", [
    *((name, plan_name) for name in MOE_MODELS for plan_name in ACCEPTANCE_PLANS),
    ("mixtral", "dp2_ep2_fsdp"), ("qwen3_moe", "experts_over_dp2")])
def test_moe_plans_equal_eager(name, plan_name):
    """Loss (with the auxiliary loss) and every gradient, router included, equal eager. Experts split over an axis
    dispatch by all-to-all (one dispatch per layer); under fsdp4 they are gathered like every parameter. Every op
    has SBP rules (the routers' index_put, scatter and histc, too: none runs replicated with a warning)."""
    model, inputs, reference = moe_model_and_reference(name)
    world, spec = PLANS[plan_name]
    plan = compile_cached(model, inputs, world, spec)
    assert sum(n.op == DISPATCH for n in plan.graph.nodes) == (0 if plan_name in ("dp2", "fsdp4") else 2)
    from ir.ops.registry import RULES
    assert [n.op for n in plan.graph.nodes if n.op not in RULES] == []  # every op laid out by its rules (no warning)
    result = plan.run_virtual(*inputs)
    assert any(".gate." in g for g in result.grads)
    assert_close_to_eager(result, model, inputs, reference=reference)


ADAMW = (torch.optim.AdamW, {"lr": 1e-3, "eps": 1e-6})
"""AdamW whose update cannot magnify fp32 rounding past the test's tolerance. Adam moves a weight by about
``lr * g / (|g| + eps)``: for a gradient within ``eps`` of zero that is ``lr / eps`` times any rounding of ``g``.
Summing a data-parallel gradient over ranks rounds differently from eager's one backward (~1e-10 here), so
with the default ``eps=1e-8`` and ``lr=1e-2`` the weights of a few such elements land up to 6e-5 from eager
after 3 steps under plain dp2 (no experts split; 38 elements), dp4 (21), ep2 (24) and dp2 x ep2 (28) alike,
while every gradient matches eager at rtol 1e-5, atol 1e-6. ``lr / eps = 1e3`` keeps that below 2e-7."""


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("name, plan_name", [("mixtral", "dp2_ep2_chunks2"), ("qwen3_moe", "ep2")])
def test_emitted_expert_parallel_program_trains_like_eager(tmp_path, name, plan_name):
    """3 AdamW steps under torchrun (gloo): losses and saved weights equal eager. The program dispatches and
    combines with ``all_to_all_single`` (each token's expert output is computed whole on one rank); Mixtral's in 2
    chunks of tokens per layer (``moe_overlap_chunks``: async all-to-alls overlapping the experts' compute)."""
    model, inputs, _ = moe_model_and_reference(name)
    world, spec = PLANS[plan_name]
    plan = compile_cached(model, inputs, world, spec, optimizer=ADAMW)
    batches = [_lm_inputs(seed=s) for s in (1, 2, 3)]
    losses, saved = train_emitted(plan, tmp_path, batches, 3)
    forward = (tmp_path / "main.py").read_text().split("\ndef forward(")[1]
    chunked = "moe_overlap_chunks" in spec
    assert ("moe_overlapped(" in forward) == chunked and ("moe_dispatch(" in forward) != chunked
    assert "expert_mm(" in forward
    assert "grouped_mm_fallback" not in forward
    eager = MOE_MODELS[name]()
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(train_eager(eager, batches, 3, ADAMW)),
                               rtol=1e-5, atol=1e-6)
    assert_state_close(saved, eager)


@pytest.mark.slow
def test_simulator_prices_dispatch_and_combine_as_all_to_all_scaled_by_the_imbalance():
    """Per MoE layer: the split sizes, the dispatch and the combine as all-to-alls on ep (the two row exchanges
    again in backward); the expert matmuls by the rows routed to a rank; ``moe_imbalance`` scales both."""
    from compiler.simulate import simulate
    from cost.ops import Precision
    from cost.segments import ir_profile
    model, inputs, _ = moe_model_and_reference("mixtral")
    plan = compile_cached(model, inputs, 2, PLANS["ep2"][1])
    balanced, skewed = (ir_profile(plan.graph, Precision.of("fp32"), moe_imbalance=f) for f in (1.0, 2.0))
    exchanges_of = [[c for s in p.segments for c in s.comms if c.kind == "all_to_all"] for p in (balanced, skewed)]
    assert [(c.axis, c.backward) for c in exchanges_of[0]] == [("ep", False), ("ep", False), ("ep", True),
                                                               ("ep", False), ("ep", True)] * 2
    rows = [c for c in exchanges_of[0] if c.nbytes[1] > 0]
    assert all(c.nbytes[1] == 16 * 2 * 32 * 4 / 2 for c in rows)  # a rank's (token, expert) rows: seq 16, k 2, 32 f32
    assert all((b.nbytes == a.nbytes * (2.0 if a.nbytes[1] > 0 else 1.0)).all() for a, b in zip(*exchanges_of))
    assert simulate(plan, moe_imbalance=2.0).step_time_s > simulate(plan).step_time_s


def test_all_to_all_between_nodes_costs_more_than_inside_one():
    """The dispatch's all-to-all is priced on the links it crosses: 8 ranks of one DGX-H100 (NVLink) against 8
    ranks spread over 4 nodes (InfiniBand; each rank sends 6 of its 7 chunks off its node)."""
    from compiler import Cluster
    from cost.collectives import collective_cost
    cluster = Cluster.load("dgx-h100:4")
    inside = collective_cost("all_to_all", 64e6, list(range(8)), cluster)
    across = collective_cost("all_to_all", 64e6, [0, 1, 8, 9, 16, 17, 24, 25], cluster)
    assert across.time_s > 2 * inside.time_s
    assert set(inside.traffic) == {"nvswitch"} and across.traffic["infiniband"] == 6 * across.traffic["nvswitch"]


def captured_graph(name: str):
    """A private copy of the model's captured graph (before any pass), at the example sizes."""
    model, inputs, _ = moe_model_and_reference(name)
    graph = capture_once(model, inputs, None, loss_fn=None, train=True, method="auto").graph
    graph.attrs["example_dims"] = {"batch": 8, "seq": 16}
    return graph


@pytest.mark.slow
def test_planner_folds_experts_over_ep_and_its_plan_equals_eager():
    """``auto`` considers ep degrees, each with the all-to-alls in 1, 2 or 4 chunks (``moe_overlap_chunks``), prices
    them (all-to-all on ep, experts' memory / ep), and writes a plan that compiles and equals eager; a fixed
    ``moe_overlap_chunks`` is kept in the plan it writes."""
    from compiler import Cluster
    from cost.estimate import PlanOptions
    from passes.planner.evaluate import ModelView
    from passes.planner.search import _Planner, search
    from strategy import normalize
    graph = captured_graph("mixtral")
    cluster = Cluster.load("dgx-h100:2")
    fixed = normalize({"mesh": {"dp": "auto", "ep": "auto", "tp": 4}}, cluster.world_size)
    planner = _Planner(ModelView(graph), cluster, fixed, PlanOptions(global_batch=64), None, None)
    assert {(s.ep, s.chunks) for s in planner.settings()} == {(1, 1), *((ep, k) for ep in (2, 4) for k in (1, 2, 4))}
    strategy, report = search(graph, Cluster.load("dgx-h100:1"), {"mesh": {"dp": "auto", "ep": "auto"}},
                              use_cache=False, global_batch=64)
    assert {"ep=2", "ep=4"} <= {part for c in [report.chosen, *report.alternatives] for part in c.summary.split()}
    strategy, report = search(graph, Cluster.load("dgx-h100:1"), {"mesh": {"dp": "auto", "ep": 4},
                                                                   "moe_overlap_chunks": 2}, use_cache=False,
                              global_batch=64)
    plan_dict = strategy.to_dict()
    assert plan_dict["mesh"] == {"dp": 2, "ep": 4} and plan_dict["moe_overlap_chunks"] == 2
    assert plan_dict["params"] == {name: {"ep": "S(0)"} for name in sorted(EXPERTS)}
    model, inputs, reference = moe_model_and_reference("mixtral")
    plan = compile_cached(model, inputs, 8, plan_dict)
    assert all(n.kwargs["chunks"] == 2 for n in plan.graph.nodes if n.op in (DISPATCH, COMBINE))
    assert_close_to_eager(plan.run_virtual(*inputs), model, inputs, reference=reference)


@pytest.mark.slow
def test_planner_lets_an_ep_group_span_nodes_priced_on_the_links_between_them():
    """On two 8-GPU nodes with tp=4, ep=4 puts each ep x tp group across both nodes: the planner plans it (it
    used to refuse), its all-to-alls priced on InfiniBand, so they cost more than ep=4 inside a node (tp=2)."""
    from compiler import Cluster
    from compiler.simulate import simulate
    from passes.planner.search import search
    graph, cluster = captured_graph("mixtral"), Cluster.load("dgx-h100:2")
    exposed = {}
    for tp in (4, 2):
        strategy, report = search(graph, cluster, {"mesh": {"dp": "auto", "ep": 4, "tp": tp}}, use_cache=False,
                                  global_batch=64)
        assert strategy.mesh.as_dict() == {"dp": 16 // (4 * tp), "ep": 4, "tp": tp}
        priced = simulate((graph, strategy.to_dict() | {"moe_overlap_chunks": 1}, cluster), global_batch=64)
        exposed[tp] = sum(v for key, v in priced.breakdown.items() if "all_to_all over ep" in key)
    assert exposed[4] > 1.5 * exposed[2]
