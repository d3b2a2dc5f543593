"""Mixed precision as part of the plan (``precision bf16-mixed``: fp32 parameters and optimizer state,
bf16 compute, gradients reduced in the ``reduce`` dtype): the casts torch.autocast makes are in the IR,
every gradient reduction follows the reduce dtype (checked by the verifier), and the virtual mesh and
emitted programs equal eager ``torch.autocast`` training within the low-precision bar of
:func:`tests.models.assert_low_precision_close` (its docstring says why that bar: the plan and eager
autocast round the same ops to bf16 and differ in the order, and the dtype, of split sums).
"""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from backends.runtime.loss_scaling import DynamicLossScaler
from cluster import Cluster as ClusterModel
from cluster.builtins import local_spec
from frontend.dsl import PlanError, parse_plan
from ir.ops.comm import sums_partials
from ir.sbp import Split
from ir.verifier import VerificationError, verify
from passes.grad_sync import gradient_reductions
from strategy import normalize
from tests.capture_cache import compile_cached
from tests.compiler.test_tensor_parallel import GPT_MEGATRON, LLAMA_MEGATRON, tp
from backends.virtual import run_virtual
from tests.backends.test_emitted_program import _free_port as free_port
from tests.launch import import_program, train_eager, train_emitted, train_virtual
from tests.models import (assert_low_precision_close, assert_low_precision_run_close, eager_loss_and_grads,
                          gpt_inputs, gpt_model, llama_model, lm_inputs)

MIXED = {"param": "fp32", "compute": "bf16", "reduce": "fp32"}


def autocast_loss_and_grads(model, inputs, dtype=torch.bfloat16) -> tuple:
    """Eager mixed precision: the forward under ``torch.autocast``, fp32 parameters and gradients."""
    model = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=dtype):
        loss = model(*inputs)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_equals_autocast(result, model, inputs) -> None:
    """Loss and every gradient (fp32, as autocast's) within the bar of eager autocast against fp32."""
    (loss, grads), (exact_loss, exact_grads) = autocast_loss_and_grads(model, inputs), eager_loss_and_grads(model, inputs)
    assert set(result.grads) == set(grads)
    assert_low_precision_close("loss", result.loss, loss, exact_loss, torch.bfloat16)
    for name, g in grads.items():
        assert result.grads[name].dtype == torch.float32, name  # master weights: fp32 gradients
        assert_low_precision_close(name, result.grads[name], g, exact_grads[name], torch.bfloat16)


def gpt_strategies() -> dict:
    return {"dp2": (2, {"mesh": {"dp": 2}}), "fsdp2": (2, {"mesh": {"dp": 2}, "fsdp": "dp"}),
            "tp2": (2, {"mesh": {"tp": 2}, "params": tp(GPT_MEGATRON)}),
            "dp2_tp2": (4, {"mesh": {"dp": 2, "tp": 2}, "params": tp(GPT_MEGATRON)}),
            "tp2_sp": (2, {"mesh": {"tp": 2}, "params": tp(GPT_MEGATRON), "sequence_parallel": True}),
            "pp2_1f1b": (2, {"mesh": {"pp": 2}, "microbatches": 2, "schedule": "1f1b"}),
            "dp2_recompute": (2, {"mesh": {"dp": 2}, "recompute": True})}


@pytest.mark.parametrize("name", list(gpt_strategies()))
def test_bf16_mixed_gpt_equals_eager_autocast(name):
    ranks, strategy = gpt_strategies()[name]
    model, x = gpt_model(), gpt_inputs()
    plan = compile_cached(model, x, cluster=ranks, strategy={**strategy, "precision": "bf16-mixed"})
    assert_equals_autocast(plan.run_virtual(*x), model, x)


def test_bf16_mixed_llama_dp2_tp2_equals_eager_autocast():
    model, x = llama_model(), lm_inputs()
    strategy = {"mesh": {"dp": 2, "tp": 2}, "params": tp(LLAMA_MEGATRON), "precision": "bf16-mixed"}
    plan = compile_cached(model, x, cluster=4, strategy=strategy)
    assert_equals_autocast(plan.run_virtual(*x), model, x)


