"""Gradient synchronisation: after backward, reduce each parameter's gradient to its layout.

A parameter held ``B`` on a mesh axis gets a ``P(sum)`` gradient there (the dual layout); those are
all-reduced over that axis, in buckets of parameters that need the same axes and have the same dtype,
in the order backward completes them (latest first use first). Parameters held ``S`` get ``S`` gradients
and need nothing. Frozen parameters (``requires_grad=False``) get no gradient: no bucket, and no adjoint
collective for values computed from them and inputs alone.
"""
from __future__ import annotations

from ir.core import Graph, Value
from ir.gradients import values_with_grad
from ir.ops.comm import ADJOINTS, GRADIENT_REDUCING
from ir.ops.shape_ops import _magnitude
from ir.sbp import Broadcast
from ir.types import DTYPE_NAMES, DTYPES_BY_NAME
from passes.manager import PassContext, register_pass
from passes.precision import PRECISION_ATTR

DEFAULT_BUCKET_BYTES = 4 * 2 ** 20  # small enough that reducing early buckets overlaps backward


@register_pass("grad_sync", requires=("boxed",), produces=("grad_buckets",))
def grad_sync_pass(graph: Graph, ctx: PassContext, *, bucket_bytes: int | None = None) -> None:
    """Record gradient buckets in ``graph.attrs['grad_buckets']``.

    ``bucket_bytes``: the size of one bucket (None: the strategy's ``grad_bucket_bytes``, else
    :data:`DEFAULT_BUCKET_BYTES`).
    """
    if not ctx.train:
        return
    limit = bucket_bytes or ctx.strategy.options.grad_bucket_bytes or DEFAULT_BUCKET_BYTES
    buckets: list[dict] = []
    open_by_key: dict[tuple, dict] = {}
    for p in _backward_order(graph):
        mesh = graph.meshes[p.mesh]
        axes = tuple(a for a, s in zip(mesh.axes, p.sbp) if isinstance(s, Broadcast) and mesh.shape[mesh.axis_index(a)] > 1)
        if not axes:
            continue
        size = _magnitude(p.type.nbytes())
        key = (axes, p.type.dtype)  # a bucket is one flat buffer: one dtype (gradients have their parameter's)
        bucket = open_by_key.get(key)
        if bucket is None or bucket["_bytes"] + size > limit and bucket["params"]:
            bucket = {"axes": list(axes), "params": [], "_bytes": 0}
            buckets.append(bucket)
            open_by_key[key] = bucket
        bucket["params"].append(p)
        bucket["_bytes"] += size
    if ctx.strategy.precision is not None and PRECISION_ATTR not in graph.attrs:
        raise ValueError(f"the strategy's precision {ctx.strategy.precision} was not applied: run the 'precision' "
                         "pass first in the pipeline (compile() does by default)")
    reduce = graph.attrs.get(PRECISION_ATTR, {}).get("reduce")
    graph.attrs["grad_buckets"] = [{"axes": b["axes"], "params": b["params"]} | ({"reduce_dtype": reduce} if reduce else {})
                                   for b in buckets]
    if reduce:
        mark_gradient_reductions(graph, reduce)
    graph.attrs["backward_comm"] = backward_collectives(graph)


def gradient_reductions(graph: Graph) -> list:
    """The forward collectives whose adjoint sums gradients across ranks (an all-reduce's all-reduce, an
    all-gather's reduce-scatter: FSDP's and Megatron's), on values that carry gradients."""
    grad = values_with_grad(graph)
    return [n for n in graph.nodes if n.op in GRADIENT_REDUCING and id(n.outputs[0]) in grad]


def mark_gradient_reductions(graph: Graph, dtype: str) -> None:
    """Give every gradient reduction of backward the dtype it runs in (kwarg ``grad_dtype``): the partial
    gradients are cast to it, summed across ranks, and cast back to the value's dtype."""
    for node in gradient_reductions(graph):
        node.kwargs["grad_dtype"] = DTYPES_BY_NAME[dtype]


def backward_collectives(graph: Graph) -> list[dict]:
    """The collectives backward performs, in order: the adjoint of each forward collective.

    Only collectives on values that carry gradients count; local conversions (slice, mask) have
    local adjoints and need no communication.
    """
    grad = values_with_grad(graph)
    return [{"op": ADJOINTS[n.op], "axis": n.kwargs["axis"], "grad_of": n.outputs[0]}
            | ({"dtype": DTYPE_NAMES[n.kwargs["grad_dtype"]]} if "grad_dtype" in n.kwargs else {})
            for n in reversed(graph.nodes) if n.op in ADJOINTS and id(n.outputs[0]) in grad]


def _backward_order(graph: Graph) -> list[Value]:
    """Trainable parameters in the order backward completes their gradients: a gradient is whole once backward
    has passed the parameter's first use, so the latest first use comes first (a tied embedding, used first
    by the token lookup and last by the output layer, is complete only at the end of backward; ordered by its
    last use it would lead the first bucket, and no bucket could launch before backward ends)."""
    first_use: dict[int, int] = {}
    for i, node in enumerate(graph.nodes):
        for v in node.input_values():
            first_use.setdefault(id(v), i)
    params = [p for p in graph.params if p.trainable and id(p) in first_use]
    return sorted(params, key=lambda p: -first_use[id(p)])
