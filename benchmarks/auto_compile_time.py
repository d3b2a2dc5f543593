"""``strategy="auto"`` compile time on tiny transformers models (issue 15, part 7), per phase.

Each model of ``tests/zoo.py`` named below is compiled with ``strategy="auto"`` on ``local:4`` with a fresh
plan (the plan cache neither read nor written), and its row splits ``compile()`` into capture
(torch.export), search (the planner) and the passes that lay out the chosen plan; wall seconds, and the
process's CPU seconds (on a shared machine, wall time measures the neighbours too). ``--check`` also
runs the plan on the virtual mesh and compares the loss and every gradient with eager PyTorch.

    python benchmarks/auto_compile_time.py [--models llama mistral ...] [--check]

The goal: every model under 10 s.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compiler import Cluster, api  # noqa: E402
from tests.models import assert_close_to_eager  # noqa: E402
from tests.zoo import ZOO  # noqa: E402

MODELS = ("llama", "mistral", "phi3", "gemma2", "gemma3", "qwen3", "gpt2", "gptj", "falcon", "t5")
PHASES = {"capture": "capture_model", "search": "search_strategy", "passes": "run_passes"}
"""Phase name -> the function of :mod:`compiler.api` that ``compile()`` runs it with."""


@contextlib.contextmanager
def phase_timers(seconds: dict):
    """Time the phases of ``compile()`` into ``seconds`` (name -> wall seconds) while inside."""
    originals = {name: getattr(api, attr) for name, attr in PHASES.items()}

    def timed(name, function):
        def run(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
        return run

    for name, attr in PHASES.items():
        setattr(api, attr, timed(name, originals[name]))
    try:
        yield seconds
    finally:
        for name, attr in PHASES.items():
            setattr(api, attr, originals[name])


def measure(name: str, check: bool) -> dict:
    """One model's row: wall and CPU seconds of the whole compile, each phase's wall seconds, the plan."""
    zoo = ZOO[name]
    model, inputs = zoo.build(), zoo.inputs()
    seconds: dict = {}
    wall, cpu = time.perf_counter(), time.process_time()
    with phase_timers(seconds):
        plan = api.compile(model, inputs, cluster=Cluster.local(4), strategy="auto",
                           search_options={"use_cache": False})
    row = {"model": name, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, **seconds,
           "plan": plan.search_report.chosen.summary}
    if check:
        assert_close_to_eager(plan.run_virtual(*inputs), zoo.build(), inputs)
        row["equals_eager"] = True
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=sorted(ZOO))
    parser.add_argument("--check", action="store_true", help="also compare the plan with eager on the virtual mesh")
    args = parser.parse_args(argv)
    measure("gpt2", check=False)  # imports and first-call caches, not any model's compile
    print(f"{'model':10} {'wall s':>7} {'cpu s':>6} {'capture':>8} {'search':>7} {'passes':>7}  plan")
    for name in args.models:
        row = measure(name, args.check)
        print(f"{name:10} {row['wall_s']:7.1f} {row['cpu_s']:6.1f} {row['capture']:8.1f} {row['search']:7.1f} "
              f"{row['passes']:7.1f}  {row['plan']}{'  (equals eager)' if row.get('equals_eager') else ''}",
              flush=True)


if __name__ == "__main__":
    main()
