"""The main job: compile the bundled GPT for 4 ranks, train it under torchrun (gloo), compare with one device.

    python examples/train_gpt.py [--ranks 4] [--steps 5] [--strategy dp] [--out build/gpt_dp]

Prints the losses of the emitted distributed program beside single-device eager losses.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt import example_inputs, make_model  # noqa: E402

from compiler import Cluster, compile  # noqa: E402


def eager_losses(batches: list, lr: float) -> list[float]:
    """Single-device reference training with the same optimizer."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for batch in batches:
        opt.zero_grad()
        loss = model(*batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--strategy", default="dp")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--out", default="build/gpt_dp")
    args = parser.parse_args()

    batches = [example_inputs(seed=100 + i) for i in range(args.steps)]
    plan = compile(make_model(), batches[0], cluster=Cluster.local(args.ranks), strategy=args.strategy,
                   optimizer=(torch.optim.SGD, {"lr": args.lr}))
    out = Path(args.out)
    main_py = plan.emit(out)
    torch.save(batches, out / "data.pt")
    print(f"compiled GPT for {args.ranks} ranks with strategy {args.strategy!r}; program: {main_py}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.ranks),
           str(main_py), "--steps", str(args.steps), "--data", str(out / "data.pt"),
           "--metrics", str(out / "losses.jsonl"), "--save", str(out / "final.pt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        return proc.returncode
    distributed = [json.loads(line)["loss"] for line in (out / "losses.jsonl").read_text().splitlines()]
    eager = eager_losses(batches, args.lr)
    print(f"{'step':>4}  {'torchrun x' + str(args.ranks):>14}  {'one device':>12}  {'|diff|':>9}")
    for step, (d, e) in enumerate(zip(distributed, eager)):
        print(f"{step:>4}  {d:>14.6f}  {e:>12.6f}  {abs(d - e):>9.2e}")
    worst = max(abs(d - e) for d, e in zip(distributed, eager))
    print("match" if worst <= 1e-6 + 1e-5 * max(map(abs, eager)) else "MISMATCH")
    return 0 if worst <= 1e-6 + 1e-5 * max(map(abs, eager)) else 1


if __name__ == "__main__":
    sys.exit(main())
