"""Estimated iteration time of SkipPipe paths against the full pipeline, on two regions.

Run from the repository root: ``python benchmarks/skippipe_paths.py [--steps N] [--seed S]``.

Cluster: 8 nodes, one GPU each, one pipeline stage each; nodes 0-3 in region A, 4-7 in region B.
Links: 1 ms and 1 GB/s inside a region, 50 ms and 0.03 GB/s between the regions (per direction;
messages on one directed link queue behind each other). Stages 0-3 sit in region A, 4-7 in B, so
every microbatch crosses the slow link once each way whatever it skips (stage 0 and the loss
stage 7 are always kept).

Model (GPT-like, stated here; FLOPs from the usual dense-transformer count):
32 layers, hidden 4096, 32 heads, vocabulary 50257, sequence 2048, microbatch of 1 sequence,
bf16 activations. Forward FLOPs per layer ``24 b s h^2 + 4 b s^2 h``; LM head ``2 b s h V``.
Layers per stage ``2,5,5,5,5,5,4,1``: fewer layers on the stages that also hold the embedding
(stage 0) and the LM head and loss (stage 7), so their forward costs are close to the others'.
Backward = 2 x forward. Activation (and gradient) per message: ``b s h`` bf16 values = 16.8 MB,
which holds the slow link 0.56 s. Two GPU speeds: 15 TFLOP/s sustained (consumer cards; compute
dominates) and 60 TFLOP/s (data-centre cards; the slow link dominates).

The estimate is the simulated makespan of one 1F1B iteration (see passes/skippipe.py): no
optimizer step, no data-parallel all-reduce. Two things drive the ratios. With r = 0.5 a path keeps
stages 0 and 7 and only 2 of the 6 middle stages, so the middle stages (the bottleneck of the full
pipeline) carry a third of their work. And links are modelled per node pair: the full pipeline
sends every microbatch over the one pair 3 -> 4, while skip paths cross on several pairs (2 -> 5,
1 -> 6, ...) at once; with per-node uplinks as the real limit the link-bound rows (60 TFLOP/s)
would gain less.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any checkout

from passes.skippipe import SkipPipeProblem, plan_skip_paths  # noqa: E402


@dataclass(frozen=True)
class GPTLikeConfig:
    """The model the per-stage costs come from."""

    n_layer: int = 32
    hidden: int = 4096
    n_head: int = 32
    vocab: int = 50257
    seq_len: int = 2048
    microbatch: int = 1
    bytes_per_value: int = 2
    layers_per_stage: tuple[int, ...] = (2, 5, 5, 5, 5, 5, 4, 1)

    def layer_forward_flops(self) -> float:
        """Dense transformer layer: QKV/proj/MLP matmuls plus attention scores and values."""
        b, s, h = self.microbatch, self.seq_len, self.hidden
        return 24 * b * s * h * h + 4 * b * s * s * h

    def head_forward_flops(self) -> float:
        """LM head logits (the embedding lookup is negligible)."""
        return 2 * self.microbatch * self.seq_len * self.hidden * self.vocab

    def stage_forward_flops(self) -> list[float]:
        """Per stage forward FLOPs for one microbatch; the last stage also runs the LM head."""
        flops = [n * self.layer_forward_flops() for n in self.layers_per_stage]
        flops[-1] += self.head_forward_flops()
        return flops

    def activation_bytes(self) -> float:
        """Hidden states handed from one stage to the next, per microbatch."""
        return self.microbatch * self.seq_len * self.hidden * self.bytes_per_value


INTRA_REGION = (0.001, 1e9)
INTER_REGION = (0.050, 0.03e9)
REGION_SIZE = 4


def two_region_link(src: int, dst: int) -> tuple[float, float]:
    """(latency_s, bandwidth_Bps) between nodes; nodes 0-3 form region A, 4-7 region B."""
    return INTRA_REGION if src // REGION_SIZE == dst // REGION_SIZE else INTER_REGION


def estimate(config: GPTLikeConfig, flops_per_s: float, microbatches: int, skip_ratio: float,
             steps: int, seed: int) -> float:
    """Estimated iteration time of the best plan found for ``skip_ratio`` (0 = full pipeline)."""
    assert sum(config.layers_per_stage) == config.n_layer, "layers_per_stage must add up to n_layer"
    problem = SkipPipeProblem(
        stage_devices=list(range(len(config.layers_per_stage))),
        forward_time_s=[f / flops_per_s for f in config.stage_forward_flops()],
        link=two_region_link,
        activation_bytes=config.activation_bytes(),
        num_microbatches=microbatches,
    )
    return plan_skip_paths(problem, skip_ratio, search_steps=steps, seed=seed).estimated_iteration_time_s


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="local-search steps per plan")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = GPTLikeConfig()
    forward = config.stage_forward_flops()
    print(f"model: {config}")
    print(f"forward TFLOP per stage: {', '.join(f'{f / 1e12:.2f}' for f in forward)}; "
          f"activation per message {config.activation_bytes() / 1e6:.1f} MB "
          f"({config.activation_bytes() / INTER_REGION[1]:.2f} s on the slow link)")
    header = (f"{'GPU TFLOP/s':>11} {'m':>3} {'skip r':>6} {'full (s)':>9} {'SkipPipe (s)':>12} "
              f"{'ratio':>6} {'plan (s)':>8}")
    print(header)
    print("-" * len(header))
    for flops_per_s in (15e12, 60e12):
        for microbatches in (8, 32):
            full = estimate(config, flops_per_s, microbatches, 0.0, args.steps, args.seed)
            for ratio in (0.25, 0.5):
                started = time.perf_counter()
                skipped = estimate(config, flops_per_s, microbatches, ratio, args.steps, args.seed)
                took = time.perf_counter() - started
                print(f"{flops_per_s / 1e12:>11.0f} {microbatches:>3} {ratio:>6.2f} {full:>9.2f} "
                      f"{skipped:>12.2f} {skipped / full:>6.2f} {took:>8.2f}")


if __name__ == "__main__":
    main()
