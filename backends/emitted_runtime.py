"""Runtime of generated programs: process groups, collectives with adjoint backward, the training loop.

This file imports only torch and the standard library: the code generator copies it verbatim into
every emitted ``main.py``, after the plan's constants (MESH_AXES, MESH_SHAPE, MESH_DEVICES, INPUTS,
PARAMS, FROZEN_PARAMS, NOT_SAVED, BUFFERS, ALIASES, GRAD_BUCKETS, LOSS_SBP, OPTIMIZER, EXAMPLE_DIMS,
PIPELINE) and before ``forward`` (or, for pipelines, the per-stage functions in STAGE_FORWARD, STAGE_PROLOGUE and the
message shapes in ENTRY_SHAPES / EXIT_SHAPES).

``MESH_DEVICES`` lists the global ranks of each pipeline position (one list without pipelining):
each position runs the plan's mesh (MESH_AXES, MESH_SHAPE) on its own devices.
"""
import argparse
import datetime
import json
import math
import os
import sys
import weakref
import time

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

aten = torch.ops.aten
DEVICE = torch.device("cpu")
GROUPS = {}  # axis name -> (process group, list of global ranks, my index in it)
COORD = {}   # axis name -> my coordinate


def fail(message):
    """Stop this rank with one clear line (no traceback)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


# -- process groups ------------------------------------------------------------------------------

def position_of(rank):
    """The pipeline position whose devices include ``rank`` (0 without pipelining)."""
    for position, devices in enumerate(MESH_DEVICES):
        if rank in devices:
            return position
    fail(f"rank {rank} is not in any device list of this program ({MESH_DEVICES})")


def coords_of(rank):
    """``rank``'s coordinates in the mesh of its pipeline position."""
    index = MESH_DEVICES[position_of(rank)].index(rank)
    out = []
    for size in reversed(MESH_SHAPE):
        out.append(index % size)
        index //= size
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
    want = sum(len(devices) for devices in MESH_DEVICES)
    if dist.get_world_size() != want:
        fail(f"this program was compiled for {want} ranks (mesh {dict(zip(MESH_AXES, MESH_SHAPE))} on "
             f"{len(MESH_DEVICES)} pipeline position(s)) but was launched with world size "
             f"{dist.get_world_size()}; run torchrun --nproc-per-node {want}")
    rank = dist.get_rank()
    for a, name in enumerate(MESH_AXES):
        COORD[name] = coords_of(rank)[a]
        for ranks in axis_groups(a):
            group = dist.new_group(ranks, timeout=datetime.timedelta(seconds=timeout_s))
            if rank in ranks:
                GROUPS[name] = (group, ranks, ranks.index(rank))


def axis_groups(axis):
    """Global ranks of every group along mesh axis ``axis``, in every pipeline position."""
    groups = {}
    for position, devices in enumerate(MESH_DEVICES):
        for r in devices:
            key = (position,) + tuple(c for i, c in enumerate(coords_of(r)) if i != axis)
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


# Parameters stored sharded (FSDP) are gathered just before use. Autograd would keep the gathered
# tensor alive until backward; instead, what it saves of it is packed as the shard and gathered
# again when backward needs it, so each full weight lives only around its use.
GATHERED = {}  # storage address -> (shard, axis, dim, weak reference to the gathered tensor)


def comm_gather_param(shard, axis, dim):
    """S(d) -> B for a parameter shard; the full tensor is freed after use, gathered again in backward."""
    full = AllGather.apply(shard, axis, dim)
    GATHERED[full.untyped_storage().data_ptr()] = (shard.detach(), axis, dim, weakref.ref(full))
    return full


def pack_saved(tensor):
    entry = GATHERED.get(tensor.untyped_storage().data_ptr())
    if entry is None or entry[3]() is None:
        return tensor
    shard, axis, dim, _ = entry
    return ("regather", shard, axis, dim, tensor.size(), tensor.stride(), tensor.storage_offset())


def unpack_saved(packed):
    if not (isinstance(packed, tuple) and packed and packed[0] == "regather"):
        return packed
    _, shard, axis, dim, size, stride, offset = packed
    return _all_gather(shard, axis, dim).as_strided(size, stride, offset)


