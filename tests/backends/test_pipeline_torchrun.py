"""Emitted pipelined programs under torchrun (gloo): three training steps equal eager training."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.backends.test_pipeline_virtual import MEGATRON, skip_path_loss, skip_reference
from compiler import Cluster, compile
from tests.models import (cnn_inputs, compile_cached, gpt2_model, gpt_inputs, gpt_model, llama_model, lm_inputs,
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


def torchrun(program: Path, ranks: int, *args: str) -> list[float]:
    """Run the emitted program; returns the loss of every step."""
    metrics = program.parent / "metrics.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               str(program), "--metrics", str(metrics), "--comm-timeout", "60", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=program.parent,
                          env={**os.environ, "SBPC_FORCE_GLOO": "1", "OMP_NUM_THREADS": "1"})
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


@pytest.mark.multiproc
@pytest.mark.parametrize("config", list(CONFIGS))
def test_emitted_pipeline_trains_like_eager(config, tmp_path):
    check_trains_like_eager(*CONFIGS[config], tmp_path)


def check_trains_like_eager(name: str, ranks: int, strategy: dict, tmp_path: Path) -> None:
    """Emit the plan of ``strategy`` for model ``name``, train STEPS steps under torchrun, compare with eager."""
    make, make_inputs = MODELS[name]
    example = make_inputs(batch=8, seq=8)
    plan = compile_cached(make(n_layer=4), example, ranks, strategy)
    program = plan.emit(tmp_path / "program")
    batches = [make_inputs(batch=8, seq=8, seed=step + 1) for step in range(STEPS)]
    torch.save(batches, tmp_path / "data.pt")
    losses = torchrun(program, ranks, "--steps", str(STEPS), "--data", str(tmp_path / "data.pt"),
                      "--save", str(tmp_path / "final.pt"))
    paths = plan.graph.attrs.get("paths")
    if paths:
        def loss_of(model, batch):
            return skip_path_loss(model, batch, paths)
    else:
        def loss_of(model, batch):
            return model(*batch)
    expected_losses, expected_state = eager_training(make(n_layer=4), batches, loss_of)
    assert losses == pytest.approx(expected_losses, rel=1e-5, abs=1e-6)
    state = torch.load(tmp_path / "final.pt", weights_only=True)
    for key, value in expected_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
    if paths:
        # the same program, forward only through stages 0, 2 and 3 of the trained model
        (evaluated,) = torchrun(program, ranks, "--steps", "1", "--data", str(tmp_path / "data.pt"),
                                "--weights", str(tmp_path / "final.pt"), "--infer-stages", "0,2,3")
        trained = make(n_layer=4)
        trained.load_state_dict(expected_state)
        expected, _ = skip_reference(trained, batches[0], [[0, 2, 3]] * strategy["microbatches"], train=False)
        assert evaluated == pytest.approx(float(expected), rel=1e-5, abs=1e-6)



@pytest.mark.multiproc
def test_emitted_pipeline_moves_batch_norm_statistics_on_their_stage(tmp_path):
    """A BatchNorm's stage updates its running statistics from the whole batch (one microbatch), as eager."""
    strategy = {"mesh": {"pp": 2}, "stages": ["blocks.1"], "microbatches": 1}
    batches = [cnn_inputs(batch=8, seed=30 + step) for step in range(STEPS)]
    plan = compile(resnet_style_model(), batches[0], cluster=Cluster.local(2), strategy=strategy)
    program = plan.emit(tmp_path / "program")
    torch.save(batches, tmp_path / "data.pt")
    losses = torchrun(program, 2, "--steps", str(STEPS), "--data", str(tmp_path / "data.pt"),
                      "--save", str(tmp_path / "final.pt"))

    def loss_of(model, batch):
        return model(*batch)

    expected_losses, expected_state = eager_training(resnet_style_model(), batches, loss_of)
    assert losses == pytest.approx(expected_losses, rel=1e-5, abs=1e-6)
    state = torch.load(tmp_path / "final.pt", weights_only=True)
    assert set(state) == set(expected_state)
    for key, value in expected_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


if __name__ == "__main__":  # the whole zero-bubble matrix, one torchrun job per entry
    import tempfile
    for key, config in ZERO_BUBBLE_CONFIGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            check_trains_like_eager(*config, Path(tmp))
        print(f"{key}: 3 steps equal eager (losses and every weight)", flush=True)
