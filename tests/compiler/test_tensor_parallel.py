"""Issue 3: tensor, sequence, vocabulary and sharded-data parallelism equal eager training."""
import functools
from collections import Counter

import pytest

from compiler import Cluster
from tests.capture_cache import compile_cached
from tests.models import assert_close_to_eager, gpt_inputs, gpt_model, llama_model, lm_inputs

GPT_MEGATRON = {
    "blocks.*.attn.qkv.weight": "S(0)", "blocks.*.attn.qkv.bias": "S(0)", "blocks.*.attn.proj.weight": "S(1)",
    "blocks.*.mlp.fc.weight": "S(0)", "blocks.*.mlp.fc.bias": "S(0)", "blocks.*.mlp.proj.weight": "S(1)",
}
LLAMA_MEGATRON = {
    "lm.model.layers.*.self_attn.[qkv]_proj.weight": "S(0)", "lm.model.layers.*.self_attn.o_proj.weight": "S(1)",
    "lm.model.layers.*.mlp.gate_proj.weight": "S(0)", "lm.model.layers.*.mlp.up_proj.weight": "S(0)",
    "lm.model.layers.*.mlp.down_proj.weight": "S(1)",
}


def tp(params: dict, axis: str = "tp") -> dict:
    """Parameter layouts on the tensor-parallel axis."""
    return {k: {axis: v} for k, v in params.items()}


def strategies(params: dict) -> dict:
    return {
        "tp2": (2, {"mesh": {"tp": 2}, "params": tp(params)}),
        "tp4": (4, {"mesh": {"tp": 4}, "params": tp(params)}),
        "dp2_tp2": (4, {"mesh": {"dp": 2, "tp": 2}, "params": tp(params)}),
        "tp2_sp": (2, {"mesh": {"tp": 2}, "params": tp(params), "sequence_parallel": True}),
        "tp2_sp_regather": (2, {"mesh": {"tp": 2}, "params": tp(params), "sequence_parallel": True,
                                "regather_activations": True}),
        "tp2_vocab": (2, {"mesh": {"tp": 2}, "params": tp(params), "vocab_parallel": True}),
        "fsdp4": (4, "fsdp"),
    }


@functools.cache
def shared_model(name: str) -> tuple:
    """One instance of the GPT or the Llama and its inputs, shared by the plans below (captured once)."""
    return (gpt_model(), gpt_inputs()) if name == "gpt" else (llama_model(), lm_inputs())


@pytest.mark.parametrize("name", list(strategies(GPT_MEGATRON)))
def test_gpt_matches_eager(name):
    ranks, strategy = strategies(GPT_MEGATRON)[name]
    model, x = shared_model("gpt")
    plan = compile_cached(model, x, ranks, strategy)
    assert_close_to_eager(plan.run_virtual(*x), model, x)


@pytest.mark.parametrize("name", list(strategies(LLAMA_MEGATRON)))
def test_llama_matches_eager(name):
    ranks, strategy = strategies(LLAMA_MEGATRON)[name]
    model, x = shared_model("llama")
    plan = compile_cached(model, x, ranks, strategy)
    assert_close_to_eager(plan.run_virtual(*x), model, x)


def comm_counts(plan) -> Counter:
    return Counter(n.op for n in plan.graph.nodes if n.op.startswith("comm.") and n.outputs[0].type.ndim > 0)


def test_megatron_layout_has_one_all_reduce_per_block():
    """Column-parallel qkv/fc, row-parallel proj: one all-reduce per attention and per MLP block, both ways."""
    n_layer = 3
    plan = compile_cached(gpt_model(n_layer=n_layer), gpt_inputs(), cluster=2,
                   strategy={"mesh": {"tp": 2}, "params": tp(GPT_MEGATRON)})
    forward = comm_counts(plan)
    assert forward["comm.all_reduce"] == 2 * n_layer
    assert forward["comm.all_gather"] == forward["comm.reduce_scatter"] == forward["comm.all_to_all"] == 0
    activation_comm = [c for c in plan.graph.attrs["backward_comm"] if c["grad_of"].type.ndim > 0]
    assert [c["op"] for c in activation_comm] == ["comm.all_reduce"] * (2 * n_layer)
    producers = [n.input_values()[0].producer for n in plan.graph.nodes if n.op == "comm.all_reduce"
                 and n.outputs[0].type.ndim > 0]
    assert all(p.op == "aten.add.Tensor" for p in producers)  # the residual after each row-parallel linear


