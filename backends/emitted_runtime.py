"""Runtime of generated programs: process groups, collectives with adjoint backward, the training loop.

This file imports only torch and the standard library: the code generator copies it verbatim into
every emitted ``main.py``, after the plan's constants (MESH_AXES, MESH_SHAPE, INPUTS, PARAMS,
BUFFERS, ALIASES, GRAD_BUCKETS, LOSS_SBP, OPTIMIZER, EXAMPLE_DIMS) and before ``forward``.
"""
import argparse
import datetime
import json
import math
import os
import sys

import torch
import torch.distributed as dist

aten = torch.ops.aten
DEVICE = torch.device("cpu")
GROUPS = {}  # axis name -> (process group, list of global ranks, my index in it)
COORD = {}   # axis name -> my coordinate


def fail(message):
    """Stop this rank with one clear line (no traceback)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


# -- process groups ------------------------------------------------------------------------------

def coords_of(rank):
    out = []
    for size in reversed(MESH_SHAPE):
        out.append(rank % size)
        rank //= size
    return tuple(reversed(out))


def init_distributed(timeout_s):
    """Start the process group (nccl on CUDA, else gloo) and one subgroup per mesh axis."""
    global DEVICE
    use_cuda = torch.cuda.is_available() and os.environ.get("SBPC_FORCE_GLOO") != "1"
    if use_cuda:
        DEVICE = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(DEVICE)
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    want = math.prod(MESH_SHAPE)
    if dist.get_world_size() != want:
        fail(f"this program was compiled for {want} ranks (mesh {dict(zip(MESH_AXES, MESH_SHAPE))}) but was "
             f"launched with world size {dist.get_world_size()}; run torchrun --nproc-per-node {want}")
    rank = dist.get_rank()
    for a, name in enumerate(MESH_AXES):
        COORD[name] = coords_of(rank)[a]
        for ranks in axis_groups(a):
            group = dist.new_group(ranks, timeout=datetime.timedelta(seconds=timeout_s))
            if rank in ranks:
                GROUPS[name] = (group, ranks, ranks.index(rank))


def axis_groups(axis):
    groups = {}
    for r in range(math.prod(MESH_SHAPE)):
        key = tuple(c for i, c in enumerate(coords_of(r)) if i != axis)
        groups.setdefault(key, []).append(r)
    return list(groups.values())


# -- collectives with adjoint backward -------------------------------------------------------------

def _all_reduce(x, axis, op="sum"):
    group, _, _ = GROUPS[axis]
    out = x.contiguous().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return out


def _all_gather(x, axis, dim):
    group, ranks, _ = GROUPS[axis]
    parts = [torch.empty_like(x.contiguous()) for _ in ranks]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x, axis, dim):
    group, ranks, me = GROUPS[axis]
    parts = [p.contiguous() for p in x.chunk(len(ranks), dim=dim)]
    out = torch.empty_like(parts[me])
    if DEVICE.type == "cuda":
        dist.reduce_scatter(out, parts, group=group)
        return out
    return _all_reduce(x, axis).chunk(len(ranks), dim=dim)[me].contiguous()


def _all_to_all(x, axis, src_dim, dst_dim):
    group, ranks, _ = GROUPS[axis]
    sends = [p.contiguous() for p in x.chunk(len(ranks), dim=dst_dim)]
    recvs = [torch.empty_like(p) for p in sends]
    dist.all_to_all(recvs, sends, group=group)
    return torch.cat(recvs, dim=src_dim)


class AllReduce(torch.autograd.Function):
    """P -> B forward; the adjoint all-reduces the (partial) gradients."""

    @staticmethod
    def forward(ctx, x, axis, op):
        ctx.axis = axis
        return _all_reduce(x, axis, op)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.axis), None, None


class AllGather(torch.autograd.Function):
    """S(d) -> B forward; reduce-scatter backward."""

    @staticmethod
    def forward(ctx, x, axis, dim):
        ctx.axis, ctx.dim = axis, dim
        return _all_gather(x, axis, dim)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.axis, ctx.dim), None, None


class ReduceScatter(torch.autograd.Function):
    """P -> S(d) forward; all-gather backward."""

    @staticmethod
    def forward(ctx, x, axis, dim):
        ctx.axis, ctx.dim = axis, dim
        return _reduce_scatter(x, axis, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.axis, ctx.dim), None, None


class AllToAll(torch.autograd.Function):
    """S(i) -> S(j) forward; S(j) -> S(i) backward."""

    @staticmethod
    def forward(ctx, x, axis, src_dim, dst_dim):
        ctx.args = (axis, src_dim, dst_dim)
        return _all_to_all(x, axis, src_dim, dst_dim)

    @staticmethod
    def backward(ctx, grad):
        axis, src_dim, dst_dim = ctx.args
        return _all_to_all(grad, axis, dst_dim, src_dim), None, None, None


def comm_all_reduce(x, axis, op="sum"):
    return AllReduce.apply(x, axis, op)


def comm_all_gather(x, axis, dim):
    return AllGather.apply(x, axis, dim)


def comm_reduce_scatter(x, axis, dim):
    return ReduceScatter.apply(x, axis, dim)


def comm_all_to_all(x, axis, src_dim, dst_dim):
    return AllToAll.apply(x, axis, src_dim, dst_dim)


def comm_slice(x, axis, dim):
    """B -> S(d): keep this rank's slice (no communication)."""
    n = len(GROUPS[axis][1])
    return x.chunk(n, dim=dim)[COORD[axis]]


