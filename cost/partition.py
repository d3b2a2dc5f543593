"""Stage partitioning: cut a sequence of items (layers, spans of nodes) into contiguous stages so that the
costliest stage costs least. The pipeline pass cuts a graph's nodes by their FLOPs with it; the
planner cuts blocks by their time and memory on each stage's devices.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def min_max_partition(tables: Sequence[np.ndarray]) -> tuple[list[tuple[int, int]], float] | None:
    """Contiguous, non-empty parts ``0 .. len(tables) - 1`` covering items ``0 .. n - 1`` whose costliest
    part is cheapest; ``tables[k][first, last]`` is the cost of items ``first..last`` as part ``k``
    (``inf`` where they may not go, e.g. do not fit its memory).

    A dynamic program over (part, last item): ``best[k][l] = min_j max(best[k-1][j-1], tables[k][j, l])``;
    at equal cost the earliest start wins. Returns (inclusive item ranges per part, the costliest
    part's cost), or None when there are more parts than items or every cut costs ``inf``.
    """
    parts, items = len(tables), tables[0].shape[0]
    if parts > items:
        return None
    best = np.full((parts, items), math.inf)
    choice = np.zeros((parts, items), dtype=int)
    best[0] = tables[0][0]
    start = np.arange(items)[:, None]
    last_item = np.arange(items)[None, :]
    columns = np.arange(items)
    for k in range(1, parts):
        # candidate[j, l]: part k takes items j..l after parts 0..k-1 took 0..j-1 (k <= j <= l)
        before = np.concatenate([[math.inf], best[k - 1][:-1]])[:, None]
        candidate = np.where((start >= k) & (start <= last_item), np.maximum(before, tables[k]), math.inf)
        choice[k] = np.argmin(candidate, axis=0)  # the earliest start at equal cost
        best[k] = candidate[choice[k], columns]
    if not math.isfinite(best[parts - 1, items - 1]):
        return None
    ranges, last = [], items - 1
    for k in range(parts - 1, 0, -1):
        start = int(choice[k, last])
        ranges.append((start, last))
        last = start - 1
    ranges.append((0, last))
    return ranges[::-1], float(best[parts - 1, items - 1])


def balanced_cuts(costs: Sequence[float], candidates: Sequence[int], parts: int) -> list[int]:
    """``parts - 1`` cut indices among ``candidates`` (into ``costs``) minimising the costliest part."""
    points = [0, *candidates, len(costs)]
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(costs, dtype=float))])
    found = min_max_partition([_span_sums(prefix[points])] * parts)
    if found is None:
        raise ValueError(f"cannot cut {len(points) - 1} spans into {parts} non-empty parts")
    return [points[first] for first, _ in found[0][1:]]


def _span_sums(cumulative: np.ndarray) -> np.ndarray:
    """``table[first, last]``: the cost of spans ``first..last`` from the cumulative cost at each span
    boundary (``inf`` where ``first > last``)."""
    first = np.arange(len(cumulative) - 1)[:, None]
    last = np.arange(len(cumulative) - 1)[None, :]
    return np.where(last >= first, cumulative[last + 1] - cumulative[first], math.inf)
