"""The training loop: every rank runs ``forward`` on its shards (plans without pipeline stages)."""
import time

import torch.distributed as dist

from .core import COORD, DEVICE, fail, init_distributed, is_seed_rank, shard
from .loop import (bind_dims, finish, first_step_report, full_state_dict, load_batches, load_weights, local_inputs,
                   local_parameters, logical_loss, make_optimizer, new_buffer_values, parse_args, report_step,
                   synthetic_batch)
from .plan import BUFFERS, LOSS_SBP, PARAMS, forward


def main(argv=None, gradient_syncs=()):
    """Train ``--steps`` steps. ``gradient_syncs``: the plan's gradient collectives outside autograd
    (classes from grad_sync, built from this rank's parameters), run after backward."""
    args = parse_args(argv)
    init_distributed(args.comm_timeout)
    if args.infer_stages:
        fail("--infer-stages chooses pipeline stages, but this program has no pipeline")
    batches = load_batches(args)
    weights = load_weights(args.weights)
    params = local_parameters(weights, {n: (n, layout) for n, layout in PARAMS.items()})
    buffers = {n: shard(weights[n].to(DEVICE), layout) for n, layout in BUFFERS.items()}
    optimizer = make_optimizer(params)
    syncs = [make(params, args.comm_timeout) for make in gradient_syncs]
    metrics = open(args.metrics, "w") if args.metrics and dist.get_rank() == 0 else None
    for step in range(args.steps):
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
    finish(args, full_state_dict(params, buffers))
