"""Sharded parameters (FSDP): gathered just before use, freed after it, gathered again for backward.

Autograd would keep a gathered parameter alive until backward; instead, what it saves of it is packed
as the shard and gathered again when backward needs it, so each full weight lives only around its use.
"""
import functools
import weakref

import torch

from .collectives import AllGather, _all_gather

GATHERED = {}  # storage address -> (shard, axis, dim, weak reference to the gathered tensor)


def comm_gather_param(shard, axis, dim, grad_dtype=None):
    """S(d) -> B for a parameter shard; the full tensor is freed after use, gathered again in backward
    (whose reduce-scatter runs in ``grad_dtype``, default the gradient's)."""
    full = AllGather.apply(shard, axis, dim, grad_dtype)
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


def regathering_params(function):
    """Run ``function`` (a forward pass) saving the parameters it gathers as shards (see comm_gather_param)."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        GATHERED.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack_saved, unpack_saved):
            return function(*args, **kwargs)
    return run
