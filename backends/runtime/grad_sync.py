"""Gradient sync: the gradient collectives outside autograd (bucket all-reduces, tied-copy sums).

Each is a class built once from this rank's parameters (every rank builds the same ones in the same
order: some create process groups); the training loop calls ``finish()`` after backward.
"""
import datetime
import functools

import torch
import torch.distributed as dist

from .core import GROUPS
from .plan import GRAD_BUCKETS, MESH_DEVICES, PIPELINE, STAGE_TENSORS, TIED_PARAMS


def local_buckets(params):
    """The gradient buckets whose parameters this rank holds (others belong to other pipeline stages)."""
    return [(axes, names) for axes, names in GRAD_BUCKETS if all(n in params for n in names)]


def flat_gradients(params, names):
    return torch.cat([(params[n].grad if params[n].grad is not None else torch.zeros_like(params[n])).reshape(-1)
                      for n in names])


def unflatten_gradients(params, names, flat):
    offset = 0
    for n in names:
        params[n].grad = flat[offset:offset + params[n].numel()].view_as(params[n]).clone()
        offset += params[n].numel()


class OverlappedGradientSync:
    """All-reduce each bucket while backward still runs, as soon as its last gradient is ready. Buckets
    launch strictly in their order (backward's), so every rank issues the same collectives in that order.
    While ``hold`` is set (the microsteps of an accumulation before its last), gradients only accumulate."""

    def __init__(self, params, timeout_s):
        self.params, self.buckets, self.hold = params, local_buckets(params), False
        for index, (_, names) in enumerate(self.buckets):
            for name in names:
                params[name].register_post_accumulate_grad_hook(functools.partial(self._ready, index, name))
        self.missing, self.launched = [set(names) for _, names in self.buckets], []

    def _ready(self, index, name, _param):
        if self.hold:
            return
        self.missing[index].discard(name)
        while len(self.launched) < len(self.buckets) and not self.missing[len(self.launched)]:
            self._launch()

    def _launch(self):
        axes, names = self.buckets[len(self.launched)]
        flat = flat_gradients(self.params, names)
        self.launched.append((flat, dist.all_reduce(flat, group=GROUPS[axes[0]][0], async_op=True)))

    def finish(self):
        """Wait for every bucket (launching those whose parameters got no gradient) and store the sums."""
        while len(self.launched) < len(self.buckets):
            self._launch()
        for (axes, names), (flat, work) in zip(self.buckets, self.launched):
            work.wait()
            for axis in axes[1:]:
                dist.all_reduce(flat, group=GROUPS[axis][0])
            unflatten_gradients(self.params, names, flat)
        self.missing, self.launched = [set(names) for _, names in self.buckets], []


class BucketedGradientSync:
    """All-reduce each bucket once backward is done (pipelines: after every microbatch's backward)."""

    def __init__(self, params, timeout_s):
        self.params = params

    def finish(self):
        for axes, names in local_buckets(self.params):
            flat = flat_gradients(self.params, names)
            for axis in axes:
                dist.all_reduce(flat, group=GROUPS[axis][0])
            unflatten_gradients(self.params, names, flat)


class TiedGradientSync:
    """Sum the gradients of a parameter's copies on different stages (tied embedding and head), over one
    process group per tied parameter and mesh index: the ranks holding its copies."""

    def __init__(self, params, timeout_s):
        self.params, self.groups = params, []  # (names of the copies, process group) of this rank's ties
        for names in TIED_PARAMS:
            positions = [PIPELINE["positions"][STAGE_TENSORS[n][3]] for n in names]
            for index in range(len(MESH_DEVICES[0])):
                ranks = sorted({MESH_DEVICES[p][index] for p in positions})
                group = (dist.new_group(ranks, timeout=datetime.timedelta(seconds=timeout_s))
                         if len(ranks) > 1 else None)
                if dist.get_rank() in ranks:
                    self.groups.append((names, group))

    def finish(self):
        for names, group in self.groups:
            local = [n for n in names if n in self.params]
            total = sum(self.params[n].grad if self.params[n].grad is not None else torch.zeros_like(self.params[n])
                        for n in local)
            if group is not None:
                dist.all_reduce(total, group=group)
            for n in local:
                self.params[n].grad = total.clone()
