"""A low-precision model is priced at its dtypes: 2-byte activations, parameters, gradients and optimizer
state for a bf16 model (as eager training keeps them), the bf16 peak FLOP/s; a named precision other than
the model's is a what-if over every float tensor, one of the model's own float size keeps each tensor at its
dtype (``cost.ops.Precision``)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from cost.ops import Precision
from ir.sbp import Split
from tests.capture_cache import compile_cached
from tests.models import gpt_inputs, gpt_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import gpt  # noqa: E402
import gpt_configs  # noqa: E402


def memory_parts(report) -> tuple[float, float, float, float]:
    """Device 0's (parameters, gradients, optimizer state, activations) bytes."""
    m = report.estimate.memory[0]
    return float(m.parameters), float(m.gradients), float(m.optimizer_state), float(m.activations)


def test_bf16_gpt_is_priced_with_two_byte_tensors():
    """The same plan priced at the model's bf16 and as a 4-byte what-if: parameters, gradients and AdamW's
    two moments take exactly half (all bf16, as eager's AdamW keeps them for bf16 parameters), activations
    and gradient traffic about half (a few float32 scalars of the loss stay 4 bytes)."""
    model = gpt_model().to(torch.bfloat16)
    plan = compile_cached(model, gpt_inputs(), cluster=2, strategy="dp")
    own, wide = plan.simulate(optimizer="adamw"), plan.simulate(precision="fp32", optimizer="adamw")
    elements = sum(p.numel() for p in model.parameters())
    params, grads, state, activations = memory_parts(own)
    assert (params, grads, state) == (2 * elements, 2 * elements, 4 * elements)
    wide_params, wide_grads, wide_state, wide_activations = memory_parts(wide)
    assert (wide_params, wide_grads, wide_state) == (4 * elements, 4 * elements, 8 * elements)
    assert 0.45 < activations / wide_activations < 0.55
    traffic, wide_traffic = sum(own.comm_bytes_by_link_class.values()), sum(wide.comm_bytes_by_link_class.values())
    assert traffic / wide_traffic == pytest.approx(0.5, rel=1e-3)
    assert own.precision == "bf16 compute (each tensor at its dtype's size)"
    assert wide.precision == "fp32 compute (4-byte float tensors)"


def test_fp32_model_what_if_bf16_keeps_master_weights():
    """A named bf16 precision on an fp32 model prices mixed precision: 2-byte parameters and gradients, an
    fp32 master copy and fp32 AdamW moments (4 + 8 bytes per parameter)."""
    model = gpt_model()
    plan = compile_cached(model, gpt_inputs(), cluster=2, strategy="dp")
    elements = sum(p.numel() for p in model.parameters())
    params, grads, state, _ = memory_parts(plan.simulate(precision="bf16", optimizer="adamw"))
    assert (params, grads, state) == (2 * elements, 2 * elements, 12 * elements)
    assert Precision.resolve(None, plan.graph) == Precision("fp32")


@pytest.mark.slow
def test_meta_device_bf16_gpt_plans_on_dgx_a100():
    """A 24-layer, 2048-wide GPT (1.3B) built on the meta device in bf16 compiles with strategy="auto" on
    dgx-a100:8 and is priced at bf16: 8 bytes per parameter (bf16 weight, gradient and two AdamW moments),
    sharded as the plan says, against 16 as an fp32 what-if of the same plan."""
    with torch.device("meta"):
        model = gpt.GPT(gpt_configs.config("1.3B", n_layer=24)).to(torch.bfloat16)
    plan = compile_cached(model, gpt_configs.example_batch(64), cluster="dgx-a100:8", strategy="auto")
    own, wide = plan.simulate(optimizer="adamw"), plan.simulate(precision="fp32", optimizer="adamw")
    params, grads, state, activations = memory_parts(own)
    assert grads == params and state == 2 * params  # every parameter trains; AdamW's moments in bf16
    wide_params, wide_grads, wide_state, wide_activations = memory_parts(wide)
    assert (wide_params, wide_grads, wide_state) == (2 * params, 2 * grads, 2 * state)
    assert 0.45 < activations / wide_activations < 0.55
    assert own.step_time_s < wide.step_time_s  # the bf16 peak (312 TFLOP/s) against fp32 (19.5)
    assert "bf16 compute" in own.precision and "bf16 compute" in plan.explain()


@pytest.mark.slow
def test_meta_device_bf16_mixed_gpt_counts_16_bytes_per_parameter():
    """The issue's figure: a 24-layer, 2048-wide GPT (1.3B) on the meta device planned with
    ``{"mesh": "auto", "precision": "bf16-mixed"}`` on dgx-a100:8 keeps, per device, fp32 master weights,
    fp32 gradients and AdamW's two fp32 moments: 4 + 4 + 8 = 16 bytes per parameter it holds (sharded as
    the plan says); its matrix products' outputs are bf16, so its activations price below the same plan
    with every float at 4 bytes; its compute is priced at the bf16 peak."""
    with torch.device("meta"):
        model = gpt.GPT(gpt_configs.config("1.3B", n_layer=24))
    plan = compile_cached(model, gpt_configs.example_batch(64), cluster="dgx-a100:8",
                   strategy={"mesh": "auto", "precision": "bf16-mixed"})
    assert plan.strategy.precision.mixed and "precision bf16-mixed" in plan.to_dsl()
    mesh = plan.graph.meshes[plan.graph.params[0].mesh]
    held = sum(int(p.type.numel()) // math.prod(n for n, s in zip(mesh.shape, p.sbp) if isinstance(s, Split))
               for p in plan.graph.params if p.kind == "param")
    mixed, wide = plan.simulate(optimizer="adamw"), plan.simulate(optimizer="adamw", precision="fp32")
    params, grads, state, activations = memory_parts(mixed)
    assert (params, grads, state) == (4 * held, 4 * held, 8 * held)
    assert params + grads + state == 16 * held
    assert activations < 0.8 * memory_parts(wide)[3]
    assert mixed.precision.startswith("bf16 compute") and mixed.step_time_s < wide.step_time_s