def regathering_params():
    """Save gathered parameters as shards during a forward pass (see comm_gather_param)."""
    GATHERED.clear()
    return torch.autograd.graph.saved_tensors_hooks(pack_saved, unpack_saved)


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

EMITTED_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights.pt")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="training steps to run")
    parser.add_argument("--data", help="torch.save'd list of input tuples, one per step (weights_only load)")
    parser.add_argument("--seed", type=int, default=0, help="seed of synthetic batches when --data is not given")
    parser.add_argument("--metrics", help="write one JSON line per step (loss, seconds) to this file")
    parser.add_argument("--save", help="save the full, unsharded state_dict here at the end")
    parser.add_argument("--weights", default=EMITTED_WEIGHTS,
                        help="initial weights (full state_dict) written by sbpc emit")
    parser.add_argument("--comm-timeout", type=int, default=120, help="seconds before a collective gives up")
    parser.add_argument("--infer-stages", help="pipelines: no training; run every batch forward through these "
                        "stages only (comma-separated, e.g. 0,2,3; 'all' for every stage) and report the loss")
    return parser.parse_args(argv)


def load_weights(path):
    """The full state_dict to start from. A state_dict saved with --save lacks the tensors in NOT_SAVED
    (non-persistent buffers, lifted constants); those come from the weights.pt emitted with the program."""
    if not os.path.exists(path):
        fail(f"initial weights {path} not found; emit the program again or pass --weights")
    weights = torch.load(path, weights_only=True)
    missing = [n for n in NOT_SAVED if n not in weights]
    if missing and os.path.abspath(path) != EMITTED_WEIGHTS:
        if not os.path.exists(EMITTED_WEIGHTS):
            fail(f"{path} lacks {missing[0]} (not part of a state_dict), which comes from {EMITTED_WEIGHTS}; "
                 f"keep the weights.pt emitted beside main.py")
        emitted = torch.load(EMITTED_WEIGHTS, weights_only=True)
        weights.update({n: emitted[n] for n in missing})
    return weights


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
    """The optimizer over the trainable parameters (frozen ones get no state); None when there are none."""
    trainable = [t for t in params.values() if t.requires_grad]
    if not trainable:
        return None
    name, kwargs = OPTIMIZER
    return getattr(torch.optim, name)(trainable, **kwargs)


def local_parameters(weights, layouts):
    """This rank's shards of the parameters ``{name: (state_dict name, layout)}``; frozen ones need no grad."""
    return {n: shard(weights[target].to(DEVICE), layout).requires_grad_(n not in FROZEN_PARAMS)
            for n, (target, layout) in layouts.items()}


def sync_gradients(params):
    """All-reduce the partial gradients of broadcast parameters, one flat buffer per bucket."""
    for axes, names in local_buckets(params):
        flat = flat_gradients(params, names)
        for axis in axes:
            dist.all_reduce(flat, group=GROUPS[axis][0])
        unflatten_gradients(params, names, flat)


def local_buckets(params):
    """The gradient buckets whose parameters this rank holds (others belong to other pipeline stages)."""
    return [(axes, names) for axes, names in GRAD_BUCKETS if all(n in params for n in names)]


def flat_gradients(params, names):
    return torch.cat([(params[n].grad if params[n].grad is not None else torch.zeros_like(params[n])).reshape(-1)
                      for n in names])


def unflatten_gradients(params, names, flat):
    offset = 0
    for n in names:
        size = params[n].numel()
        params[n].grad = flat[offset:offset + size].view_as(params[n]).clone()
        offset += size


