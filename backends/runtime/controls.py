"""Training controls: the learning-rate schedule, gradient accumulation and global-norm gradient clipping.

The schedule is torch's ``LambdaLR`` over a warmup and a decay (its state goes into checkpoints). With
--grad-accum N a step runs N microsteps and averages their gradients, as one step on their concatenated
batch would. The clipping norm is that of the whole model: each rank sums the squares of the gradients it
holds, a sharded parameter's shard counted on every rank holding one, a replicated one only on its seed rank
and a tied copy only once, and one all-reduce over the world adds them up.
"""
import functools
import math

import torch
import torch.distributed as dist

from .core import DEVICE, is_seed_rank


def lr_factor(kind, warmup, total, step):
    """The learning rate of ``step`` as a fraction of the optimizer's: a linear warmup over ``warmup`` steps,
    then constant, or a cosine or linear decay to zero at step ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress


def make_schedule(args, optimizer):
    """The learning-rate schedule of --lr-schedule and --warmup-steps over --steps (None without an optimizer)."""
    if optimizer is None:
        return None
    factor = functools.partial(lr_factor, args.lr_schedule, args.warmup_steps, args.steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def restore_schedule(schedule, state):
    """Continue ``schedule`` from a checkpoint's state: its step, and the learning rate of that step."""
    schedule.load_state_dict(state)
    for group, base, factor in zip(schedule.optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas):
        group["lr"] = base * factor(schedule.last_epoch)


def finish_gradients(params, layouts, microsteps, max_norm):
    """Average the accumulated gradients over the microsteps and clip them to ``max_norm`` (0: no clipping);
    returns the global gradient norm before clipping (None without clipping). ``layouts``: each counted
    parameter's layout (tied copies after the first left out)."""
    grads = [p.grad for p in params.values() if p.grad is not None]
    if microsteps > 1:
        torch._foreach_mul_(grads, 1 / microsteps)
    if not max_norm:
        return None
    norm = global_grad_norm(params, layouts)
    scale = max_norm / (norm + 1e-6)  # as torch.nn.utils.clip_grad_norm_
    if scale < 1:
        torch._foreach_mul_(grads, scale)
    return norm


def apply_gradients(params, layouts, optimizer, schedule, scaler, microsteps, max_norm):
    """After the gradient collectives: unscale them (``scaler``: fp16 plans' loss scaler; a gradient that
    overflowed on any rank skips the update on every rank), average and clip them (:func:`finish_gradients`),
    step the optimizer and the schedule. Returns the step's metrics: ``lr``, ``grad_norm`` and, with a scaler,
    ``loss_scale`` and ``skipped``."""
    skipped = scaler.unscale_all_ranks(params) if scaler else False  # unscaled before clipping
    extra = {"lr": optimizer.param_groups[0]["lr"] if optimizer else None,
             "grad_norm": finish_gradients(params, layouts, microsteps, max_norm)}
    if optimizer:
        if not skipped:  # a gradient overflowed: no update this step
            optimizer.step()
        schedule.step()
    if scaler:
        extra |= {"loss_scale": float(scaler.scale), "skipped": skipped}
        scaler.update(skipped)
    return extra


def global_grad_norm(params, layouts):
    """The 2-norm of every gradient of the model, whatever its layout (see the module's docstring)."""
    squares = torch.zeros(1, dtype=torch.float64, device=DEVICE)
    for name, layout in layouts.items():
        grad = params[name].grad
        if grad is not None and is_seed_rank(layout):
            squares += grad.detach().double().pow(2).sum()
    dist.all_reduce(squares)
    return float(squares[0].sqrt())
