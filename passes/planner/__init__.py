"""Automatic planning (``strategy="auto"``): intra-op SBP layouts, inter-op stages, degrees and placement.

- :mod:`.pairwise`: pairwise assignment problems; frontier DP, ILP (HiGHS) and z3 solvers.
- :mod:`.intra_op`: the SBP layout problem of a graph (compacted over identical blocks) and its costs.
- :mod:`.evaluate`: pricing strategies on a captured graph.
- :mod:`.search`: the search ``compile`` calls for ``"auto"`` strategies.

What it prices with lives in :mod:`cost` (segments, placement, the estimator) and its layer structure
in :mod:`ir.layers`.
"""
from cost.estimate import PlanOptions
from passes.planner.evaluate import ModelView
from passes.planner.search import Candidate, SearchError, SearchReport, search

__all__ = ["search", "SearchReport", "SearchError", "Candidate", "PlanOptions", "ModelView"]
