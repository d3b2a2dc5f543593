"""The pipeline training loop: each rank runs its action list of the schedule.

A stage's function computes one microbatch on this rank's shards and returns what it sends on (the
loss share on the last stage); the runtime makes leaves of what it receives and calls
``torch.autograd.backward`` with the gradients that come back. Zero-bubble schedules split that
backward (:class:`SplitBackwardStep`): ``B`` computes the gradients of what the stage received,
``W`` later those of its parameters.
"""
import time
from typing import NamedTuple

import torch
import torch.distributed as dist

from .collectives import unshard
from .checkpoint import TrainingState, checkpoint_due, find_checkpoint, load_checkpoint, save_checkpoint
from .core import COORD, DEVICE, fail, init_distributed, is_seed_rank, my_position
from .faults import peer_failures
from .controls import apply_gradients, make_schedule
from .data import open_batches
from .loop import (bind_dims, finish, first_step_report, load_weights, local_copy, local_inputs, local_parameters,
                   make_optimizer, new_buffer_values, parse_args, token_count)
from .progress import open_metrics, report_step
from .plan import (ALIASES, INPUTS, LOSS_SBP, MESH_DEVICES, NOT_SAVED, PIPELINE, SCHEDULE, STAGE_TENSORS,
                   TIED_PARAMS)
from .split_backward import backward_input


PIPELINE_OPTIONS = {"--infer-stages": "no training; run every batch forward through these stages only "
                                      "(comma-separated, e.g. 0,2,3; 'all' for every stage) and report the loss"}


class Stages(NamedTuple):
    """The generated functions of a pipelined program (its main.py), each a dict by stage index."""

    forward: dict  # function(p, b, x, entries, dims, coord, whole): a stage on one microbatch; returns its
    # exits (the loss share on the last stage) and the new values of the buffers it updates
    prologue: dict  # function(p, b, x, dims, coord): a stage's whole-batch values, once per step
    entry_shapes: dict  # function(dims): local (shape, dtype) of each value a stage receives
    exit_shapes: dict  # function(dims): local (shape, dtype) of each value a stage sends


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

    def __init__(self, stages, params, buffers, micro, dims, whole, paths):
        self.stages = stages
        self.params, self.buffers, self.micro, self.dims, self.whole = params, buffers, micro, dims, whole
        self.paths = paths
        self.inputs = [local_inputs(mb) for mb in micro]
        self.ready, self.saved, self.sends = {}, {}, []
        self.loss = None
        self.scaler = None  # fp16 plans: the loss scaler (run_batch sets it)

    def forward(self, stage, mb, train=True):
        """F: run ``stage`` on microbatch ``mb`` from leaves of what the previous stage sent."""
        previous = neighbour(self.paths[mb], stage, -1)
        leaves = []
        if previous is not None:
            leaves = [t.detach().requires_grad_(train and t.is_floating_point())
                      for t in self.ready.pop(("F", previous, mb))]
        out, updated = self.stages.forward[stage](self.params, self.buffers, self.inputs[mb], leaves, self.dims,
                                                  COORD, self.whole.get(stage, {}))
        self.buffers.update(new_buffer_values(updated))  # each microbatch's forward moves them, as in eager
        if neighbour(self.paths[mb], stage, +1) is None:
            share = out.detach().float()  # the reported loss: shares summed without rounding
            self.loss = share if self.loss is None else self.loss + share
            self.saved[(stage, mb)] = (leaves, None, out)
        else:
            self.ready[("F", stage, mb)] = [o.detach().contiguous() for o in out]
            self.saved[(stage, mb)] = (leaves, out, None)

    def backward_seeds(self, stage, mb):
        """What a B back-propagates: the stage's entry leaves, its outputs and their gradients (the loss
        share, seeded on its seed ranks only, on the last stage of the path)."""
        leaves, outs, loss = self.saved.pop((stage, mb))
        if loss is not None:
            seeded = loss if is_seed_rank(LOSS_SBP) else loss * 0
            return leaves, [self.scaler.scaled(seeded) if self.scaler else seeded], [None]
        grads = iter(self.ready.pop(("B", neighbour(self.paths[mb], stage, +1), mb)))
        pairs = [(o, next(grads)) for o in outs if o.is_floating_point()]
        pairs = [(o, g) for o, g in pairs if o.requires_grad]
        return leaves, [o for o, _ in pairs], [g for _, g in pairs]

    def backward(self, stage, mb):
        """B: back-propagate the loss share or the gradients that came back; keep the entries' gradients."""
        leaves, outs, grads = self.backward_seeds(stage, mb)
        if outs:
            torch.autograd.backward(outs, grads)
        self.send_back(stage, mb, leaves, [leaf.grad for leaf in leaves])

    def send_back(self, stage, mb, leaves, grads):
        """Keep the gradients of the stage's float entries for SEND_B (zeros where one got none)."""
        if leaves:
            self.ready[("B", stage, mb)] = [(g if g is not None else torch.zeros_like(leaf)).contiguous()
                                            for leaf, g in zip(leaves, grads) if leaf.is_floating_point()]

    def compute(self, kind, stage, mb):
        """One F or B of the action list."""
        if kind == "F":
            self.forward(stage, mb)
        else:
            self.backward(stage, mb)

    def message_shapes(self, kind, stage):
        """Local (shape, dtype) of each tensor of a message: exits for RECV_F, float entries for RECV_B."""
        if kind == "RECV_F":
            return self.stages.exit_shapes[stage](self.dims)
        return [(s, d) for s, d in self.stages.entry_shapes[stage](self.dims) if d.is_floating_point]

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
            kind, stage, mb, peer = actions[i]
            if peer is None:  # a compute
                self.compute(kind, stage, mb)
                i += 1
                continue
            j = i
            while j < len(actions) and actions[j][3] is not None:
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


