"""Low-precision models (bf16, fp16) compile under every strategy family and equal eager low-precision
PyTorch on the virtual mesh, within the bar of :func:`tests.models.assert_low_precision_close` (its
docstring says why that bar): the bundled GPT cast with ``.to(torch.bfloat16)`` (its loss computed in
bf16), transformers' GPT-2 and Llama from tiny configs, a BatchNorm CNN.
"""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn as nn

from ir.precision import accumulation_dtype, model_dtype
from tests.capture_cache import compile_cached
from tests.compiler.test_tensor_parallel import GPT_MEGATRON, LLAMA_MEGATRON, tp
from tests.launch import train_eager, train_emitted
from tests.models import (assert_low_precision_close, assert_low_precision_run_close, cnn_inputs,
                          gpt2_model, gpt_inputs, gpt_model, llama_model, lm_inputs,
                          low_precision_references, resnet_style_model, widened)
from tests.zoo import GPT2_TP


def strategies(params: dict) -> dict:
    """Every strategy family the fp32 suite covers: name -> (ranks, strategy)."""
    return {
        "dp2": (2, "dp"),
        "fsdp4": (4, "fsdp"),
        "tp2": (2, {"mesh": {"tp": 2}, "params": tp(params)}),
        "dp2_tp2": (4, {"mesh": {"dp": 2, "tp": 2}, "params": tp(params)}),
        "tp2_sp": (2, {"mesh": {"tp": 2}, "params": tp(params), "sequence_parallel": True}),
        "tp2_vocab": (2, {"mesh": {"tp": 2}, "params": tp(params), "vocab_parallel": True}),
        "pp2_1f1b": (2, {"mesh": {"pp": 2}, "microbatches": 4, "schedule": "1f1b"}),
        "pp2_gpipe": (2, {"mesh": {"pp": 2}, "microbatches": 4, "schedule": "gpipe"}),
        "pp2_interleaved": (2, {"mesh": {"pp": 2}, "microbatches": 4, "schedule": "interleaved"}),
        "dp2_recompute": (2, {"mesh": {"dp": 2}, "recompute": True}),
    }


MODELS = {"gpt": (gpt_model, gpt_inputs, GPT_MEGATRON), "gpt2": (gpt2_model, lm_inputs, GPT2_TP),
          "llama": (llama_model, lm_inputs, LLAMA_MEGATRON)}
QUICK = {("gpt", "bfloat16", s) for s in strategies({})} | {
    ("gpt", "float16", "dp2"), ("gpt", "float16", "tp2_vocab"), ("gpt2", "bfloat16", "dp2_tp2"),
    ("llama", "bfloat16", "tp2_vocab")}
"""Cases of the quick tier; the slow tier runs every model under every strategy."""
_BUILT: dict = {}


def built(model_name: str, dtype: str) -> tuple:
    """The model in ``dtype``, its inputs and eager references (built once per session)."""
    key = (model_name, dtype)
    if key not in _BUILT:
        make, inputs, _ = MODELS[model_name]
        model, x = make().to(getattr(torch, dtype)), inputs()
        _BUILT[key] = model, x, low_precision_references(model, x)
    return _BUILT[key]


def cases() -> list:
    out = []
    for model_name in MODELS:
        for dtype in ("bfloat16", "float16"):
            for strategy in strategies({}):
                quick = (model_name, dtype, strategy) in QUICK
                if quick or dtype == "bfloat16":
                    marks = [] if quick else [pytest.mark.slow]
                    out.append(pytest.param(model_name, dtype, strategy, marks=marks,
                                            id=f"{model_name}-{dtype}-{strategy}"))
    return out


@pytest.mark.parametrize("model_name, dtype, strategy_name", cases())
def test_low_precision_plan_equals_eager(model_name, dtype, strategy_name):
    model, x, references = built(model_name, dtype)
    ranks, strategy = strategies(MODELS[model_name][2])[strategy_name]
    plan = compile_cached(model, x, ranks, copy.deepcopy(strategy))
    result = plan.run_virtual(*x)
    assert_low_precision_run_close(result, model, x, references)