class OverlappedGradientSync:
    """All-reduce each bucket while backward still runs, as soon as its last gradient is ready.

    Buckets are launched strictly in their order (the grad_sync pass orders them as backward
    produces them), so every rank issues the same collectives in the same order.
    """

    def __init__(self, params):
        self.params = params
        self.buckets = local_buckets(params)
        self.bucket_of = {n: i for i, (_, names) in enumerate(self.buckets) for n in names}
        for name in self.bucket_of:
            params[name].register_post_accumulate_grad_hook(self._hook(name))
        self.start()

    def start(self):
        """Forget the previous step (call before backward)."""
        self.missing = [set(names) for _, names in self.buckets]
        self.launched = []

    def _hook(self, name):
        def ready(_param):
            self.missing[self.bucket_of[name]].discard(name)
            self._launch_ready()
        return ready

    def _launch_ready(self):
        while len(self.launched) < len(self.buckets) and not self.missing[len(self.launched)]:
            self._launch(len(self.launched))

    def _launch(self, index):
        axes, names = self.buckets[index]
        flat = flat_gradients(self.params, names)
        self.launched.append((flat, dist.all_reduce(flat, group=GROUPS[axes[0]][0], async_op=True)))

    def finish(self):
        """Wait for every bucket (launching those whose parameters got no gradient) and store the sums."""
        while len(self.launched) < len(self.buckets):
            self._launch(len(self.launched))
        for (axes, names), (flat, work) in zip(self.buckets, self.launched):
            work.wait()
            for axis in axes[1:]:
                dist.all_reduce(flat, group=GROUPS[axis][0])
            unflatten_gradients(self.params, names, flat)


def per_rank(count):
    """Every rank's value of an integer ``count``, gathered to every rank (in rank order)."""
    mine = torch.tensor([int(count)], dtype=torch.int64, device=DEVICE)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [int(t[0]) for t in every]


def first_step_report(params, optimizer):
    """What the step-0 metrics line adds: parameter bytes each rank stores at rest, and how many
    tensors each rank's optimizer updates and keeps state for (its trainable shards only)."""
    return {"param_bytes_per_rank": per_rank(sum(t.numel() * t.element_size() for t in params.values())),
            "optimizer_params_per_rank": per_rank(sum(len(g["params"]) for g in optimizer.param_groups)
                                                  if optimizer else 0),
            "optimizer_state_per_rank": per_rank(len(optimizer.state) if optimizer else 0)}


def logical_loss(loss):
    """The full loss value, the same on every rank."""
    total = (loss.detach() if is_seed_rank(LOSS_SBP) else loss.detach() * 0).reshape(1).clone()
    dist.all_reduce(total)
    return float(total[0])


def full_state_dict(params, buffers):
    """The model's own state_dict: unsharded parameters, persistent buffers, tied aliases."""
    state = {}
    for name, t in params.items():
        state[name] = unshard(t.detach(), PARAMS[name]).cpu()
    for name, t in buffers.items():
        if name not in NOT_SAVED:
            state[name] = unshard(t.detach(), BUFFERS[name]).cpu()
    for alias, name in ALIASES.items():
        state[alias] = state[name]
    return state


def new_buffer_values(updated):
    """The buffers' values after a forward (running statistics, counters), kept without autograd history."""
    return {name: t.detach() for name, t in updated.items()}


def report_step(metrics, step, value, started, extra=None):
    """One JSON line per step in --metrics (rank 0), and the loss on rank 0's stdout."""
    if metrics:
        record = {"step": step, "loss": value, "seconds": time.perf_counter() - started, **(extra or {})}
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
    if dist.get_rank() == 0:
        print(f"step {step} loss {value:.6f}", flush=True)


def finish(args, state):
    """Save the full state_dict (--save, rank 0) and leave the process group."""
    if args.save and dist.get_rank() == 0:
        torch.save(state, args.save)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    args = parse_args(argv)
    init_distributed(args.comm_timeout)
    if PIPELINE:
        return pipeline_main(args)
    if args.infer_stages:
        fail("--infer-stages chooses pipeline stages, but this program has no pipeline")
    batches = load_batches(args)
    weights = load_weights(args.weights)
    params = local_parameters(weights, {n: (n, layout) for n, layout in PARAMS.items()})
    buffers = {n: shard(weights[n].to(DEVICE), layout) for n, layout in BUFFERS.items()}
    optimizer = make_optimizer(params)
    grad_sync = OverlappedGradientSync(params)
    metrics = open(args.metrics, "w") if args.metrics and dist.get_rank() == 0 else None
    for step in range(args.steps):
        started = time.perf_counter()
        batch = batches[step] if batches is not None else synthetic_batch(args.seed, step)
        dims = bind_dims(batch)
        if optimizer:
            optimizer.zero_grad(set_to_none=True)
        with regathering_params():
            loss, updated = forward(params, buffers, local_inputs(batch), dims, COORD)
        grad_sync.start()
        (loss if is_seed_rank(LOSS_SBP) else loss * 0).backward()
        grad_sync.finish()
        if optimizer:
            optimizer.step()
        buffers.update(new_buffer_values(updated))
        value = logical_loss(loss)
        report_step(metrics, step, value, started, first_step_report(params, optimizer) if step == 0 else {})
    finish(args, full_state_dict(params, buffers))


