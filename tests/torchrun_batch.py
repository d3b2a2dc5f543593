"""Serves emitted programs to every rank of ONE long-lived torchrun launch (tests only).

Each rank of a torchrun launch pays, before its first step, about 1 s of CPU importing torch and 1 s
importing ``torch._dynamo`` (torch's optimizers import it), and the agent about 1.5 s more: a 4-rank launch
costs some 10-20 s of CPU before any program runs, which on a small test machine is most of a
multi-process test's time. The tests therefore keep one launch per world size for the whole test process
(``tests.launch.run_programs``) and hand it their programs one after another: this script, started by
``torchrun`` like any program, waits for the next job in a queue folder and runs its ``main.py`` as
``python main.py ARGS`` would (as ``__main__``, with its own ``runtime.py`` imported afresh, its own
``sys.argv`` and working directory, torch's default random state as a fresh process has it, and its own
process group, which the program creates and destroys). Each program joins through a rendezvous store of
its own (:func:`fresh_store`): process groups created again in the same processes take the same names, so
keys the previous program left in torchrun's store would pair them with that program's closed connections.
What a shared launch cannot see is how a program's own process ends (interpreter teardown with its process
groups); the tests that launch one program alone (the checkpoint, restart, multi-node and error-path tests)
cover that.

Usage: ``torchrun ... torchrun_batch.py QUEUE PARENT_PID``. Job ``k`` is the file ``QUEUE/k.json``,
``{"main": path, "args": [...], "cwd": path, "out": folder}``, written whole (renamed into place). Rank r
writes the program's stdout and stderr to ``out/rank{r}.out`` / ``out/rank{r}.err`` and, once the program
has returned, ``out/rank{r}.ok``. The first program that fails ends the launch with its exit code (torchrun
then stops the other ranks); so does a file ``QUEUE/stop``, the end of the process ``PARENT_PID``, or
:data:`IDLE_S` without a job.
"""
from __future__ import annotations

import datetime
import json
import os
import runpy
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(seconds=120)
IDLE_S = 600


def exit_code(error: SystemExit) -> int:
    """The process exit status ``sys.exit(code)`` would give."""
    if error.code is None:
        return 0
    return error.code if isinstance(error.code, int) else 1


def run_program(main: str, args: list[str]) -> int:
    """Run ``main`` as ``__main__`` with ``args``; its exit status."""
    sys.modules.pop("runtime", None)  # every program imports the runtime.py beside it
    sys.path.insert(0, str(Path(main).parent))
    sys.argv = [main, *args]
    try:
        runpy.run_path(main, run_name="__main__")
        return 0
    except SystemExit as error:
        return exit_code(error)
    except BaseException:  # a crash prints its traceback, as the interpreter would
        traceback.print_exc()
        return 1
    finally:
        sys.path.remove(str(Path(main).parent))
        sys.modules.pop("runtime", None)


def run_with_output_to(out: Path, rank: int, main: str, args: list[str]) -> int:
    """Run one program with this process's stdout/stderr (file descriptors 1 and 2, so torch's own C++
    messages too) sent to ``out/rank{rank}.out`` / ``.err``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(out / f"rank{rank}.out", "w") as stdout, open(out / f"rank{rank}.err", "w") as stderr:
        os.dup2(stdout.fileno(), 1)
        os.dup2(stderr.fileno(), 2)
        try:
            return run_program(main, args)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def fresh_store(agent_store: dist.Store, index: int, rank: int) -> dist.TCPStore | None:
    """Rank 0 starts a new TCP store for job ``index`` and announces its port in torchrun's store; every rank
    points MASTER_PORT at it, so that the program's ``init_process_group`` joins there. Rank 0's server (the
    returned store) must live until the program has finished."""
    server = None
    if rank == 0:
        server = dist.TCPStore(os.environ["MASTER_ADDR"], 0, is_master=True, timeout=TIMEOUT, wait_for_workers=False)
        agent_store.set(f"sbpc_batch/{index}/port", str(server.port))
    os.environ["MASTER_PORT"] = agent_store.get(f"sbpc_batch/{index}/port").decode()
    return server


def main() -> None:
    """Serve the jobs of the queue folder named on the command line, in order, until told to stop."""
    queue, parent = Path(sys.argv[1]), int(sys.argv[2])
    rank = int(os.environ["RANK"])
    agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                timeout=TIMEOUT)
    fresh_random_state = torch.random.get_rng_state()
    start_dir = os.getcwd()
    index = 0
    while (job := next_job(queue, index, parent)) is not None:
        out = Path(job["out"])
        out.mkdir(parents=True, exist_ok=True)
        torch.random.set_rng_state(fresh_random_state)
        os.chdir(job["cwd"] or start_dir)
        server = fresh_store(agent_store, index, rank)
        code = run_with_output_to(out, rank, job["main"], job["args"])
        if code != 0:
            sys.exit(code)
        (out / f"rank{rank}.ok").touch()
        finished = agent_store.add(f"sbpc_batch/{index}/finished", 1)
        while server is not None and finished < int(os.environ["WORLD_SIZE"]):  # rank 0's server outlives every use
            time.sleep(0.01)
            finished = agent_store.add(f"sbpc_batch/{index}/finished", 0)
        index += 1


def next_job(queue: Path, index: int, parent: int) -> dict | None:
    """Job ``index`` of ``queue`` once it is there; None when the queue is stopped, the test process ``parent``
    has gone or no job came for :data:`IDLE_S`."""
    deadline = time.monotonic() + IDLE_S
    while time.monotonic() < deadline and not (queue / "stop").exists() and process_exists(parent):
        try:
            return json.loads((queue / f"{index}.json").read_text())
        except FileNotFoundError:
            time.sleep(0.05)
    return None


def process_exists(pid: int) -> bool:
    """Whether the process ``pid`` is still running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


if __name__ == "__main__":
    main()
