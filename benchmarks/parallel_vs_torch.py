"""Emitted DP / TP / FSDP programs against DDP, parallelize_module and fully_shard (2 ranks, gloo).

    python benchmarks/parallel_vs_torch.py [--ranks 2] [--steps 10]

The emitted programs' step time is measured from two runs that differ only in their step count
(start-up cancels out); the native baselines time their own loop. Prints one ratio per strategy:
emitted / native step time (below 1 means the compiler's program is faster).
"""
from __future__ import annotations

import argparse
import os
import re
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


def emitted_step_time(strategy, ranks: int, steps: int, workdir: Path) -> float:
    batches = [bench_batch(i) for i in range(steps + 2)]
    plan = compile(bench_model(), batches[0], cluster=Cluster.local(ranks), strategy=strategy,
                   optimizer=(torch.optim.SGD, {"lr": 0.1}))
    main = plan.emit(workdir)
    torch.save(batches, workdir / "data.pt")
    short, _ = launch(main, ranks, "--steps", "2", "--data", str(workdir / "data.pt"))
    long, _ = launch(main, ranks, "--steps", str(steps + 2), "--data", str(workdir / "data.pt"))
    return (long - short) / steps


def native_step_time(mode: str, ranks: int, steps: int) -> float:
    _, out = launch(HERE / "torch_native.py", ranks, "--mode", mode, "--steps", str(steps))
    return float(re.search(r"step_time_s ([0-9.]+)", out).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--only", choices=list(STRATEGIES), action="append")
    args = parser.parse_args()
    print(f"GPT {BENCH_CONFIG}, {args.ranks} ranks on gloo, {args.steps} timed steps")
    print(f"{'strategy':>8} {'emitted s/step':>15} {'native s/step':>14} {'native':>16} {'ratio':>7}")
    for name in args.only or list(STRATEGIES):
        native_mode, strategy = STRATEGIES[name]
        with tempfile.TemporaryDirectory() as tmp:
            emitted = emitted_step_time(strategy(args.ranks), args.ranks, args.steps, Path(tmp))
        native = native_step_time(native_mode, args.ranks, args.steps)
        label = {"ddp": "DDP", "tp": "parallelize_module", "fsdp": "fully_shard"}[native_mode]
        print(f"{name:>8} {emitted:>15.4f} {native:>14.4f} {label:>16} {emitted / native:>7.2f}")


if __name__ == "__main__":
    main()