def test_casts_are_in_the_ir_sharded_as_their_inputs():
    """Each linear reads its input, weight and bias through a bf16 cast of its module, laid out as the
    value it casts (a column-parallel weight's cast is S(0) on tp); the loss reads its logits cast to fp32;
    parameters stay fp32."""
    plan = compile_cached(gpt_model(), gpt_inputs(), cluster=2,
                   strategy={"mesh": {"tp": 2}, "params": tp(GPT_MEGATRON), "precision": "bf16-mixed"})
    ir = plan.ir
    assert re.search(r"%blocks\.0\.mlp\.fc\.weight_bf16: bf16\[256, 64\] \(S\(0\)\) @world = "
                     r"aten\._to_copy\.default\(%blocks\.0\.mlp\.fc\.weight, dtype=torch\.bfloat16\) "
                     r"\{module = \"blocks\.0\.mlp\.fc\"\}", ir)
    assert re.search(r"%linear_2: bf16\[batch, seq, 256\] .* = aten\.linear\.default\(%layer_norm_1_bf16, "
                     r"%blocks\.0\.mlp\.fc\.weight_bf16, %blocks\.0\.mlp\.fc\.bias_bf16\)", ir)
    assert re.search(r"%view_2_f32: f32\[`batch\*seq`, 512\] .* = aten\._to_copy\.default\(%view_2, "
                     r"dtype=torch\.float32\)", ir)
    assert {p.type.dtype for p in plan.graph.params} == {"f32"}
    assert 'attr precision = {param = "f32", compute = "bf16", reduce = "f32"}' in ir


def test_fsdp_bf16_mixed_gathers_bf16_cast_on_the_shard(tmp_path):
    """FSDP over dp2 under bf16-mixed gathers what autocast computes in bf16 as bf16 (half the bytes, as
    fully_shard with param_dtype=bf16): the cast runs on the fp32 shard, before the gather, in the IR and in the
    emitted program (one comm_gather_param call casts and gathers). Of the 2-layer GPT's 29 gathers, the 8
    matrices and vectors of the linear layers of each block and the tied head's weight gather bf16 (17); layer
    norms and embeddings, which run in fp32, gather fp32 (12). Parameters stay fp32 (master weights)."""
    plan = compile_cached(gpt_model(), gpt_inputs(), cluster=2,
                   strategy={"mesh": {"dp": 2}, "fsdp": "dp", "precision": "bf16-mixed"})
    gathers = [n for n in plan.graph.nodes if n.op == "comm.all_gather" and n.kwargs["axis"] == "dp"]
    dtypes = [n.outputs[0].type.dtype for n in gathers]
    assert (dtypes.count("bf16"), dtypes.count("f32")) == (17, 12)
    for gather in gathers:
        source = gather.input_values()[0]
        if gather.outputs[0].type.dtype == "bf16":  # a cast of the parameter's shard, before the gather
            assert source.producer.op == "aten._to_copy.default" and source.sbp == (Split(0),), source
            assert source.producer.input_values()[0].kind == "param"
        else:
            assert source.kind == "param" and source.type.dtype == "f32"
    assert {p.type.dtype for p in plan.graph.params} == {"f32"}
    assert re.search(r"%blocks\.0\.mlp\.fc\.weight_bf16: bf16\[256, 64\] \(S\(0\)\) @world = aten\._to_copy\.default\("
                     r"%blocks\.0\.mlp\.fc\.weight, dtype=torch\.bfloat16\)", plan.ir)
    main = plan.emit(tmp_path).read_text()
    assert main.count("dtype=torch.bfloat16, grad_dtype=torch.float32)") == 17
    assert "    blocks_0_mlp_fc_weight_bf16 = comm_gather_param(p['blocks.0.mlp.fc.weight'], axis='dp', dim=0, " \
           "dtype=torch.bfloat16, grad_dtype=torch.float32)  # (B)" in main
    assert "_to_copy.default(p[" not in main  # the cast is part of the gather