# -- pipelines ------------------------------------------------------------------------------------
# PIPELINE = {"stages": K, "positions": [position of each stage], "microbatches": m,
#             "paths": [stages visited by each microbatch], "skippable": bool}
# SCHEDULE = {rank: [(kind, stage, microbatch, peer), ...]}; STAGE_TENSORS = {name: (target, kind,
# layout, stage)}; TIED_PARAMS = [[names of the copies of one parameter]]; STAGE_FORWARD[s](p, b, x,
# entries, dims, coord, whole) returns the stage's exits (the loss on the last stage) and the new values
# of the buffers it updates;
# STAGE_PROLOGUE[s](p, b, x, dims, coord) computes its whole-batch values; ENTRY_SHAPES[s](dims)
# and EXIT_SHAPES[s](dims) give the local (shape, dtype) of what stage s receives and sends.

TIED_GROUPS = []  # (names of the copies, process group) for the tied groups this rank belongs to


def my_position():
    """This rank's pipeline position."""
    return position_of(dist.get_rank())


def init_tied_groups(timeout_s):
    """One process group per tied parameter and mesh index: the ranks holding its copies."""
    rank = dist.get_rank()
    width = len(MESH_DEVICES[0])
    for names in TIED_PARAMS:
        positions = [PIPELINE["positions"][STAGE_TENSORS[n][3]] for n in names]
        for index in range(width):
            ranks = sorted({MESH_DEVICES[p][index] for p in positions})
            group = dist.new_group(ranks, timeout=datetime.timedelta(seconds=timeout_s)) if len(ranks) > 1 else None
            if rank in ranks:
                TIED_GROUPS.append((names, group))


def sync_tied(params):
    """Sum the gradients of a parameter's copies on different stages (tied embedding and head)."""
    for names, group in TIED_GROUPS:
        local = [n for n in names if n in params]
        total = sum(params[n].grad if params[n].grad is not None else torch.zeros_like(params[n]) for n in local)
        if group is not None:
            dist.all_reduce(total, group=group)
        for n in local:
            params[n].grad = total.clone()


def split_microbatches(batch, count):
    """Batch-like inputs (a symbolic first dim) cut into ``count`` chunks along dim 0; others shared."""
    parts = []
    for (name, dims, _, _, _), t in zip(INPUTS, batch):
        if dims and isinstance(dims[0], str):
            if t.shape[0] % count:
                fail(f"input {name}: the batch ({t.shape[0]}) does not split into {count} microbatches; "
                     f"use a multiple of {count}")
            parts.append(t.chunk(count, dim=0))
        else:
            parts.append([t] * count)
    return [tuple(p) for p in zip(*parts)]


def neighbour(path, stage, step):
    """The stage before (step -1) or after (+1) ``stage`` on a microbatch's path; None at its ends."""
    i = path.index(stage) + step
    return path[i] if 0 <= i < len(path) else None


