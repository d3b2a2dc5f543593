"""Pipelined plans on the virtual mesh: every schedule equals eager full-batch training.

Loss and every gradient (the tied embedding / LM head included) at fp32 rtol 1e-5, atol 1e-6.
SkipPipe plans equal an eager reference that runs each microbatch through its own path of stages.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from backends.virtual import VirtualRunError, run_virtual
from ir.parser import parse
from ir.verifier import VerificationError, verify
from passes.manager import PassFailed
from passes.pipeline import apply_paths
from ir.ops.pipeline_ops import schedule_actions
from ir.schedules import stage_positions
from tests.capture_cache import compile_cached
from tests.models import (assert_close_to_eager, bn_cnn_model, cnn_inputs, gpt2_model, gpt_inputs,
                          gpt_model, llama_model, lm_inputs)

GPT = gpt_model(n_layer=4)
GPT_INPUTS = gpt_inputs(batch=8, seq=8)
GPT2 = gpt2_model(n_layer=4)
GPT2_INPUTS = lm_inputs(batch=8, seq=8)
MODELS = {"gpt": (GPT, GPT_INPUTS), "gpt2": (GPT2, GPT2_INPUTS)}
FOUR_STAGES = ["blocks.1", "blocks.2", "blocks.3"]
MEGATRON = {"blocks.*.attn.qkv.weight": {"tp": "S(0)"}, "blocks.*.attn.qkv.bias": {"tp": "S(0)"},
            "blocks.*.attn.proj.weight": {"tp": "S(1)"}, "blocks.*.mlp.fc.weight": {"tp": "S(0)"},
            "blocks.*.mlp.fc.bias": {"tp": "S(0)"}, "blocks.*.mlp.proj.weight": {"tp": "S(1)"}}


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved"])
@pytest.mark.parametrize("microbatches", [4, 8])
@pytest.mark.parametrize("positions", [2, 4])
@pytest.mark.parametrize("name", list(MODELS))
def test_pipeline_equals_eager_full_batch(name, positions, microbatches, schedule):
    model, inputs = MODELS[name]
    strategy = {"mesh": {"pp": positions}, "microbatches": microbatches, "schedule": schedule}
    plan = compile_cached(model, inputs, positions, strategy)
    assert plan.graph.attrs["pipeline"]["stages"] == positions * (2 if schedule == "interleaved" else 1)
    assert_close_to_eager(plan.run_virtual(*inputs), model, inputs)


LLAMA = llama_model(n_layer=4)
ZERO_BUBBLE_MODELS = {"gpt": (GPT, GPT_INPUTS), "llama": (LLAMA, GPT2_INPUTS)}


@pytest.mark.parametrize("schedule", ["zb-h1", "zbv", "dualpipev"])
@pytest.mark.parametrize("positions", [2, 4])
@pytest.mark.parametrize("name", list(ZERO_BUBBLE_MODELS))
def test_zero_bubble_pipelines_equal_eager_full_batch(name, positions, schedule):
    """Split backwards (B, then W later on the same rank) give eager's loss and every gradient; the V shapes
    put two stages on each of the pp positions (8 stages on 4 ranks), the first and the last on rank 0."""
    model, inputs = ZERO_BUBBLE_MODELS[name]
    strategy = {"mesh": {"pp": positions}, "microbatches": 8, "schedule": schedule}
    plan = compile_cached(model, inputs, positions, strategy)
    stages = plan.graph.attrs["pipeline"]["stages"]
    assert plan.graph.attrs["pipeline"]["positions"] == stage_positions(schedule, positions, stages)
    kinds = {a.kind for actions in schedule_actions(plan.graph).values() for a in actions}
    assert {"B", "W"} <= kinds and f"W0@s{stages - 1}" in plan.ir  # the dump shows the split
    assert_close_to_eager(plan.run_virtual(*inputs), model, inputs)


@pytest.mark.parametrize("mesh, params", [({"pp": 2, "tp": 2}, MEGATRON), ({"pp": 2, "dp": 2}, {})],
                         ids=["pp2xtp2", "pp2xdp2"])
def test_pipeline_stages_on_sub_meshes_equal_eager(mesh, params):
    strategy = {"mesh": mesh, "params": params, "stages": ["blocks.2"], "microbatches": 4, "schedule": "1f1b"}
    plan = compile_cached(GPT, GPT_INPUTS, 4, strategy)
    assert_close_to_eager(plan.run_virtual(*GPT_INPUTS), GPT, GPT_INPUTS)


def test_split_backward_on_tensor_parallel_stages_equals_eager():
    """W on stages whose weights are split over tp (their B all-reduces the input gradient)."""
    strategy = {"mesh": {"pp": 2, "tp": 2}, "params": MEGATRON, "microbatches": 4, "schedule": "zbv"}
    plan = compile_cached(GPT, GPT_INPUTS, 4, strategy)
    assert_close_to_eager(plan.run_virtual(*GPT_INPUTS), GPT, GPT_INPUTS)


def test_the_parsed_dump_runs_like_the_plan():
    plan = compile_cached(GPT2, GPT2_INPUTS, 2, {"mesh": {"pp": 2}, "microbatches": 4, "schedule": "gpipe"})
    again = run_virtual(parse(plan.ir), plan.weights, GPT2_INPUTS)
    assert_close_to_eager(again, GPT2, GPT2_INPUTS)


def test_the_batch_must_split_into_the_microbatches():
    plan = compile_cached(GPT, GPT_INPUTS, 2, {"mesh": {"pp": 2}, "microbatches": 3})
    with pytest.raises(VirtualRunError, match=r"the batch \(8\) does not split into 3 microbatches"):
        plan.run_virtual(*GPT_INPUTS)


# -- losses that are not sum / count ----------------------------------------------------------------

class MeanSquaredMLP(nn.Module):
    """Two linear layers; the loss is a mean (``mse_loss``) or a sum over the batch."""

    def __init__(self, reduction: str):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(8, 16), nn.Linear(16, 4)])
        self.reduction = reduction

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.layers[1](torch.tanh(self.layers[0](x)))
        if self.reduction == "mean":
            return F.mse_loss(out, y)
        if self.reduction == "smoothed":
            return F.cross_entropy(out, y.argmax(1), label_smoothing=0.1) * 2.0
        return (out - y).pow(2).sum() / 4.0


@pytest.mark.parametrize("reduction, split", [("mean", "mean"), ("sum", "sum")])
def test_mean_and_sum_losses_accumulate_to_the_full_batch(reduction, split):
    model = MeanSquaredMLP(reduction)
    g = torch.Generator().manual_seed(3)
    inputs = (torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g))
    plan = compile_cached(model, inputs, 2, {"mesh": {"pp": 2}, "stages": ["layers.1"], "microbatches": 4})
    assert plan.graph.attrs["pipeline"]["loss_split"] == split
    assert_close_to_eager(plan.run_virtual(*inputs), model, inputs)


def test_a_mean_over_counted_targets_is_not_split_silently():
    model = MeanSquaredMLP("smoothed")
    inputs = (torch.randn(8, 8), torch.randn(8, 4))
    with pytest.raises(PassFailed, match="averages over its counted targets"):
        compile_cached(model, inputs, 2, {"mesh": {"pp": 2}, "stages": ["layers.1"], "microbatches": 4})



class ShiftedLabelsLM(nn.Module):
    """Reads its labels first, shifted right into decoder inputs (as transformers' T5 and Whisper do),
    and last, in a mean cross entropy over the labels that are not ignored."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 16)])

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shifted = torch.cat([torch.zeros_like(labels[:, :1]), labels[:, :-1]], 1).clamp(min=0)
        h = self.layers[1](torch.tanh(self.layers[0](self.embed(shifted) + x)))
        return F.cross_entropy(h.flatten(0, 1), labels.flatten(), ignore_index=-100)


@pytest.mark.parametrize("mesh", [{"pp": 2}, {"pp": 2, "dp": 2}])
def test_labels_read_on_the_first_stage_are_counted_whole_on_the_last(mesh):
    model = ShiftedLabelsLM()
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 16, (8, 6), generator=g)
    labels[:3, :4] = -100  # microbatches count different numbers of targets
    inputs = (torch.randn(8, 6, 8, generator=g), labels)
    world = 2 * mesh.get("dp", 1)
    plan = compile_cached(model, inputs, world, {"mesh": mesh, "stages": ["layers.1"], "microbatches": 2})
    graph = plan.graph
    assert graph.attrs["pipeline"]["loss_split"] == "global_denominator"
    labels_value = graph.inputs[1]
    assert labels_value.mesh == "stage0"  # where the shift reads it; relayed to the loss on stage 1
    whole = [n for n in graph.nodes if n.attrs.get("whole_batch")]
    assert whole and {n.attrs["stage"] for n in whole} == {1}
    reader = next(n for n in whole if labels_value in n.input_values())  # the whole batch, not the relayed one
    assert_close_to_eager(plan.run_virtual(*inputs), model, inputs)
    # only whole-batch nodes may read an input on another stage
    del reader.attrs["whole_batch"]
    with pytest.raises(VerificationError, match=rf"node %{reader.name} .* mixes placements \['stage0', 'stage1'\] "
                                                r"\(%labels\); insert a transfer"):
        verify(graph)


