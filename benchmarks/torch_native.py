"""PyTorch-native baselines for the benchmarks: DDP, parallelize_module (TP) and fully_shard (FSDP).

Launched by ``benchmarks/parallel_vs_torch.py`` under torchrun on gloo; trains the same GPT the
emitted programs train, on the same synthetic batches, and prints the steady-state step time.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import gpt  # noqa: E402

BENCH_CONFIG = gpt.GPTConfig(vocab_size=2048, block_size=128, n_layer=4, n_head=8, n_embd=256)
BATCH, SEQ = 16, 128


def bench_model() -> gpt.GPT:
    """The GPT every benchmark trains (deterministic weights)."""
    torch.manual_seed(0)
    return gpt.GPT(BENCH_CONFIG)


def bench_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic global batch for step ``step``."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, BENCH_CONFIG.vocab_size, (BATCH, SEQ), generator=g)
    return ids, torch.randint(0, BENCH_CONFIG.vocab_size, (BATCH, SEQ), generator=g)


def local_heads_forward(self, x):
    """Attention over this rank's heads (torchtitan's approach: the module sees local head counts)."""
    B, T, _ = x.shape
    qkv = self.qkv(x)
    heads = qkv.shape[-1] // (3 * self.head_dim)
    q, k, v = qkv.view(B, T, heads, 3 * self.head_dim).split(self.head_dim, dim=3)
    y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
    return self.proj(y.transpose(1, 2).reshape(B, T, heads * self.head_dim))


def wrap(model: torch.nn.Module, mode: str, world: int):
    """The model prepared for ``mode``, and the rank's share of each batch."""
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model), "batch"
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, "batch"
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    plan = {}
    for i in range(len(model.blocks)):
        plan.update({f"blocks.{i}.attn.qkv": ColwiseParallel(), f"blocks.{i}.attn.proj": RowwiseParallel(),
                     f"blocks.{i}.mlp.fc": ColwiseParallel(), f"blocks.{i}.mlp.proj": RowwiseParallel()})
    parallelize_module(model, mesh, plan)
    gpt.CausalSelfAttention.forward = local_heads_forward
    return model, "full"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ddp", "tp", "fsdp"], required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    model, share = wrap(bench_model(), args.mode, world)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    start = 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            dist.barrier()
            start = time.perf_counter()
        ids, targets = bench_batch(step)
        if share == "batch":
            ids, targets = ids.chunk(world)[rank], targets.chunk(world)[rank]
        opt.zero_grad()
        model(ids, targets).backward()
        opt.step()
    dist.barrier()
    if rank == 0:
        print(f"step_time_s {(time.perf_counter() - start) / args.steps:.6f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
