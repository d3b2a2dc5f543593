"""``cp_attention auto``: each way of running attention on sequence shards compiled and priced on the cluster.

The planner searches data, tensor and pipeline degrees; a strategy that fixes a ``cp`` axis and leaves
only the attention method to choose is decided here, where passes and the simulator meet: the plan is
compiled once per method of :data:`strategy.CP_ATTENTIONS` (a fresh copy of the captured graph each time)
and the fastest that fits the devices' memory wins. The report lists every method's step time and peak
memory, so ``plan.explain()`` says why.
"""
from __future__ import annotations

import time
from dataclasses import replace

from backends.simulator import price_ir
from cluster import Cluster
from cost.estimate import PlanOptions
from ir.core import Graph
from ir.parser import parse
from passes.manager import PassContext, run_passes
from passes.planner.search import Candidate, SearchError, SearchReport
from strategy import AUTO, CP_ATTENTIONS, Strategy


def only_cp_attention_open(strategy: Strategy) -> bool:
    """Whether the attention method under context parallelism is the one choice left to the planner."""
    if strategy.options.cp_attention != AUTO:
        return False
    return not replace(strategy, options=replace(strategy.options, cp_attention=None)).wants_search


def choose_cp_attention(graph: Graph, cluster: Cluster, strategy: Strategy, *, train: bool, passes_for,
                        **search_options) -> tuple[Strategy, SearchReport]:
    """The fastest fitting ``cp_attention`` for ``strategy`` on ``cluster`` (``passes_for``: the pass pipeline
    of a strategy), and the report of every method priced."""
    options = PlanOptions(**{k: v for k, v in search_options.items() if k in PlanOptions.__dataclass_fields__})
    started = time.perf_counter()
    candidates = [_priced(graph, cluster, replace(strategy, options=replace(strategy.options, cp_attention=method)),
                          train, passes_for, options) for method in CP_ATTENTIONS]
    fitting = sorted((c for c in candidates if c.fits), key=lambda c: c.step_time_s)
    if not fitting:
        tried = "; ".join(f"{c.summary}: {c.max_memory_bytes / 2 ** 30:.1f} GiB" for c in candidates)
        raise SearchError(f"no cp_attention fits the devices' memory ({tried}); add devices to the cp axis or "
                          "recompute activations")
    chosen = fitting[0]
    notes = [f"cp_attention {chosen.strategy.options.cp_attention} chosen: the fastest of "
             + ", ".join(f"{c.summary} {c.step_time_s * 1e3:.3g} ms ({'fits' if c.fits else 'does not fit'})"
                         for c in sorted(candidates, key=lambda c: c.step_time_s))]
    report = SearchReport(chosen, [c for c in candidates if c is not chosen], len(candidates), 0,
                          time.perf_counter() - started, cluster=cluster.name, notes=notes)
    return chosen.strategy, report


def _priced(graph: Graph, cluster: Cluster, strategy: Strategy, train: bool, passes_for,
            options: PlanOptions) -> Candidate:
    copy = parse(str(graph))
    copy.attrs.update({k: v for k, v in graph.attrs.items() if k in ("example_dims", "aliases")})
    ctx = PassContext(strategy=strategy, world_size=cluster.world_size, train=train, cluster=cluster)
    run_passes(copy, [str(p) for p in passes_for(strategy)], ctx)
    estimate, _, _ = price_ir(copy, ctx.strategy, cluster, options)
    memory = estimate.max_memory_bytes
    return Candidate(ctx.strategy, f"cp_attention {strategy.options.cp_attention}", estimate.step_time_s, memory,
                     estimate.fits, True)