def test_sequence_parallel_turns_all_reduces_into_gather_scatter_pairs():
    n_layer = 2
    plan = compile_cached(gpt_model(n_layer=n_layer), gpt_inputs(), cluster=2,
                   strategy={"mesh": {"tp": 2}, "params": tp(GPT_MEGATRON), "sequence_parallel": True})
    counts = comm_counts(plan)
    assert counts["comm.all_reduce"] == 0
    assert counts["comm.reduce_scatter"] == 2 * n_layer
    assert counts["comm.all_gather"] == 2 * n_layer  # the LM head and loss stay on sequence shards
    norms = [n for n in plan.graph.nodes if n.op == "aten.layer_norm.default"]
    assert all(str(n.outputs[0].sbp[0]) == "S(1)" for n in norms)


def test_vocab_parallel_never_gathers_logits():
    plan = compile_cached(gpt_model(), gpt_inputs(), cluster=2,
                   strategy={"mesh": {"tp": 2}, "params": tp(GPT_MEGATRON), "vocab_parallel": True})
    vocab = 512
    for n in plan.graph.nodes:
        if n.op.startswith("comm.") and n.op != "comm.slice":
            assert vocab not in [int(d) for d in n.outputs[0].type.shape if d.is_Integer], n.op
    assert str(plan.graph.value("tok_emb.weight").sbp[0]) == "S(0)"


def test_parameter_memory_under_tp4_and_fsdp4():
    model, x = gpt_model(), gpt_inputs()
    tp4 = compile_cached(model, x, cluster=4,
                  strategy={"mesh": {"tp": 4}, "params": tp(GPT_MEGATRON), "vocab_parallel": True})
    fsdp = compile_cached(model, x, cluster=4, strategy="fsdp")
    for plan in (tp4, fsdp):
        total = plan.total_parameter_bytes()
        assert max(plan.parameter_memory().values()) <= 0.30 * total


def test_fsdp_stores_shards_and_gathers_before_use():
    plan = compile_cached(gpt_model(), gpt_inputs(), cluster=4, strategy="fsdp")
    weight = plan.graph.value("blocks.0.mlp.fc.weight")
    assert str(weight.sbp[0]) == "S(0)"
    users = {u.op for u in weight.uses}
    assert users == {"comm.all_gather"}
    backward = {c["op"] for c in plan.graph.attrs["backward_comm"] if c["grad_of"].producer.input_values()[0].kind == "param"}
    assert backward == {"comm.reduce_scatter"}


@pytest.mark.parametrize("bad, message", [
    ({"mesh": {"tp": 2}, "params": {"blocks.*.attn.qkvv.weight": {"tp": "S(0)"}}}, "did you mean"),
    ({"mesh": {"tp": 2}, "params": {"blocks.*.attn.qkv.weight": {"tq": "S(0)"}}}, "'tq'.*mesh"),
    ({"mesh": {"tp": 2}, "params": {"blocks.*.attn.qkv.weight": {"tp": "S(2)"}}}, "dim 2"),
    ({"mesh": {"tp": 3}, "params": {"blocks.*.attn.qkv.weight": {"tp": "S(1)"}}}, "size 64.*size 3|size 3.*size 64"),
    ({"mesh": {"dp": 3}}, "3 devices, but the world has 2"),
    ({"mesh": {"tp": 2}, "parms": {}}, "did you mean.*params"),
])
def test_impossible_requests_name_the_tensor(bad, message):
    with pytest.raises(ValueError, match=message):
        cluster = Cluster.local(3 if bad["mesh"].get("tp") == 3 else 2)
        compile_cached(gpt_model(), gpt_inputs(), cluster=cluster, strategy=bad)


def test_uneven_split_error_names_shape_and_axis():
    with pytest.raises(ValueError) as err:
        compile_cached(gpt_model(), gpt_inputs(), cluster=3,
                strategy={"mesh": {"tp": 3}, "params": {"blocks.0.mlp.fc.weight": {"tp": "S(1)"}}})
    text = str(err.value)
    assert "blocks.0.mlp.fc.weight" in text and "64" in text and "tp" in text and "size 3" in text
