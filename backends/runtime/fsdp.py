"""Sharded parameters (FSDP): gathered just before use, freed after it, gathered again for backward.

Autograd would keep a gathered parameter alive until backward; instead, what it saves of it is packed
as the shard and gathered again when backward needs it, so each full weight lives only around its use.
The gathers are prefetched: the first step learns the order in which forward and backward gather the
shards; from then on each gather also launches the next ones (``PREFETCH_AHEAD``) asynchronously, so
their communication runs while the current layer computes. Every rank runs the same forward and backward,
so all launch the same collectives in the same order.
"""
import functools
import weakref

import torch
import torch.distributed as dist

from .collectives import AllGather, _all_gather
from .core import GROUPS

GATHERED = {}  # storage address -> (shard, axis, dim, weak reference to the gathered tensor)
PREFETCH_AHEAD = 4  # gathers in flight ahead of the one in use (about a transformer block's weights)


class GatherPrefetch:
    """The order of a step's gathers, per phase (``forward``, ``backward``), learned on the first step, and the
    asynchronous gathers launched ahead along it. A gather off the learned order (a recomputed region) runs
    at once; what was launched for it is still waited for, at the next step at the latest."""

    def __init__(self):
        self.orders = {"forward": [], "backward": []}  # (key, shard, axis, dim) of each gather, in order
        self.learned = set()
        self.cursor = {"forward": 0, "backward": 0}  # the position in the order of the next gather
        self.pending = {}  # (phase, position) -> (parts, work, dim) of a launched gather
        self.phase = None

    def start_forward(self):
        """A step's forward begins: the previous step's backward order is complete."""
        self.learned |= {phase for phase, order in self.orders.items() if order}
        for _, work, _ in self.pending.values():
            work.wait()
        self.pending.clear()
        self.cursor = {"forward": 0, "backward": 0}
        self.phase = "forward"

    def gather(self, shard, axis, dim, phase):
        """The full tensor of ``shard`` (S(dim) on ``axis``): from a launched gather or gathered now; then the
        next gathers of ``phase``'s order are launched."""
        key, order = (shard.data_ptr(), axis, dim), self.orders[phase]
        if phase not in self.learned:
            order.append((key, shard.detach(), axis, dim))
            return _all_gather(shard, axis, dim)
        position = next((i for i in range(self.cursor[phase], len(order)) if order[i][0] == key), None)
        if position is None:  # off the learned order
            return _all_gather(shard, axis, dim)
        self.cursor[phase] = position + 1
        for ahead in range(position + 1, min(position + 1 + PREFETCH_AHEAD, len(order))):
            self.launch(phase, ahead)
        if (phase, position) not in self.pending:
            return _all_gather(shard, axis, dim)
        parts, work, dim = self.pending.pop((phase, position))
        work.wait()
        return torch.cat(parts, dim=dim)

    def launch(self, phase, position):
        """Start the gather at ``position`` of ``phase``'s order (once per step)."""
        if (phase, position) not in self.pending:
            _, shard, axis, dim = self.orders[phase][position]
            group, ranks, _ = GROUPS[axis]
            parts = [torch.empty_like(shard) for _ in ranks]
            work = dist.all_gather(parts, shard.contiguous(), group=group, async_op=True)
            self.pending[(phase, position)] = (parts, work, dim)


PREFETCH = GatherPrefetch()


class GatherParam(AllGather):
    """S(d) -> B for a parameter shard in forward, through the prefetcher; reduce-scatter backward."""

    @staticmethod
    def forward(ctx, x, axis, dim):
        ctx.axis, ctx.dim = axis, dim
        if PREFETCH.phase != "forward":  # outside a regathering forward (a recomputed region): no prefetch
            return _all_gather(x, axis, dim)
        return PREFETCH.gather(x, axis, dim, "forward")


def comm_gather_param(shard, axis, dim):
    """S(d) -> B for a parameter shard; the full tensor is freed after use, gathered again in backward."""
    full = GatherParam.apply(shard, axis, dim)
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
    return PREFETCH.gather(shard, axis, dim, "backward").as_strided(size, stride, offset)


def regathering_params(function):
    """Run ``function`` (a forward pass) saving the parameters it gathers as shards (see comm_gather_param)."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        GATHERED.clear()
        PREFETCH.start_forward()
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack_saved, unpack_saved):
                return function(*args, **kwargs)
        finally:
            PREFETCH.phase = None
    return run
