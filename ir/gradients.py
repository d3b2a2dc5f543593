"""Which values of a graph carry gradients: an analysis that passes and the cost model share."""
from __future__ import annotations

from ir.core import Graph


def values_with_grad(graph: Graph) -> set[int]:
    """Ids of the values that depend differentiably on a trainable parameter (and, in a training graph,
    that the loss depends on: a buffer's new running statistics get no gradient)."""
    grad = {id(p) for p in graph.params if p.trainable}
    for node in graph.nodes:
        if node.op == "aten.detach.default":
            continue
        if any(id(v) in grad for v in node.input_values()):
            grad |= {id(o) for o in node.outputs if o.type.torch_dtype.is_floating_point}
    if graph.loss is not None:
        grad &= _loss_depends_on(graph)
    return grad


def _loss_depends_on(graph: Graph) -> set[int]:
    """Ids of the values the loss is computed from differentiably, the loss included: a value the loss reads
    only through a ``detach`` (a softmax's detached row max) gets no gradient, and its op runs no backward."""
    needed = {id(graph.loss)}
    for node in reversed(graph.nodes):
        if node.op == "aten.detach.default":
            continue
        if any(id(o) in needed for o in node.outputs):
            needed |= {id(v) for v in node.input_values()}
    return needed