class SplitBackwardStep(PipelineStep):
    """A step of a zero-bubble schedule: a B whose W comes later on this rank computes only the gradients
    of the stage's entries (what goes back to the previous stage); the W then computes the parameters'
    gradients from what that B kept (``split_backward.py``)."""

    def run(self, actions):
        self.deferred = {(stage, mb) for kind, stage, mb, _ in actions if kind == "W"}
        self.weight_work = {}
        return super().run(actions)

    def compute(self, kind, stage, mb):
        if kind == "W":
            self.weight_work.pop((stage, mb)).run()
        elif kind == "B" and (stage, mb) in self.deferred:
            leaves, outs, grads = self.backward_seeds(stage, mb)
            found, self.weight_work[(stage, mb)] = backward_input(outs, grads, leaves)
            self.send_back(stage, mb, leaves, found)
        else:
            super().compute(kind, stage, mb)


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
    """The full loss on every rank: the loss stage's seed ranks contribute their sum of shares (float32,
    whatever the loss's dtype, as every other rank's zero)."""
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


def tied_copies():
    """The IR names of the second and later copies of each tied parameter: loaded, not saved (they are equal)."""
    return {n for group in TIED_PARAMS for n in group[1:]}


def pipeline_model(shapes):
    """Every tensor of the model by state_dict name: (shape, layout, stage), a tied parameter's first copy's."""
    return {target: (shapes[target].shape, layout, stage) for n, (target, _, layout, stage) in STAGE_TENSORS.items()
            if n not in tied_copies()}


def run_batch(stages, batch, params, buffers, path, step_type, actions, scaler=None):
    """One batch through the pipeline: its microbatches through this rank's action list, or with ``path``
    forward only through those stages; returns this rank's sum of loss shares (None off the loss stage).
    ``scaler``: fp16 plans' loss scaler, whose scale multiplies the loss shares backward starts from."""
    count = PIPELINE["microbatches"]
    micro = split_microbatches(batch, count)
    position = my_position()
    whole = {s: prologue(params, buffers, local_inputs(batch), bind_dims(batch), COORD)
             for s, prologue in stages.prologue.items() if PIPELINE["positions"][s] == position}
    paths = [path] * count if path else PIPELINE["paths"]
    step = step_type(stages, params, buffers, micro, bind_dims(micro[0]), whole, paths)
    step.scaler = scaler
    return step.infer(path) if path else step.run(actions)


