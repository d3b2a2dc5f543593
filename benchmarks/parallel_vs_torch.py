"""Emitted DP / TP / FSDP programs against DDP, parallelize_module and fully_shard (2 ranks, gloo).

    python benchmarks/parallel_vs_torch.py [--ranks 2] [--steps 10] [--repeat 3]

Both sides time their own steady-state loop after 2 warmup steps: the emitted program from its --metrics
lines (each step's seconds), the native baseline from a barrier before and after its timed steps; start-up is
not counted on either side. Prints one ratio per strategy: emitted / native step time (below 1 means the
compiler's program is faster). With --repeat N the two are measured N times in turn (a shared machine's load
changes from minute to minute) and the median of the N ratios is printed after them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from torch_native import BENCH_CONFIG, bench_batch, bench_model  # noqa: E402

from compiler import Cluster, compile  # noqa: E402

MEGATRON = {"blocks.*.attn.qkv.weight": "S(0)", "blocks.*.attn.qkv.bias": "S(0)", "blocks.*.attn.proj.weight": "S(1)",
            "blocks.*.mlp.fc.weight": "S(0)", "blocks.*.mlp.fc.bias": "S(0)", "blocks.*.mlp.proj.weight": "S(1)"}
STRATEGIES = {
    "dp": ("ddp", lambda n: "dp"),
    "tp": ("tp", lambda n: {"mesh": {"tp": n}, "params": {k: {"tp": v} for k, v in MEGATRON.items()}}),
    "fsdp": ("fsdp", lambda n: "fsdp"),
}


def launch(script: Path, ranks: int, *args: str) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SBPC_FORCE_GLOO": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           str(script), *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    if proc.returncode:
        raise RuntimeError(f"{script} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start, proc.stdout


WARMUP = 2


def emit_program(strategy, ranks: int, steps: int, workdir: Path) -> Path:
    """The emitted program of the benchmark GPT under ``strategy``, with its batches beside it."""
    batches = [bench_batch(i) for i in range(steps + WARMUP)]
    plan = compile(bench_model(), batches[0], cluster=Cluster.local(ranks), strategy=strategy,
                   optimizer=(torch.optim.SGD, {"lr": 0.1}))
    main = plan.emit(workdir)
    torch.save(batches, workdir / "data.pt")
    return main


def emitted_step_time(main: Path, ranks: int, steps: int) -> float:
    """The mean of the program's own step times (its --metrics seconds) after the warmup steps."""
    metrics = main.parent / "metrics.jsonl"
    launch(main, ranks, "--steps", str(steps + WARMUP), "--data", str(main.parent / "data.pt"), "--metrics", str(metrics))
    seconds = [json.loads(line)["seconds"] for line in metrics.read_text().splitlines()][WARMUP:]
    return sum(seconds) / len(seconds)


def native_step_time(mode: str, ranks: int, steps: int) -> float:
    _, out = launch(HERE / "torch_native.py", ranks, "--mode", mode, "--steps", str(steps), "--warmup", str(WARMUP))
    return float(re.search(r"step_time_s ([0-9.]+)", out).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--only", choices=list(STRATEGIES), action="append")
    parser.add_argument("--repeat", type=int, default=1, help="measure both sides this many times, in turn")
    args = parser.parse_args()
    print(f"GPT {BENCH_CONFIG}, {args.ranks} ranks on gloo, {args.steps} timed steps after {WARMUP} warmup steps")
    print(f"{'strategy':>8} {'emitted s/step':>15} {'native s/step':>14} {'native':>16} {'ratio':>7}")
    for name in args.only or list(STRATEGIES):
        native_mode, strategy = STRATEGIES[name]
        label = {"ddp": "DDP", "tp": "parallelize_module", "fsdp": "fully_shard"}[native_mode]
        ratios = []
        with tempfile.TemporaryDirectory() as tmp:
            main = emit_program(strategy(args.ranks), args.ranks, args.steps, Path(tmp))
            for _ in range(args.repeat):
                emitted = emitted_step_time(main, args.ranks, args.steps)
                native = native_step_time(native_mode, args.ranks, args.steps)
                ratios.append(emitted / native)
                print(f"{name:>8} {emitted:>15.4f} {native:>14.4f} {label:>16} {ratios[-1]:>7.2f}", flush=True)
        if args.repeat > 1:
            print(f"{name:>8} {'median of ' + str(args.repeat):>47} {statistics.median(ratios):>7.2f}", flush=True)


if __name__ == "__main__":
    main()
