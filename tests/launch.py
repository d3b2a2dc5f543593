"""Launching emitted programs under a real torchrun (gloo), for the multi-process tests."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

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


def import_program(main: Path) -> tuple[ModuleType, ModuleType]:
    """An emitted program imported into this process: its ``main.py`` (not run: it is no ``__main__``) and the
    ``runtime.py`` beside it that ``main.py`` imports from. Several programs may be imported one after another:
    each gets its own runtime module (removed from ``sys.modules`` again)."""
    sys.path.insert(0, str(main.parent))
    try:
        spec = importlib.util.spec_from_file_location(f"emitted_{abs(hash(str(main)))}", main)
        program = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(program)
        return program, sys.modules["runtime"]
    finally:
        sys.path.remove(str(main.parent))
        sys.modules.pop("runtime", None)


def train_emitted(plan, out: Path, batches: list, steps: int) -> tuple[list[float], dict]:
    """Emit ``plan`` into ``out``, train ``steps`` steps on ``batches``; the logged losses and saved weights."""
    main = plan.emit(out)
    torch.save(batches, out / "data.pt")
    proc = torchrun(main, plan.cluster.world_size, "--steps", str(steps), "--data", str(out / "data.pt"),
                    "--metrics", str(out / "losses.jsonl"), "--save", str(out / "final.pt"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = [json.loads(line)["loss"] for line in (out / "losses.jsonl").read_text().splitlines()]
    return losses, torch.load(out / "final.pt", weights_only=True)


def train_virtual(plan, batches: list, steps: int, optimizer: tuple) -> tuple[list[float], dict]:
    """The plan's own reference: ``steps`` steps on the virtual mesh, the optimizer updating the full
    parameters (an elementwise update, the same on shards); the losses and the trained parameters."""
    from backends.virtual import run_virtual
    weights = {name: value.detach().clone() for name, value in plan.weights.items()}
    cls, kwargs = optimizer
    params: dict = {}
    opt = None
    losses = []
    for batch in batches[:steps]:
        result = run_virtual(plan.graph, {**weights, **{k: p.detach() for k, p in params.items()}}, batch, "train")
        if opt is None:
            params = {name: torch.nn.Parameter(weights[name]) for name in result.grads}
            opt = cls(list(params.values()), **kwargs)
        for name, p in params.items():
            p.grad = result.grads[name].clone()
        opt.step()
        losses.append(result.loss.item())
    return losses, {name: p.detach() for name, p in params.items()}


def train_eager(model: torch.nn.Module, batches: list, steps: int, optimizer: tuple,
                autocast: torch.dtype | None = None) -> list[float]:
    """The single-process reference: ``steps`` optimizer steps, returning the losses; ``autocast``: the
    forward under ``torch.autocast`` in that dtype (mixed precision, the parameters and optimizer state
    staying in theirs)."""
    cls, kwargs = optimizer
    opt = cls(model.parameters(), **kwargs)
    losses = []
    for batch in batches[:steps]:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
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
