"""The training loop: every rank runs ``forward`` on its shards (plans without pipeline stages)."""
import time

from .checkpoint import TrainingState, checkpoint_due, find_checkpoint, load_checkpoint, save_checkpoint
from .controls import apply_gradients, make_schedule
from .core import COORD, DEVICE, init_distributed, is_seed_rank
from .data import open_batches
from .faults import peer_failures
from .loop import (bind_dims, finish, first_step_report, full_state_dict, load_weights, local_copy, local_inputs,
                   local_parameters, logical_loss, make_optimizer, new_buffer_values, parse_args, token_count)
from .plan import BUFFERS, LOSS_SBP, PARAMS
from .progress import open_metrics, report_step


def main(forward, gradient_syncs=(), loss_scaler=None, description="", argv=None):
    """Train up to step ``--steps`` (from the last checkpoint with --resume). ``forward``: the program's
    ``forward(p, b, x, dims, coord)`` (one rank's forward pass: its loss and its buffers' new values);
    ``gradient_syncs``: the plan's gradient collectives outside autograd (classes from grad_sync, built from
    this rank's parameters), run after backward; ``loss_scaler``: fp16 plans' dynamic loss scaling (the class
    from loss_scaling); ``description``: the program's docstring, for ``--help``."""
    args = parse_args(argv, description, loss_scaler.OPTIONS if loss_scaler else None)
    init_distributed(args.comm_timeout)
    batches = open_batches(args, args.steps * args.grad_accum)
    shapes = load_weights(args.weights, meta=True)
    model = {n: (shapes[n].shape, layout, 0) for n, layout in {**PARAMS, **BUFFERS}.items()}
    checkpoint = find_checkpoint(args, model) if args.resume else None
    weights = shapes if checkpoint else load_weights(args.weights)  # a checkpoint fills the uninitialised shards
    params = local_parameters(weights, {n: (n, layout) for n, layout in PARAMS.items()})
    buffers = {n: local_copy(weights[n], layout) for n, layout in BUFFERS.items()}
    optimizer = make_optimizer(params)
    schedule = make_schedule(args, optimizer)
    syncs = [make(params, args.comm_timeout) for make in gradient_syncs]
    scaler = loss_scaler.from_args(args, DEVICE) if loss_scaler else None
    state = TrainingState(params, buffers, optimizer, {n: (n, spec[1]) for n, spec in model.items()}, model,
                          schedule=schedule, data=batches, loss_scaler=scaler)
    start = load_checkpoint(checkpoint, state) if checkpoint else 0
    metrics = open_metrics(args.metrics, start)
    for step in range(start, args.steps):
        with peer_failures(step):
            started = time.perf_counter()
            if optimizer:
                optimizer.zero_grad(set_to_none=True)
            total, tokens = 0.0, 0
            for micro in range(args.grad_accum):
                batch = batches.next()
                for sync in syncs:
                    sync.hold = micro < args.grad_accum - 1  # sync the gradients once, after the last microstep
                loss, updated = forward(params, buffers, local_inputs(batch), bind_dims(batch), COORD)
                seeded = loss if is_seed_rank(LOSS_SBP) else loss * 0
                (scaler.scaled(seeded) if scaler else seeded).backward()
                buffers.update(new_buffer_values(updated))
                total, tokens = total + logical_loss(loss), tokens + token_count(batch)
            for sync in syncs:
                sync.finish()
            extra = {"tokens": tokens} | apply_gradients(params, PARAMS, optimizer, schedule, scaler, args.grad_accum,
                                                         args.clip_grad_norm)
            extra |= first_step_report(params, optimizer) if step == 0 else {}
            report_step(metrics, step, total / args.grad_accum, started, extra, args.steps)
            if checkpoint_due(args, step + 1):
                save_checkpoint(args, state, step + 1)
    finish(args, full_state_dict(params, buffers))
