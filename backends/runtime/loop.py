"""Training loop parts: the command line, inputs, weights, the optimizer, the loss, saving."""
import argparse
import gc
import os

import torch
import torch.distributed as dist

from .collectives import unshard
from .core import DEVICE, GROUPS, fail, is_seed_rank, shard, split_dim
from .plan import ALIASES, BUFFERS, FROZEN_PARAMS, INPUTS, LOSS_SBP, MESH_AXES, NOT_SAVED, OPTIMIZER, PARAMS

EMITTED_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights.pt")


def parse_args(argv=None, description="", options=None):
    """The program's command line; ``description``: its docstring (``--help``); ``options``: the flags of one
    kind of program only, ``{flag: help}`` (pipelines: ``--infer-stages``) or ``{flag: add_argument's keyword
    arguments}`` (fp16 loss scaling)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="the run's total training steps (a resumed run "
                        "continues from its checkpoint's step up to this)")
    parser.add_argument("--data", help="a token file (.bin or .npy of uint16/uint32 token ids, memory-mapped) or "
                        "a torch.save'd list of input tuples, one per step and microstep (weights_only load)")
    parser.add_argument("--data-dtype", default="uint16", choices=("uint16", "uint32"),
                        help="the token ids' type in a .bin token file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the token file's sample order, or of "
                        "synthetic batches when --data is not given")
    parser.add_argument("--metrics", help="write one JSON line per step (step, loss, seconds, tokens_per_s, "
                        "memory_bytes, lr, grad_norm; fp16 programs: loss_scale, skipped) to this file")
    parser.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine", "linear"),
                        help="the learning rate after warmup: constant, or decaying to zero at --steps")
    parser.add_argument("--warmup-steps", type=int, default=0, help="steps of linear learning-rate warmup")
    parser.add_argument("--clip-grad-norm", type=float, default=0.0, metavar="MAX",
                        help="clip the gradients' global 2-norm to MAX (0: no clipping)")
    parser.add_argument("--grad-accum", type=int, default=1, metavar="N",
                        help="microsteps (batches) per optimizer step; their gradients are averaged")
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
    for flag, spec in (options or {}).items():
        parser.add_argument(flag, **(spec if isinstance(spec, dict) else {"help": spec}))
    args = parser.parse_args(argv)
    if args.grad_accum < 1:
        fail(f"--grad-accum takes a positive number of microsteps, found {args.grad_accum}")
    return args


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
            dim, n = split_dim(entry), len(GROUPS[axis][1]) * (2 if axis == "cp" else 1)  # cp: 2 chunks a rank
            if dim is not None and t.shape[dim] % n:
                fail(f"input {name}: dim {dim} has size {t.shape[dim]}, which does not split over "
                     f"{n} {'load-balanced chunks' if axis == 'cp' else 'ranks'} of mesh axis {axis}; "
                     f"use a multiple of {n}")
    return dims


def token_count(batch):
    """The tokens of a batch whose first input is token ids (0 for other inputs), for tokens per second."""
    return 0 if batch[0].is_floating_point() else batch[0].numel()


def local_inputs(batch):
    return {name: shard(t.to(DEVICE), layout, balanced=True) for (name, _, _, layout, _), t in zip(INPUTS, batch)}


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
    tensors its optimizer updates and keeps state for (its trainable shards only); and the precision rank 0
    trains in: the dtypes of its parameters, of their gradients and of its optimizer state."""
    precision = {"param_dtypes": _dtypes(params.values()),
                 "grad_dtypes": _dtypes(t.grad for t in params.values() if t.grad is not None),
                 "optimizer_state_dtypes": _dtypes(v for s in (optimizer.state.values() if optimizer else ())
                                                   for v in s.values() if torch.is_tensor(v) and v.ndim > 0)}
    mine = [sum(t.numel() * t.element_size() for t in params.values()),
            sum(len(group["params"]) for group in optimizer.param_groups) if optimizer else 0,
            len(optimizer.state) if optimizer else 0]
    every = [torch.zeros(3, dtype=torch.int64, device=DEVICE) for _ in range(dist.get_world_size())]
    dist.all_gather(every, torch.tensor(mine, dtype=torch.int64, device=DEVICE))
    keys = ("param_bytes_per_rank", "optimizer_params_per_rank", "optimizer_state_per_rank")
    return {**{key: [int(t[i]) for t in every] for i, key in enumerate(keys)}, **precision}


def _dtypes(tensors):
    """The dtype names of ``tensors`` (``["float32"]``), sorted."""
    return sorted({str(t.dtype).removeprefix("torch.") for t in tensors})


def logical_loss(loss):
    """The full loss value, the same on every rank (its shares summed in float32: a bf16 loss adds no rounding)."""
    total = (loss.detach() if is_seed_rank(LOSS_SBP) else loss.detach() * 0).float().reshape(1).clone()
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
