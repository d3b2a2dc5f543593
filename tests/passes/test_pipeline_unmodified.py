"""Pipelines of unmodified models: planner cuts (no ``stages``) and microbatches on models that compute
position ids, causal masks or rotary tables before their first layer. Those input-only values are computed
on each stage reading them, so only the residual stream crosses a cut."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from compiler import compile
from ir.ops.pipeline_ops import SEND_RECV
from passes.pipeline import _input_only_nodes
from tests.capture_cache import compile_cached
from tests.models import assert_close_to_eager, gpt2_model, llama_model, lm_inputs

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from megatron_gpt import MEGATRON_LAYOUT, MegatronConfig, meta_model  # noqa: E402

BATCH, SEQ, HIDDEN = 16, 32, 64


def crossing(graph) -> dict[int, list]:
    """Per destination stage, the types of the values sent to it."""
    out: dict[int, list] = {}
    for node in graph.nodes:
        if node.op == SEND_RECV:
            out.setdefault(node.attrs["stage"], []).append(node.outputs[0].type)
    return out


def assert_only_the_residual_stream_crosses(graph, stages: int, hidden: int, dtype: str = "f32") -> None:
    sent = crossing(graph)
    assert sorted(sent) == list(range(1, stages)), sent
    for stage, types in sent.items():
        assert len(types) == 1 and types[0].shape[-1] == hidden and types[0].dtype == dtype, (stage, types)


def assert_input_only_nodes_on_their_readers_stage(graph) -> None:
    """Every input-only node shares a stage with each of its readers."""
    movable = _input_only_nodes(graph)
    for node in graph.nodes:
        if id(node) in movable:
            assert all(user.attrs["stage"] == node.attrs["stage"] for o in node.outputs for user in o.uses), node


@pytest.mark.parametrize("mesh, layers, extra", [
    ({"tp": 4, "pp": 2}, 2, {"params": MEGATRON_LAYOUT, "schedule": "1f1b"}),
    ({"dp": 1, "pp": 8}, 8, {"schedule": "1f1b"}),
], ids=["pp2-tp4-megatron", "pp8"])
def test_megatron_gpt_compiles_with_planner_cuts_and_microbatches(mesh, layers, extra):
    """benchmarks/megatron_gpt.py's GPT on the meta device (bf16, dropout on, unfused attention with its causal
    mask, the loss on float32 logits), cut by the planner at layer boundaries, 4 microbatches; compiles and
    simulates."""
    cfg = MegatronConfig(vocab_size=256, block_size=SEQ, n_layer=layers, n_head=4, n_embd=HIDDEN)
    tokens = torch.zeros(BATCH, SEQ, dtype=torch.long)
    plan = compile(meta_model(cfg), (tokens, tokens), cluster="dgx-a100:1",
                   strategy={"mesh": mesh, "microbatches": 4, **extra})
    info = plan.graph.attrs["pipeline"]
    assert info["stages"] == mesh["pp"] and info["microbatches"] == 4 and info["loss_split"] == "global_denominator"
    assert_only_the_residual_stream_crosses(plan.graph, mesh["pp"], HIDDEN, "bf16")
    assert_input_only_nodes_on_their_readers_stage(plan.graph)
    report = plan.simulate()
    assert report.step_time_s > 0 and set(report.peak_memory_bytes) == set(range(8))


LM_INPUTS = lm_inputs(batch=8, seq=8)


@pytest.mark.parametrize("make", [llama_model, gpt2_model], ids=["llama", "gpt2"])
def test_masks_and_rotary_tables_are_computed_per_stage_and_equal_eager(make):
    """A tiny transformers Llama (rotary tables, causal mask) and GPT-2 (causal mask) built once before the
    first layer: pp2 with 4 microbatches sends only the hidden state, and equals eager (loss, every gradient)."""
    model = make(n_layer=2)
    plan = compile_cached(model, LM_INPUTS, 2, {"mesh": {"pp": 2}, "microbatches": 4})
    assert_only_the_residual_stream_crosses(plan.graph, 2, 32)
    assert_input_only_nodes_on_their_readers_stage(plan.graph)
    copied = [n for n in plan.graph.nodes if n.attrs["stage"] == 1 and id(n) in _input_only_nodes(plan.graph)]
    assert copied, "the mask is computed again on stage 1"
    assert_close_to_eager(plan.run_virtual(*LM_INPUTS), model, LM_INPUTS)
