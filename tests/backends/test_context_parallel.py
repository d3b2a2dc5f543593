"""Context parallelism: the sequence split over a cp mesh axis, attention by ring, all-gather or all-to-all.

Loss and every gradient equal eager on the virtual mesh (GPT and transformers' Llama at sequence 256), the
ring's blocks equal attention, no rank holds a full-sequence score matrix, and emitted programs train under
torchrun as eager does.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from backends.runtime.context_parallel import block_plan, merge_blocks, ring_block, ring_positions
from backends.virtual import VirtualRunError
from compiler import Cluster
from frontend.dsl import format_plan, parse_plan
from ir.ops.attention import RING_ATTENTION
from ir.sbp import Split
from strategy import StrategyError, normalize
from tests.launch import (assert_state_close, run_programs, selected_tests, train_eager, training_program,
                          training_result)
from tests.capture_cache import compile_cached
from tests.models import (assert_close_to_eager, gpt, gpt_inputs, gpt_model, llama_model,
                          lm_inputs)

SEQ = 256
LLAMA_TP = {"lm.model.layers.*.self_attn.[qkv]_proj.weight": {"tp": "S(0)"},
            "lm.model.layers.*.self_attn.o_proj.weight": {"tp": "S(1)"}}
GPT_TP = {"blocks.*.attn.qkv.weight": {"tp": "S(0)"}, "blocks.*.attn.proj.weight": {"tp": "S(1)"}}


def long_gpt(seed: int = 0) -> torch.nn.Module:
    """The bundled GPT with positions for :data:`SEQ` tokens."""
    torch.manual_seed(seed)
    return gpt.GPT(gpt.GPTConfig(block_size=SEQ, n_layer=2))


def gpt_batch(batch: int = 2, seed: int = 1) -> tuple:
    return gpt.example_inputs(batch=batch, seq=SEQ, seed=seed)


@functools.cache
def model_and_inputs(name: str) -> tuple:
    """The shared instance of model ``name`` (``gpt`` or ``llama``: built when a test first needs it, not while
    the suite is collected) and its inputs."""
    if name == "gpt":
        return long_gpt(), gpt_batch()
    return llama_model(), lm_inputs(batch=2, seq=SEQ)


def cp_plan(name: str, mesh: dict, method: str, **extra):
    model, inputs = model_and_inputs(name)
    world = 1
    for size in mesh.values():
        world *= size
    return compile_cached(model, inputs, world, {"mesh": mesh, "cp_attention": method, **extra})


# -- the strategy and the plan language ------------------------------------------------------------------


def test_cp_axis_and_attention_round_trip_through_the_plan_language():
    strategy = parse_plan("mesh dp=2, cp=2\ncp_attention allgather\n")
    assert strategy.context_parallel == 2 and strategy.cp_attention == "allgather"
    assert strategy.tensor_axis is None  # cp splits the sequence, it is no tensor-parallel axis
    assert parse_plan(format_plan(strategy)) == strategy
    assert normalize({"mesh": {"cp": 2}}).cp_attention == "ring"


def test_bad_cp_attention_is_one_clear_error():
    with pytest.raises(Exception, match=r"unknown cp_attention 'rng' \(did you mean 'ring'\?\); expected one of: "
                                        r"ring, allgather, a2a, auto"):
        parse_plan("mesh cp=2\ncp_attention rng\n")
    with pytest.raises(StrategyError, match="cp_attention ring runs attention on sequence shards over a cp mesh "
                                            "axis, but the mesh has only dp; add an axis such as cp=2"):
        compile_cached(*model_and_inputs("gpt"), cluster=2, strategy={"mesh": {"dp": 2}, "cp_attention": "ring"})


# -- the ring's blocks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("balanced", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_ring_blocks_merged_online_equal_attention(causal, balanced):
    """Rank 2 of a ring of 4: its queries against every block, merged in ring order, equal attention's rows
    (load-balanced: chunks 2 and 5 of 8; contiguous: block 2 of 4)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 32, 8, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 32, 32, generator=g) > 0.3
    mask |= torch.eye(32, dtype=torch.bool)  # every query sees some key
    n, length, me = 4, 8, 2
    rows = ring_positions(me, n, length, balanced)
    assert rows.tolist() == (list(range(8, 12)) + list(range(20, 24)) if balanced else list(range(16, 24)))
    out = lse = None
    for step in range(n):
        cols = ring_positions((me - step) % n, n, length, balanced)
        part = ring_block(q[..., rows, :], k[..., cols, :], v[..., cols, :], mask[..., rows, :], rows, cols, causal,
                          8 ** -0.5)
        if part is not None:
            out, lse = merge_blocks(out, lse, *part)
    full = mask & torch.ones(32, 32, dtype=torch.bool).tril() if causal else mask
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=full)[..., rows, :]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [2, 4])
def test_balanced_causal_ring_gives_every_rank_the_same_work(n):
    """Causal, load-balanced: each rank computes its own block's two chunks and half of every other block, the
    same number of scores; contiguous blocks give the last rank n times the first's."""
    length = 8

    def work(rank, balanced):
        q_pos = ring_positions(rank, n, length, balanced)
        total = 0
        for source in range(n):
            plan = block_plan(None, q_pos, ring_positions(source, n, length, balanced), True, "cpu")
            if plan is not None:
                total += len(range(length)[plan[0]]) * len(range(length)[plan[1]])
        return total

    balanced = [work(r, True) for r in range(n)]
    assert len(set(balanced)) == 1 and balanced[0] == length * length * (n + 1) // 2
    contiguous = [work(r, False) for r in range(n)]
    assert contiguous == [length * length * (r + 1) for r in range(n)]


