"""Dynamic loss scaling, carried only by plans that compute in fp16 on fp32 master weights (``fp16-mixed``).

fp16 holds magnitudes down to 6e-8 only, and small gradients of the fp16 part of backward round to zero.
As ``torch.amp.GradScaler`` does, the loss is multiplied by a scale (2**16 to start) before backward, so
the gradients backward makes are that much larger; after the gradient collectives, the fp32 gradients are
multiplied by the scale's reciprocal (exact: the scale is a power of two) before clipping and the optimizer.
A gradient that overflowed (inf or nan) on any rank skips the step on every rank (one all-reduce of the
found-inf flag over the whole world: each rank holds other shards) and halves the scale; after
``growth_interval`` steps in a row without one the scale doubles. The scale and the count of good steps
since the last change go into checkpoints. The virtual mesh runs the same class (``backends/virtual.py``).
"""
import torch
import torch.distributed as dist


class DynamicLossScaler:
    """The loss scale and its updates, as ``torch.amp.GradScaler`` (see the module docstring). ``scale`` is a
    float32 scalar tensor on ``device``; ``growth_tracker`` counts the good steps since it last changed."""

    OPTIONS = {
        "--loss-scale": {"type": float, "default": 2.0 ** 16, "help": "fp16 dynamic loss scaling: the first scale"},
        "--loss-scale-growth": {"type": float, "default": 2.0, "help": "the factor the scale grows by"},
        "--loss-scale-backoff": {"type": float, "default": 0.5, "help": "the factor the scale shrinks by when a "
                                 "gradient overflowed (the step is skipped)"},
        "--loss-scale-interval": {"type": int, "default": 2000,
                                  "help": "steps in a row without an overflow before the scale grows"},
    }
    """The command-line flags of programs that scale their loss (torch.amp.GradScaler's defaults)."""

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000,
                 device="cpu"):
        self.scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.growth_tracker = 0

    @classmethod
    def from_args(cls, args, device):
        """The scaler of the program's ``--loss-scale*`` flags."""
        return cls(args.loss_scale, args.loss_scale_growth, args.loss_scale_backoff, args.loss_scale_interval, device)

    def scaled(self, loss):
        """What backward starts from: the loss times the scale."""
        return loss * self.scale

    def unscale(self, grads):
        """Multiply the gradients by the scale's reciprocal, in place; whether any element is inf or nan."""
        grads = [g for g in grads if g is not None]
        inverse = self.scale.double().reciprocal().float()
        found = torch.zeros((), dtype=torch.float32, device=self.scale.device)
        for g in grads:
            found = torch.maximum(found, (~torch.isfinite(g)).any().float())
        if grads:
            torch._foreach_mul_(grads, inverse)
        return found

    def update(self, found_inf):
        """After the step: back off (and restart counting) when a gradient overflowed, else count the step and
        grow the scale after ``growth_interval`` good steps in a row (``torch._amp_update_scale_``'s rule)."""
        if found_inf:
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            grown = self.scale * self.growth_factor
            if torch.isfinite(grown):  # a scale that would overflow float32 stays
                self.scale.copy_(grown)
            self.growth_tracker = 0

    def state_dict(self):
        """The state a checkpoint keeps (plain numbers)."""
        return {"scale": float(self.scale), "growth_tracker": self.growth_tracker}

    def load_state_dict(self, state):
        self.scale.fill_(state["scale"])
        self.growth_tracker = int(state["growth_tracker"])

    def unscale_all_ranks(self, params):
        """Unscale this rank's gradients; whether a gradient overflowed on any rank (one all-reduce of the flag
        over the world, so that every rank skips the same steps)."""
        found = self.unscale(p.grad for p in params.values())
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return bool(found)