def comm_mask(x, axis):
    """B -> P(sum): the first rank of the axis keeps the value, the others hold zeros."""
    return x if COORD[axis] == 0 else x * 0


# -- layouts ----------------------------------------------------------------------------------------

def parse_layout(text):
    """``S(1)`` -> ("S", 1); ``B`` -> ("B", None); ``P(sum)`` -> ("P", "sum")."""
    if text.startswith("S("):
        return "S", int(text[2:-1])
    if text.startswith("P"):
        return "P", text[2:-1] or "sum"
    return "B", None


def shard(full, layout):
    """This rank's local tensor of a full tensor held in ``layout`` (one entry per mesh axis)."""
    out = full
    for axis, entry in zip(MESH_AXES, layout):
        kind, dim = parse_layout(entry)
        if kind == "S":
            n = len(GROUPS[axis][1])
            size = out.shape[dim] // n
            out = out.narrow(dim, COORD[axis] * size, size)
    return out.contiguous()


def unshard(local, layout):
    """The full tensor on every rank, from each rank's local shard (inner axes first)."""
    out = local
    for axis, entry in reversed(list(zip(MESH_AXES, layout))):
        kind, dim = parse_layout(entry)
        if kind == "S":
            out = _all_gather(out, axis, dim)
    return out


def is_seed_rank(layout):
    """Whether this rank's copy of the loss counts (coordinate 0 on broadcast axes)."""
    return all(COORD[a] == 0 for a, e in zip(MESH_AXES, layout) if parse_layout(e)[0] == "B")


# -- the training loop ----------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="training steps to run")
    parser.add_argument("--data", help="torch.save'd list of input tuples, one per step (weights_only load)")
    parser.add_argument("--seed", type=int, default=0, help="seed of synthetic batches when --data is not given")
    parser.add_argument("--metrics", help="write one JSON line per step with the loss to this file")
    parser.add_argument("--save", help="save the full, unsharded state_dict here at the end")
    parser.add_argument("--weights", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights.pt"),
                        help="initial weights (full state_dict) written by sbpc emit")
    parser.add_argument("--comm-timeout", type=int, default=120, help="seconds before a collective gives up")
    return parser.parse_args(argv)


def load_batches(args):
    if args.data is None:
        return None
    if not os.path.exists(args.data):
        fail(f"--data file {args.data} does not exist; pass a torch.save'd list of input tuples")
    batches = torch.load(args.data, weights_only=True)
    if not isinstance(batches, (list, tuple)) or len(batches) < args.steps:
        count = len(batches) if isinstance(batches, (list, tuple)) else type(batches).__name__
        fail(f"--data {args.data} must hold a list of at least {args.steps} input tuples (one per step), "
             f"found {count}")
    return batches