# -- the virtual mesh equals eager ----------------------------------------------------------------------

CASES = [("gpt", {"cp": 2}, "ring"), ("gpt", {"cp": 2}, "allgather"), ("gpt", {"cp": 2}, "a2a"),
         ("gpt", {"cp": 4}, "ring"), ("gpt", {"cp": 4}, "allgather"), ("gpt", {"cp": 4}, "a2a"),
         ("llama", {"cp": 2}, "ring"), ("llama", {"cp": 2}, "allgather"), ("llama", {"cp": 2}, "a2a"),
         ("llama", {"cp": 4}, "ring"), ("llama", {"cp": 4}, "allgather"), ("llama", {"cp": 4}, "a2a"),
         ("gpt", {"dp": 2, "cp": 2}, "ring"), ("llama", {"dp": 2, "cp": 2}, "ring")]


@pytest.mark.slow
@pytest.mark.parametrize("name, mesh, method", CASES,
                         ids=[f"{n}-{'x'.join(f'{a}{s}' for a, s in m.items())}-{k}" for n, m, k in CASES])
def test_context_parallel_equals_eager(name, mesh, method):
    plan = cp_plan(name, mesh, method)
    ops = [node.op for node in plan.graph.nodes]
    if method == "ring":
        assert ops.count(RING_ATTENTION) == 2 and "aten.scaled_dot_product_attention.default" not in ops
    elif method == "allgather":  # keys and values gathered per layer, queries stay split
        assert ops.count("comm.all_gather") >= 4 and RING_ATTENTION not in ops
    else:
        assert ops.count("comm.all_to_all") >= 8  # q, k, v in and the output back, per layer
    model, inputs = model_and_inputs(name)
    assert_close_to_eager(plan.run_virtual(*inputs), model, inputs)


@pytest.mark.slow
@pytest.mark.parametrize("name, params", [("gpt", GPT_TP), ("llama", LLAMA_TP)])
def test_cp2_with_tensor_parallel_equals_eager(name, params):
    plan = cp_plan(name, {"cp": 2, "tp": 2}, "ring", params=params)
    attention = [n for n in plan.graph.nodes if n.op == RING_ATTENTION]
    assert len(attention) == 2 and all(n.outputs[0].sbp[0] == Split(2) for n in attention)  # sequence on cp
    assert all(isinstance(n.outputs[0].sbp[1], Split) for n in attention)  # heads (or batch) on tp
    model, inputs = model_and_inputs(name)
    assert_close_to_eager(plan.run_virtual(*inputs), model, inputs)


