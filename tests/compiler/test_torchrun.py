"""Emitted programs under a real torchrun on gloo equal eager training (multi-process tier)."""
import json

import pytest
import torch

from tests.capture_cache import compile_cached
from tests.compiler.test_tensor_parallel import GPT_MEGATRON, tp
from tests.launch import (Program, assert_state_close, run_programs, selected_tests, torchrun, train_eager,
                          training_program, training_result)
from tests.models import bn_cnn_model, cnn_inputs, gpt_inputs, gpt_model, resnet_style_model

pytestmark = pytest.mark.multiproc
SGD = (torch.optim.SGD, {"lr": 0.1})
# Adam divides by sqrt(v) + eps: where a true gradient is ~0 (the k-part of the qkv bias, rarely used
# embedding rows) it turns rounding noise of 1e-12 into visible updates. eps=1e-6 bounds that
# amplification so fp32 tolerances stay meaningful; the optimizer is still AdamW.
ADAMW = (torch.optim.AdamW, {"lr": 1e-4, "eps": 1e-6})


def batches(n: int) -> list:
    return [gpt_inputs(seed=10 + i) for i in range(n)]


DATA_PARALLEL = [2, 4]
SHARDED = {
    "tp2": (2, {"mesh": {"tp": 2}, "params": tp(GPT_MEGATRON)}),
    "dp2_tp2_vocab": (4, {"mesh": {"dp": 2, "tp": 2}, "params": tp(GPT_MEGATRON), "vocab_parallel": True}),
    "dp2_tp2_sp_regather": (4, {"mesh": {"dp": 2, "tp": 2}, "params": tp(GPT_MEGATRON), "sequence_parallel": True,
                                "regather_activations": True}),
    "fsdp4": (4, "fsdp"),
    "dp2_tp2_recompute_mlp": (4, {"mesh": {"dp": 2, "tp": 2}, "params": tp(GPT_MEGATRON),
                                  "recompute": ["blocks.*.mlp"]}),
    "fsdp2_recompute": (2, {"mesh": {"dp": 2}, "fsdp": "dp", "recompute": True}),
}
BATCH_NORM = {"cnn-dp2": (bn_cnn_model, 2, "dp"), "cnn-tp2": (bn_cnn_model, 2, {"mesh": {"tp": 2}}),
              "resnet_style-dp4": (resnet_style_model, 4, "dp")}
TP4_VOCAB = {"mesh": {"tp": 4}, "params": tp(GPT_MEGATRON), "vocab_parallel": True}


def training_case(test_name: str, params: dict) -> tuple:
    """What the test ``test_name`` with ``params`` trains: (plan, batches, steps)."""
    if test_name == "test_data_parallel_five_sgd_steps":
        data = batches(5)
        plan = compile_cached(gpt_model(), data[0], cluster=params["ranks"], strategy="dp", optimizer=SGD)
        return plan, data, 5
    if test_name == "test_sharded_programs_three_adamw_steps":
        ranks, strategy = SHARDED[params["name"]]
        data = batches(3)
        return compile_cached(gpt_model(), data[0], cluster=ranks, strategy=strategy, optimizer=ADAMW), data, 3
    if test_name == "test_batch_norm_running_statistics_follow_eager":
        make, ranks, strategy = BATCH_NORM[params["name"]]
        data = [cnn_inputs(seed=20 + i) for i in range(3)]
        return compile_cached(make(), data[0], cluster=ranks, strategy=strategy, optimizer=SGD), data, 3
    data = batches(1)  # test_emitted_shards_match_the_reported_parameter_memory
    return compile_cached(gpt_model(), data[0], cluster=4, strategy=TP4_VOCAB), data, 1


@pytest.fixture(scope="module")
def trained(request, tmp_path_factory) -> dict:
    """The programs this session's tests check, run under torchrun (those of one world size sharing a launch):
    test name -> (plan, folder, logged losses, saved weights); the synthetic-batch run -> its result."""
    cases = {name: training_case(test_name, params)
             for test_name in ("test_data_parallel_five_sgd_steps", "test_sharded_programs_three_adamw_steps",
                               "test_batch_norm_running_statistics_follow_eager",
                               "test_emitted_shards_match_the_reported_parameter_memory")
             for name, params in selected_tests(request, test_name).items()}
    folders = {name: tmp_path_factory.mktemp("program") for name in cases}
    programs = {name: training_program(plan, folders[name], data, steps) for name, (plan, data, steps) in cases.items()}
    if selected_tests(request, "test_synthetic_batches_run"):
        folders["synthetic"] = tmp_path_factory.mktemp("synthetic")
        plan = compile_cached(gpt_model(), gpt_inputs(), cluster=2, strategy="dp")
        programs["synthetic"] = Program(plan.emit(folders["synthetic"]), 2, (
            "--steps", "2", "--seed", "3", "--metrics", str(folders["synthetic"] / "m.jsonl")))
    results = run_programs(programs)
    runs = {name: (cases[name][0], folders[name], *training_result(folders[name], results[name])) for name in cases}
    return runs | ({"synthetic": (folders["synthetic"], results["synthetic"])} if "synthetic" in results else {})


