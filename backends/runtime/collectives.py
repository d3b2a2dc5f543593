"""Collectives on one mesh axis: autograd functions whose backward is the adjoint collective."""
import torch
import torch.distributed as dist

from .core import COORD, DEVICE, GROUPS, balance, balanced_part, split_dim, unbalance
from .plan import MESH_AXES


def _all_reduce(x, axis, op="sum", dtype=None):
    """The sum (or max) over the axis, computed in ``dtype`` (default: x's) and returned in x's dtype."""
    group, _, _ = GROUPS[axis]
    out = x.contiguous().to(dtype or x.dtype, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return out.to(x.dtype)


def _all_gather(x, axis, dim):
    group, ranks, _ = GROUPS[axis]
    parts = [torch.empty_like(x.contiguous()) for _ in ranks]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x, axis, dim, dtype=None):
    """This rank's part of the sum over the axis, summed in ``dtype`` (default: x's), in x's dtype."""
    group, ranks, me = GROUPS[axis]
    parts = [p.contiguous().to(dtype or x.dtype) for p in x.chunk(len(ranks), dim=dim)]
    out = torch.empty_like(parts[me])
    if DEVICE.type == "cuda":
        dist.reduce_scatter(out, parts, group=group)
        return out.to(x.dtype)
    return _all_reduce(x, axis, dtype=dtype).chunk(len(ranks), dim=dim)[me].contiguous()


def _all_to_all(x, axis, src_dim, dst_dim):
    group, ranks, _ = GROUPS[axis]
    sends = [p.contiguous() for p in x.chunk(len(ranks), dim=dst_dim)]
    recvs = [torch.empty_like(p) for p in sends]
    dist.all_to_all(recvs, sends, group=group)
    return torch.cat(recvs, dim=src_dim)


class AllReduce(torch.autograd.Function):
    """P -> B forward; the adjoint all-reduces the (partial) gradients."""

    @staticmethod
    def forward(ctx, x, axis, op, grad_dtype=None, reduce_dtype=None):
        ctx.axis, ctx.grad_dtype = axis, grad_dtype
        return _all_reduce(x, axis, op, reduce_dtype)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.axis, dtype=ctx.grad_dtype), None, None, None, None


class AllGather(torch.autograd.Function):
    """S(d) -> B forward; reduce-scatter backward."""

    @staticmethod
    def forward(ctx, x, axis, dim, grad_dtype=None):
        ctx.axis, ctx.dim, ctx.grad_dtype = axis, dim, grad_dtype
        return _all_gather(x, axis, dim)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.axis, ctx.dim, ctx.grad_dtype), None, None, None


class ReduceScatter(torch.autograd.Function):
    """P -> S(d) forward; all-gather backward."""

    @staticmethod
    def forward(ctx, x, axis, dim, reduce_dtype=None):
        ctx.axis, ctx.dim = axis, dim
        return _reduce_scatter(x, axis, dim, reduce_dtype)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.axis, ctx.dim), None, None, None


class AllToAll(torch.autograd.Function):
    """S(i) -> S(j) forward; S(j) -> S(i) backward."""

    @staticmethod
    def forward(ctx, x, axis, src_dim, dst_dim):
        ctx.args = (axis, src_dim, dst_dim)
        return _all_to_all(x, axis, src_dim, dst_dim)

    @staticmethod
    def backward(ctx, grad):
        axis, src_dim, dst_dim = ctx.args
        return _all_to_all(grad, axis, dst_dim, src_dim), None, None, None


def comm_all_reduce(x, axis, op="sum", grad_dtype=None, reduce_dtype=None):
    """P -> B, summed in ``reduce_dtype`` (the plan's forward_reduce; default x's); backward sums the gradients
    in ``grad_dtype`` (the plan's reduce dtype; default theirs)."""
    return AllReduce.apply(x, axis, op, grad_dtype, reduce_dtype)


def comm_all_gather(x, axis, dim, grad_dtype=None, balanced=False):
    """S(d) -> B; backward reduce-scatters the gradients in ``grad_dtype`` (default theirs). ``balanced``: the
    split is a load-balanced sequence split, put back in sequence order."""
    out = AllGather.apply(x, axis, dim, grad_dtype)
    return unbalance(out, dim, len(GROUPS[axis][1])) if balanced else out


def comm_reduce_scatter(x, axis, dim, balanced=False, reduce_dtype=None):
    """P -> S(d), summed in ``reduce_dtype`` (the plan's forward_reduce; default x's); ``balanced``: each rank's
    load-balanced part of the sequence."""
    return ReduceScatter.apply(balance(x, dim, len(GROUPS[axis][1])) if balanced else x, axis, dim, reduce_dtype)


def comm_all_to_all(x, axis, src_dim, dst_dim, balanced=(False, False)):
    """S(src_dim) -> S(dst_dim); ``balanced``: whether each of the two splits is a load-balanced sequence split."""
    n = len(GROUPS[axis][1])
    out = AllToAll.apply(balance(x, dst_dim, n) if balanced[1] else x, axis, src_dim, dst_dim)
    return unbalance(out, src_dim, n) if balanced[0] else out


def comm_slice(x, axis, dim, balanced=False):
    """B -> S(d): keep this rank's slice (no communication; ``balanced``: its load-balanced part)."""
    n = len(GROUPS[axis][1])
    return balanced_part(x, dim, n, COORD[axis]) if balanced else x.chunk(n, dim=dim)[COORD[axis]]


def comm_mask(x, axis):
    """B -> P(sum): the first rank of the axis keeps the value, the others hold zeros."""
    return x if COORD[axis] == 0 else x * 0


def unshard(local, layout):
    """The full tensor on every rank, from each rank's local shard in ``layout`` (inner axes first)."""
    for axis, entry in reversed(list(zip(MESH_AXES, layout))):
        if split_dim(entry) is not None:
            local = _all_gather(local, axis, split_dim(entry))
    return local