def test_mixed_what_if_reduces_gradients_in_fp32():
    """``bf16-mixed`` as a what-if prices the ``bf16`` what-if with gradients reduced (and kept) in fp32, as
    Megatron-LM trains bf16 by default: twice the gradient bytes and twice dp's all-reduce traffic, the rest
    alike."""
    plan = compile_cached(gpt_model(), gpt_inputs(), cluster=2, strategy="dp")
    elements = sum(p.numel() for p in gpt_model().parameters())
    half, mixed = (plan.simulate(precision=p, optimizer="adamw") for p in ("bf16", "bf16-mixed"))
    assert memory_parts(mixed)[:3] == (2 * elements, 4 * elements, 12 * elements)
    assert memory_parts(mixed)[3] == memory_parts(half)[3]
    traffic = sum(mixed.comm_bytes_by_link_class.values()) / sum(half.comm_bytes_by_link_class.values())
    assert traffic == pytest.approx(2.0, rel=1e-4)  # the loss's few bytes are not gradients
    assert mixed.precision == "bf16 compute (2-byte float tensors, fp32 master weights and optimizer state, " \
                              "4-byte gradient reductions)"
    with pytest.raises(ValueError, match="bf16-mixed"):
        Precision.of("bf16-mixd")


class UpcastLoss(torch.nn.Module):
    """A model's logits with the loss computed on their float32 upcast (``logits.float()``), as Megatron's and
    transformers' language models do for a bf16 model."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(idx)
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def test_mixed_what_if_of_a_bf16_model_keeps_its_float32_loss():
    """A ``bf16-mixed`` what-if of a bf16 model whose loss runs on float32 logits prices that loss at 4 bytes,
    as the model computes it (its activations are those of the model's own dtypes, above the same model's with
    a bf16 loss); only master weights and fp32 gradient reductions are added. A :class:`Precision` names a
    combination no name gives: fp32 master weights with the bf16 model's own 2-byte gradient reductions."""
    elements = sum(p.numel() for p in gpt_model().parameters())
    upcast = compile_cached(UpcastLoss(gpt_model().to(torch.bfloat16)), gpt_inputs(), cluster=2, strategy="dp")
    plain = compile_cached(gpt_model().to(torch.bfloat16), gpt_inputs(), cluster=2, strategy="dp")
    own, mixed = upcast.simulate(optimizer="adamw"), upcast.simulate(precision="bf16-mixed", optimizer="adamw")
    assert memory_parts(mixed)[3] == memory_parts(own)[3] > memory_parts(plain.simulate(optimizer="adamw"))[3]
    assert memory_parts(mixed)[:3] == (2 * elements, 4 * elements, 12 * elements)
    assert mixed.precision == "bf16 compute (each tensor at its dtype's size, fp32 master weights and optimizer " \
                              "state, 4-byte gradient reductions)"
    master = upcast.simulate(precision=Precision("bf16", master_weights=True), optimizer="adamw")
    assert memory_parts(master) == (2 * elements, 2 * elements, 12 * elements, memory_parts(own)[3])
    traffic = sum(master.comm_bytes_by_link_class.values()) / sum(mixed.comm_bytes_by_link_class.values())
    assert traffic == pytest.approx(0.5, rel=1e-3)
    with pytest.raises(ValueError, match="expected a compute precision in .* found 'bf16-mix'"):
        Precision("bf16-mix", master_weights=True)


def test_planned_reduce_dtype_is_priced():
    """A compiled mixed-precision plan's gradient reductions are priced in its reduce dtype: bf16 reductions
    move half the bytes of fp32 ones, and take less time (priced exposed, not overlapped with backward)."""
    model = gpt_model()
    strategies = {reduce: {"mesh": {"dp": 2}, "precision": {"param": "fp32", "compute": "bf16", "reduce": reduce}}
                  for reduce in ("fp32", "bf16")}
    reports = {reduce: compile_cached(model, gpt_inputs(), cluster=2, strategy=strategy).simulate(
        overlap_grad_sync=False) for reduce, strategy in strategies.items()}
    traffic = {k: sum(r.comm_bytes_by_link_class.values()) for k, r in reports.items()}
    assert traffic["bf16"] / traffic["fp32"] == pytest.approx(0.5, rel=1e-3)
    grads = {k: float(r.estimate.memory[0].gradients) for k, r in reports.items()}
    assert grads["bf16"] == grads["fp32"]  # fp32 gradients either way: bf16 is the reduction's cast only
    exposed = {k: r.breakdown["gradient reduction (exposed)"] for k, r in reports.items()}
    assert exposed["bf16"] < exposed["fp32"]
    assert reports["bf16"].step_time_s == pytest.approx(reports["fp32"].step_time_s - exposed["fp32"] + exposed["bf16"])
