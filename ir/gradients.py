"""Which values of a graph carry gradients: an analysis that passes and the cost model share."""
from __future__ import annotations

from ir.core import Graph


def values_with_grad(graph: Graph) -> set[int]:
    """Ids of the values that depend differentiably on a trainable parameter."""
    grad = {id(p) for p in graph.params if p.kind == "param"}
    for node in graph.nodes:
        if node.op == "aten.detach.default":
            continue
        if any(id(v) in grad for v in node.input_values()):
            grad |= {id(o) for o in node.outputs if o.type.torch_dtype.is_floating_point}
    return grad