def synthetic_batch(seed, step):
    g = torch.Generator().manual_seed(seed * 100003 + step)
    out = []
    for name, dims, dtype, layout, high in INPUTS:
        shape = [EXAMPLE_DIMS.get(d, d) if isinstance(d, str) else d for d in dims]
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=g, dtype=dtype))
        else:
            out.append(torch.randint(0, high, shape, generator=g, dtype=dtype))
    return tuple(out)


def bind_dims(batch):
    dims = {}
    for (name, spec, dtype, layout, high), t in zip(INPUTS, batch):
        if t.ndim != len(spec):
            fail(f"input {name}: expected {len(spec)} dims, found shape {tuple(t.shape)}")
        for d, size in zip(spec, t.shape):
            if isinstance(d, str):
                dims.setdefault(d, int(size))
            elif d != size:
                fail(f"input {name}: expected size {d}, found shape {tuple(t.shape)}")
        for axis, entry in zip(MESH_AXES, layout):
            kind, dim = parse_layout(entry)
            n = len(GROUPS[axis][1])
            if kind == "S" and t.shape[dim] % n:
                fail(f"input {name}: dim {dim} has size {t.shape[dim]}, which does not split over "
                     f"{n} ranks of mesh axis {axis}; use a multiple of {n}")
    return dims


def local_inputs(batch):
    return {name: shard(t.to(DEVICE), layout) for (name, _, _, layout, _), t in zip(INPUTS, batch)}


def make_optimizer(params):
    name, kwargs = OPTIMIZER
    return getattr(torch.optim, name)(list(params.values()), **kwargs)


def sync_gradients(params):
    """All-reduce the partial gradients of broadcast parameters, one flat buffer per bucket."""
    for axes, names in GRAD_BUCKETS:
        grads = [params[n].grad if params[n].grad is not None else torch.zeros_like(params[n]) for n in names]
        flat = torch.cat([g.reshape(-1) for g in grads])
        for axis in axes:
            dist.all_reduce(flat, group=GROUPS[axis][0])
        offset = 0
        for n, g in zip(names, grads):
            params[n].grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()


def logical_loss(loss):
    """The full loss value, the same on every rank."""
    total = (loss.detach() if is_seed_rank(LOSS_SBP) else loss.detach() * 0).reshape(1).clone()
    dist.all_reduce(total)
    return float(total[0])


def full_state_dict(params, buffers):
    state = {}
    for name, t in params.items():
        state[name] = unshard(t.detach(), PARAMS[name]).cpu()
    for name, t in buffers.items():
        state[name] = t.detach().cpu()
    for alias, name in ALIASES.items():
        state[alias] = state[name]
    return state


def main(argv=None):
    args = parse_args(argv)
    init_distributed(args.comm_timeout)
    batches = load_batches(args)
    if not os.path.exists(args.weights):
        fail(f"initial weights {args.weights} not found; emit the program again or pass --weights")
    weights = torch.load(args.weights, weights_only=True)
    params = {n: shard(weights[n].to(DEVICE), layout).requires_grad_(True) for n, layout in PARAMS.items()}
    buffers = {n: weights[n].to(DEVICE) for n in BUFFERS}
    optimizer = make_optimizer(params)
    metrics = open(args.metrics, "w") if args.metrics and dist.get_rank() == 0 else None
    for step in range(args.steps):
        batch = batches[step] if batches is not None else synthetic_batch(args.seed, step)
        dims = bind_dims(batch)
        optimizer.zero_grad(set_to_none=True)
        loss = forward(params, buffers, local_inputs(batch), dims, COORD)
        (loss if is_seed_rank(LOSS_SBP) else loss * 0).backward()
        sync_gradients(params)
        optimizer.step()
        value = logical_loss(loss)
        if metrics:
            metrics.write(json.dumps({"step": step, "loss": value}) + "\n")
            metrics.flush()
        if dist.get_rank() == 0:
            print(f"step {step} loss {value:.6f}", flush=True)
    state = full_state_dict(params, buffers)
    if args.save and dist.get_rank() == 0:
        torch.save(state, args.save)
    dist.barrier()
    dist.destroy_process_group()
