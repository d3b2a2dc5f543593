"""Launching emitted programs under a real torchrun (gloo), for the multi-process tests."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch

TIMEOUT_S = 240


def torchrun(main: Path, nproc: int, *args: str, timeout: int = TIMEOUT_S, torchrun_args: tuple[str, ...] = (),
             env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``main.py`` with ``torchrun --standalone --nproc-per-node nproc [torchrun_args]`` (``env`` added to the
    environment, in ``cwd``); never hangs past ``timeout``."""
    return subprocess.run(torchrun_command(main, nproc, *args, torchrun_args=torchrun_args), capture_output=True,
                          text=True, timeout=timeout, env=torchrun_env(env), cwd=cwd)


def torchrun_command(main: Path, nproc: int, *args: str, torchrun_args: tuple[str, ...] = ()) -> list[str]:
    """The command line of a single-node torchrun launch of ``main.py`` with ``nproc`` ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            *torchrun_args, str(main), *args]


def torchrun_env(extra: dict | None = None) -> dict:
    """This process's environment for a launch: one intra-op thread per rank (the ranks share the test
    machine's cores), gloo even where CUDA is present, and ``extra``."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "SBPC_FORCE_GLOO": "1", **(extra or {})}


@dataclass(frozen=True)
class Program:
    """One emitted program to run: ``torchrun --nproc-per-node nproc main.py *args`` in ``cwd``."""

    main: Path
    nproc: int
    args: tuple[str, ...] = ()
    cwd: Path | None = None
    timeout: int = field(default=TIMEOUT_S, compare=False)


def run_programs(programs: dict) -> dict[object, subprocess.CompletedProcess]:
    """Run every program of ``programs`` (key -> :class:`Program`) under a real torchrun; the result of each, as
    :func:`torchrun` gives it (exit status and the program's own stdout/stderr, every rank's).

    The programs of one world size share one launch, kept for the whole test process (:class:`WarmLaunch`,
    ``tests/torchrun_batch.py`` runs them one after another in each rank), which saves each program the
    ~2 s of CPU per rank that importing torch costs and the agent's ~1.5 s. When a program fails (or runs
    past its timeout), it ends that launch and is run again alone, so that its error is exactly what a launch
    of its own gives; the programs after it start a new shared launch."""
    results = {}
    for key, program in programs.items():
        launch = _WARM.get(program.nproc)
        if launch is None or not launch.running():
            launch = _WARM[program.nproc] = WarmLaunch(program.nproc)
        results[key] = launch.run(program)
        if results[key] is None:
            launch.stop()
            results[key] = torchrun(program.main, program.nproc, *program.args, cwd=program.cwd,
                                    timeout=program.timeout)
    return results


class WarmLaunch:
    """One torchrun launch of ``tests/torchrun_batch.py`` with ``nproc`` ranks, serving programs from a queue
    folder until this test process stops it or ends (see that script)."""

    def __init__(self, nproc: int):
        self.nproc = nproc
        self.queue = Path(tempfile.mkdtemp(prefix="sbpc-warm-"))
        self.jobs = 0
        cmd = torchrun_command(Path(__file__).with_name("torchrun_batch.py"), nproc, str(self.queue), str(os.getpid()))
        with open(self.queue / "launch.log", "w") as log:
            self.process = subprocess.Popen(cmd, env=torchrun_env(), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def running(self) -> bool:
        """Whether the launch is still serving programs."""
        return self.process.poll() is None

    def run(self, program: Program) -> subprocess.CompletedProcess | None:
        """Run ``program`` in every rank; its result, or None when the launch ended (the program failed) or the
        program ran past its timeout."""
        out = self.queue / str(self.jobs)
        job = {"main": str(program.main), "args": list(program.args), "cwd": str(program.cwd or ""), "out": str(out)}
        written = self.queue / f"{self.jobs}.json.part"
        written.write_text(json.dumps(job))
        written.rename(self.queue / f"{self.jobs}.json")
        self.jobs += 1
        done = [out / f"rank{rank}.ok" for rank in range(self.nproc)]
        deadline = time.monotonic() + program.timeout
        while not all(path.exists() for path in done):
            if not self.running() or time.monotonic() > deadline:
                return None
            time.sleep(0.02)
        text = {stream: "".join((out / f"rank{rank}.{stream}").read_text() for rank in range(self.nproc))
                for stream in ("out", "err")}
        return subprocess.CompletedProcess([str(program.main), *program.args], 0, text["out"], text["err"])

    def stop(self) -> None:
        """End the launch: asked to (its ranks stop between programs), else after 10 s torchrun is told to stop
        its ranks, else after 30 s more every process of the launch is killed; its queue folder is removed (also
        when the launch had ended by itself)."""
        if self.running():
            (self.queue / "stop").touch()
        for ending, wait_s in ((None, 10), (self.process.terminate, 30), (self._kill, None)):
            if ending:
                ending()
            try:
                self.process.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(self.queue, ignore_errors=True)

    def _kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)


_WARM: dict[int, WarmLaunch] = {}
"""The shared launch of each world size in this test process."""


def stop_warm_launches() -> None:
    """Stop this test process's shared launches and remove their queue folders (at the end of the test session,
    ``tests/conftest.py``; pytest-xdist's workers end without running ``atexit``)."""
    for launch in _WARM.values():
        launch.stop()
    _WARM.clear()


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
    program = training_program(plan, out, batches, steps)
    return training_result(out, run_programs({"program": program})["program"])


def training_program(plan, out: Path, batches: list, steps: int, *args: str) -> Program:
    """``plan`` emitted into ``out`` with ``batches`` saved beside it: the program training ``steps`` steps on
    them (``args`` added), logging its losses and saving its weights (see :func:`training_result`)."""
    main = plan.emit(out)
    torch.save(batches, out / "data.pt")
    return Program(main, plan.cluster.world_size, ("--steps", str(steps), "--data", str(out / "data.pt"),
                                                   "--metrics", str(out / "losses.jsonl"),
                                                   "--save", str(out / "final.pt"), *args))


def training_result(out: Path, proc: subprocess.CompletedProcess) -> tuple[list[float], dict]:
    """What a :func:`training_program` run logged: its losses and saved weights (the run must have succeeded)."""
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = [json.loads(line)["loss"] for line in (out / "losses.jsonl").read_text().splitlines()]
    return losses, torch.load(out / "final.pt", weights_only=True)


def selected_tests(request, test_name: str) -> dict[str, dict]:
    """The tests of the function ``test_name`` in the requesting module that this session runs: test name (as
    ``request.node.name`` gives it) -> its parameters. What a module-scoped fixture running their programs in
    shared launches prepares."""
    return {item.name: item.callspec.params if hasattr(item, "callspec") else {} for item in request.session.items
            if item.module is request.module and item.originalname == test_name}


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