@pytest.mark.slow
@pytest.mark.parametrize("name, stage", [("gpt", "blocks.1"), ("llama", "lm.model.layers.1")])
def test_cp2_inside_a_two_stage_pipeline_equals_eager(name, stage):
    model = model_and_inputs(name)[0]
    inputs = gpt_batch(batch=4) if name == "gpt" else lm_inputs(batch=4, seq=SEQ)
    plan = compile_cached(model, inputs, 4, {"mesh": {"pp": 2, "cp": 2}, "cp_attention": "ring", "stages": [stage],
                                             "microbatches": 2})
    assert sum(node.op == RING_ATTENTION for node in plan.graph.nodes) == 2
    assert_close_to_eager(plan.run_virtual(*inputs), model, inputs)


@pytest.mark.slow
def test_cp2_with_fsdp_and_sequence_parallel_tp_equals_eager():
    """Sharded parameters over dp, and Megatron sequence parallelism over tp, beside the cp split."""
    model, inputs = gpt_model(), gpt_inputs(batch=4, seq=16)
    fsdp = compile_cached(model, inputs, 4, {"mesh": {"dp": 2, "cp": 2}, "fsdp": "dp"})
    assert_close_to_eager(fsdp.run_virtual(*inputs), model, inputs)
    # sharded over cp itself (the planner's choice without dp): parameters in contiguous shards, even the
    # position table whose rows are as many as the sequence's positions
    model, inputs = model_and_inputs("gpt")
    over_cp = cp_plan("gpt", {"cp": 2}, "ring", fsdp="cp")
    assert any(p.target == "pos_emb.weight" and p.sbp == (Split(0),) for p in over_cp.graph.params)
    assert_close_to_eager(over_cp.run_virtual(*inputs), model, inputs)
    sp = compile_cached(model, inputs, 4, {"mesh": {"cp": 2, "tp": 2}, "params": GPT_TP, "sequence_parallel": True})
    assert_close_to_eager(sp.run_virtual(*inputs), model, inputs)


@pytest.mark.slow
def test_a_cp_degree_the_planner_chooses_compiles_and_equals_eager():
    """The planner's cp candidate (here the only one: dp fixed to 1 on two devices) becomes a strategy that
    compiles to ring attention and trains as eager does."""
    model, inputs = model_and_inputs("gpt")
    plan = compile_cached(model, inputs, cluster=2, search_options={"use_cache": False},
                   strategy={"mesh": {"dp": 1, "tp": 1, "pp": 1, "cp": "auto"}})
    assert plan.strategy.context_parallel == 2 and plan.strategy.cp_attention == "ring"
    assert "cp=2" in plan.search_report.chosen.summary
    assert sum(node.op == RING_ATTENTION for node in plan.graph.nodes) == 2
    assert_close_to_eager(plan.run_virtual(*inputs), model, inputs)


def test_a_sequence_the_cp_axis_does_not_divide_is_one_clear_error():
    model, inputs = gpt_model(), gpt_inputs(batch=4, seq=16)
    plan = compile_cached(model, inputs, 2, {"mesh": {"cp": 2}})
    with pytest.raises(VirtualRunError, match=r"input idx: dim 1 has size 14, which does not divide evenly over 2 "
                                              r"ranks \(mesh axes cp=2, two load-balanced chunks per cp rank\); use a "
                                              r"sequence length that is a multiple of 4"):
        plan.run_virtual(*gpt_inputs(batch=4, seq=14))


# -- memory -----------------------------------------------------------------------------------------------