@pytest.mark.parametrize("reduce, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_every_gradient_reduction_runs_in_the_reduce_dtype(reduce, dtype):
    """dp2 x tp2 bf16-mixed, and the same with FSDP over dp: every gradient bucket, every tensor-parallel
    all-reduce's adjoint and every FSDP all-gather's adjoint reduce-scatter is marked with the reduce
    dtype, and the counts are what the plan needs (4 tp adjoints in the 2-layer GPT; FSDP: a
    gather, so a reduce-scatter, for each of the 12 matrices and vectors of each of the 2 blocks at least)."""
    base = {"mesh": {"dp": 2, "tp": 2}, "params": tp(GPT_MEGATRON), "precision": {**MIXED, "reduce": reduce}}
    for strategy in (base, {**base, "fsdp": "dp"}):
        plan = compile_cached(gpt_model(), gpt_inputs(), cluster=4, strategy=strategy)
        reductions = gradient_reductions(plan.graph)
        ops = [(n.op, n.kwargs["axis"]) for n in reductions]
        assert ops.count(("comm.all_reduce", "tp")) == 4
        gathers = ops.count(("comm.all_gather", "dp"))  # FSDP's parameter gathers: reduce-scatters in backward
        assert gathers >= 2 * 12 if "fsdp" in strategy else gathers == 0
        assert {n.kwargs["grad_dtype"] for n in reductions} == {dtype}
        short = {torch.float32: "f32", torch.bfloat16: "bf16"}[dtype]
        assert [b["reduce_dtype"] for b in plan.graph.attrs["grad_buckets"]] == [short] * len(plan.graph.attrs["grad_buckets"])
        assert plan.ir.count(f"grad_dtype={dtype}") == len(reductions)
        assert {entry["dtype"] for entry in plan.graph.attrs["backward_comm"]} == {short}


def test_bf16_reduce_runs_the_adjoints_in_bf16_and_stays_close():
    """With reduce bf16 the plan still equals eager autocast within the bar (each sum rounded once more)."""
    model, x = gpt_model(), gpt_inputs()
    strategy = {"mesh": {"dp": 2, "tp": 2}, "params": tp(GPT_MEGATRON), "precision": {**MIXED, "reduce": "bf16"}}
    plan = compile_cached(model, x, cluster=4, strategy=strategy)
    assert_equals_autocast(plan.run_virtual(*x), model, x)


def test_the_verifier_rejects_a_reduction_off_the_contract():
    plan = compile_cached(gpt_model(), gpt_inputs(), cluster=4,
                   strategy={"mesh": {"dp": 2, "tp": 2}, "params": tp(GPT_MEGATRON), "precision": "bf16-mixed"})
    graph = plan.graph
    node = gradient_reductions(graph)[0]
    node.kwargs["grad_dtype"] = torch.bfloat16
    with pytest.raises(VerificationError, match=rf"%{node.outputs[0].name}.*comm\.all_reduce over tp .* runs in "
                                                r"bf16, but the plan's precision reduces gradients in f32"):
        verify(graph)
    node.kwargs["grad_dtype"] = torch.float32
    graph.attrs["grad_buckets"][0].pop("reduce_dtype")
    with pytest.raises(VerificationError, match=r"gradient bucket 0 .* reduced in its gradients own dtype, but the "
                                                r"plan's precision reduces gradients in f32"):
        verify(graph)


def test_precision_in_the_plan_language_and_to_dsl():
    for text in ("mesh dp=2\nprecision bf16-mixed\n", "precision param=fp32, compute=bf16, reduce=bf16\n"):
        assert str(parse_plan(text).precision) in text
    plan = compile_cached(gpt_model(), gpt_inputs(), cluster=2,
                   strategy=parse_plan("mesh dp=2\nprecision bf16-mixed\n"))
    assert "precision bf16-mixed" in plan.to_dsl()
    assert normalize({"precision": {"param": "fp32", "compute": "bf16"}}).precision == normalize(
        {"precision": "bf16-mixed"}).precision


@pytest.mark.parametrize("bad, message", [
    ("precision bf16-mix\n", r"1:11: error: unknown precision 'bf16-mix' \(did you mean 'bf16-mixed'.*expected "
                             r"one of: fp32, bf16, fp16, bf16-mixed, fp16-mixed"),
    ("precision compute=fp8\n", r"1:19: error: precision compute is one of fp32, bf16, fp16, found 'fp8'"),
    ("precision reduc=fp32\n", r"unknown precision key 'reduc' \(did you mean 'reduce'\?\); the keys are: param, "
                               r"compute, reduce"),
])
def test_bad_precision_is_one_clear_error(bad, message):
    with pytest.raises(PlanError, match=message):
        parse_plan(bad)


def test_a_compute_dtype_the_cluster_lacks_is_refused():
    """V100s list no bf16 peak: bf16 compute there is one error naming the key and the dtypes they list; a
    param dtype other than the model's, and a cluster of CPU ranks and GPUs, likewise."""
    spec = local_spec(2)
    spec["nodes"][0]["device"] = "v100-32gb"
    with pytest.raises(Exception, match=r"strategy\['precision'\]\['compute'\]: compute dtype bf16 is not one the "
                                        r"cluster's v100-32gb devices list .*expected one of: fp32, fp16"):
        compile_cached(gpt_model(), gpt_inputs(), cluster=ClusterModel.from_dict(spec),
                strategy={"mesh": {"dp": 2}, "precision": "bf16-mixed"})
    with pytest.raises(Exception, match=r"strategy\['precision'\]\['param'\]: precision param is bf16, but the "
                                        r"model's parameters are fp32; cast the model \(model\.to\(torch\.bfloat16\)\) or "
                                        r"write param=fp32"):
        compile_cached(gpt_model(), gpt_inputs(), cluster=2, strategy={"precision": "bf16"})
    spec = local_spec(1)  # a CPU rank and a GPU: their autocast lists differ
    spec["nodes"].append({**copy.deepcopy(spec["nodes"][0]), "name": "gpu", "device": "a100-80gb"})
    with pytest.raises(Exception, match=r"strategy\['precision'\]\['compute'\]: the cluster mixes CPU ranks with "
                                        r"a100-80gb devices, whose autocast casts differ"):
        compile_cached(gpt_model(), gpt_inputs(), cluster=ClusterModel.from_dict(spec),
                strategy={"mesh": {"dp": 2}, "precision": "bf16-mixed"})


def test_the_simulator_prices_the_plans_precision():
    """A bf16-mixed plan is priced at the bf16 peak, bf16 activations at 2 bytes, fp32 master weights,
    gradients and AdamW state: 16 bytes per parameter."""
    model = gpt_model()
    elements = sum(p.numel() for p in model.parameters())
    plan = compile_cached(model, gpt_inputs(), cluster=2, strategy={"mesh": {"dp": 2}, "precision": "bf16-mixed"})
    fp32 = compile_cached(model, gpt_inputs(), cluster=2, strategy={"mesh": {"dp": 2}})
    mixed, plain = plan.simulate(optimizer="adamw"), fp32.simulate(optimizer="adamw")
    memory = mixed.estimate.memory[0]
    assert float(memory.parameters + memory.gradients + memory.optimizer_state) == 16 * elements
    assert mixed.precision.startswith("bf16 compute") and plain.precision.startswith("fp32 compute")


BF16_MIXED_ADAMW = (torch.optim.AdamW, {"lr": 1e-2, "eps": 1e-6})


@pytest.mark.multiproc
def test_emitted_bf16_mixed_dp2_tp2_trains_five_adamw_steps_like_eager_autocast(tmp_path):
    """dp2 x tp2 bf16-mixed under torchrun (gloo), 5 AdamW steps, against eager torch.autocast training with
    fp32 master weights (and fp32 training of the same weights as the exact reference):

    - every loss and the trained weights equal the virtual mesh's bitwise (the same ops, the same sums in the
      same order: 2-rank all-reduces, dp then tp, and one intra-op thread on both sides, as CPU layer_norm's
      backward adds its weight and bias gradients up in one partial sum per thread);
    - each step's loss is within the low-precision bar of eager autocast's;
    - the updates (final - initial weights, all parameters as one vector) are within the bar: per tensor
      the bar does not hold after several Adam steps, as Adam divides each gradient element by its own
      running magnitude, so an element whose gradient is mostly rounding noise (an attention key bias,
      whose exact gradient is zero) moves by +-lr either way in any two bf16 computations; over all
      parameters such elements are few (measured: plan 0.35 from fp32, eager autocast 0.31);
    - ``--save`` writes fp32 weights (the parameter dtype), and they hold updates finer than bf16 can
      (master weights: most elements of each matrix are not bf16 numbers); ``--metrics`` reports fp32
      parameters, gradients and optimizer state.
    """
    data = [gpt_inputs(seed=20 + i) for i in range(5)]
    model = gpt_model()
    plan = compile_cached(model, data[0], cluster=4, optimizer=BF16_MIXED_ADAMW,
                   strategy={"mesh": {"dp": 2, "tp": 2}, "params": tp(GPT_MEGATRON), "precision": "bf16-mixed"})
    losses, saved = train_emitted(plan, tmp_path, data, steps=5)
    first = json.loads((tmp_path / "losses.jsonl").read_text().splitlines()[0])  # --metrics reports the precision
    assert (first["param_dtypes"], first["grad_dtypes"], first["optimizer_state_dtypes"]) == (["float32"],) * 3
    assert torch.get_num_threads() == 1  # as every torchrun rank (OMP_NUM_THREADS=1; tests/conftest.py)
    virtual_losses, virtual_trained = train_virtual(plan, data, 5, BF16_MIXED_ADAMW)
    assert losses == virtual_losses
    assert [n for n, value in virtual_trained.items() if not torch.equal(saved[n], value)] == []
    eager, exact = copy.deepcopy(model), copy.deepcopy(model)
    eager_losses = train_eager(eager, data, 5, BF16_MIXED_ADAMW, autocast=torch.bfloat16)
    exact_losses = train_eager(exact, data, 5, BF16_MIXED_ADAMW)
    for step, (loss, eager_loss, exact_loss) in enumerate(zip(losses, eager_losses, exact_losses)):
        assert_low_precision_close(f"step {step} loss", *map(torch.tensor, (loss, eager_loss, exact_loss)),
                                   low=torch.bfloat16)
    initial, trained, reference = model.state_dict(), eager.state_dict(), exact.state_dict()
    assert {k: v.dtype for k, v in saved.items()} == {k: torch.float32 for k in initial}
    flat = {name: torch.cat([d[k].reshape(-1).double() - initial[k].reshape(-1).double() for k in initial])
            for name, d in (("plan", saved), ("eager", trained), ("exact", reference))}
    assert_low_precision_close("all updates", flat["plan"], flat["eager"], flat["exact"], low=torch.bfloat16)
    for name in ("blocks.0.mlp.fc.weight", "blocks.1.attn.qkv.weight", "tok_emb.weight"):
        off_bf16 = (saved[name] != saved[name].bfloat16().float()).float().mean().item()
        assert off_bf16 > 0.9, f"{name}: only {off_bf16:.0%} of the elements are finer than bf16"


def test_a_pipeline_without_the_precision_pass_is_refused():
    """A strategy's precision is never silently dropped: a pass list that leaves out ``precision`` fails in
    grad_sync, naming the pass to add."""
    with pytest.raises(Exception, match=r"pass 'grad_sync' failed .*the strategy's precision bf16-mixed was not "
                                        r"applied: run the 'precision' pass first"):
        compile_cached(gpt_model(), gpt_inputs(), cluster=2, strategy={"precision": "bf16-mixed"},
                passes="decompose,layouts,propagate,boxing,grad_sync")


@pytest.mark.multiproc
def test_emitted_fsdp_bf16_reduce_equals_the_virtual_mesh_bitwise(tmp_path):
    """FSDP over dp2 with bf16 compute and bf16 gradient reduce-scatters: 2 AdamW steps under torchrun equal
    the virtual mesh's bitwise (2-rank sums: the same order; the same casts and reduce dtype)."""
    data = [gpt_inputs(seed=30 + i) for i in range(2)]
    plan = compile_cached(gpt_model(), data[0], cluster=2, optimizer=BF16_MIXED_ADAMW,
                   strategy={"mesh": {"dp": 2}, "fsdp": "dp", "precision": {**MIXED, "reduce": "bf16"}})
    losses, saved = train_emitted(plan, tmp_path, data, steps=2)
    virtual_losses, trained = train_virtual(plan, data, 2, BF16_MIXED_ADAMW)
    assert losses == virtual_losses
    for name, value in trained.items():
        assert torch.equal(saved[name], value), name


SCALER = {"init_scale": 2.0 ** 10, "growth_factor": 2.0 ** 60, "backoff_factor": 2.0 ** -60, "growth_interval": 2}
"""Two good steps at 2**10, then the scale grows to 2**70, at which fp16 backward overflows whatever the
weights (a gradient element of 1e-16 times 2**70 is past fp16's 65504): the third step is skipped on both
sides and the scale backs off to 2**10 again."""


def train_virtual_loss_scaled(plan, batches: list, optimizer: tuple) -> tuple[list, list, dict, dict]:
    """The virtual mesh with fp16 dynamic loss scaling, as an emitted program runs it: backward from the scaled
    loss, the synced gradients unscaled, the step skipped where one overflowed; the losses, the (scale, skipped)
    of each step, the first step's (unscaled) gradients, the trained parameters."""
    scaler, weights = DynamicLossScaler(**SCALER), {n: v.detach().clone() for n, v in plan.weights.items()}
    params, opt, losses, steps, first = {}, None, [], [], {}
    for batch in batches:
        result = plan.run_virtual(*batch, loss_scale=scaler.scale) if not params else run_virtual(
            plan.graph, {**weights, **{n: p.detach() for n, p in params.items()}}, batch, "train",
            loss_scale=scaler.scale)
        if opt is None:
            params = {n: torch.nn.Parameter(weights[n]) for n in result.grads}
            opt = optimizer[0](list(params.values()), **optimizer[1])
        for n, p in params.items():
            p.grad = result.grads[n].clone()
        skipped = bool(scaler.unscale(p.grad for p in params.values()))
        first = first or {n: p.grad.clone() for n, p in params.items()}
        if not skipped:
            opt.step()
        losses.append(result.loss.item())
        steps.append((float(scaler.scale), skipped))
        scaler.update(skipped)
    return losses, steps, first, {n: p.detach() for n, p in params.items()}


def train_eager_grad_scaler(model, batches: list, optimizer: tuple,
                            skip: set | None = None) -> tuple[list, list, dict]:
    """Eager ``torch.autocast(float16)`` + ``torch.amp.GradScaler`` training; the losses, the (scale, skipped) of
    each step and the first step's (unscaled) gradients. With ``skip``: float32 training without a scaler,
    skipping those steps (the exact reference)."""
    opt, scaler = optimizer[0](model.parameters(), **optimizer[1]), torch.amp.GradScaler("cpu", **SCALER)
    losses, steps, first = [], [], {}
    for step, batch in enumerate(batches):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16, enabled=skip is None):
            loss = model(*batch)
        losses.append(loss.item())
        if skip is not None:
            loss.backward()
            if step not in skip:
                opt.step()
        else:
            scaler.scale(loss).backward()
            scale = scaler.get_scale()
            scaler.step(opt)  # unscales the gradients in place first
            scaler.update()
            steps.append((scale, scaler.get_scale() < scale))
        first = first or {n: p.grad.clone() for n, p in model.named_parameters()}
    return losses, steps, first


