"""``plan.simulate()``: the simulated cost of a plan, or of a strategy on a captured graph.

``simulate(plan)`` prices a compiled plan from its SBP-annotated IR (:func:`backends.simulator.price_ir`).
``simulate((graph, strategy, cluster))`` prices a strategy on a captured graph without running the
passes, through the planner's :class:`~passes.planner.evaluate.ModelView` (what the planner itself
uses), so pipelined strategies can be simulated before the pipeline pass exists. That path solves the
tensor-parallel layouts the strategy leaves open at their optimum and prices data parallelism
analytically (batch split, gradient all-reduce, FSDP gathers), without the scalar all-reduces of the
loss over ``dp`` that the IR also holds.
"""
from __future__ import annotations

import weakref
from typing import Any

from backends.simulator import SimReport, is_laid_out, price_ir, report
from cluster import Cluster
from cost.estimate import PlanOptions, optimizer_name
from ir.core import Graph
from passes.planner.evaluate import ModelView
from strategy import Strategy, normalize

_VIEWS: "weakref.WeakKeyDictionary[Graph, ModelView]" = weakref.WeakKeyDictionary()


def simulate(target: Any, *, options: PlanOptions | None = None, exact: bool = True, **option_values) -> SimReport:
    """Simulate a ``CompiledPlan`` or a ``(graph, strategy, cluster)`` triple; see the module docstring.

    ``options`` (or keyword values of :class:`~cost.estimate.PlanOptions`: ``precision``,
    ``optimizer``, ``global_batch``, ``overhead_s``, ``memory_headroom``) override what the plan says.
    """
    graph, strategy, cluster, defaults = _unpack(target)
    options = options or PlanOptions(**{**defaults, **option_values})
    strategy = normalize(strategy, cluster.world_size)
    if is_laid_out(graph):
        estimate, shape, profile = price_ir(graph, strategy, cluster, options, exact)
        return report(estimate, shape, profile, cluster, strategy, "ir", options)
    evaluation = _view(graph).evaluate(strategy, cluster, options, exact)
    return report(evaluation.estimate, evaluation.shape, evaluation.profile, cluster, strategy, "strategy", options)


def _unpack(target: Any) -> tuple[Graph, Strategy | dict | str, Cluster, dict]:
    if isinstance(target, tuple):
        if len(target) != 3:
            raise TypeError(f"expected a CompiledPlan or (graph, strategy, cluster), found a tuple of {len(target)}")
        graph, strategy, cluster = target
        cluster = Cluster.load(cluster) if isinstance(cluster, str) else cluster
        return graph, strategy, cluster, {}
    if all(hasattr(target, a) for a in ("graph", "strategy", "cluster")):
        defaults = {"optimizer": optimizer_name(getattr(target, "optimizer", ("SGD", {})))}
        return target.graph, target.strategy, target.cluster, defaults
    raise TypeError(f"expected a CompiledPlan or (graph, strategy, cluster), found {type(target).__name__}")


def _view(graph: Graph) -> ModelView:
    """One :class:`ModelView` per graph: layouts solved for one strategy serve the next."""
    view = _VIEWS.get(graph)
    if view is None:
        view = ModelView(graph, graph.loss is not None)
        _VIEWS[graph] = view
    return view
