"""Automatic planning (``strategy="auto"``): intra-op SBP layouts, inter-op stages, degrees and placement.

- :mod:`.layers`: prologue / repeated blocks / epilogue of a graph.
- :mod:`.pairwise`: pairwise assignment problems; frontier DP, ILP (HiGHS) and z3 solvers.
- :mod:`.intra_op`: the SBP layout problem of a graph (compacted over identical blocks) and its costs.
- :mod:`.costs`: per-segment costs (affine in the microbatch size) from layouts or from laid-out IR.
- :mod:`.placement`: device lists, axis groups and stage ranges of a strategy.
- :mod:`.estimate`: step time, memory and traffic of a placed profile (shared with the simulator).
- :mod:`.evaluate`: pricing strategy dicts on a captured graph.
- :mod:`.search`: the search ``compile`` calls for ``"auto"`` strategies.
"""
from passes.planner.evaluate import ModelView, PlanOptions
from passes.planner.search import Candidate, SearchError, SearchReport, search

__all__ = ["search", "SearchReport", "SearchError", "Candidate", "PlanOptions", "ModelView"]
