"""Training controls and token files in emitted programs under a real torchrun (gloo): a cosine schedule with
warmup, global-norm clipping and gradient accumulation equal eager PyTorch on the same token-file batches under
dp2, dp4, tp2, fsdp2 (prefetching its gathers), dp2 x tp2 and a 2-stage pipeline; a run resumed mid-schedule continues
the same schedule and data stream bit for bit.

The eager reference reads the token file as the programs document it (windows of ``seq + 1`` tokens every
``seq`` tokens, a seeded permutation per epoch), so these tests also pin down the data order.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.capture_cache import compile_cached
from tests.compiler.test_tensor_parallel import GPT_MEGATRON, tp
from tests.launch import Program, run_programs, selected_tests, torchrun
from tests.models import gpt_inputs, gpt_model

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]
SGD = (torch.optim.SGD, {"lr": 0.5, "momentum": 0.9})
BATCH, SEQ, STEPS, ACCUM, WARMUP, MAX_NORM, SEED = 8, 16, 10, 2, 2, 0.5, 3
RESUME_AT = 5  # the step the resumed run continues from
TOKENS = 600  # 37 windows: the 160 samples of a run cross into a fifth epoch
CONTROLS = ["--lr-schedule", "cosine", "--warmup-steps", str(WARMUP), "--clip-grad-norm", str(MAX_NORM),
            "--grad-accum", str(ACCUM), "--seed", str(SEED)]
PLANS = {  # name: (ranks, strategy)
    "dp2": (2, "dp"),
    "dp4": (4, "dp"),
    "tp2": (2, {"mesh": {"tp": 2}, "params": tp(GPT_MEGATRON)}),
    "fsdp2": (2, "fsdp"),
    "dp2_tp2": (4, {"mesh": {"dp": 2, "tp": 2}, "params": tp(GPT_MEGATRON)}),
    "pipeline_1f1b": (2, {"mesh": {"pp": 2}, "microbatches": 4, "schedule": "1f1b"}),
}


def token_file(path: Path) -> Path:
    tokens = torch.randint(0, 512, (TOKENS,), generator=torch.Generator().manual_seed(7)).numpy().astype(np.uint16)
    tokens.tofile(path)
    return path


def eager_batches(path: Path, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` batches of the token file, in the order the programs document."""
    tokens = torch.from_numpy(np.fromfile(path, dtype=np.uint16).astype(np.int64))
    windows = (len(tokens) - 1) // SEQ
    samples = []
    for n in range(count * BATCH):
        order = torch.randperm(windows, generator=torch.Generator().manual_seed(SEED * 1000003 + n // windows))
        start = int(order[n % windows]) * SEQ
        samples.append(tokens[start:start + SEQ + 1])
    rows = torch.stack(samples).view(count, BATCH, SEQ + 1)
    return [(r[:, :-1].contiguous(), r[:, 1:].contiguous()) for r in rows]


def cosine_with_warmup(step: int) -> float:
    if step < WARMUP:
        return (step + 1) / WARMUP
    return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP)))


def eager_run(data: Path) -> tuple[list[float], list[float], dict]:
    """Losses, clipping norms and final weights of the same training on one device."""
    model = gpt_model()
    optimizer = SGD[0](model.parameters(), **SGD[1])
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup)
    batches = eager_batches(data, STEPS * ACCUM)
    losses, norms = [], []
    for step in range(STEPS):
        optimizer.zero_grad()
        total = 0.0
        for micro in batches[step * ACCUM:(step + 1) * ACCUM]:
            loss = model(*micro)
            (loss / ACCUM).backward()
            total += loss.item()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        optimizer.step()
        schedule.step()
        losses.append(total / ACCUM)
    return losses, norms, model.state_dict()


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return token_file(tmp_path_factory.mktemp("tokens") / "tokens.bin")


@pytest.fixture(scope="module")
def eager(data):
    return eager_run(data)


def program(out: Path, ranks: int, strategy, data: Path, *args: str) -> Program:
    """Emit the plan into ``out``: the program training it on ``data`` with the controls."""
    main = compile_cached(gpt_model(), gpt_inputs(batch=BATCH, seq=SEQ), cluster=ranks, strategy=strategy,
                   optimizer=SGD).emit(out)
    return Program(main, ranks, ("--steps", str(STEPS), "--data", str(data), *CONTROLS, "--metrics",
                                 str(out / "metrics.jsonl"), "--save", str(out / "final.pt"), *args))


