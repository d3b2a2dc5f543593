"""Split backward: a stage's backward as an input-gradient part (B) and a weight-gradient part (W).

Zero-bubble schedules run B as soon as the next stage's gradient arrives (the previous stage waits
for what it sends back) and W later, in what would otherwise be a bubble. Both parts walk the one
autograd graph that the stage's forward recorded:

- :func:`backward_input` finds the *meeting points*: the autograd nodes where the part of the
  graph that leads only to weights joins the part that leads to the stage's inputs (a linear
  layer's ``AddmmBackward``, whose inputs are the activation and the transposed weight). It records
  the gradient that reaches each meeting point while it back-propagates to the inputs only, and
  keeps the graph.
- :func:`backward_weight` starts at the meeting points with those gradients and back-propagates to
  the weights only, accumulating into ``.grad`` as ``backward()`` does.

Weights are grouped by the meeting points they share and each group runs on its own, so W never
walks back through the input path into earlier layers (the input gradients were B's work). Where a
weight is reachable from a meeting point through the input path too (a weight used twice in one
stage), that walk happens, and the meeting points it passes get the gradient B recorded instead of
the one arriving, so nothing counts twice. Outputs whose graph reaches no input (the first stage,
which receives nothing) meet the weights at the outputs themselves: their B has nothing to do and W
does the whole backward. (The idea is the one of ``stage_backward_input``/``stage_backward_weight``
in ``torch.distributed.pipelining``.)
"""
import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge


def grad_leaf(node):
    """The leaf tensor whose gradient ``node`` accumulates, or None for any other autograd node."""
    return getattr(node, "variable", None)


def reverse_edges(roots):
    """Every autograd node reachable from ``roots``, each with the nodes that pass it a gradient."""
    parents = {node: [] for node in roots}
    frontier = list(parents)
    while frontier:
        node = frontier.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            if child not in parents:
                parents[child] = []
                frontier.append(child)
            parents[child].append(node)
    return parents


def upstream(starts, parents):
    """The nodes from which one of ``starts`` is reachable (``starts`` included)."""
    seen = set(starts)
    frontier = list(seen)
    while frontier:
        for parent in parents[frontier.pop()]:
            if parent not in seen:
                seen.add(parent)
                frontier.append(parent)
    return seen


class WeightWork:
    """What B leaves for W: per group of weights, the meeting points and the gradients that reached them."""

    def __init__(self):
        self.groups = []
        """``(weights, [(node, output index, gradient)], meeting nodes to hold at their B gradient)``."""

    def run(self):
        """W: back-propagate from the meeting points to the weights, accumulating their ``.grad``."""
        for weights, edges, held in self.groups:
            hooks = [node.register_prehook(lambda _, recorded=recorded: recorded) for node, recorded in held]
            try:
                torch.autograd.backward([GradientEdge(node, i) for node, i, _ in edges],
                                        [g for _, _, g in edges], inputs=weights, retain_graph=True)
            finally:
                for hook in hooks:
                    hook.remove()
        self.groups = []


def backward_input(outputs, grads, inputs):
    """B: the gradients of ``inputs`` (None where an input gets none), and the :class:`WeightWork` for W.

    ``outputs`` are what the stage computed (the loss on the last stage), ``grads`` their gradients
    (None: ones, for a loss); only outputs that require a gradient count.
    """
    pairs = [(o, torch.ones_like(o) if g is None else g) for o, g in zip(outputs, grads) if o.requires_grad]
    wanted = [t for t in inputs if t.requires_grad]
    work = WeightWork()
    if not pairs:
        return [None] * len(inputs), work
    roots = {}  # node -> {output index: seed gradient}
    for o, g in pairs:
        edge = get_gradient_edge(o)
        node, index = edge.node, edge.output_nr
        seeds = roots.setdefault(node, {})
        seeds[index] = seeds[index] + g if index in seeds else g
    parents = reverse_edges(list(roots))
    wanted_ids = {id(t) for t in wanted}
    input_nodes = [n for n in parents if grad_leaf(n) is not None and id(grad_leaf(n)) in wanted_ids]
    on_input_path = upstream(input_nodes, parents)
    groups = _weight_groups(parents, on_input_path, roots)
    recorded = {}
    hooks = [node.register_prehook(lambda g, node=node: recorded.__setitem__(node, g))
             for group in groups for node in group[1] if node in on_input_path]
    try:
        found = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], retain_graph=True,
                                    allow_unused=True) if wanted else ()
    finally:
        for hook in hooks:
            hook.remove()
    for weights, sources in groups:
        edges, held = [], []
        for node in sources:
            if node in on_input_path:
                got = recorded.get(node)
                if got is not None:  # B passed it a gradient
                    edges += [(node, i, g) for i, g in enumerate(got) if g is not None]
                    held.append((node, got))
            else:
                edges += [(node, i, g) for i, g in roots[node].items()]
        if edges:
            work.groups.append((weights, edges, held))
    by_id = dict(zip(map(id, wanted), found))
    return [by_id.get(id(t)) for t in inputs], work


def _weight_groups(parents, on_input_path, roots):
    """Weights grouped by shared sources: ``[(weights, sources)]`` where a source is a meeting point
    (a node on the input path that passes a gradient towards the weight) or an output off that path."""
    leader = {}  # union-find over weight accumulators and sources

    def find(x):
        while leader[x] is not x:
            leader[x] = leader[leader[x]]
            x = leader[x]
        return x

    sources_of = {node: _sources(node, parents, on_input_path, roots)
                  for node in parents if grad_leaf(node) is not None and node not in on_input_path}
    for node, sources in sources_of.items():
        leader.setdefault(node, node)
        for source in sources:
            leader.setdefault(source, source)
            leader[find(source)] = find(node)
    groups = {}
    for node, sources in sources_of.items():
        weights, members = groups.setdefault(find(node), ([], {}))
        weights.append(grad_leaf(node))
        members.update(dict.fromkeys(sources))
    return [(weights, list(members)) for weights, members in groups.values()]


def _sources(weight_node, parents, on_input_path, roots):
    """Walk from a weight's accumulator towards the outputs, stopping at the input path."""
    found, seen = [], {weight_node}
    frontier = [weight_node]
    while frontier:
        node = frontier.pop()
        if node in roots and node not in on_input_path:
            found.append(node)
        for parent in parents[node]:
            if parent in seen:
                continue
            seen.add(parent)
            if parent in on_input_path:
                found.append(parent)
            else:
                frontier.append(parent)
    return found