def test_bf16_loss_is_a_float32_mean_rounded_once():
    """The GPT's bf16 cross entropy becomes sum / count: the sum and the token count in float32 (the NLL
    kernel's accumulation), the division in float32, one rounding to the bf16 loss; the verifier's meta
    execution agreed with every declared type."""
    model, x = gpt_model().to(torch.bfloat16), gpt_inputs()
    ir = compile_cached(model, x, cluster=2, strategy="dp").ir
    assert re.search(r"%ce_sum_acc: f32\[\] .* = aten\._to_copy\.default\(%ce_sum, dtype=torch\.float32\)", ir)
    assert re.search(r"%count: f32\[\] .* = aten\.sum\.default\(%counted, dtype=torch\.float32\)", ir)
    assert re.search(r"%loss_acc: f32\[\] .* = aten\.div\.Tensor\(%ce_sum_acc, %count", ir)
    assert re.search(r"%loss: bf16\[\] .* = aten\._to_copy\.default\(%loss_acc, dtype=torch\.bfloat16\)", ir)


def test_vocab_parallel_bf16_loss_reduces_in_float32():
    """Vocabulary-parallel cross entropy of bf16 logits: the shifted logits and their exponentials stay
    bf16 (elementwise, as eager rounds them), the sum of exponentials across the vocabulary shards is
    float32 (log_softmax's accumulation), so its reduction across the shards runs in float32; the max
    all-reduce is bf16 (exact in any dtype)."""
    strategy = {"mesh": {"tp": 2}, "params": tp(GPT_MEGATRON), "vocab_parallel": True}
    plan = compile_cached(gpt_model().to(torch.bfloat16), gpt_inputs(), cluster=2, strategy=strategy)
    types = {o.name: o.type.dtype for n in plan.graph.nodes for o in n.outputs}
    assert types["exp"] == "bf16" and types["sum_exp"] == "f32" and types["token_loss"] == "f32"
    reductions = {n.input_values()[0].name: (n.op, n.outputs[0].type.dtype) for n in plan.graph.nodes
                  if n.op in ("comm.all_reduce", "comm.reduce_scatter")}
    assert reductions["sum_exp"][1] == "f32" and reductions["logit_max"] == ("comm.all_reduce", "bf16")


def test_bf16_batch_norm_statistics_in_float32_equal_eager():
    """Training BatchNorm of a bf16 CNN, written as sums over the batch shards in float32 (the statistics
    eager's fused kernel accumulates), equals eager bf16: loss, gradients and running statistics."""
    model = resnet_style_model().to(torch.bfloat16)
    x = tuple(t.to(torch.bfloat16) if t.is_floating_point() else t for t in cnn_inputs())
    references = low_precision_references(model, x)
    plan = compile_cached(model, x, cluster=2, strategy="dp")
    assert {n.outputs[0].type.dtype for n in plan.graph.nodes if n.attrs.get("batch_statistics")} == {"f32"}
    result = plan.run_virtual(*x)
    assert_low_precision_run_close(result, model, x, references)
    eager, exact = copy.deepcopy(model), widened(model, x)[0]
    eager(*x)
    exact(*widened(model, x)[1])
    for name, value in result.buffers.items():
        if value.is_floating_point():
            assert_low_precision_close(name, value, dict(eager.named_buffers())[name],
                                       dict(exact.named_buffers())[name])


def test_the_bar_rejects_a_gradient_five_percent_off():
    """Eager bf16 gradients of the GPT land 0.5-1% from float32; the bar (2x that plus one rounding) accepts
    eager itself and rejects a gradient scaled by 1.05 (a plan error is usually far larger: a missing
    partial sum halves a gradient)."""
    model, x, (eager, exact) = built("gpt", "bfloat16")
    for name in ("blocks.0.mlp.fc.weight", "tok_emb.weight", "ln_f.bias"):
        assert_low_precision_close(name, eager[1][name], eager[1][name], exact[1][name])
        with pytest.raises(AssertionError, match=name):
            assert_low_precision_close(name, eager[1][name] * 1.05, eager[1][name], exact[1][name])


