"""Gradient synchronisation: after backward, reduce each parameter's gradient to its layout.

A parameter held ``B`` on a mesh axis gets a ``P(sum)`` gradient there (the dual layout); those are
all-reduced over that axis, in buckets of parameters that need the same axes, in the order backward
produces them (last used first). Parameters held ``S`` get ``S`` gradients and need nothing. Frozen
parameters (``requires_grad=False``) get no gradient: no bucket, and no adjoint collective for values
computed from them and inputs alone.
"""
from __future__ import annotations

from ir.core import Graph, Value
from ir.gradients import values_with_grad
from ir.ops.comm import ADJOINTS
from ir.ops.shape_ops import _magnitude
from ir.sbp import Broadcast
from passes.manager import PassContext, register_pass

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
    open_by_axes: dict[tuple, dict] = {}
    for p in _backward_order(graph):
        mesh = graph.meshes[p.mesh]
        axes = tuple(a for a, s in zip(mesh.axes, p.sbp) if isinstance(s, Broadcast) and mesh.shape[mesh.axis_index(a)] > 1)
        if not axes:
            continue
        size = _magnitude(p.type.nbytes())
        bucket = open_by_axes.get(axes)
        if bucket is None or bucket["_bytes"] + size > limit and bucket["params"]:
            bucket = {"axes": list(axes), "params": [], "_bytes": 0}
            buckets.append(bucket)
            open_by_axes[axes] = bucket
        bucket["params"].append(p)
        bucket["_bytes"] += size
    graph.attrs["grad_buckets"] = [{"axes": b["axes"], "params": b["params"]} for b in buckets]
    graph.attrs["backward_comm"] = backward_collectives(graph)


def backward_collectives(graph: Graph) -> list[dict]:
    """The collectives backward performs, in order: the adjoint of each forward collective.

    Only collectives on values that carry gradients count; local conversions (slice, mask) have
    local adjoints and need no communication.
    """
    grad = values_with_grad(graph)
    return [{"op": ADJOINTS[n.op], "axis": n.kwargs["axis"], "grad_of": n.outputs[0]}
            for n in reversed(graph.nodes) if n.op in ADJOINTS and id(n.outputs[0]) in grad]


def _backward_order(graph: Graph) -> list[Value]:
    """Trainable parameters, the last used first (their gradients are ready first)."""
    last_use: dict[int, int] = {}
    for i, node in enumerate(graph.nodes):
        for v in node.input_values():
            last_use[id(v)] = i
    params = [p for p in graph.params if p.trainable and id(p) in last_use]
    return sorted(params, key=lambda p: -last_use[id(p)])
