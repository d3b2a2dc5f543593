"""Emitted pipelined programs under torchrun (gloo): three training steps equal eager training."""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.backends.test_pipeline_virtual import MEGATRON, skip_path_loss, skip_reference
from compiler import Cluster, compile
from tests.launch import Program, run_programs, selected_tests
from tests.capture_cache import compile_cached
from tests.models import (cnn_inputs, gpt2_model, gpt_inputs, gpt_model, llama_model, lm_inputs,
                          resnet_style_model)

STEPS = 3
LR = 0.1  # compile()'s default optimizer: SGD(lr=0.1)

CONFIGS = {
    "gpt-pp2-1f1b": ("gpt", 2, {"mesh": {"pp": 2}, "stages": ["blocks.2"], "microbatches": 4, "schedule": "1f1b"}),
    "gpt2-pp2-gpipe": ("gpt2", 2, {"mesh": {"pp": 2}, "microbatches": 4, "schedule": "gpipe"}),
    "gpt-pp2xtp2-interleaved": ("gpt", 4, {"mesh": {"pp": 2, "tp": 2}, "params": MEGATRON, "microbatches": 4,
                                           "schedule": "interleaved", "virtual_stages": 2}),
    "gpt-pp2xdp2-1f1b": ("gpt", 4, {"mesh": {"pp": 2, "dp": 2}, "stages": ["blocks.2"], "microbatches": 4}),
    "gpt-pp2xtp2-1f1b-recompute": ("gpt", 4, {"mesh": {"pp": 2, "tp": 2}, "params": MEGATRON, "microbatches": 4,
                                              "recompute": True}),
    # activations kept as sequence shards and gathered again in backward, under a split (zero-bubble) backward
    "gpt-pp2xtp2-zbv-sp-regather": ("gpt", 4, {"mesh": {"pp": 2, "tp": 2}, "params": MEGATRON, "microbatches": 4,
                                               "schedule": "zbv", "sequence_parallel": True,
                                               "regather_activations": True}),
    "gpt-pp4-skippipe": ("gpt", 4, {"mesh": {"pp": 4}, "stages": ["blocks.1", "blocks.2", "blocks.3"],
                                    "microbatches": 4, "skip_ratio": 0.25}),
}
ZERO_BUBBLE_CONFIGS = {f"{name}-pp{pp}-{schedule}": (name, pp, {"mesh": {"pp": pp}, "microbatches": 8,
                                                                  "schedule": schedule})
                       for name in ("gpt", "llama") for pp in (2, 4) for schedule in ("zb-h1", "zbv", "dualpipev")}
"""Zero-bubble schedules (split backward; zbv and dualpipev put 2 stages on each rank, in a V): the whole matrix
passes (``python3 -m tests.backends.test_pipeline_torchrun`` runs it, about 12 torchrun jobs); the suite runs
one per schedule, model and pipeline size."""
CONFIGS |= {key: ZERO_BUBBLE_CONFIGS[key] for key in ("gpt-pp2-zbv", "gpt-pp4-dualpipev", "llama-pp2-zb-h1",
                                                      "llama-pp4-zbv")}
MODELS = {"gpt": (gpt_model, gpt_inputs), "gpt2": (gpt2_model, lm_inputs), "llama": (llama_model, lm_inputs)}


def pipeline_program(program: Path, ranks: int, metrics: Path, *args: str) -> Program:
    """The emitted program run with ``args``, logging its losses to ``metrics``."""
    return Program(program, ranks, ("--metrics", str(metrics), "--comm-timeout", "60", *args), cwd=program.parent)


def logged_losses(metrics: Path, done: subprocess.CompletedProcess) -> list[float]:
    """The loss of every step a run of :func:`pipeline_program` logged to ``metrics``."""
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]


def eager_training(model, batches: list[tuple], loss_of) -> tuple[list[float], dict]:
    """SGD on one device: the loss of each step and the final state_dict."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for batch in batches:
        optimizer.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class PipelineCase:
    """One emitted pipeline program, its training run and eager's; for SkipPipe also the run evaluating eager's
    trained weights along a path that skips stage 1."""

    make: object
    batches: list
    training: Program
    folder: Path
    expected_losses: list[float]
    expected_state: dict
    evaluation: Program | None = None
    paths: list | None = None


def prepare_case(name: str, ranks: int, strategy: dict, folder: Path) -> PipelineCase:
    """Emit the plan of ``strategy`` for model ``name`` into ``folder``, its data and eager's training."""
    make, make_inputs = MODELS[name]
    plan = compile_cached(make(n_layer=4), make_inputs(batch=8, seq=8), ranks, strategy)
    program = plan.emit(folder / "program")
    batches = [make_inputs(batch=8, seq=8, seed=step + 1) for step in range(STEPS)]
    torch.save(batches, folder / "data.pt")
    training = pipeline_program(program, ranks, folder / "training.jsonl", "--steps", str(STEPS),
                                "--data", str(folder / "data.pt"), "--save", str(folder / "final.pt"))
    paths = plan.graph.attrs.get("paths")
    if paths:
        def loss_of(model, batch):
            return skip_path_loss(model, batch, paths)
    else:
        def loss_of(model, batch):
            return model(*batch)
    case = PipelineCase(make, batches, training, folder, *eager_training(make(n_layer=4), batches, loss_of))
    if paths:  # the same program, forward only through stages 0, 2 and 3 of eager's trained weights
        case.paths = [[0, 2, 3]] * strategy["microbatches"]
        torch.save(case.expected_state, folder / "eager.pt")
        case.evaluation = pipeline_program(program, ranks, folder / "evaluation.jsonl", "--steps", "1", "--data",
                                           str(folder / "data.pt"), "--weights", str(folder / "eager.pt"),
                                           "--infer-stages", "0,2,3")
    return case