def test_fp16_mixed_dp2_scales_its_loss_like_eager_grad_scaler():
    """fp16-mixed GPT under dp2 on the virtual mesh with dynamic loss scaling, 4 AdamW steps against eager
    autocast(fp16) + GradScaler with the same scaler settings (:data:`SCALER`): the same scales and the
    same skipped step (the third, an overflow), each loss and all updates within the low-precision bar of
    eager's (the exact reference: fp32 training without that step)."""
    data = [gpt_inputs(seed=40 + i) for i in range(4)]
    model = gpt_model()
    plan = compile_cached(model, data[0], cluster=2, strategy={"mesh": {"dp": 2}, "precision": "fp16-mixed"})
    losses, steps, grads, trained = train_virtual_loss_scaled(plan, data, BF16_MIXED_ADAMW)
    eager, exact = copy.deepcopy(model), copy.deepcopy(model)
    eager_losses, eager_steps, eager_grads = train_eager_grad_scaler(eager, data, BF16_MIXED_ADAMW)
    exact_losses, _, exact_grads = train_eager_grad_scaler(exact, data, BF16_MIXED_ADAMW, skip={2})
    assert steps == eager_steps == [(2.0 ** 10, False), (2.0 ** 10, False), (2.0 ** 70, True), (2.0 ** 10, False)]
    for step, values in enumerate(zip(losses, eager_losses, exact_losses)):
        assert_low_precision_close(f"step {step} loss", *map(torch.tensor, values), low=torch.float16)
    for name, grad in grads.items():  # unscaled: Adam's update alone would hardly show a missing unscale
        assert_low_precision_close(f"step 0 {name}", grad, eager_grads[name], exact_grads[name], low=torch.float16)
    initial, references = model.state_dict(), (eager.state_dict(), exact.state_dict())
    flat = [torch.cat([d[k].reshape(-1).double() - initial[k].reshape(-1).double() for k in trained])
            for d in (trained, *references)]
    assert_low_precision_close("all updates", *flat, low=torch.float16)


