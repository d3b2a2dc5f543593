"""Reductions and scans: a split of a reduced dim becomes a partial value; a scanned dim stays whole."""
from __future__ import annotations

import sympy

from ir.core import Node
from ir.ops.registry import LocalCall, LocalContext, Signature, all_b, default_local, register
from ir.ops.schema import arg, dim_arg, normalize_dim
from ir.precision import accumulation_dtype
from ir.sbp import P, PMAX, Split
from ir.types import DTYPES_BY_NAME


def reduced_dims(node: Node) -> tuple[list[int], bool]:
    """The dims a reduction with ``dim`` and ``keepdim`` arguments reduces, and whether it keeps them.

    ``dim`` is one int or a list; None or an empty list reduces every dim.
    """
    ndim = node.input_values()[0].type.ndim
    dims = arg(node, "dim")
    keep = bool(arg(node, "keepdim"))
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        return list(range(ndim)), keep
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    return sorted({normalize_dim(d, ndim) for d in dims}), keep


def every_dim(node: Node) -> tuple[list[int], bool]:
    """What a reduction without ``dim`` (``sum.default``) reduces: every dim, none kept."""
    return list(range(node.input_values()[0].type.ndim)), False


def _reduction(node: Node, reduced: tuple[list[int], bool], reduced_partial) -> list[Signature]:
    """Unreduced dims split through (shifted when reduced dims are dropped); a split reduced dim gives
    ``reduced_partial`` (None: it may not be split); partial inputs reduce to partial outputs."""
    x = node.input_values()[0]
    dims, keep = reduced
    n_out = len(node.outputs)
    sigs = [all_b(node)]
    for i in range(x.type.ndim):
        if i not in dims:
            out = i if keep else i - sum(1 for d in dims if d < i)
            sigs.append(Signature((Split(i),), (Split(out),) * n_out))
        elif reduced_partial is not None:
            sigs.append(Signature((Split(i),), (reduced_partial,) * n_out))
    if reduced_partial is not None:
        sigs.append(Signature((reduced_partial,), (reduced_partial,) * n_out))
    return sigs


@register("aten.sum.dim_IntList", doc="sum: a split reduced dim gives P(sum)")
def sum_dims(node: Node) -> list[Signature]:
    return _reduction(node, reduced_dims(node), P)


@register("aten.sum.default", doc="sum of every entry: a split gives P(sum)")
def sum_all(node: Node) -> list[Signature]:
    return _reduction(node, every_dim(node), P)


@register("aten.amax.default", doc="max: a split reduced dim gives P(max)")
def amax(node: Node) -> list[Signature]:
    return _reduction(node, reduced_dims(node), PMAX)


@register("aten.amin.default", doc="min: only unreduced dims may be split (no P(min) layout)")
def amin(node: Node) -> list[Signature]:
    return _reduction(node, reduced_dims(node), None)


def _mean_call(node: Node, ctx: LocalContext, reduced: tuple[list[int], bool]) -> LocalCall:
    """A mean over split dims: local sum over the global count of reduced elements."""
    x = node.input_values()[0]
    dims, keep = reduced
    split = {s.dim for s in ctx.in_sbps[0] if isinstance(s, Split)}
    if not split & set(dims):
        return default_local(node, ctx)
    count = sympy.Integer(1)
    for d in dims:
        count = count * x.type.shape[d]
    dtype = arg(node, "dtype")
    accumulate = accumulation_dtype(node.op, node.outputs[0].type.dtype)
    return LocalCall("kernels.sum_over", [x, dims, keep, count, dtype,
                                          None if accumulate == node.outputs[0].type.dtype else DTYPES_BY_NAME[accumulate]])


def _mean_dims_local(node: Node, ctx: LocalContext) -> LocalCall:
    return _mean_call(node, ctx, reduced_dims(node))


def _mean_all_local(node: Node, ctx: LocalContext) -> LocalCall:
    return _mean_call(node, ctx, every_dim(node))


register("aten.mean.dim", local=_mean_dims_local,
         doc="mean: a split reduced dim gives P(sum) of local sums over the global count")(sum_dims)
register("aten.mean.default", local=_mean_all_local,
         doc="mean of every entry: local sums over the global count")(sum_all)


def along_dim(node: Node, linear: bool) -> list[Signature]:
    """An op that reads ``dim`` whole (scan, sort, softmax): every other dim may be split; a linear one
    (cumsum) maps partial values to partial values."""
    x = node.input_values()[0]
    dim = dim_arg(node, "dim", x.type.ndim)
    n_out = len(node.outputs)
    sigs = [all_b(node)] + [Signature((Split(i),), (Split(i),) * n_out) for i in range(x.type.ndim) if i != dim]
    return sigs + ([Signature((P,), (P,) * n_out)] if linear else [])


@register("aten.cumsum.default", doc="prefix sums along one dim: linear; other dims may be split")
def cumsum(node: Node) -> list[Signature]:
    return along_dim(node, linear=True)


@register("aten.topk.default", "aten.sort.default", "aten.sort.stable", "aten.argsort.default",
          "aten.argsort.stable", "aten.cumprod.default",
          doc="ranks or scans along one dim; other dims may be split")
def ranked(node: Node) -> list[Signature]:
    return along_dim(node, linear=False)


@register("aten.var.correction", "aten.var_mean.correction", "aten.std.correction", "aten.var.dim",
          "aten.std.dim", "aten.var_mean.dim",
          "aten.argmax.default", "aten.argmin.default", "aten.max.dim", "aten.min.dim",
          "aten.logsumexp.default", "aten.prod.dim_int", "aten.any.dim", "aten.all.dim",
          doc="nonlinear reductions: only unreduced dims may be split")
def nonlinear_reduction(node: Node) -> list[Signature]:
    """``argmax`` / ``argmin`` without ``dim`` index the flattened input: every dim counts as reduced."""
    return _reduction(node, reduced_dims(node), None)


@register("aten.histc.default", doc="a histogram over fixed bounds: split inputs give partial counts")
def histc(node: Node) -> list[Signature]:
    """With bounds given (``min < max``) each shard's counts add up to the whole input's (P(sum)); with the
    default bounds the data's own min and max set the bins, which a shard does not know."""
    x = node.input_values()[0]
    if not arg(node, "min") < arg(node, "max"):
        return [all_b(node)]
    return [all_b(node)] + [Signature((Split(i),), (P,)) for i in range(x.type.ndim)]