def run_cases(configs: dict, folder: Path) -> tuple[dict, dict]:
    """Every case of ``configs`` prepared under ``folder``, and the result of every program they run (programs
    of one world size share a torchrun launch)."""
    cases = {}
    for key, config in configs.items():
        (folder / key).mkdir()
        cases[key] = prepare_case(*config, folder / key)
    programs = {(key, "training"): case.training for key, case in cases.items()}
    programs |= {(key, "evaluation"): case.evaluation for key, case in cases.items() if case.evaluation}
    return cases, run_programs(programs)


def check_case(case: PipelineCase, training: subprocess.CompletedProcess,
               evaluation: subprocess.CompletedProcess | None) -> None:
    """STEPS SGD steps of the emitted program equal eager training (every loss and every final weight); a
    SkipPipe program's forward along a path skipping stage 1 equals eager's along it."""
    losses = logged_losses(case.folder / "training.jsonl", training)
    assert losses == pytest.approx(case.expected_losses, rel=1e-5, abs=1e-6)
    state = torch.load(case.folder / "final.pt", weights_only=True)
    for key, value in case.expected_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
    if case.evaluation:
        (evaluated,) = logged_losses(case.folder / "evaluation.jsonl", evaluation)
        trained = case.make(n_layer=4)
        trained.load_state_dict(case.expected_state)
        expected, _ = skip_reference(trained, case.batches[0], case.paths, train=False)
        assert evaluated == pytest.approx(float(expected), rel=1e-5, abs=1e-6)


@pytest.fixture(scope="module")
def launched(request, tmp_path_factory) -> tuple[dict, dict]:
    """The cases this session tests, run."""
    selected = selected_tests(request, "test_emitted_pipeline_trains_like_eager").values()
    return run_cases({params["config"]: CONFIGS[params["config"]] for params in selected},
                     tmp_path_factory.mktemp("pipelines"))


@pytest.mark.multiproc
@pytest.mark.parametrize("config", list(CONFIGS))
def test_emitted_pipeline_trains_like_eager(config, launched):
    cases, results = launched
    check_case(cases[config], results[config, "training"], results.get((config, "evaluation")))


@pytest.mark.multiproc
def test_emitted_pipeline_moves_batch_norm_statistics_on_their_stage(tmp_path):
    """A BatchNorm's stage updates its running statistics from the whole batch (one microbatch), as eager."""
    strategy = {"mesh": {"pp": 2}, "stages": ["blocks.1"], "microbatches": 1}
    batches = [cnn_inputs(batch=8, seed=30 + step) for step in range(STEPS)]
    plan = compile(resnet_style_model(), batches[0], cluster=Cluster.local(2), strategy=strategy)
    program = plan.emit(tmp_path / "program")
    torch.save(batches, tmp_path / "data.pt")
    run = pipeline_program(program, 2, tmp_path / "metrics.jsonl", "--steps", str(STEPS), "--data",
                           str(tmp_path / "data.pt"), "--save", str(tmp_path / "final.pt"))
    losses = logged_losses(tmp_path / "metrics.jsonl", run_programs({"bn": run})["bn"])

    def loss_of(model, batch):
        return model(*batch)

    expected_losses, expected_state = eager_training(resnet_style_model(), batches, loss_of)
    assert losses == pytest.approx(expected_losses, rel=1e-5, abs=1e-6)
    state = torch.load(tmp_path / "final.pt", weights_only=True)
    assert set(state) == set(expected_state)
    for key, value in expected_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


if __name__ == "__main__":  # the whole zero-bubble matrix
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        cases, results = run_cases(ZERO_BUBBLE_CONFIGS, Path(tmp))
        for key, case in cases.items():
            check_case(case, results[key, "training"], None)
            print(f"{key}: 3 steps equal eager (losses and every weight)", flush=True)