@pytest.mark.parametrize("ranks", DATA_PARALLEL)
def test_data_parallel_five_sgd_steps(request, trained, ranks):
    _, _, losses, saved = trained[request.node.name]
    reference = gpt_model()
    expected = train_eager(reference, batches(5), 5, SGD)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert_state_close(saved, reference)


@pytest.mark.parametrize("name", list(SHARDED))
def test_sharded_programs_three_adamw_steps(request, trained, name):
    """Losses and saved weights equal eager; each rank stores the parameter bytes the plan reports for it."""
    plan, folder, losses, saved = trained[request.node.name]
    reference = gpt_model()
    expected = train_eager(reference, batches(3), 3, ADAMW)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert_state_close(saved, reference)
    assert_reported_parameter_memory(plan, folder / "losses.jsonl")


def assert_reported_parameter_memory(plan, metrics) -> None:
    """The plan's per-rank parameter bytes are what the emitted program's ranks actually store (step 0's line)."""
    first = json.loads(metrics.read_text().splitlines()[0])
    expected = plan.parameter_memory()
    assert first["param_bytes_per_rank"] == [expected[r] for r in range(plan.cluster.world_size)]


@pytest.mark.parametrize("name", list(BATCH_NORM))
def test_batch_norm_running_statistics_follow_eager(request, trained, name):
    """Training-mode BatchNorm (batch statistics all-reduced over the batch shards) updates its running
    statistics in the emitted program as in eager."""
    _, _, losses, saved = trained[request.node.name]
    reference = BATCH_NORM[name][0]()
    expected = train_eager(reference, [cnn_inputs(seed=20 + i) for i in range(3)], 3, SGD)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert_state_close(saved, reference)
    counters = [name for name in saved if name.endswith("num_batches_tracked")]
    assert counters and all(int(saved[name]) == int(reference.state_dict()[name]) for name in counters)


def test_wrong_world_size_stops_with_both_numbers(tmp_path):
    plan = compile_cached(gpt_model(), gpt_inputs(), cluster=4, strategy="dp")
    main = plan.emit(tmp_path)
    proc = torchrun(main, 2, "--steps", "1")
    assert proc.returncode != 0
    assert "compiled for 4 ranks" in proc.stderr and "world size 2" in proc.stderr
    assert "Traceback" not in _rank_output(proc.stderr)


def test_missing_data_file_is_one_clear_error(tmp_path):
    plan = compile_cached(gpt_model(), gpt_inputs(), cluster=2, strategy="dp")
    main = plan.emit(tmp_path)
    proc = torchrun(main, 2, "--steps", "1", "--data", str(tmp_path / "nope.pt"))
    assert proc.returncode != 0
    assert f"--data file {tmp_path / 'nope.pt'} does not exist" in proc.stderr
    assert "Traceback" not in _rank_output(proc.stderr)


def test_synthetic_batches_run(trained):
    folder, proc = trained["synthetic"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len((folder / "m.jsonl").read_text().splitlines()) == 2


def _rank_output(stderr: str) -> str:
    """What the ranks printed, without torchrun's own failure report (which has its own traceback)."""
    return "\n".join(line for line in stderr.splitlines() if "torch/distributed" not in line
                     and "elastic" not in line and not line.startswith(("[", "  ", "Traceback", "torch.", "=")))


def test_emitted_shards_match_the_reported_parameter_memory(request, trained):
    """tp4 with a vocabulary-parallel head: every rank stores under 30% of the model, as the plan reports (the
    sharded programs above check the same on their plans, fsdp4 among them)."""
    plan, folder, _, _ = trained[request.node.name]
    assert_reported_parameter_memory(plan, folder / "losses.jsonl")
    assert max(plan.parameter_memory().values()) <= 0.30 * plan.total_parameter_bytes()