class PipelineStep:
    """One training step of this rank: its action list over the microbatches of one batch."""

    def __init__(self, params, buffers, micro, dims, whole, paths):
        self.params, self.buffers, self.micro, self.dims, self.whole = params, buffers, micro, dims, whole
        self.paths = paths
        self.inputs = [local_inputs(mb) for mb in micro]
        self.ready, self.saved, self.sends = {}, {}, []
        self.loss = None

    def forward(self, stage, mb, train=True):
        """F: run ``stage`` on microbatch ``mb`` from leaves of what the previous stage sent."""
        previous = neighbour(self.paths[mb], stage, -1)
        leaves = []
        if previous is not None:
            leaves = [t.detach().requires_grad_(train and t.is_floating_point())
                      for t in self.ready.pop(("F", previous, mb))]
        with regathering_params():
            out, updated = STAGE_FORWARD[stage](self.params, self.buffers, self.inputs[mb], leaves, self.dims, COORD,
                                                self.whole.get(stage, {}))
        self.buffers.update(new_buffer_values(updated))  # each microbatch's forward moves them, as in eager
        if neighbour(self.paths[mb], stage, +1) is None:
            share = out.detach()
            self.loss = share if self.loss is None else self.loss + share
            self.saved[(stage, mb)] = (leaves, None, out)
        else:
            self.ready[("F", stage, mb)] = [o.detach().contiguous() for o in out]
            self.saved[(stage, mb)] = (leaves, out, None)

    def backward(self, stage, mb):
        """B: back-propagate the loss share or the gradients that came back; keep the entries' gradients."""
        leaves, outs, loss = self.saved.pop((stage, mb))
        if loss is not None:
            (loss if is_seed_rank(LOSS_SBP) else loss * 0).backward()
        else:
            grads = iter(self.ready.pop(("B", neighbour(self.paths[mb], stage, +1), mb)))
            pairs = [(o, next(grads)) for o in outs if o.is_floating_point()]
            pairs = [(o, g) for o, g in pairs if o.requires_grad]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        if leaves:
            self.ready[("B", stage, mb)] = [(leaf.grad if leaf.grad is not None else torch.zeros_like(leaf))
                                            .contiguous() for leaf in leaves if leaf.is_floating_point()]

    def message_shapes(self, kind, stage):
        """Local (shape, dtype) of each tensor of a message: exits for RECV_F, float entries for RECV_B."""
        if kind == "RECV_F":
            return EXIT_SHAPES[stage](self.dims)
        return [(s, d) for s, d in ENTRY_SHAPES[stage](self.dims) if d.is_floating_point]

    def transfer(self, actions):
        """A run of sends and receives: post the sends (not waited on), then receive, batched."""
        sends = [dist.P2POp(dist.isend, t, peer)
                 for kind, stage, mb, peer in actions if kind.startswith("SEND")
                 for t in self.ready.pop((kind[-1], stage, mb))]
        if sends:
            self.sends.extend(dist.batch_isend_irecv(sends))
        receives, ops = [], []
        for kind, stage, mb, peer in actions:
            if kind.startswith("RECV"):
                buffers = [torch.empty(shape, dtype=dtype, device=DEVICE)
                           for shape, dtype in self.message_shapes(kind, stage)]
                receives.append(((kind[-1], stage, mb), buffers))
                ops += [dist.P2POp(dist.irecv, b, peer) for b in buffers]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        for key, buffers in receives:
            self.ready[key] = buffers

    def run(self, actions):
        """Run the action list; returns this rank's sum of loss shares (None off the loss stage)."""
        i = 0
        while i < len(actions):
            kind, stage, mb, _ = actions[i]
            if kind in ("F", "B"):
                self.forward(stage, mb) if kind == "F" else self.backward(stage, mb)
                i += 1
                continue
            j = i
            while j < len(actions) and actions[j][0] not in ("F", "B"):
                j += 1
            self.transfer(actions[i:j])
            i = j
        for work in self.sends:
            work.wait()
        return self.loss

    def infer(self, path):
        """Forward only: every microbatch through ``path``, sending each stage's exits to the next."""
        position = my_position()
        for mb in range(len(self.micro)):
            for k, stage in enumerate(path):
                if PIPELINE["positions"][stage] != position:
                    continue
                previous = path[k - 1] if k else None
                if previous is not None and PIPELINE["positions"][previous] != position:
                    peer = MESH_DEVICES[PIPELINE["positions"][previous]][MESH_DEVICES[position].index(dist.get_rank())]
                    self.transfer([("RECV_F", previous, mb, peer)])
                with torch.no_grad():
                    self.forward(stage, mb, train=False)
                following = path[k + 1] if k + 1 < len(path) else None
                if following is not None and PIPELINE["positions"][following] != position:
                    peer = MESH_DEVICES[PIPELINE["positions"][following]][MESH_DEVICES[position].index(dist.get_rank())]
                    self.transfer([("SEND_F", stage, mb, peer)])
        for work in self.sends:
            work.wait()
        return self.loss


