"""Step time of sbpc's emitted pipelines on 2 ranks against ``torch.distributed.pipelining``.

Run from the repository root: ``python benchmarks/pipeline_vs_torch.py [--steps N] [--layers L]
[--schedules gpipe,1f1b,zbv] ...``. It launches, one after the other, 2-rank torchrun jobs on gloo
(CPU) training the bundled GPT example (``examples/gpt.py``) with SGD, per schedule:

- sbpc: ``compile(strategy={"mesh": {"pp": 2}, "stages": [cuts], "microbatches": m, "schedule": ...})``,
  emitted and run as generated (step times from the program's ``--metrics`` file). GPipe and 1F1B cut
  the blocks in two stages, ZB-V (``zbv``: two stages per rank in a V, split backwards) in four;
- torch: the same model cut at the same blocks by hand into ``PipelineStage`` s driven by
  ``ScheduleGPipe``, ``Schedule1F1B`` or ``ScheduleZBVZeroBubble`` (this file re-launched with
  ``--worker``; ZB-V puts stages 0 and 3 on rank 0, 1 and 2 on rank 1). The tied embedding / head weight
  has a copy on the first and the last stage whose gradients are summed after backward, as sbpc does.

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

SCHEDULES = ("gpipe", "1f1b", "zbv")
STAGES = {"gpipe": 2, "1f1b": 2, "zbv": 4}
"""Stages of each schedule on the 2 ranks."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="training steps per job")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    parser.add_argument("--layers", type=int, default=4, help="GPT blocks (cut evenly into the stages)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--schedules", default=",".join(SCHEDULES), help="comma-separated, from " + ", ".join(SCHEDULES))
    parser.add_argument("--worker", choices=SCHEDULES, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def batches(args) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same batches for every job."""
    return [gpt.example_inputs(batch=args.batch, seq=args.seq, seed=step + 1) for step in range(args.steps)]


# -- torch.distributed.pipelining (runs under torchrun with --worker) ------------------------------

def cuts(layers: int, stages: int) -> list[int]:
    """The first block of each stage after the first (an even cut)."""
    if layers % stages:
        raise SystemExit(f"--layers ({layers}) must be a multiple of the {stages} stages")
    return [k * layers // stages for k in range(1, stages)]


class Stage(nn.Module):
    """Blocks ``first..last-1`` of the GPT; the first stage adds the embeddings, the last the final norm and the
    head (its own copy of the tied weight)."""

    def __init__(self, model: gpt.GPT, first: int, last: int):
        super().__init__()
        self.is_first, self.is_last = first == 0, last == len(model.blocks)
        if self.is_first:
            self.tok_emb, self.pos_emb = model.tok_emb, model.pos_emb
        self.blocks = nn.ModuleList(model.blocks[first:last])
        if self.is_last:
            self.ln_f = model.ln_f
            self.head_weight = nn.Parameter(model.tok_emb.weight.detach().clone())

    def tied(self) -> list[nn.Parameter]:
        """This stage's copies of the tied embedding / head weight."""
        return ([self.tok_emb.weight] if self.is_first else []) + ([self.head_weight] if self.is_last else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            x = self.tok_emb(x) + self.pos_emb(torch.arange(x.shape[1]))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.head_weight) if self.is_last else x


def mean_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def rank_stages(schedule: str, rank: int) -> list[int]:
    """The stages a rank holds: one each, or for ZB-V the V (rank 0: first and last)."""
    return [rank, STAGES[schedule] - 1 - rank] if schedule == "zbv" else [rank]


def sum_tied_gradients(tied: list[nn.Parameter]) -> None:
    """Sum the gradients of the tied weight's two copies: both on this rank (ZB-V) or one here, one on the peer."""
    if len(tied) == 2:
        total = tied[0].grad + tied[1].grad
        tied[0].grad, tied[1].grad = total, total.clone()
    elif tied:
        dist.all_reduce(tied[0].grad)


def torch_worker(args) -> None:
    """One rank of a torch.distributed.pipelining job; rank 0 writes step times and losses."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleZBVZeroBubble
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = gpt.make_model(n_layer=args.layers)
    count = STAGES[args.worker]
    bounds = [0] + cuts(args.layers, count) + [args.layers]
    modules = {k: Stage(model, bounds[k], bounds[k + 1]) for k in rank_stages(args.worker, rank)}
    stages = [PipelineStage(module, k, count, torch.device("cpu")) for k, module in modules.items()]
    if args.worker == "zbv":
        schedule = ScheduleZBVZeroBubble(stages, n_microbatches=args.microbatches, loss_fn=mean_token_loss)
    else:
        kind = ScheduleGPipe if args.worker == "gpipe" else Schedule1F1B
        schedule = kind(stages[0], n_microbatches=args.microbatches, loss_fn=mean_token_loss)
    optimizer = torch.optim.SGD([p for m in modules.values() for p in m.parameters()], lr=args.lr)
    tied = [p for m in modules.values() for p in m.tied()]
    holds_first, holds_last = 0 in modules, count - 1 in modules
    records = []
    for idx, targets in torch.load(args.data, weights_only=True):
        started = time.perf_counter()
        optimizer.zero_grad()
        losses: list = []
        schedule.step(*([idx] if holds_first else []), **({"target": targets, "losses": losses} if holds_last else {}))
        sum_tied_gradients(tied)
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
    strategy = {"mesh": {"pp": 2}, "stages": [f"blocks.{b}" for b in cuts(args.layers, STAGES[schedule])],
                "microbatches": args.microbatches, "schedule": schedule}
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
    schedules = [name for name in args.schedules.split(",") if name]
    unknown = [name for name in schedules if name not in SCHEDULES]
    if unknown:
        raise SystemExit(f"--schedules: unknown {unknown}; choose from {', '.join(SCHEDULES)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data.pt"
        torch.save(batches(args), data)
        results = {}
        for schedule in schedules:
            results[("sbpc", schedule)] = sbpc_job(args, schedule, work, data)
            results[("torch", schedule)] = torch_job(args, schedule, work, data)
    print(f"GPT example, {args.layers} blocks cut evenly into the stages, batch {args.batch} x seq {args.seq}, "
          f"{args.microbatches} microbatches, 2 ranks on gloo; median of steps {args.warmup}..{args.steps - 1}")
    print(f"{'schedule':<8} {'sbpc s/step':>12} {'torch s/step':>13} {'sbpc/torch':>11}   loss first, last (sbpc | torch)")
    for schedule in schedules:
        ours, theirs = results[("sbpc", schedule)], results[("torch", schedule)]
        a, b = median_step(ours, args.warmup), median_step(theirs, args.warmup)
        losses = f"{ours[0]['loss']:.4f} {ours[-1]['loss']:.4f} | {theirs[0]['loss']:.4f} {theirs[-1]['loss']:.4f}"
        print(f"{schedule:<8} {a:>12.4f} {b:>13.4f} {a / b:>11.2f}   {losses}")


if __name__ == "__main__":
    main()
