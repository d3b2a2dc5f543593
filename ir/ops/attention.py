"""Ring attention: attention whose queries, keys and values are split over the sequence on one mesh axis.

``cp.ring_attention(query, key, value, attn_mask, axis=, causal=, scale=, balanced=)`` computes what
``aten.scaled_dot_product_attention(query, key, value, attn_mask, 0.0, causal, scale=scale)`` does on
the logical tensors. On its ``axis`` the inputs may all be split over the sequence (``S(L)``, the
mask over its query rows; ``balanced``: the sequence split load-balanced, two mirrored chunks per rank,
see :func:`ir.ops.registry.sequence_sizes`): the ranks of the axis then pass key/value blocks around a ring and merge
partial softmaxes online (``backends/runtime/context_parallel.py``; the virtual mesh runs the same
blocks). On the other axes it splits like attention, over batch and heads. The ``context_parallel``
pass writes it in place of ``scaled_dot_product_attention`` under ``cp_attention ring``.
"""
from __future__ import annotations

from ir.core import Node, Value
from ir.ops.nn_ops import attention_signature
from ir.ops.registry import LocalCall, LocalContext, Signature, all_b, register
from ir.ops.schema import arg
from ir.sbp import Split
from ir.types import Mesh

RING_ATTENTION = "cp.ring_attention"
"""The op name."""
RING_ATTENTION_SCHEMA = ("cp::ring_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, *, "
                         "str axis, bool causal=False, float? scale=None, bool balanced=False) -> Tensor")
"""Its arguments, read by name like an ATen op's (``ir.ops.schema.arg``)."""


def ring_inputs(node: Node) -> tuple[Value, Value, Value, Value | None]:
    """Query, key, value and the mask (None when the attention has none) of a ring attention node."""
    return arg(node, "query"), arg(node, "key"), arg(node, "value"), arg(node, "attn_mask")


def ring_signatures(node: Node) -> list[Signature]:
    """Off its axis: split over batch and heads (every leading dim), as attention is."""
    q, _, v, mask = ring_inputs(node)
    return [all_b(node)] + [attention_signature(q, v, mask, d, kv_split=True) for d in range(q.type.ndim - 2)]


def ring_on_axis(node: Node, axis: str) -> list[Signature]:
    """On its own axis, queries, keys and values split over the sequence (the mask over its rows)."""
    if axis != arg(node, "axis"):
        return []
    q, _, v, mask = ring_inputs(node)
    return [attention_signature(q, v, mask, q.type.ndim - 2, kv_split=True)]


def runs_ring(node: Node, mesh: Mesh, query_sbp: tuple) -> bool:
    """Whether the ranks exchange blocks: the query is split over the sequence on the node's axis."""
    if arg(node, "axis") not in mesh.axes:
        return False
    axis = mesh.axis_index(arg(node, "axis"))
    return query_sbp[axis] == Split(ring_inputs(node)[0].type.ndim - 2) and mesh.shape[axis] > 1


def _ring_local(node: Node, ctx: LocalContext) -> LocalCall:
    """Without a sequence split on its axis every rank holds whole sequences: plain attention."""
    q, k, v, mask = ring_inputs(node)
    return LocalCall("aten.scaled_dot_product_attention.default", [q, k, v, mask, 0.0, arg(node, "causal")],
                     {"scale": arg(node, "scale")})


register(RING_ATTENTION, local=_ring_local, on_axis=ring_on_axis,
         doc="attention with key/value blocks passed around a ring of sequence shards")(ring_signatures)


def logical_ring_attention(query, key, value, attn_mask=None, *, axis: str, causal: bool, scale: float | None,
                           balanced: bool = False):
    """What the op computes on logical tensors (for shape checks): ``scaled_dot_product_attention``."""
    import torch
    return torch.ops.aten.scaled_dot_product_attention.default(query, key, value, attn_mask, 0.0, causal,
                                                               scale=scale)