def infer_path(text):
    """The stages of ``--infer-stages`` (``all`` or a comma list starting at 0, ending at the last)."""
    count = PIPELINE["stages"]
    if text == "all":
        return list(range(count))
    try:
        path = [int(s) for s in text.split(",")]
    except ValueError:
        fail(f"--infer-stages takes comma-separated stage numbers such as 0,2,3 (or all), found {text!r}")
    if path[0] != 0 or path[-1] != count - 1 or len(set(path)) != len(path) or not all(0 <= s < count for s in path):
        fail(f"--infer-stages {text}: expected distinct stages starting at 0 and ending at {count - 1}")
    if path != list(range(count)) and not PIPELINE["skippable"]:
        fail("this pipeline's stages cannot be skipped (its cuts carry different values); use --infer-stages all")
    return path


def pipeline_loss(local):
    """The full loss on every rank: the loss stage's seed ranks contribute their sum of shares."""
    mine = local is not None and is_seed_rank(LOSS_SBP)
    total = (local.detach() if mine else torch.zeros((), device=DEVICE)).reshape(1).clone()
    dist.all_reduce(total)
    return float(total[0])


def pipeline_state_dict(params, buffers):
    """The full state_dict, assembled on every rank from each position's unsharded tensors."""
    mine = {}
    for name, t in list(params.items()) + list(buffers.items()):
        target, _, layout, _ = STAGE_TENSORS[name]
        if target not in NOT_SAVED:
            mine[target] = unshard(t.detach(), layout).cpu()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    state = {}
    for part in gathered:
        state.update(part)
    for alias, name in ALIASES.items():
        state[alias] = state[name]
    return state


def pipeline_main(args):
    init_tied_groups(args.comm_timeout)
    batches = load_batches(args)
    weights = load_weights(args.weights)
    position = my_position()
    mine = {n: spec for n, spec in STAGE_TENSORS.items() if PIPELINE["positions"][spec[3]] == position}
    params = local_parameters(weights, {n: (target, layout) for n, (target, kind, layout, _) in mine.items()
                                        if kind == "param"})
    buffers = {n: shard(weights[target].to(DEVICE), layout) for n, (target, kind, layout, _) in mine.items()
               if kind == "buffer"}
    optimizer = make_optimizer(params)
    actions = SCHEDULE[dist.get_rank()]
    path = infer_path(args.infer_stages) if args.infer_stages else None
    metrics = open(args.metrics, "w") if args.metrics and dist.get_rank() == 0 else None
    count = PIPELINE["microbatches"]
    for step_index in range(args.steps):
        started = time.perf_counter()
        batch = batches[step_index] if batches is not None else synthetic_batch(args.seed, step_index)
        full_dims = bind_dims(batch)
        micro = split_microbatches(batch, count)
        dims = bind_dims(micro[0])
        whole = {s: STAGE_PROLOGUE[s](params, buffers, local_inputs(batch), full_dims, COORD)
                 for s in STAGE_PROLOGUE if PIPELINE["positions"][s] == position}
        paths = [path] * count if path else PIPELINE["paths"]
        step = PipelineStep(params, buffers, micro, dims, whole, paths)
        if path:
            local = step.infer(path)
        else:
            if optimizer:
                optimizer.zero_grad(set_to_none=True)
            local = step.run(actions)
            sync_gradients(params)
            sync_tied(params)
            if optimizer:
                optimizer.step()
        value = pipeline_loss(local)
        report_step(metrics, step_index, value, started,
                    first_step_report(params, optimizer) if step_index == 0 else {})
    finish(args, pipeline_state_dict(params, buffers))
