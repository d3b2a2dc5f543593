"""Training loop parts: the command line, batches, weights, the optimizer, reports, saving."""
import argparse
import gc
import json
import os
import time

import torch
import torch.distributed as dist

from .collectives import unshard
from .core import DEVICE, GROUPS, fail, is_seed_rank, shard, split_dim
from .plan import (ALIASES, BUFFERS, EXAMPLE_DIMS, FROZEN_PARAMS, INPUTS, LOSS_SBP, MESH_AXES, NOT_SAVED,
                   OPTIMIZER, PARAMS)

EMITTED_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights.pt")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="the run's total training steps (a resumed run "
                        "continues from its checkpoint's step up to this)")
    parser.add_argument("--data", help="torch.save'd list of input tuples, one per step (weights_only load)")
    parser.add_argument("--seed", type=int, default=0, help="seed of synthetic batches when --data is not given")
    parser.add_argument("--metrics", help="write one JSON line per step (loss, seconds) to this file")
    parser.add_argument("--save", help="save the full, unsharded state_dict here at the end")
    parser.add_argument("--weights", default=EMITTED_WEIGHTS,
                        help="initial weights (full state_dict) written by sbpc emit")
    parser.add_argument("--comm-timeout", type=int, default=120, help="seconds before a collective gives up")
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="K",
                        help="save a sharded checkpoint every K steps and after the last (0: never)")
    parser.add_argument("--checkpoint-dir", default="checkpoints", help="where checkpoints go (step-N directories)")
    parser.add_argument("--keep", type=int, default=2, metavar="N", help="keep the newest N checkpoints (0: all)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest whole checkpoint in "
                        "--checkpoint-dir, under this program's plan whatever plan wrote it (none: start at step 0)")
    parser.add_argument("--infer-stages", help="pipelines: no training; run every batch forward through these "
                        "stages only (comma-separated, e.g. 0,2,3; 'all' for every stage) and report the loss")
    return parser.parse_args(argv)


def load_batches(args):
    """The batches of --data, one tuple of inputs per step (None: synthetic batches)."""
    if args.data is None:
        return None
    if not os.path.exists(args.data):
        fail(f"--data file {args.data} does not exist; pass a torch.save'd list of input tuples")
    batches = torch.load(args.data, weights_only=True)
    if not isinstance(batches, (list, tuple)) or len(batches) < args.steps:
        count = len(batches) if isinstance(batches, (list, tuple)) else type(batches).__name__
        fail(f"--data {args.data} must hold a list of at least {args.steps} input tuples (one per step), found {count}")
    return batches


