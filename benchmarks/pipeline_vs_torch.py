"""Step time of sbpc's emitted 2-stage pipelines against ``torch.distributed.pipelining``.

Run from the repository root: ``python benchmarks/pipeline_vs_torch.py [--steps N] [--layers L] ...``.
It launches, one after the other, four 2-rank torchrun jobs on gloo (CPU) training the bundled GPT
example (``examples/gpt.py``) with SGD:

- sbpc GPipe and sbpc 1F1B: ``compile(strategy={"mesh": {"pp": 2}, "stages": ["blocks.<L/2>"],
  "microbatches": m, "schedule": ...})``, emitted and run as generated (step times from the
  program's ``--metrics`` file);
- torch GPipe and torch 1F1B: the same model cut at the same block by hand into two
  ``PipelineStage`` s driven by ``ScheduleGPipe`` / ``Schedule1F1B`` (this file re-launched with
  ``--worker``). The tied embedding / head weight has a copy on each stage whose gradients are
  all-reduced after backward, as sbpc does.

It prints the median step time of each (the first ``--warmup`` steps dropped) and the ratios
sbpc / torch. Both sides run the same batches; their losses are printed to show they train alike.
SkipPipe's estimated iteration times (8 stages on two regions) are a separate benchmark:
``benchmarks/skippipe_paths.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from any checkout
sys.path.insert(0, str(ROOT / "examples"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import gpt  # noqa: E402

SCHEDULES = ("gpipe", "1f1b")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="training steps per job")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    parser.add_argument("--layers", type=int, default=4, help="GPT blocks (cut in half)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--worker", choices=SCHEDULES, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def batches(args) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same batches for every job."""
    return [gpt.example_inputs(batch=args.batch, seq=args.seq, seed=step + 1) for step in range(args.steps)]


# -- torch.distributed.pipelining (runs under torchrun with --worker) ------------------------------

class FirstHalf(nn.Module):
    """Embeddings and the first half of the blocks."""

    def __init__(self, model: gpt.GPT, cut: int):
        super().__init__()
        self.tok_emb, self.pos_emb = model.tok_emb, model.pos_emb
        self.blocks = nn.ModuleList(model.blocks[:cut])

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return x


class SecondHalf(nn.Module):
    """The other blocks, the final norm and the head (its own copy of the tied weight)."""

    def __init__(self, model: gpt.GPT, cut: int):
        super().__init__()
        self.blocks = nn.ModuleList(model.blocks[cut:])
        self.ln_f = model.ln_f
        self.head_weight = nn.Parameter(model.tok_emb.weight.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.head_weight)


def mean_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def torch_worker(args) -> None:
    """One rank of a torch.distributed.pipelining job; rank 0 writes step times and losses."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = gpt.make_model(n_layer=args.layers)
    cut = args.layers // 2
    module = FirstHalf(model, cut) if rank == 0 else SecondHalf(model, cut)
    stage = PipelineStage(module, rank, 2, torch.device("cpu"))
    kind = ScheduleGPipe if args.worker == "gpipe" else Schedule1F1B
    schedule = kind(stage, n_microbatches=args.microbatches, loss_fn=mean_token_loss)
    optimizer = torch.optim.SGD(module.parameters(), lr=args.lr)
    tied = module.tok_emb.weight if rank == 0 else module.head_weight
    records = []
    for idx, targets in torch.load(args.data, weights_only=True):
        started = time.perf_counter()
        optimizer.zero_grad()
        losses: list = []
        if rank == 0:
            schedule.step(idx)
        else:
            schedule.step(target=targets, losses=losses)
        dist.all_reduce(tied.grad)
        optimizer.step()
        loss = torch.stack(losses).mean().reshape(1) if losses else torch.zeros(1)
        dist.all_reduce(loss)
        records.append({"loss": float(loss), "seconds": time.perf_counter() - started})
    if rank == 0:
        Path(args.out).write_text("\n".join(json.dumps(r) for r in records) + "\n")
    dist.destroy_process_group()


# -- the driver ----------------------------------------------------------------------------------------------

def torchrun(script: Path, *arguments: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
               *arguments]
    env = {**os.environ, "SBPC_FORCE_GLOO": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")


def sbpc_job(args, schedule: str, work: Path, data: Path) -> list[dict]:
    from compiler import Cluster, compile
    model = gpt.make_model(n_layer=args.layers)
    strategy = {"mesh": {"pp": 2}, "stages": [f"blocks.{args.layers // 2}"], "microbatches": args.microbatches,
                "schedule": schedule}
    plan = compile(model, batches(args)[0], cluster=Cluster.local(2), strategy=strategy,
                   optimizer=(torch.optim.SGD, {"lr": args.lr}))
    program = plan.emit(work / f"sbpc_{schedule}")
    metrics = work / f"sbpc_{schedule}.jsonl"
    torchrun(program, "--steps", str(args.steps), "--data", str(data), "--metrics", str(metrics))
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def torch_job(args, schedule: str, work: Path, data: Path) -> list[dict]:
    out = work / f"torch_{schedule}.jsonl"
    torchrun(Path(__file__).resolve(), "--worker", schedule, "--data", str(data), "--out", str(out),
             "--layers", str(args.layers), "--microbatches", str(args.microbatches), "--lr", str(args.lr))
    return [json.loads(line) for line in out.read_text().splitlines()]


def median_step(records: list[dict], warmup: int) -> float:
    return statistics.median(r["seconds"] for r in records[warmup:])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        torch_worker(args)
        return
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data.pt"
        torch.save(batches(args), data)
        results = {}
        for schedule in SCHEDULES:
            results[("sbpc", schedule)] = sbpc_job(args, schedule, work, data)
            results[("torch", schedule)] = torch_job(args, schedule, work, data)
    print(f"GPT example, {args.layers} blocks cut at blocks.{args.layers // 2}, batch {args.batch} x seq {args.seq}, "
          f"{args.microbatches} microbatches, 2 ranks on gloo; median of steps {args.warmup}..{args.steps - 1}")
    print(f"{'schedule':<8} {'sbpc s/step':>12} {'torch s/step':>13} {'sbpc/torch':>11}   loss first, last (sbpc | torch)")
    for schedule in SCHEDULES:
        ours, theirs = results[("sbpc", schedule)], results[("torch", schedule)]
        a, b = median_step(ours, args.warmup), median_step(theirs, args.warmup)
        losses = f"{ours[0]['loss']:.4f} {ours[-1]['loss']:.4f} | {theirs[0]['loss']:.4f} {theirs[-1]['loss']:.4f}"
        print(f"{schedule:<8} {a:>12.4f} {b:>13.4f} {a / b:>11.2f}   {losses}")


if __name__ == "__main__":
    main()
