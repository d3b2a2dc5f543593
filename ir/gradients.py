"""Which values of a graph carry gradients: an analysis that passes and the cost model share."""
from __future__ import annotations

from dataclasses import dataclass

from ir.core import Graph, Node


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


@dataclass(frozen=True)
class GradientFlow:
    """Where autograd sends a graph's gradients: the values that carry one (:func:`values_with_grad`), and the
    inputs whose gradient is summed into another gradient of the same value. A value several ops read gets one
    gradient from each; backward runs them in reverse, so every reader but the last one's adds its gradient to the
    sum so far (one addition each: the residual stream's, the fork into a layer's query, key and value)."""

    values: frozenset
    """Ids of the values with a gradient."""
    accumulated: frozenset
    """(id of the node, input position) of the reads whose gradient autograd adds to one already computed."""

    def has_grad(self, node: Node) -> bool:
        """Whether ``node`` runs a backward: some output carries a gradient."""
        return any(id(o) in self.values for o in node.outputs)

    def input_grads(self, node: Node) -> tuple[bool, ...]:
        """Per input of ``node``, whether its backward computes that input's gradient."""
        runs = self.has_grad(node) and node.op != "aten.detach.default"
        return tuple(runs and id(v) in self.values for v in node.input_values())

    def same_flow(self, node: Node, other: Node) -> bool:
        """Whether autograd computes and sums the same gradients for ``node`` and ``other`` (two blocks' copies
        of one op)."""
        return (self.has_grad(node) == self.has_grad(other) and self.input_grads(node) == self.input_grads(other)
                and self.accumulating_inputs(node) == self.accumulating_inputs(other))

    def accumulating_inputs(self, node: Node) -> tuple[bool, ...]:
        """Per input of ``node``, whether the gradient its backward computes is added to another of the value."""
        return tuple((id(node), position) in self.accumulated for position in range(len(node.input_values())))


def gradient_flow(graph: Graph) -> GradientFlow:
    """The :class:`GradientFlow` of ``graph``."""
    flow = GradientFlow(frozenset(values_with_grad(graph)), frozenset())
    readers: dict[int, list] = {}
    for node in graph.nodes:
        for position, wanted in enumerate(flow.input_grads(node)):
            if wanted:
                readers.setdefault(id(node.input_values()[position]), []).append((id(node), position))
    return GradientFlow(flow.values, frozenset(read for reads in readers.values() for read in reads[:-1]))
