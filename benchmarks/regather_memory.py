"""Memory and time of ``regather_activations`` on this machine: the GPT example under tensor and sequence
parallelism, its programs run under torchrun (gloo) with the gathered norm outputs kept whole and kept as shards.

Both programs are emitted from the same model and batch; each runs ``--steps`` steps on ``--ranks`` CPU ranks.
Printed per program: the simulator's peak memory of rank 0 (cluster ``local:<ranks>``), the measured peak
resident memory of rank 0 (the interpreter and torch included) and the median step time; then what keeping the
shards saves, simulated against measured, and the step-time ratio. On this machine the peak is the process's
resident size, so the saving shows as a difference of peaks, not a ratio of activation memory; the programs run
with glibc's allocator mapping every block of 1 MiB or more on its own (:data:`ALLOCATOR_ENV`), so that the
resident size follows the live tensors instead of the heap's high-water mark (with glibc's adaptive threshold
the same run measured the saving anywhere from -78 to +47 MiB).

    python benchmarks/regather_memory.py [--layers 4] [--width 512] [--batch 8] [--seq 512] [--ranks 2] [--steps 4]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpt  # noqa: E402
from cluster import Cluster  # noqa: E402
from compiler.api import compile  # noqa: E402
from frontend.dsl import load_plan  # noqa: E402
from simulator_vs_measured import median_step_seconds, run_program  # noqa: E402

MIB = 2 ** 20
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
"""glibc maps blocks of 1 MiB or more on their own and unmaps them when freed (a fixed threshold)."""


def main(argv: list[str] | None = None) -> None:
    """Compile, simulate, run and compare the two programs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    os.environ.update(ALLOCATOR_ENV)  # the programs' processes inherit it
    config = gpt.GPTConfig(n_layer=args.layers, n_embd=args.width, n_head=8, block_size=args.seq)
    inputs = gpt.example_inputs(batch=args.batch, seq=args.seq)
    megatron = load_plan(str(ROOT / "examples" / "plans" / "megatron_tp.sbp")).to_dict()  # the Megatron layout
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for regather in (False, True):
            strategy = {**megatron, "mesh": {"tp": args.ranks}, "sequence_parallel": True,
                        "regather_activations": regather}
            plan = compile(gpt.GPT(config), inputs, cluster=Cluster.local(args.ranks), strategy=strategy)
            sim = plan.simulate()
            simulated = sim.peak_memory_bytes[0]
            workdir = plan.emit(Path(scratch) / f"regather_{regather}").parent
            records = run_program(workdir, args.steps, args.ranks)
            seconds = median_step_seconds(records)
            results[regather] = (simulated, max(r["memory_bytes"] for r in records), seconds, sim.step_time_s)
            print(f"{'shards kept' if regather else 'kept whole'}: simulated peak {simulated / MIB:.1f} MiB, "
                  f"measured peak resident {results[regather][1] / MIB:.1f} MiB, step {seconds * 1e3:.1f} ms")
    (sim_whole, rss_whole, t_whole, s_whole), (sim_kept, rss_kept, t_kept, s_kept) = results[False], results[True]
    print(f"saved by keeping shards: simulated {(sim_whole - sim_kept) / MIB:.1f} MiB, "
          f"measured {(rss_whole - rss_kept) / MIB:.1f} MiB; step time regathered / whole: measured "
          f"{t_kept / t_whole:.3f}, simulated {s_kept / s_whole:.3f} (uncalibrated local cluster)")


if __name__ == "__main__":
    main()