class LowPrecisionInputs(nn.Module):
    """layer_norm, softmax, exp and sum reached by bf16 values (a linear's output) under autocast: CPU autocast
    runs them in bf16, CUDA autocast in float32."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.ln, self.fc2 = nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8)

    def forward(self, x, y):
        h = self.ln(self.fc1(x))
        p = torch.softmax(self.fc2(h), dim=-1)
        return F.mse_loss(p * torch.exp(h).sum(-1, keepdim=True), y)


def test_the_casts_follow_the_autocast_lists_of_the_clusters_device_type():
    """On CPU ranks a bf16-mixed plan casts as torch.autocast("cpu"): layer_norm, softmax, exp and sum read the
    bf16 values they are given, and a one-rank plan's loss and every gradient equal eager CPU autocast's
    bitwise (the same ops on the same dtypes). The same model planned for GPUs casts as CUDA autocast:
    layer_norm and softmax read float32 casts of the linears' outputs, and exp and sum run in float32."""
    model, inputs = LowPrecisionInputs(), (torch.randn(8, 16), torch.randn(8, 8))
    plan = compile_cached(model, inputs, cluster=1, strategy={"mesh": {"dp": 1}, "precision": "bf16-mixed"})
    low = r"%(layer_norm|softmax|exp|sum_1): bf16\[batch, \d+\] .* = aten\.\w+\.\w+\(%(linear|linear_1|layer_norm|exp)[,)]"
    assert len(re.findall(low, plan.ir)) == 4, plan.ir
    result = plan.run_virtual(*inputs)
    loss, grads = autocast_loss_and_grads(model, inputs)
    assert torch.equal(result.loss, loss)
    assert [n for n, g in grads.items() if not torch.equal(result.grads[n], g)] == []
    spec = local_spec(2)
    spec["nodes"][0]["device"] = "a100-80gb"
    gpus = compile_cached(model, inputs, cluster=ClusterModel.from_dict(spec),
                   strategy={"mesh": {"dp": 2}, "precision": "bf16-mixed"})
    assert len(re.findall(r"%(layer_norm|softmax|exp|sum_1): f32\[batch, \d+\]", gpus.ir)) == 4, gpus.ir
    assert len(re.findall(r"aten\.(layer_norm|softmax)\.\w+\(%linear(_1)?_f32[,)]", gpus.ir)) == 2, gpus.ir