def test_a_mixed_dtype_model_buckets_gradients_per_dtype():
    """A bf16 GPT whose LayerNorms stay float32 (a common recipe): the norms run on mixed inputs as eager's
    kernels do, each gradient bucket holds one dtype, and the plan equals eager."""
    model, x = gpt_model().to(torch.bfloat16), gpt_inputs()
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.float()
    references = low_precision_references(model, x)
    plan = compile_cached(model, x, cluster=2, strategy="dp")
    for bucket in plan.graph.attrs["grad_buckets"]:
        assert len({p.type.dtype for p in bucket["params"]}) == 1
    assert {p.type.dtype for b in plan.graph.attrs["grad_buckets"] for p in b["params"]} == {"bf16", "f32"}
    assert_low_precision_run_close(plan.run_virtual(*x), model, x, references)


def test_accumulation_dtypes_follow_eager():
    """Sums of bf16 values accumulate in float32 in eager (a bf16 running sum would stop at 256: 256 + 1
    rounds back to 256), and ``accumulation_dtype`` says so; elementwise ops keep their dtype."""
    assert torch.ones(4096, dtype=torch.bfloat16).sum().item() == 4096
    assert torch.ones(4096, dtype=torch.bfloat16).mean().item() == 1
    assert accumulation_dtype("aten.sum.dim_IntList", "bf16") == "f32"
    assert accumulation_dtype("aten.cross_entropy_loss.default", "f16") == "f32"
    assert accumulation_dtype("aten.sum.default", "f32") == "f32"
    assert accumulation_dtype("aten.exp.default", "bf16") == "bf16"
    assert model_dtype(compile_cached(gpt_model().to(torch.bfloat16), gpt_inputs(), cluster=1,
                               strategy="dp").graph) == "bf16"


BF16_ADAMW = (torch.optim.AdamW, {"lr": 1e-2, "eps": 1e-6})
"""lr 1e-2: each step moves a weight by ~1e-2, dozens of bf16 ulps of the GPT's ~0.02 weights, so the
updates (not their rounding) are what the steps compare."""


@pytest.mark.multiproc
def test_emitted_bf16_dp2_tp2_trains_three_adamw_steps_like_eager(tmp_path):
    """A pure bf16 GPT (parameters, gradients, AdamW state and gloo's collectives all bf16, as eager keeps
    them for a bf16 model) trains 3 steps under torchrun: each step's loss and every parameter's update
    (final - initial) within the low-precision bar of eager bf16 training against float32 training of
    the same weights; ``--save`` writes bf16 weights, as the model has them."""
    data = [gpt_inputs(seed=10 + i) for i in range(3)]
    model = gpt_model().to(torch.bfloat16)
    plan = compile_cached(model, data[0], cluster=4, optimizer=BF16_ADAMW,
                   strategy={"mesh": {"dp": 2, "tp": 2}, "params": tp(GPT_MEGATRON)})
    losses, saved = train_emitted(plan, tmp_path, data, steps=3)
    first = json.loads((tmp_path / "losses.jsonl").read_text().splitlines()[0])  # --metrics reports the precision
    assert (first["param_dtypes"], first["grad_dtypes"], first["optimizer_state_dtypes"]) == (["bfloat16"],) * 3
    eager = copy.deepcopy(model)
    eager_losses = train_eager(eager, data, 3, BF16_ADAMW)
    exact = widened(model, ())[0]
    exact_losses = train_eager(exact, data, 3, BF16_ADAMW)
    for step, (loss, eager_loss, exact_loss) in enumerate(zip(losses, eager_losses, exact_losses)):
        assert_low_precision_close(f"step {step} loss", *map(torch.tensor, (loss, eager_loss, exact_loss)),
                                   low=torch.bfloat16)
    initial, trained, reference = model.state_dict(), eager.state_dict(), exact.state_dict()
    assert {k: v.dtype for k, v in saved.items()} == {k: v.dtype for k, v in initial.items()}
    for name, start in initial.items():
        if start.is_floating_point():
            assert_low_precision_close(f"{name} update", saved[name].double() - start.double(),
                                       trained[name].double() - start.double(),
                                       reference[name].double() - start.double(), low=torch.bfloat16)