def main(stages, gradient_syncs=(), step_type=PipelineStep, loss_scaler=None, description="", argv=None):
    """Train up to step ``--steps`` (from the last checkpoint with --resume), or, with --infer-stages, run
    forward only. ``stages``: the program's stage functions; ``gradient_syncs``: the plan's gradient collectives
    outside autograd (classes from grad_sync), run once every microbatch's backward is done; ``step_type``: what
    runs the action list (:class:`SplitBackwardStep` for schedules with W actions); ``loss_scaler``: fp16
    plans' dynamic loss scaling (the class from loss_scaling); ``description``: the program's docstring, for
    ``--help``."""
    args = parse_args(argv, description, {**PIPELINE_OPTIONS, **(loss_scaler.OPTIONS if loss_scaler else {})})
    init_distributed(args.comm_timeout)
    batches = open_batches(args, args.steps * args.grad_accum, PIPELINE["microbatches"])
    shapes = load_weights(args.weights, meta=True)
    model = pipeline_model(shapes)
    checkpoint = find_checkpoint(args, model) if args.resume else None
    weights = shapes if checkpoint else load_weights(args.weights)  # a checkpoint fills the uninitialised shards
    position = my_position()
    mine = {n: spec for n, spec in STAGE_TENSORS.items() if PIPELINE["positions"][spec[3]] == position}
    params = local_parameters(weights, {n: (target, layout) for n, (target, kind, layout, _) in mine.items()
                                        if kind == "param"})
    buffers = {n: local_copy(weights[target], layout) for n, (target, kind, layout, _) in mine.items()
               if kind == "buffer"}
    optimizer = make_optimizer(params)
    schedule = make_schedule(args, optimizer)
    syncs = [make(params, args.comm_timeout) for make in gradient_syncs]
    scaler = loss_scaler.from_args(args, DEVICE) if loss_scaler else None
    actions = SCHEDULE[dist.get_rank()]
    path = infer_path(args.infer_stages) if args.infer_stages else None
    places = {n: (STAGE_TENSORS[n][0], STAGE_TENSORS[n][2]) for n in [*params, *buffers]}
    state = TrainingState(params, buffers, optimizer, places, model, tied_copies() & set(places), schedule, batches,
                          scaler)
    start = load_checkpoint(checkpoint, state) if checkpoint else 0
    metrics = open_metrics(args.metrics, start)
    layouts = {n: STAGE_TENSORS[n][2] for n in params if n not in tied_copies()}  # what the clipping norm counts
    if path:
        batches.position = 0  # inference runs every batch
    for step_index in range(0 if path else start, args.steps):
        with peer_failures(step_index):
            started = time.perf_counter()
            if optimizer and not path:
                optimizer.zero_grad(set_to_none=True)
            total, tokens = 0.0, 0
            for _ in range(1 if path else args.grad_accum):
                batch = batches.next()
                local = run_batch(stages, batch, params, buffers, path, step_type, actions, scaler)
                total, tokens = total + pipeline_loss(local), tokens + token_count(batch)
            extra = {"tokens": tokens}
            if not path:
                for sync in syncs:
                    sync.finish()
                extra |= apply_gradients(params, layouts, optimizer, schedule, scaler, args.grad_accum,
                                         args.clip_grad_norm)
            extra |= first_step_report(params, optimizer) if step_index == 0 else {}
            report_step(metrics, step_index, total / (1 if path else args.grad_accum), started, extra, args.steps)
            if not path and checkpoint_due(args, step_index + 1):
                save_checkpoint(args, state, step_index + 1)
    syncs.clear()  # they hold process groups (tied parameters): finish destroys every group
    finish(args, pipeline_state_dict(params, buffers))
