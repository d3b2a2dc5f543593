"""Stage partitioning (cost/partition.py): the min-max cut the pipeline pass and the planner share."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cost.partition import balanced_cuts, min_max_partition


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 4), st.data())
def test_balanced_partition_is_optimal(parts, data):
    costs = data.draw(st.lists(st.floats(0, 100), min_size=parts + 1, max_size=9))
    candidates = sorted(data.draw(st.sets(st.integers(1, len(costs) - 1), min_size=parts - 1)))
    chosen = balanced_cuts(costs, candidates, parts)

    def worst(cuts):
        bounds = [0, *cuts, len(costs)]
        return max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))

    best = min(worst(c) for c in itertools.combinations(candidates, parts - 1))
    assert len(chosen) == parts - 1 and set(chosen) <= set(candidates)
    assert worst(chosen) == pytest.approx(best)


def brute_force(tables: list) -> float:
    """The costliest part of the best cut, by trying every cut."""
    items = tables[0].shape[0]
    best = math.inf
    for cuts in itertools.combinations(range(1, items), len(tables) - 1):
        bounds = [0, *cuts, items]
        best = min(best, max(tables[k][a, b - 1] for k, (a, b) in enumerate(zip(bounds, bounds[1:]))))
    return best


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 7), st.data())
def test_per_part_tables_are_cut_optimally(parts, items, data):
    """Each part has its own costs (faster devices, memory limits as inf), as the planner's stages do."""
    values = st.one_of(st.floats(0, 50), st.just(math.inf))
    tables = [np.array([[data.draw(values) for _ in range(items)] for _ in range(items)]) for _ in range(parts)]
    found = min_max_partition(tables)
    best = brute_force(tables) if parts <= items else math.inf
    if not math.isfinite(best):
        assert found is None
        return
    ranges, worst = found
    assert ranges[0][0] == 0 and ranges[-1][1] == items - 1 and len(ranges) == parts
    assert all(b + 1 == c for (_, b), (c, _) in zip(ranges, ranges[1:])) and all(a <= b for a, b in ranges)
    assert worst == best == max(tables[k][a, b] for k, (a, b) in enumerate(ranges))


def test_faster_parts_take_more_items():
    slow = np.array([[2.0 * (b - a + 1) if b >= a else math.inf for b in range(6)] for a in range(6)])
    fast = slow / 2
    ranges, worst = min_max_partition([fast, slow])
    assert ranges == [(0, 3), (4, 5)] and worst == 4.0
    assert min_max_partition([fast] * 7) is None  # more parts than items
