"""The distributed-optimizer what-if (``PlanOptions.distributed_optimizer``, Megatron-LM's
``--use-distributed-optimizer``): optimizer state and master weights split over the data-parallel ranks,
gradients reduce-scattered and parameters gathered back instead of one all-reduce."""
from __future__ import annotations

import pytest

from tests.capture_cache import compile_cached
from tests.models import gpt_inputs, gpt_model


def priced(strategy, **options):
    plan = compile_cached(gpt_model(), gpt_inputs(), cluster=4, strategy=strategy)
    return {sharded: plan.simulate(optimizer="adamw", distributed_optimizer=sharded, **options)
            for sharded in (False, True)}


def test_dp_state_is_split_and_gradients_reduce_scattered():
    """dp4: each rank keeps a quarter of AdamW's state and updates a quarter of the parameters; the traffic is
    the all-reduce's (a reduce-scatter and an all-gather of as many bytes), priced as those two collectives."""
    reports = priced("dp", overlap_grad_sync=False)
    plain, sharded = (reports[k].estimate.memory[0] for k in (False, True))
    assert float(sharded.optimizer_state) == pytest.approx(float(plain.optimizer_state) / 4)
    assert (sharded.parameters, sharded.gradients, sharded.activations) == \
        (plain.parameters, plain.gradients, plain.activations)
    assert reports[True].breakdown["optimizer step"] == pytest.approx(reports[False].breakdown["optimizer step"] / 4)
    traffic = {k: sum(r.comm_bytes_by_link_class.values()) for k, r in reports.items()}
    assert traffic[True] == pytest.approx(traffic[False], rel=1e-3)
    # on local:4's ring an all-reduce costs what its reduce-scatter and all-gather cost
    assert reports[True].breakdown["gradient reduction (exposed)"] == \
        pytest.approx(reports[False].breakdown["gradient reduction (exposed)"])


def test_mixed_what_if_gathers_bf16_parameters_after_fp32_reduce_scatters():
    """With ``bf16-mixed`` the gradients cross in fp32 and the parameters come back in bf16: 1.5x the bytes of
    a bf16 all-reduce."""
    plan = compile_cached(gpt_model(), gpt_inputs(), cluster=4, strategy="dp")
    mixed = plan.simulate(precision="bf16-mixed", distributed_optimizer=True)
    half = plan.simulate(precision="bf16")
    ratio = sum(mixed.comm_bytes_by_link_class.values()) / sum(half.comm_bytes_by_link_class.values())
    assert ratio == pytest.approx(1.5, rel=1e-3)


def test_deepspeed_kind_all_reduces_the_gradients_then_gathers_the_parameters():
    """``distributed_optimizer="all_reduce"`` (DeepSpeed's BF16 optimizer at ZeRO stage 0): the state is split as
    with Megatron's kind, but every rank all-reduces the whole gradient before the all-gather: 1.5x the bytes,
    and on local:4's ring the all-gather's time on top of the plain all-reduce's."""
    plan = compile_cached(gpt_model(), gpt_inputs(), cluster=4, strategy="dp")
    reports = {kind: plan.simulate(optimizer="adamw", distributed_optimizer=kind, overlap_grad_sync=False)
               for kind in (False, True, "all_reduce")}
    deepspeed, megatron, plain = reports["all_reduce"], reports[True], reports[False]
    assert deepspeed.estimate.memory[0] == megatron.estimate.memory[0]
    ratio = sum(deepspeed.comm_bytes_by_link_class.values()) / sum(plain.comm_bytes_by_link_class.values())
    assert ratio == pytest.approx(1.5, rel=1e-3)
    reduction = {k: r.breakdown["gradient reduction (exposed)"] for k, r in reports.items()}
    gather = reduction[True] - reduction[False] / 2  # Megatron's: half an all-reduce, then the all-gather
    assert reduction["all_reduce"] == pytest.approx(reduction[False] + gather, rel=1e-6)


def test_fsdp_and_single_replica_plans_are_unchanged():
    """FSDP already shards the state; a plan without data parallelism has nothing to shard."""
    for strategy in ("fsdp", {"mesh": {"tp": 4}, "params": {"*": "S(0)"}}):
        reports = priced(strategy)
        assert reports[True].step_time_s == reports[False].step_time_s
        assert reports[True].estimate.memory[0] == reports[False].estimate.memory[0]
