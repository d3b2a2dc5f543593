"""Regathered activations: all-gathered activations kept as shards for backward (``regather_activations``).

Autograd keeps what an op saves for its backward until that backward runs. Under sequence parallelism the norm
outputs are all-gathered over the tensor axis before the column-parallel matmuls, which save them whole: the
largest activations of a block, kept once per microbatch in flight. With the strategy's
``regather_activations`` this pass marks each all-gather of an activation that some op saves
(:data:`ir.ops.comm.REGATHER_KWARG`): the emitted program keeps this rank's shard instead and gathers it again
when backward reads it (``backends/runtime/regather.py``), as Megatron-LM's sequence-parallel linear layers do,
and the simulator prices the shard's memory and the second all-gather. Values are unchanged.
"""
from __future__ import annotations

from cost.segments import keeps_for_backward
from ir.core import Graph, Node
from ir.gradients import values_with_grad
from ir.ops.comm import REGATHER_KWARG
from ir.recompute import RECOMPUTE_ATTR
from passes.manager import PassContext, register_pass


@register_pass("regather", requires=("boxed",), produces=("regathered",))
def regather_pass(graph: Graph, ctx: PassContext) -> None:
    """Mark the all-gathers of activations whose result an op saves for backward (training, with the strategy's
    ``regather_activations``). Runs after ``recompute``: not where the gather is recomputed or a recomputed
    region reads its result (the region's recomputation keeps it whole anyway)."""
    if not ctx.strategy.regather_activations or not ctx.train:
        return
    grad = values_with_grad(graph)
    for node in graph.nodes:
        if node.op == "comm.all_gather" and RECOMPUTE_ATTR not in node.attrs and _saved_and_regatherable(graph, node, grad):
            node.kwargs[REGATHER_KWARG] = True


def _saved_and_regatherable(graph: Graph, gather: Node, grad: set) -> bool:
    source, full = gather.input_values()[0], gather.outputs[0]
    if source.kind in ("param", "buffer") or id(full) not in grad or full in graph.outputs:
        return False
    if any(RECOMPUTE_ATTR in use.attrs for use in full.uses):
        return False
    return any(keeps_for_backward(use, position) for use in full.uses
               for position, v in enumerate(use.input_values()) if v is full)
