"""Reductions: a split of a reduced dim becomes a partial value."""
from __future__ import annotations

import sympy

from ir.core import Node
from ir.ops.registry import LocalCall, LocalContext, RULES, Signature, all_b, register, default_local
from ir.sbp import P, PMAX, Split


# Where ``keepdim`` sits among the positional arguments (``*.correction`` take it by keyword only).
KEEPDIM_POSITION = {"aten.var.dim": 3, "aten.std.dim": 3, "aten.var_mean.dim": 3, "aten.var.correction": None,
                    "aten.std.correction": None, "aten.var_mean.correction": None}


def reduced_dims(node: Node) -> tuple[list[int], bool]:
    """The dims a reduction reduces, and whether it keeps them."""
    x = node.input_values()[0]
    position = KEEPDIM_POSITION.get(node.op, 2)
    if position is not None and len(node.args) > position:
        keep = bool(node.args[position])
    else:
        keep = bool(node.kwargs.get("keepdim", False))
    full = node.op in ("aten.sum.default", "aten.mean.default")
    if full or len(node.args) < 2 or node.args[1] is None or node.args[1] == []:
        return list(range(x.type.ndim)), keep and not full
    dims = node.args[1] if isinstance(node.args[1], list) else [node.args[1]]
    return sorted(int(d) % max(x.type.ndim, 1) for d in dims), keep


def _reduction(node: Node, reduced_partial) -> list[Signature]:
    x = node.input_values()[0]
    dims, keep = reduced_dims(node)
    sigs = [all_b(node)]
    for i in range(x.type.ndim):
        if i in dims:
            sigs.append(Signature((Split(i),), (reduced_partial,)))
        else:
            out = i if keep else i - sum(1 for d in dims if d < i)
            sigs.append(Signature((Split(i),), (Split(out),)))
    if reduced_partial == P:
        sigs.append(Signature((P,), (P,)))
    if reduced_partial == PMAX:
        sigs.append(Signature((PMAX,), (PMAX,)))
    return sigs


@register("aten.sum.dim_IntList", "aten.sum.default", "aten.mean.dim", "aten.mean.default",
          doc="sum/mean: a split reduced dim gives P(sum)")
def sum_mean(node: Node) -> list[Signature]:
    return _reduction(node, P)


@register("aten.amax.default", "aten.amin.default", doc="max: a split reduced dim gives P(max)")
def amax(node: Node) -> list[Signature]:
    if node.op == "aten.amin.default":
        return [s for s in _reduction(node, P) if P not in s.outputs and P not in s.inputs]
    return _reduction(node, PMAX)


def _mean_local(node: Node, ctx: LocalContext) -> LocalCall:
    """A mean over split dims: local sum over the global count of reduced elements."""
    x = node.input_values()[0]
    dims, keep = reduced_dims(node)
    split = {s.dim for s in ctx.in_sbps[0] if isinstance(s, Split)}
    if not split & set(dims):
        return default_local(node, ctx)
    count = sympy.Integer(1)
    for d in dims:
        count = count * x.type.shape[d]
    dtype = node.kwargs.get("dtype")
    return LocalCall("kernels.sum_over", [x, dims, keep, count, dtype])


RULES["aten.mean.dim"].local = _mean_local
RULES["aten.mean.default"].local = _mean_local


@register("aten.cumsum.default", doc="prefix sums along one dim; other dims may be split")
def cumsum(node: Node) -> list[Signature]:
    x = node.input_values()[0]
    dim = int(node.args[1]) % x.type.ndim
    sigs = [all_b(node), Signature((P,), (P,))]
    return sigs + [Signature((Split(i),), (Split(i),)) for i in range(x.type.ndim) if i != dim]


@register("aten.var.correction", "aten.var_mean.correction", "aten.std.correction", "aten.var.dim",
          "aten.std.dim", "aten.var_mean.dim",
          "aten.argmax.default", "aten.argmin.default", "aten.max.dim", "aten.min.dim",
          "aten.logsumexp.default", "aten.prod.dim_int", "aten.any.dim", "aten.all.dim",
          doc="nonlinear reductions: only unreduced dims may be split")
def nonlinear_reduction(node: Node) -> list[Signature]:
    x = node.input_values()[0]
    dims, keep = reduced_dims(node)
    if node.op in ("aten.argmax.default", "aten.argmin.default") and (len(node.args) < 2 or node.args[1] is None):
        return [all_b(node)]
    n_out = len(node.outputs)
    sigs = [all_b(node)]
    for i in range(x.type.ndim):
        if i not in dims:
            out = i if keep else i - sum(1 for d in dims if d < i)
            sigs.append(Signature((Split(i),), (Split(out),) * n_out))
    return sigs
