"""Simulated against measured step time of the GPT example's emitted DP and TP programs on ``local:2``.

1. ``cost.calibrate.calibrate(2)`` (``sbpc calibrate``) measures this machine and writes a cluster
   spec: matmul FLOP/s and memory bandwidth, per-op efficiency (matmuls by size) and dispatch overhead,
   gloo collectives as a busy step meets them, and how much of an all-reduce hides behind compute.
2. The GPT example is compiled for that cluster with data parallelism and with Megatron tensor
   parallelism (``examples/plans/megatron_tp.sbp``); ``plan.simulate()`` prices each step.
3. Each program is emitted and run under ``torchrun --nproc-per-node 2`` on gloo; the step time is the
   median of the per-step seconds the program records, after warm-up steps.

    python benchmarks/simulator_vs_measured.py [--steps 22] [--layers 2] [--width 256] [--batch 8] [--seq 64]
        [--spec calibrated-local.yaml]   # a spec from `sbpc calibrate` instead of calibrating now

The goal is agreement within 30%.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import gpt  # noqa: E402
import torch  # noqa: E402
from cost.calibrate import calibrate  # noqa: E402
from compiler.api import compile  # noqa: E402
from frontend.dsl import load_plan  # noqa: E402
from cluster import Cluster  # noqa: E402

WARMUP_STEPS = 2
GOAL = 0.30


def measure(plan, workdir: Path, steps: int) -> float:
    """Median seconds per step of the emitted program under torchrun (gloo, two CPU ranks)."""
    plan.emit(workdir)
    metrics = workdir / "metrics.jsonl"
    threads = max(1, (os.cpu_count() or 2) // 2)  # what calibration gave each rank
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(workdir / "main.py"), "--steps", str(steps), "--metrics", str(metrics)]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the emitted program failed ({done.returncode}):\n{done.stderr[-2000:]}")
    seconds = [json.loads(line)["seconds"] for line in metrics.read_text().splitlines()]
    return statistics.median(seconds[WARMUP_STEPS:] or seconds)


def main(argv: list[str] | None = None) -> None:
    """Calibrate, compile, simulate, run, and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=22)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=256, help="n_embd (the example's default is 64, where "
                        "per-op dispatch rather than arithmetic sets the step time)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="quick calibration (fewer repeats)")
    parser.add_argument("--spec", help="a spec written by `sbpc calibrate --world-size 2` (default: calibrate now)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        spec_path = Path(args.spec) if args.spec else Path(scratch) / "calibrated-local.yaml"
        if not args.spec:
            calibrate(2, spec_path, quick=args.quick)
        cluster = Cluster.load(spec_path)
        if cluster.world_size != 2 or "calibration" not in cluster.metadata:
            parser.error(f"--spec {spec_path}: expected a 2-rank spec from `sbpc calibrate`, found {cluster!r}")
        calibration = cluster.metadata.get("calibration", {})
        device = cluster.devices[0]
        all_reduce = cluster.nodes[0].intra_link.for_collective("all_reduce")
        print(f"calibrated {cluster.name}: matmul {max(calibration['matmul_fp32_gflops'].values()):.1f} GFLOP/s "
              f"peak per rank (probe matmuls reach {device.efficiency_of('matmul')[0]:.2f} of it), memory "
              f"{calibration['elementwise_bytes_per_s'] / 1e9:.1f} GB/s, op dispatch "
              f"{device.op_overhead_s[0] * 1e6:.1f}/{device.op_overhead_s[1] * 1e6:.1f} us forward/backward; "
              f"gloo all-reduce steps {all_reduce.latency_s * 1e6:.0f} us + {all_reduce.bandwidth_Bps / 1e9:.2f} GB/s, "
              f"{device.comm_overlap:.0%} of it hidden behind compute")
        torch.manual_seed(0)
        model = gpt.GPT(gpt.GPTConfig(n_layer=args.layers, n_embd=args.width, block_size=max(64, args.seq)))
        inputs = gpt.example_inputs(batch=args.batch, seq=args.seq)
        plans = {"DP": "dp", "TP (Megatron)": load_plan(str(ROOT / "examples" / "plans" / "megatron_tp.sbp"))}
        print(f"GPT example: {args.layers} layers of width {args.width}, batch {args.batch}, sequence {args.seq}; "
              f"median of "
              f"{args.steps - WARMUP_STEPS} steps after {WARMUP_STEPS} warm-up steps")
        print(f"{'program':<16} {'simulated ms':>13} {'measured ms':>12} {'sim/measured':>13}")
        worst = 0.0
        for name, strategy in plans.items():
            plan = compile(model, inputs, cluster=cluster, strategy=strategy)
            # The emitted runtime launches gradient all-reduces during backward; how much of them hides
            # behind it is the calibrated comm_overlap (on CPU ranks, little: gloo needs the busy cores).
            simulated = plan.simulate().step_time_s
            measured = measure(plan, Path(scratch) / name.split()[0].lower(), args.steps)
            ratio = simulated / measured
            worst = max(worst, abs(ratio - 1))
            print(f"{name:<16} {simulated * 1e3:>13.2f} {measured * 1e3:>12.2f} {ratio:>13.2f}", flush=True)
        print(f"largest disagreement {worst * 100:.0f}% ({'within' if worst <= GOAL else 'outside'} the "
              f"{GOAL * 100:.0f}% goal)")


if __name__ == "__main__":
    main()