def _activation_bytes(plan, inputs) -> tuple[int, int, int, list]:
    """Rank 0's bytes of every value a step computes (all of them, and the largest one), the largest tensor any
    rank saves for backward (inside ops too: attention's scores), and every rank's computed local shapes."""
    saved = [0]

    def pack(t):
        saved[0] = max(saved[0], t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = plan.run_virtual(*inputs)
    computed = {node.outputs[0].name for node in plan.graph.nodes}
    sizes = [t[0].numel() * t[0].element_size() for name, t in result.local.items() if name in computed]
    shapes = [tuple(local.shape) for name, t in result.local.items() if name in computed for local in t]
    return sum(sizes), max(sizes), saved[0], shapes


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_cp4_holds_a_quarter_of_the_activations_and_no_score_matrix(name):
    """Every value a rank computes is at most a quarter of cp1's; all of them together a little more than a
    quarter (the loss's inputs are moved from sequence to vocabulary shards by all-to-all: one more copy);
    attention's scores exist per block only, and no rank holds a [..., seq, seq] tensor: Llama's boolean
    causal mask, which transformers writes for the whole sequence, is built on each rank for its rows only."""
    model, inputs = model_and_inputs(name)
    whole, whole_peak, whole_saved, whole_shapes = _activation_bytes(compile_cached(model, inputs, 1, "dp"), inputs)
    split, split_peak, split_saved, shapes = _activation_bytes(cp_plan(name, {"cp": 4}, "ring"), inputs)
    assert split_peak == whole_peak / 4
    assert 0.24 < split / whole < 0.32, split / whole
    heads = model.cfg.n_head if name == "gpt" else model.lm.config.num_attention_heads
    scores = inputs[0].shape[0] * heads * SEQ * SEQ * 4  # one layer's full score matrix, fp32
    assert split_saved <= scores / 8 and split_saved <= whole_saved / 4
    assert name == "gpt" or any(s[-2:] == (SEQ, SEQ) for s in whole_shapes)  # Llama's mask, whole at cp1
    assert not any(s[-2:] == (SEQ, SEQ) for s in shapes)


# -- emitted programs under torchrun -----------------------------------------------------------------------


EMITTED = {"gpt-mesh0-ring": ("gpt", {"dp": 2, "cp": 2}, "ring", False),
           "gpt-mesh1-allgather": ("gpt", {"dp": 2, "cp": 2}, "allgather", False),
           "llama-mesh2-ring": ("llama", {"cp": 2}, "ring", False),
           "gpt-mesh1-allgather-regather": ("gpt", {"dp": 2, "cp": 2}, "allgather", True)}
"""case -> (model, mesh, cp_attention, regather_activations: the gathered keys and values kept as load-balanced
sequence shards and gathered again in backward)."""
SGD = (torch.optim.SGD, {"lr": 0.1})


def emitted_batches(name: str) -> list:
    """The 3 training batches of the emitted programs of ``name``."""
    return [gpt_batch(batch=2, seed=10 + i) if name == "gpt" else lm_inputs(batch=2, seq=SEQ, seed=10 + i)
            for i in range(3)]


@pytest.fixture(scope="module")
def emitted_runs(request, tmp_path_factory) -> dict:
    """The emitted programs this session's tests check, trained 3 SGD steps under torchrun (those of one world
    size sharing a launch): case -> (folder, losses, saved weights)."""
    programs, folders = {}, {}
    for params in selected_tests(request, "test_emitted_context_parallel_trains_like_eager").values():
        case = params["case"]
        name, mesh, method, regather = EMITTED[case]
        data = emitted_batches(name)
        plan = compile_cached((long_gpt if name == "gpt" else llama_model)(), data[0], cluster=Cluster.local(math.prod(
            mesh.values())), optimizer=SGD, strategy={"mesh": mesh, "cp_attention": method,
                                                      "regather_activations": regather})
        folders[case] = tmp_path_factory.mktemp(case)
        programs[case] = training_program(plan, folders[case], data, 3)
    results = run_programs(programs)
    return {case: (folders[case], *training_result(folders[case], results[case])) for case in programs}


@pytest.mark.multiproc
@pytest.mark.parametrize("case", list(EMITTED))
def test_emitted_context_parallel_trains_like_eager(emitted_runs, case):
    name, _, method, regather = EMITTED[case]
    folder, losses, saved = emitted_runs[case]
    program = (folder / "runtime.py").read_text()  # the ring's runtime, which main.py's forward calls
    assert ("batch_isend_irecv" in program) == (method == "ring")
    assert ("comm_gather_activation" in (folder / "main.py").read_text()) == regather
    reference = (long_gpt if name == "gpt" else llama_model)()
    expected = train_eager(reference, emitted_batches(name), 3, SGD)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert_state_close(saved, reference)