def synthetic_batch(seed, step):
    """Random inputs of the example sizes (integers below each input's bound), the same on every rank."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    shapes = [[EXAMPLE_DIMS.get(d, d) for d in dims] for _, dims, _, _, _ in INPUTS]
    return tuple(torch.randn(shape, generator=g, dtype=dtype) if dtype.is_floating_point
                 else torch.randint(0, high, shape, generator=g, dtype=dtype)
                 for shape, (_, _, dtype, _, high) in zip(shapes, INPUTS))


def bind_dims(batch):
    """The symbolic sizes of a batch; one clear error for a shape that does not fit the plan."""
    dims = {}
    for (name, spec, _, layout, _), t in zip(INPUTS, batch):
        if t.ndim != len(spec):
            fail(f"input {name}: expected {len(spec)} dims, found shape {tuple(t.shape)}")
        for d, size in zip(spec, t.shape):
            if isinstance(d, str):
                dims.setdefault(d, int(size))
            elif d != size:
                fail(f"input {name}: expected size {d}, found shape {tuple(t.shape)}")
        for axis, entry in zip(MESH_AXES, layout):
            dim, n = split_dim(entry), len(GROUPS[axis][1])
            if dim is not None and t.shape[dim] % n:
                fail(f"input {name}: dim {dim} has size {t.shape[dim]}, which does not split over "
                     f"{n} ranks of mesh axis {axis}; use a multiple of {n}")
    return dims


def local_inputs(batch):
    return {name: shard(t.to(DEVICE), layout) for (name, _, _, layout, _), t in zip(INPUTS, batch)}


def load_weights(path, meta=False):
    """The full state_dict to start from, memory-mapped (each rank reads only its shards), or with ``meta`` its
    shapes and dtypes only. One saved with --save lacks the tensors in NOT_SAVED (non-persistent buffers, lifted
    constants): those come from the weights.pt emitted with the program."""
    if not os.path.exists(path):
        fail(f"initial weights {path} not found; emit the program again or pass --weights")
    options = {"map_location": "meta"} if meta else {"mmap": True}
    weights = torch.load(path, weights_only=True, **options)
    missing = [n for n in NOT_SAVED if n not in weights]
    if missing and os.path.abspath(path) != EMITTED_WEIGHTS:
        if not os.path.exists(EMITTED_WEIGHTS):
            fail(f"{path} lacks {missing[0]} (not part of a state_dict), which comes from {EMITTED_WEIGHTS}; "
                 f"keep the weights.pt emitted beside main.py")
        emitted = torch.load(EMITTED_WEIGHTS, weights_only=True, **options)
        weights.update({n: emitted[n] for n in missing})
    return weights


def local_copy(full, layout):
    """This rank's shard of a full tensor, in memory of its own: a copy of its part of ``full`` (memory-mapped),
    or uninitialised when ``full`` is on the meta device (a checkpoint fills it)."""
    part = shard(full, layout)
    return torch.empty_like(part, device=DEVICE) if part.is_meta else part.to(DEVICE, copy=True)


def local_parameters(weights, layouts):
    """This rank's shards of the parameters ``{name: (state_dict name, layout)}``, each a leaf in memory of its
    own (a tied parameter's copies on one rank must not share one); frozen ones need no grad."""
    return {n: local_copy(weights[target], layout).requires_grad_(n not in FROZEN_PARAMS)
            for n, (target, layout) in layouts.items()}


def make_optimizer(params):
    """The optimizer over the trainable parameters (frozen ones get no state); None when there are none."""
    trainable = [t for t in params.values() if t.requires_grad]
    return getattr(torch.optim, OPTIMIZER[0])(trainable, **OPTIMIZER[1]) if trainable else None


def new_buffer_values(updated):
    """The buffers' values after a forward (running statistics, counters), without autograd history."""
    return {name: t.detach() for name, t in updated.items()}


def first_step_report(params, optimizer):
    """What step 0 adds to --metrics, per rank (in rank order): the parameter bytes it stores, and how many
    tensors its optimizer updates and keeps state for (its trainable shards only)."""
    mine = [sum(t.numel() * t.element_size() for t in params.values()),
            sum(len(group["params"]) for group in optimizer.param_groups) if optimizer else 0,
            len(optimizer.state) if optimizer else 0]
    every = [torch.zeros(3, dtype=torch.int64, device=DEVICE) for _ in range(dist.get_world_size())]
    dist.all_gather(every, torch.tensor(mine, dtype=torch.int64, device=DEVICE))
    keys = ("param_bytes_per_rank", "optimizer_params_per_rank", "optimizer_state_per_rank")
    return {key: [int(t[i]) for t in every] for i, key in enumerate(keys)}


def open_metrics(path, start):
    """The --metrics file (rank 0): new, or, resuming at step ``start``, keeping the lines of earlier steps."""
    if not path or dist.get_rank() != 0:
        return None
    kept = []
    if start and os.path.exists(path):
        with open(path) as old:
            kept = [line for line in old if line.strip() and json.loads(line)["step"] < start]
    metrics = open(path, "w")
    metrics.writelines(kept)
    return metrics


def report_step(metrics, step, loss, started, extra):
    """The loss on rank 0's stdout and, with --metrics, one JSON line per step (rank 0)."""
    if metrics:
        record = {"step": step, "loss": loss, "seconds": time.perf_counter() - started, **extra}
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
    if dist.get_rank() == 0:
        print(f"step {step} loss {loss:.6f}", flush=True)


def logical_loss(loss):
    """The full loss value, the same on every rank."""
    total = (loss.detach() if is_seed_rank(LOSS_SBP) else loss.detach() * 0).reshape(1).clone()
    dist.all_reduce(total)
    return float(total[0])


def full_state_dict(params, buffers):
    """The model's own state_dict: unsharded parameters, persistent buffers, tied aliases."""
    state = {name: unshard(t.detach(), PARAMS[name]).cpu() for name, t in params.items()}
    state |= {name: unshard(t.detach(), BUFFERS[name]).cpu() for name, t in buffers.items() if name not in NOT_SAVED}
    return state | {alias: state[name] for alias, name in ALIASES.items()}


def finish(args, state):
    """Save the full state_dict (--save, rank 0) and leave the process group. Every process group is
    destroyed here, while the program runs: a gloo group left for the interpreter to tear down at exit
    can abort the process ("terminate called without an active exception")."""
    if args.save and dist.get_rank() == 0:
        torch.save(state, args.save)
    dist.barrier()
    GROUPS.clear()
    dist.destroy_process_group()
    gc.collect()