def test_batch_statistics_refuse_microbatches_and_run_whole():
    """A training BatchNorm normalises with statistics of the whole batch: microbatches would each use
    their own (silently not the full-batch step), so they are refused; one microbatch equals eager."""
    model, inputs = bn_cnn_model(), cnn_inputs()
    with pytest.raises(PassFailed, match=r"cannot split the batch into 2 microbatches: aten.sum.dim_IntList "
                                         r"\(%bn_sum, module bn\) normalises with statistics of the whole batch"):
        compile_cached(model, inputs, 2, {"mesh": {"pp": 2}, "stages": ["head"], "microbatches": 2})
    plan = compile_cached(model, inputs, 2, {"mesh": {"pp": 2}, "stages": ["head"], "microbatches": 1})
    assert_close_to_eager(plan.run_virtual(*inputs), bn_cnn_model(), inputs)

# -- SkipPipe ----------------------------------------------------------------------------------------

def skip_path_loss(model, inputs: tuple, paths: list[list[int]]) -> torch.Tensor:
    """Eager SkipPipe for the 4-layer GPT cut into one block per stage: microbatch m runs the blocks
    of ``paths[m]`` in that order (skipped stages pass the residual stream through); the loss sums
    each microbatch's cross-entropy sum over the token count of the whole batch."""
    idx, targets = inputs
    total = torch.zeros(())
    for path, ids, wanted in zip(paths, idx.chunk(len(paths)), targets.chunk(len(paths))):
        x = model.tok_emb(ids) + model.pos_emb(torch.arange(ids.shape[1]))
        for stage in path:
            x = model.blocks[stage](x)
        logits = model.lm_head(model.ln_f(x))
        total = total + F.cross_entropy(logits.flatten(0, 1), wanted.flatten(), reduction="sum")
    return total / targets.numel()