@pytest.mark.slow
def test_forward_reduce_sums_every_forward_partial_in_its_dtype(tmp_path):
    """``forward_reduce=fp32`` on a pure bf16 GPT: every forward sum of partials across ranks (tp2's all-reduces;
    with sequence parallelism its reduce-scatters) runs in fp32 (``reduce_dtype=``, in the IR and in the emitted
    program's collectives), the verifier rejects one that does not, the plan language round-trips it, and the
    virtual run stays within the low-precision bar of eager bf16. (On 2 ranks a bf16 sum rounds once either
    way; the dtype matters from 3 ranks on, where a bf16 all-reduce rounds after every addition.)"""
    model, x = gpt_model().to(torch.bfloat16), gpt_inputs()
    precision = {"param": "bf16", "compute": "bf16", "reduce": "bf16", "forward_reduce": "fp32"}
    plan = compile_cached(model, x, cluster=2,
                   strategy={"mesh": {"tp": 2}, "params": tp(GPT_MEGATRON), "precision": precision})
    assert_low_precision_run_close(plan.run_virtual(*x), model, x)
    sequence = compile_cached(model, x, cluster=2, strategy={
        "mesh": {"tp": 2}, "params": tp(GPT_MEGATRON), "sequence_parallel": True, "precision": precision})
    for compiled, op in ((plan, "all_reduce"), (sequence, "reduce_scatter")):
        sums = [n for n in compiled.graph.nodes if sums_partials(n)]
        assert len(sums) >= 4 and {n.op for n in sums} == {f"comm.{op}"}
        assert {n.kwargs["reduce_dtype"] for n in sums} == {torch.float32}
        assert compiled.ir.count("reduce_dtype=torch.float32") == len(sums)
    main = sequence.emit(tmp_path).read_text()
    assert main.count("comm_reduce_scatter(") == main.count("reduce_dtype=torch.float32)") >= 4
    assert "precision param=bf16, compute=bf16, reduce=bf16, forward_reduce=fp32" in plan.to_dsl()
    assert parse_plan(plan.to_dsl()).precision == normalize({"precision": precision}).precision
    node = next(n for n in plan.graph.nodes if sums_partials(n))
    node.kwargs.pop("reduce_dtype")
    with pytest.raises(VerificationError, match=rf"%{node.outputs[0].name} .*comm\.all_reduce over tp sums its partial "
                                                r"values in bf16 \(the value's own\), but the plan's precision sums "
                                                r"forward partials in f32"):
        verify(plan.graph)


