"""Context parallelism: attention on sequence shards, by the strategy's ``cp_attention``.

The ``layouts`` pass splits the sequence of the inputs over the ``cp`` axis; elementwise ops, norms,
matrix products, position ops and the loss keep that split (their op rules), and propagation
reconciles the rest. Attention needs every key for its queries, so how it runs is a plan choice:

- ``ring``: this pass writes each ``scaled_dot_product_attention`` as ``cp.ring_attention`` on the cp
  axis (``ir/ops/attention.py``), whose ranks pass key/value blocks around a ring;
- ``allgather``: queries stay split over the sequence and keys and values are gathered (the op rule's
  row-block signature, a causal mask aligned to each rank's rows);
- ``a2a`` (Ulysses): the sequence split becomes a split over heads by all-to-all around attention
  (where the heads divide the cp axis; else all-gather).

Propagation keeps the choice through activation hints (:func:`cp_attention_hints`).
"""
from __future__ import annotations

from ir.core import Graph, Node
from ir.ops.attention import RING_ATTENTION
from ir.ops.registry import is_balanced, sequence_sizes
from ir.ops.schema import arg
from ir.sbp import Split
from ir.types import CONTEXT_AXIS
from passes.manager import PassContext, register_pass
from strategy import Strategy

ATTENTION = "aten.scaled_dot_product_attention.default"


@register_pass("context_parallel", requires=("laid_out",), produces=("context_attention",))
def context_parallel_pass(graph: Graph, ctx: PassContext) -> None:
    """Under ``cp_attention ring``, attention nodes become ring attention on the cp axis."""
    mesh = graph.meshes[next(iter(graph.meshes))]
    if CONTEXT_AXIS not in mesh.axes or ctx.strategy.cp_attention != "ring":
        return
    sequences = sequence_sizes(graph)
    for node in list(graph.nodes):
        if node.op == ATTENTION and _ring_can_run(node):
            _to_ring(graph, node, sequences)


def _ring_can_run(node: Node) -> bool:
    """Plain attention: no dropout, and keys with as many heads as queries (``enable_gqa`` off)."""
    return not arg(node, "dropout_p") and not arg(node, "enable_gqa")


def _to_ring(graph: Graph, node: Node, sequences: frozenset) -> None:
    """``balanced``: the queries' length is the sequence, whose split over cp is load-balanced."""
    q, k, v, mask = (arg(node, name) for name in ("query", "key", "value", "attn_mask"))
    kwargs = {"axis": CONTEXT_AXIS, "causal": bool(arg(node, "is_causal")), "scale": arg(node, "scale"),
              "balanced": is_balanced(q.type.shape[-2], CONTEXT_AXIS, sequences)}
    ring = graph.create_node(RING_ATTENTION, [q, k, v, mask], kwargs, [node.outputs[0].type],
                             out_names=["ring_attention"], attrs=dict(node.attrs), before=node)
    graph.replace_all_uses(node.outputs[0], ring.outputs[0])
    graph.remove_node(node)


def cp_attention_hints(graph: Graph, strategy: Strategy) -> dict[int, tuple]:
    """Per attention node id, the output layout the strategy's cp attention asks for (None entries: free)."""
    mesh = graph.meshes[next(iter(graph.meshes))]
    if CONTEXT_AXIS not in mesh.axes:
        return {}
    a = mesh.axis_index(CONTEXT_AXIS)
    hints: dict[int, tuple] = {}
    for node in graph.nodes:
        if node.op in (ATTENTION, RING_ATTENTION):
            dim = _attention_output_dim(node, strategy.cp_attention, mesh.shape[a])
            hints[id(node)] = tuple(Split(dim) if i == a else None for i in range(mesh.ndim))
    return hints


def _attention_output_dim(node: Node, method: str, ways: int) -> int:
    """The output dim split on the cp axis: heads under a2a (where they divide), else the sequence."""
    out = node.outputs[0].type
    heads = out.shape[-3] if out.ndim >= 3 else None
    if method == "a2a" and node.op == ATTENTION and heads is not None and heads.is_Integer and int(heads) % ways == 0:
        return out.ndim - 3
    return out.ndim - 2