def skip_reference(model, inputs: tuple, paths: list[list[int]], train: bool = True):
    """The loss of :func:`skip_path_loss` and (train) every parameter's gradient."""
    model.zero_grad()
    loss = skip_path_loss(model, inputs, paths)
    if not train:
        return loss.detach(), {}
    loss.backward()
    return loss.detach(), {n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                           for n, p in model.named_parameters()}  # stages no path visits get no gradient


def assert_equals_reference(result, reference) -> None:
    loss, grads = reference
    torch.testing.assert_close(result.loss, loss, rtol=1e-5, atol=1e-6)
    assert set(result.grads) == set(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(result.grads[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def skip_plan(ratio: float, **extra):
    strategy = {"mesh": {"pp": 4}, "stages": FOUR_STAGES, "microbatches": 8, "skip_ratio": ratio, **extra}
    return compile_cached(GPT, GPT_INPUTS, 4, strategy)


def test_skip_ratio_zero_gives_exactly_the_plain_pipeline():
    plain = compile_cached(GPT, GPT_INPUTS, 4, {"mesh": {"pp": 4}, "stages": FOUR_STAGES, "microbatches": 8})
    skipping = skip_plan(0.0).run_virtual(*GPT_INPUTS)
    expected = plain.run_virtual(*GPT_INPUTS)
    assert torch.equal(skipping.loss, expected.loss)
    assert all(torch.equal(skipping.grads[n], g) for n, g in expected.grads.items())


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_skipping_equals_the_path_reference(ratio):
    plan = skip_plan(ratio)
    paths = plan.graph.attrs["paths"]
    assert any(len(p) < 4 for p in paths)
    assert_equals_reference(plan.run_virtual(*GPT_INPUTS), skip_reference(GPT, GPT_INPUTS, paths))


def test_reordered_paths_equal_the_path_reference():
    plan = skip_plan(0.25, schedule="gpipe")
    paths = [[0, 2, 1, 3], [0, 1, 3], [0, 2, 3], [0, 1, 2, 3], [0, 3], [0, 2, 1, 3], [0, 1, 3], [0, 2, 3]]
    apply_paths(plan.graph, paths)
    assert_equals_reference(plan.run_virtual(*GPT_INPUTS), skip_reference(GPT, GPT_INPUTS, paths))


def test_inference_through_a_subset_of_stages():
    plan = skip_plan(0.25)
    (loss,) = plan.run_virtual(*GPT_INPUTS, mode="infer", stages=[0, 2, 3]).outputs
    expected, _ = skip_reference(GPT, GPT_INPUTS, [[0, 2, 3]] * 8, train=False)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    (full,) = plan.run_virtual(*GPT_INPUTS, mode="infer", stages=[0, 1, 2, 3]).outputs
    torch.testing.assert_close(full, GPT(*GPT_INPUTS).detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(VirtualRunError, match="expected distinct stages from 0 to 3"):
        plan.run_virtual(*GPT_INPUTS, mode="infer", stages=[1, 3])