@pytest.mark.slow
def test_an_emitted_fp16_program_scales_skips_and_resumes_like_the_virtual_mesh(tmp_path, monkeypatch):
    """The emitted program of a one-rank fp16-mixed GPT, its training loop run in this process (no launch): 4 AdamW
    steps with the scaler flags of :data:`SCALER` log the virtual mesh's losses, scales and skipped step
    bitwise in ``--metrics`` and save its weights; 2 steps with a checkpoint, then ``--resume`` to 4, continue
    with the checkpointed scale (2**70: the resumed third step is skipped too) to the same weights."""
    data = [gpt_inputs(seed=40 + i) for i in range(4)]
    plan = compile_cached(gpt_model(), data[0], cluster=1, optimizer=BF16_MIXED_ADAMW,
                   strategy={"mesh": {"dp": 1}, "precision": "fp16-mixed"})
    path = plan.emit(tmp_path / "program")
    torch.save(data, tmp_path / "data.pt")
    program, runtime_module = import_program(path)
    flags = ["--data", str(tmp_path / "data.pt"), "--loss-scale", str(SCALER["init_scale"]), "--loss-scale-growth",
             str(SCALER["growth_factor"]), "--loss-scale-backoff", str(SCALER["backoff_factor"]),
             "--loss-scale-interval", str(SCALER["growth_interval"]), "--checkpoint-dir", str(tmp_path / "ck")]

    def train(*args: str) -> list[dict]:
        for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                                LOCAL_RANK="0", SBPC_FORCE_GLOO="1").items():
            monkeypatch.setenv(name, value)
        metrics = tmp_path / f"metrics{len(list(tmp_path.glob('metrics*')))}.jsonl"
        runtime_module.main(program.forward, loss_scaler=runtime_module.DynamicLossScaler,
                            argv=[*flags, "--metrics", str(metrics), *args])
        return [json.loads(line) for line in metrics.read_text().splitlines()]

    losses, steps, _, trained = train_virtual_loss_scaled(plan, data, BF16_MIXED_ADAMW)
    whole = train("--steps", "4", "--save", str(tmp_path / "whole.pt"))
    assert [r["loss"] for r in whole] == losses and [(r["loss_scale"], r["skipped"]) for r in whole] == steps
    train("--steps", "2", "--checkpoint-every", "2")
    resumed = train("--steps", "4", "--resume", "--save", str(tmp_path / "resumed.pt"))
    assert [(r["step"], r["loss_scale"], r["skipped"]) for r in resumed] == [(2, 2.0 ** 70, True), (3, 2.0 ** 10, False)]
    for saved in (torch.load(tmp_path / "whole.pt"), torch.load(tmp_path / "resumed.pt")):
        assert [n for n, value in trained.items() if not torch.equal(saved[n], value)] == []
