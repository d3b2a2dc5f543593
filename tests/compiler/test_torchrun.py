"""Emitted programs under a real torchrun on gloo equal eager training (multi-process tier)."""
import json

import pytest
import torch

from compiler import Cluster, compile
from tests.compiler.test_tensor_parallel import GPT_MEGATRON, tp
from tests.launch import assert_state_close, torchrun, train_eager, train_emitted
from tests.models import bn_cnn_model, cnn_inputs, gpt_inputs, gpt_model, resnet_style_model

pytestmark = pytest.mark.multiproc
SGD = (torch.optim.SGD, {"lr": 0.1})
# Adam divides by sqrt(v) + eps: where a true gradient is ~0 (the k-part of the qkv bias, rarely used
# embedding rows) it turns rounding noise of 1e-12 into visible updates. eps=1e-6 bounds that
# amplification so fp32 tolerances stay meaningful; the optimizer is still AdamW.
ADAMW = (torch.optim.AdamW, {"lr": 1e-4, "eps": 1e-6})


def batches(n: int) -> list:
    return [gpt_inputs(seed=10 + i) for i in range(n)]


@pytest.mark.parametrize("ranks", [2, 4])
def test_data_parallel_five_sgd_steps(tmp_path, ranks):
    data = batches(5)
    plan = compile(gpt_model(), data[0], cluster=Cluster.local(ranks), strategy="dp", optimizer=SGD)
    losses, saved = train_emitted(plan, tmp_path, data, steps=5)
    reference = gpt_model()
    expected = train_eager(reference, data, 5, SGD)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert_state_close(saved, reference)


@pytest.mark.parametrize("ranks, strategy", [
    (2, {"mesh": {"tp": 2}, "params": tp(GPT_MEGATRON)}),
    (4, {"mesh": {"dp": 2, "tp": 2}, "params": tp(GPT_MEGATRON), "vocab_parallel": True}),
    (4, "fsdp"),
    (4, {"mesh": {"dp": 2, "tp": 2}, "params": tp(GPT_MEGATRON), "recompute": ["blocks.*.mlp"]}),
    (2, {"mesh": {"dp": 2}, "fsdp": "dp", "recompute": True}),
], ids=["tp2", "dp2_tp2_vocab", "fsdp4", "dp2_tp2_recompute_mlp", "fsdp2_recompute"])
def test_sharded_programs_three_adamw_steps(tmp_path, ranks, strategy):
    """Losses and saved weights equal eager; each rank stores the parameter bytes the plan reports for it."""
    data = batches(3)
    plan = compile(gpt_model(), data[0], cluster=Cluster.local(ranks), strategy=strategy, optimizer=ADAMW)
    losses, saved = train_emitted(plan, tmp_path, data, steps=3)
    reference = gpt_model()
    expected = train_eager(reference, data, 3, ADAMW)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert_state_close(saved, reference)
    assert_reported_parameter_memory(plan, tmp_path / "losses.jsonl")


def assert_reported_parameter_memory(plan, metrics) -> None:
    """The plan's per-rank parameter bytes are what the emitted program's ranks actually store (step 0's line)."""
    first = json.loads(metrics.read_text().splitlines()[0])
    expected = plan.parameter_memory()
    assert first["param_bytes_per_rank"] == [expected[r] for r in range(plan.cluster.world_size)]


@pytest.mark.parametrize("make, ranks, strategy", [
    (bn_cnn_model, 2, "dp"), (bn_cnn_model, 2, {"mesh": {"tp": 2}}), (resnet_style_model, 4, "dp"),
], ids=["cnn-dp2", "cnn-tp2", "resnet_style-dp4"])
def test_batch_norm_running_statistics_follow_eager(tmp_path, make, ranks, strategy):
    """Training-mode BatchNorm (batch statistics all-reduced over the batch shards) updates its running
    statistics in the emitted program as in eager."""
    data = [cnn_inputs(seed=20 + i) for i in range(3)]
    plan = compile(make(), data[0], cluster=Cluster.local(ranks), strategy=strategy, optimizer=SGD)
    losses, saved = train_emitted(plan, tmp_path, data, steps=3)
    reference = make()
    expected = train_eager(reference, data, 3, SGD)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert_state_close(saved, reference)
    counters = [name for name in saved if name.endswith("num_batches_tracked")]
    assert counters and all(int(saved[name]) == int(reference.state_dict()[name]) for name in counters)


def test_wrong_world_size_stops_with_both_numbers(tmp_path):
    plan = compile(gpt_model(), gpt_inputs(), cluster=Cluster.local(4), strategy="dp")
    main = plan.emit(tmp_path)
    proc = torchrun(main, 2, "--steps", "1")
    assert proc.returncode != 0
    assert "compiled for 4 ranks" in proc.stderr and "world size 2" in proc.stderr
    assert "Traceback" not in _rank_output(proc.stderr)


def test_missing_data_file_is_one_clear_error(tmp_path):
    plan = compile(gpt_model(), gpt_inputs(), cluster=Cluster.local(2), strategy="dp")
    main = plan.emit(tmp_path)
    proc = torchrun(main, 2, "--steps", "1", "--data", str(tmp_path / "nope.pt"))
    assert proc.returncode != 0
    assert f"--data file {tmp_path / 'nope.pt'} does not exist" in proc.stderr
    assert "Traceback" not in _rank_output(proc.stderr)


def test_synthetic_batches_run(tmp_path):
    plan = compile(gpt_model(), gpt_inputs(), cluster=Cluster.local(2), strategy="dp")
    main = plan.emit(tmp_path)
    proc = torchrun(main, 2, "--steps", "2", "--seed", "3", "--metrics", str(tmp_path / "m.jsonl"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 2


def _rank_output(stderr: str) -> str:
    """What the ranks printed, without torchrun's own failure report (which has its own traceback)."""
    return "\n".join(line for line in stderr.splitlines() if "torch/distributed" not in line
                     and "elastic" not in line and not line.startswith(("[", "  ", "Traceback", "torch.", "=")))


def test_emitted_shards_match_the_reported_parameter_memory(tmp_path):
    """tp4 with a vocabulary-parallel head: every rank stores under 30% of the model, as the plan reports (the
    sharded programs above check the same on their plans, fsdp4 among them)."""
    data = batches(1)
    strategy = {"mesh": {"tp": 4}, "params": tp(GPT_MEGATRON), "vocab_parallel": True}
    plan = compile(gpt_model(), data[0], cluster=Cluster.local(4), strategy=strategy)
    train_emitted(plan, tmp_path, data, steps=1)
    assert_reported_parameter_memory(plan, tmp_path / "losses.jsonl")
    assert max(plan.parameter_memory().values()) <= 0.30 * plan.total_parameter_bytes()
