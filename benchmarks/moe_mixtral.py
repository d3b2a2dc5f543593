"""Mixtral-8x7B-sized training on 4 DGX-H100 nodes (32 GPUs), simulated: ``strategy="auto"`` against a
hand-written Megatron-style layout (experts over ep=8 inside a node, tp=1, a 4-stage pipeline).

transformers' ``MixtralForCausalLM`` at 8x7B's sizes (hidden 4096, 14336-wide experts, 8 experts, top-2,
32 layers, 32 heads, 8 key/value heads, vocabulary 32000, sequence 4096) is built on the meta device in
bf16, captured with :data:`CAPTURED_BLOCKS` blocks standing for all 32 (``BLOCK_COUNT_ATTR``), and priced
by the simulator with Adam in bf16 (mixed: fp32 master weights and moments). Expert parallelism folds the
experts over ``ep`` of the data-parallel ranks; its dispatch and combine are all-to-alls on the links the
``ep`` group crosses (NVLink inside a node). The all-to-all share of the step is printed for both plans.

    python benchmarks/moe_mixtral.py [--batch 256] [--imbalance 1.0]

Measured (2-core shared machine, planning 158 s): auto chose dp=4 ep=8 tp=1 pp=1 with the all-to-alls in 4 chunks
(``moe_overlap_chunks 4``: each chunk's exchange overlaps the experts' compute of another), 2 microbatches, every
block recomputed: 6.50 s/step, 70.0 GiB peak, all-to-all 0.7% of the step (6.68 s and 2.5% in one chunk); the
Megatron-style layout (one chunk) 7.66 s/step, 19.3 GiB, all-to-all 2.4%: auto / Megatron-style 0.85x.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from cluster import Cluster  # noqa: E402
from compiler.simulate import simulate  # noqa: E402
from frontend.torch_capture import capture  # noqa: E402
from passes.planner.evaluate import BLOCK_COUNT_ATTR  # noqa: E402
from passes.planner.search import search  # noqa: E402

CAPTURED_BLOCKS = 2
LAYERS = 32
SEQ = 4096
CLUSTER = "dgx-h100:4"
EXPERTS = ("model.layers.*.mlp.experts.gate_up_proj", "model.layers.*.mlp.experts.down_proj")
MEGATRON = {"mesh": {"pp": 4, "ep": 8}, "params": {name: {"ep": "S(0)"} for name in EXPERTS}, "schedule": "1f1b",
            "microbatches": 32, "recompute": True}
"""The hand-written layout: 4 pipeline stages of one node each, the experts over the node's 8 GPUs (ep=8, which
also splits the batch), no tensor parallelism, 32 microbatches of one sequence per rank (batch 256), every
block recomputed (without it a stage holds 152 GiB of activations: it does not fit)."""


class Loss(torch.nn.Module):
    """``forward(input_ids, labels)`` -> the causal LM's loss."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, labels=labels).loss


def captured_mixtral():
    """Mixtral-8x7B's graph (meta device, bf16) with :data:`CAPTURED_BLOCKS` blocks standing for :data:`LAYERS`."""
    from transformers import MixtralConfig, MixtralForCausalLM
    cfg = MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=CAPTURED_BLOCKS,
                        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=SEQ, use_cache=False, router_jitter_noise=0.0,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    with torch.device("meta"):
        model = Loss(MixtralForCausalLM(cfg).to(torch.bfloat16))
    tokens = torch.zeros(2, SEQ, dtype=torch.long, device="meta")  # batch 1 would be specialised as a constant
    graph = capture(model, (tokens, tokens), train=True).graph
    graph.attrs["example_dims"] = {"batch": 2, "seq": SEQ}
    graph.attrs[BLOCK_COUNT_ATTR] = LAYERS
    return graph


def all_to_all_share(report) -> float:
    """The share of the step spent in (exposed) all-to-alls, from the simulator's breakdown."""
    total = sum(report.breakdown.values())
    return sum(v for k, v in report.breakdown.items() if "all_to_all" in k) / total if total else 0.0


def main(argv: list[str] | None = None) -> None:
    """Plan with auto, simulate it beside the Megatron-style layout, print both."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="global batch (sequences of 4096 tokens)")
    parser.add_argument("--imbalance", type=float, default=1.0, help="routing imbalance (moe_imbalance)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    graph = captured_mixtral()
    print(f"captured {CAPTURED_BLOCKS} blocks of Mixtral-8x7B (standing for {LAYERS}) in {time.perf_counter() - start:.0f} s")
    cluster = Cluster.load(CLUSTER)
    options = dict(precision="bf16", optimizer="adam", global_batch=args.batch, moe_imbalance=args.imbalance)
    start = time.perf_counter()
    strategy, plan = search(graph, cluster, "auto", use_cache=False, **options)
    print(f"auto planned in {time.perf_counter() - start:.0f} s: {plan.chosen.summary}")
    auto = simulate((graph, strategy, cluster), **options)
    megatron = simulate((graph, MEGATRON, cluster), **options)
    print("| plan | step s | all-to-all share | peak GiB | fits |")
    print("|---|---|---|---|---|")
    for name, report in (("auto: " + plan.chosen.summary, auto), ("Megatron-style ep8 tp1 pp4", megatron)):
        print(f"| {name} | {report.step_time_s:.3f} | {all_to_all_share(report):.1%} | "
              f"{max(report.peak_memory_bytes.values()) / 2**30:.1f} | {report.fits} |")
    print(f"auto / Megatron-style: {auto.step_time_s / megatron.step_time_s:.2f}x")


if __name__ == "__main__":
    main()
