"""Tensors saved for backward as the shards they were gathered from, gathered again when backward reads them.

Autograd keeps what an op saves for its backward until that backward runs, so a gathered tensor that a matmul
reads stays whole in memory for every microbatch in flight. A gather that opts in records its result here (by
the address of its storage) with how to make it again; while a function decorated with ``regathering`` runs,
what autograd saves of such a tensor (it, or a view of it) is packed as that recipe instead and unpacked by
running it. FSDP's parameter gathers use it (``fsdp``, which also prefetches them), and so do the all-gathers of
activations under the strategy's ``regather_activations`` (``comm_gather_activation``): the activation is kept
as this rank's shard and gathered once more in backward, ahead of its use, as Megatron-LM's sequence-parallel
linear layers keep their input's sequence shard. Every rank runs the same backward, so all gather again in the
same order.
"""
import functools
import weakref

import torch
import torch.distributed as dist

from .collectives import comm_all_gather
from .core import GROUPS, unbalance

REGATHERABLE = {}  # storage address -> (weak reference to the gathered tensor, its pack: see remember_gather)


def remember_gather(full, pack):
    """Record that ``full`` was gathered: when autograd saves it, ``pack()`` gives the function (of no arguments)
    that makes it again in backward, or None to keep it whole."""
    REGATHERABLE[full.untyped_storage().data_ptr()] = (weakref.ref(full), pack)


def pack_saved(tensor):
    entry = REGATHERABLE.get(tensor.untyped_storage().data_ptr())
    regather = entry[1]() if entry is not None and entry[0]() is not None else None
    if regather is None:
        return tensor
    return ("regather", regather, tensor.size(), tensor.stride(), tensor.storage_offset())


def unpack_saved(packed):
    if not (isinstance(packed, tuple) and packed and packed[0] == "regather"):
        return packed
    _, regather, size, stride, offset = packed
    return regather().as_strided(size, stride, offset)


def regathering(function):
    """Run ``function`` (a forward pass or a stage's) saving the tensors gathered in it that ``remember_gather``
    recorded as their shards; the activation it gathered last starts gathering again when backward reaches its
    outputs (see ``ActivationRegather``)."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        REGATHERABLE.clear()
        LAST_GATHERED[0] = lambda: None
        with torch.autograd.graph.saved_tensors_hooks(pack_saved, unpack_saved):
            out = function(*args, **kwargs)
        last = LAST_GATHERED[0]()
        if last is not None:
            for tensor in _tensors(out):
                if tensor.requires_grad:
                    tensor.register_hook(lambda grad, last=last: last.launch())
        return out
    return run


def _tensors(value):
    """The tensors in a function's result (nested tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


class ActivationRegather:
    """An activation's all-gather made again in backward, once for all the ops that saved it: the first of their
    backwards to run takes it, the last one's use lets it go. Backward reads gathered activations back in the
    reverse of forward's order, so taking one launches the gather of the one gathered before it in forward
    (``before``) asynchronously: its communication runs while backward computes up to where that one is read
    (the activation forward gathered last is launched when backward reaches the forward's outputs)."""

    def __init__(self, shard, axis, dim, balanced, before):
        self.shard, self.axis, self.dim, self.balanced = shard.detach(), axis, dim, balanced
        self.before = before
        self.pending = 0  # saves not yet read back
        self.launched = None  # (handle, parts) of a gather started ahead
        self.full = None

    def pack(self):
        """One more op saved the gathered tensor: what it reads back in backward."""
        self.pending += 1
        return self.take

    def launch(self):
        """Start gathering the shard again ahead of its use (unless already gathered or under way, or nothing
        saved it)."""
        if self.full is None and self.launched is None and self.pending > 0:
            self._start()

    def _start(self):
        group, ranks, _ = GROUPS[self.axis]
        parts = [torch.empty_like(self.shard) for _ in ranks]
        self.launched = (dist.all_gather(parts, self.shard.contiguous(), group=group, async_op=True), parts)

    def take(self):
        """The gathered tensor again; the first take waits for its gather and launches the one before it."""
        if self.full is None:
            if self.launched is None:
                self._start()
            handle, parts = self.launched
            self.launched = None
            handle.wait()
            full = torch.cat(parts, dim=self.dim)
            self.full = unbalance(full, self.dim, len(parts)) if self.balanced else full
            if self.before is not None:
                self.before.launch()
        full, self.pending = self.full, self.pending - 1
        if self.pending <= 0:
            self.full = None
        return full


LAST_GATHERED = [lambda: None]  # a weak reference to this forward's latest ActivationRegather


def comm_gather_activation(x, axis, dim, grad_dtype=None, balanced=False):
    """S(d) -> B for an activation that backward keeps as this rank's shard: the ops that save the gathered tensor
    read it back gathered anew (``regathering``). Backward reduce-scatters the gradients in ``grad_dtype``
    (default theirs); ``balanced``: the split is a load-balanced sequence split, put back in sequence order."""
    full = comm_all_gather(x, axis, dim, grad_dtype, balanced)
    regather = ActivationRegather(x, axis, dim, balanced, LAST_GATHERED[0]())
    LAST_GATHERED[0] = weakref.ref(regather)
    remember_gather(full, regather.pack)
    return full