@pytest.fixture(scope="module")
def runs(request, data, tmp_path_factory) -> dict:
    """The runs this session's tests check (those of one world size sharing a torchrun launch): plan name ->
    (folder, program, stdout); "uninterrupted" is the dp2 run checkpointing after step RESUME_AT."""
    programs, folders = {}, {}
    for params in selected_tests(request, "test_schedule_clipping_and_accumulation_equal_eager").values():
        folders[params["name"]] = tmp_path_factory.mktemp(params["name"])
        programs[params["name"]] = program(folders[params["name"]], *PLANS[params["name"]], data)
    if selected_tests(request, "test_a_resumed_run_continues_the_schedule_and_the_token_stream_bitwise"):
        folders["uninterrupted"] = full = tmp_path_factory.mktemp("uninterrupted")
        programs["uninterrupted"] = program(full, 2, "dp", data, "--checkpoint-every", str(RESUME_AT),
                                            "--checkpoint-dir", str(full / "checkpoints"))
    results = run_programs(programs)
    for name, proc in results.items():
        assert proc.returncode == 0, f"{name}: {proc.stderr[-4000:]}"
    return {name: (folders[name], programs[name], results[name].stdout) for name in programs}


@pytest.mark.parametrize("name", list(PLANS))
def test_schedule_clipping_and_accumulation_equal_eager(name, runs, eager):
    tmp_path, _, stdout = runs[name]
    losses, norms, final = eager
    got = records(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(STEPS))
    torch.testing.assert_close(torch.tensor([r["loss"] for r in got]), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor([r["grad_norm"] for r in got]), torch.tensor(norms), rtol=1e-5, atol=0)
    assert min(norms) > MAX_NORM  # the clipping acted on every step
    expected_lr = [SGD[1]["lr"] * cosine_with_warmup(s) for s in range(STEPS)]
    assert [r["lr"] for r in got] == pytest.approx(expected_lr, rel=1e-12)
    assert all(r["tokens_per_s"] > 0 and r["memory_bytes"] > 0 for r in got)
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]  # not a terminal: a line per step
    assert len(lines) == STEPS
    assert re.fullmatch(r"step 1 loss [0-9.]+ tokens/s \d+ step_time [0-9.]+s memory [0-9.]+MiB lr [0-9.e-]+ "
                        r"grad_norm [0-9.]+", lines[1]), lines[1]
    saved = torch.load(tmp_path / "final.pt", weights_only=True)
    for key, value in final.items():
        torch.testing.assert_close(saved[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_a_resumed_run_continues_the_schedule_and_the_token_stream_bitwise(runs, data, tmp_path):
    """Uninterrupted: 10 steps with a checkpoint after step 5. Resumed from that checkpoint in a fresh directory:
    steps 5-9 give the same losses, norms and learning rates, bit for bit (the schedule's state and the token
    file's position come from the checkpoint)."""
    full, uninterrupted, _ = runs["uninterrupted"]
    step_dir = f"step-{RESUME_AT:08d}"
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / step_dir, resumed / "checkpoints" / step_dir)
    proc = torchrun(uninterrupted.main, 2, "--steps", str(STEPS), "--data", str(data), *CONTROLS, "--resume",
                    "--checkpoint-dir", str(resumed / "checkpoints"), "--metrics", str(resumed / "metrics.jsonl"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"at step {RESUME_AT}" in proc.stdout
    position = {"train.data_position": 0, "train.step": 0}
    dcp.load(position, checkpoint_id=str(full / "checkpoints" / step_dir), no_dist=True)
    assert position == {"train.data_position": RESUME_AT * ACCUM * BATCH, "train.step": RESUME_AT}  # samples handed out
    fields = ("step", "loss", "grad_norm", "lr")
    expected = [{k: r[k] for k in fields} for r in records(full / "metrics.jsonl")[RESUME_AT:]]
    assert [{k: r[k] for k in fields} for r in records(resumed / "metrics.jsonl")] == expected
