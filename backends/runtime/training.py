"""The training loop: every rank runs ``forward`` on its shards (plans without pipeline stages)."""
import time

from .checkpoint import TrainingState, checkpoint_due, find_checkpoint, load_checkpoint, save_checkpoint
from .core import COORD, fail, init_distributed, is_seed_rank
from .faults import peer_failures
from .loop import (bind_dims, finish, first_step_report, full_state_dict, load_batches, load_weights, local_copy,
                   local_inputs, local_parameters, logical_loss, make_optimizer, new_buffer_values, open_metrics,
                   parse_args, report_step, synthetic_batch)
from .plan import BUFFERS, LOSS_SBP, PARAMS, forward


def main(argv=None, gradient_syncs=()):
    """Train up to step ``--steps`` (from the last checkpoint with --resume). ``gradient_syncs``: the plan's
    gradient collectives outside autograd (classes from grad_sync, built from this rank's parameters), run
    after backward."""
    args = parse_args(argv)
    init_distributed(args.comm_timeout)
    if args.infer_stages:
        fail("--infer-stages chooses pipeline stages, but this program has no pipeline")
    batches = load_batches(args)
    shapes = load_weights(args.weights, meta=True)
    model = {n: (shapes[n].shape, layout, 0) for n, layout in {**PARAMS, **BUFFERS}.items()}
    checkpoint = find_checkpoint(args, model) if args.resume else None
    weights = shapes if checkpoint else load_weights(args.weights)  # a checkpoint fills the uninitialised shards
    params = local_parameters(weights, {n: (n, layout) for n, layout in PARAMS.items()})
    buffers = {n: local_copy(weights[n], layout) for n, layout in BUFFERS.items()}
    optimizer = make_optimizer(params)
    syncs = [make(params, args.comm_timeout) for make in gradient_syncs]
    state = TrainingState(params, buffers, optimizer, {n: (n, spec[1]) for n, spec in model.items()}, model)
    start = load_checkpoint(checkpoint, state) if checkpoint else 0
    metrics = open_metrics(args.metrics, start)
    for step in range(start, args.steps):
        with peer_failures(step):
            started = time.perf_counter()
            batch = batches[step] if batches is not None else synthetic_batch(args.seed, step)
            dims = bind_dims(batch)
            if optimizer:
                optimizer.zero_grad(set_to_none=True)
            loss, updated = forward(params, buffers, local_inputs(batch), dims, COORD)
            (loss if is_seed_rank(LOSS_SBP) else loss * 0).backward()
            for sync in syncs:
                sync.finish()
            if optimizer:
                optimizer.step()
            buffers.update(new_buffer_values(updated))
            extra = first_step_report(params, optimizer) if step == 0 else {}
            report_step(metrics, step, logical_loss(loss), started, extra)
            if checkpoint_due(args, step + 1):
                save_checkpoint(args, state, step + 1)
    finish(args, full_state_dict(params, buffers))
