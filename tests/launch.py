"""Launching emitted programs under a real torchrun (gloo), for the multi-process tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

TIMEOUT_S = 240


def torchrun(main: Path, nproc: int, *args: str, timeout: int = TIMEOUT_S, torchrun_args: tuple[str, ...] = (),
             env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``main.py`` with ``torchrun --standalone --nproc-per-node nproc [torchrun_args]`` (``env`` added to the
    environment); never hangs past ``timeout``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SBPC_FORCE_GLOO": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           *torchrun_args, str(main), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def train_emitted(plan, out: Path, batches: list, steps: int) -> tuple[list[float], dict]:
    """Emit ``plan`` into ``out``, train ``steps`` steps on ``batches``; the logged losses and saved weights."""
    main = plan.emit(out)
    torch.save(batches, out / "data.pt")
    proc = torchrun(main, plan.cluster.world_size, "--steps", str(steps), "--data", str(out / "data.pt"),
                    "--metrics", str(out / "losses.jsonl"), "--save", str(out / "final.pt"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = [json.loads(line)["loss"] for line in (out / "losses.jsonl").read_text().splitlines()]
    return losses, torch.load(out / "final.pt", weights_only=True)


def train_eager(model: torch.nn.Module, batches: list, steps: int, optimizer: tuple) -> list[float]:
    """The single-process reference: ``steps`` optimizer steps, returning the losses."""
    cls, kwargs = optimizer
    opt = cls(model.parameters(), **kwargs)
    losses = []
    for batch in batches[:steps]:
        opt.zero_grad()
        loss = model(*batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_state_close(saved: dict, model: torch.nn.Module, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """The saved full state_dict equals the model's, under the model's own keys."""
    expected = model.state_dict()
    assert set(saved) == set(expected), set(saved) ^ set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(saved[key], value, rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")
