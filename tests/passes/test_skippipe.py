"""SkipPipe path planning: constraints on paths, balance, the r = 0 case, and the time estimate."""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cost.timeline import peak_in_flight, simulate
from ir.schedules import ScheduleError, build_1f1b, build_gpipe, check_deadlock
from passes.skippipe import (
    SkipPipeProblem,
    format_skip_plan,
    parse_skip_plan,
    path_inversions,
    plan_skip_paths,
    visited_stage_count,
)

FAST_LINK = (0.001, 1e9)
SLOW_LINK = (0.05, 0.03e9)


def _two_regions(num_devices: int):
    """Devices [0, n/2) in one region, the rest in another; a slow link between the regions."""
    half = num_devices // 2
    return lambda a, b: FAST_LINK if (a < half) == (b < half) else SLOW_LINK


def _problem(num_stages: int, num_microbatches: int, **extra) -> SkipPipeProblem:
    return SkipPipeProblem(list(range(num_stages)), 0.2, _two_regions(num_stages), 4e6, num_microbatches, **extra)


@pytest.mark.parametrize("stages, ratio, expected", [
    (6, 1 / 3, 4), (8, 0.25, 6), (8, 0.5, 4), (4, 0.5, 2), (5, 0.5, 3), (4, 0.9, 2), (8, 0.0, 8),
])
def test_visited_stage_count(stages, ratio, expected):
    assert visited_stage_count(stages, ratio) == expected


def test_visited_stage_count_without_fixed_ends_keeps_at_least_one():
    assert visited_stage_count(4, 0.9, keep_first_last=False) == 1
    with pytest.raises(ValueError, match=r"skip_ratio must be in \[0, 1\), found 1.0"):
        visited_stage_count(4, 1.0)


def test_path_inversions_counts_neighbour_swaps():
    assert path_inversions([0, 1, 2, 3]) == 0
    assert path_inversions([0, 2, 1, 3]) == 1
    assert path_inversions([0, 3, 1, 2]) == 2


@pytest.mark.parametrize("order, builder", [("1f1b", build_1f1b), ("gpipe", build_gpipe)])
def test_no_skipping_gives_exactly_the_plain_schedule(order, builder):
    plan = plan_skip_paths(_problem(5, 6), 0.0, order=order)
    assert plan.paths == [[0, 1, 2, 3, 4]] * 6
    assert plan.actions == builder(5, 6, [0, 1, 2, 3, 4])
    assert plan.visits_per_stage == {s: 6 for s in range(5)}


def _check_path_rules(plan, num_stages: int, ratio: float) -> None:
    length = visited_stage_count(num_stages, ratio)
    for path in plan.paths:
        assert len(path) == length == len(set(path))
        assert path[0] == 0 and path[-1] == num_stages - 1
        assert all(0 <= s < num_stages for s in path)
        assert path_inversions(path) <= 2


@settings(max_examples=25, deadline=None)
@given(st.integers(4, 8), st.integers(1, 10), st.sampled_from([0.25, 0.5]), st.integers(0, 3))
def test_skip_paths_meet_every_constraint(num_stages, num_microbatches, ratio, seed):
    problem = _problem(num_stages, num_microbatches)
    plan = plan_skip_paths(problem, ratio, search_steps=15, seed=seed)
    _check_path_rules(plan, num_stages, ratio)
    visits = Counter(s for path in plan.paths for s in path)
    assert plan.visits_per_stage == {s: visits[s] for s in range(num_stages)}
    assert visits[0] == visits[num_stages - 1] == num_microbatches
    middle = [visits[s] for s in range(1, num_stages - 1)]
    assert max(middle) - min(middle) <= 1
    check_deadlock(plan.actions, plan.paths)
    # the estimate is the simulated makespan of the plan's own actions
    problem_comm = lambda a, b: problem.link(a, b)[0] + problem.activation_bytes / problem.link(a, b)[1]
    busy = lambda a, b: problem.activation_bytes / problem.link(a, b)[1]
    timeline = simulate(plan.actions, 0.2, 0.4, problem_comm, link_busy_time=busy)
    assert plan.estimated_iteration_time_s == pytest.approx(timeline.makespan)


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_skipping_beats_the_full_pipeline_across_a_slow_link(ratio):
    problem = _problem(8, 8)
    full = plan_skip_paths(problem, 0.0)
    skipped = plan_skip_paths(problem, ratio, search_steps=100)
    assert skipped.estimated_iteration_time_s < full.estimated_iteration_time_s


def test_search_never_worsens_the_balanced_start():
    problem = _problem(8, 12)
    start = plan_skip_paths(problem, 0.5, search_steps=0)
    searched = plan_skip_paths(problem, 0.5, search_steps=150)
    assert searched.estimated_iteration_time_s <= start.estimated_iteration_time_s


def test_search_avoids_extra_crossings_of_the_slow_link():
    """Stages 2,3 in one region and 4,5 in the other: swapping 3 and 4 would cross three times."""
    plan = plan_skip_paths(_problem(8, 8), 0.25, search_steps=200)
    for path in plan.paths:
        crossings = sum((a < 4) != (b < 4) for a, b in zip(path, path[1:]))
        assert crossings == 1


def test_plans_are_deterministic_for_a_seed():
    first = plan_skip_paths(_problem(7, 9), 0.5, seed=3, search_steps=60)
    second = plan_skip_paths(_problem(7, 9), 0.5, seed=3, search_steps=60)
    assert first == second


def test_memory_limit_caps_microbatches_in_flight():
    plan = plan_skip_paths(_problem(6, 10, memory_limit=2), 0.25, search_steps=40)
    assert max(peak_in_flight(plan.actions).values()) <= 2
    assert set(plan.max_in_flight.values()) <= {1, 2}


def test_gpipe_over_the_memory_limit_is_refused():
    with pytest.raises(ScheduleError, match="order='gpipe' keeps every microbatch.*memory_limit=3"):
        plan_skip_paths(_problem(4, 6, memory_limit=3), 0.25, order="gpipe")


def test_replicated_stages_share_their_microbatches():
    devices = [0, (1, 5), (2, 6), 3]
    problem = SkipPipeProblem(devices, [0.1, 0.2, 0.2, 0.1], _two_regions(8), 1e6, 8)
    plan = plan_skip_paths(problem, 0.0)
    per_device = Counter(d for visit in plan.path_devices for d in visit)
    assert per_device[1] == per_device[5] == per_device[2] == per_device[6] == 4
    check_deadlock(plan.actions, plan.paths)


def test_link_may_be_a_matrix():
    matrix = [[FAST_LINK, SLOW_LINK], [SLOW_LINK, FAST_LINK]]
    from_matrix = SkipPipeProblem([0, 1], 1.0, matrix, 3e6, 2)
    from_function = SkipPipeProblem([0, 1], 1.0, _two_regions(2), 3e6, 2)
    assert plan_skip_paths(from_matrix, 0.0).estimated_iteration_time_s == pytest.approx(
        plan_skip_paths(from_function, 0.0).estimated_iteration_time_s)


def test_backward_time_defaults_to_twice_forward():
    problem = SkipPipeProblem([0, 1], [1.0, 3.0], lambda a, b: (0.0, 1e12), 0.0, 1)
    assert problem.backward_times() == (2.0, 6.0)
    assert plan_skip_paths(problem, 0.0).estimated_iteration_time_s == pytest.approx(1 + 3 + 6 + 2)


def test_plan_text_round_trips():
    plan = plan_skip_paths(_problem(6, 5), 0.5, search_steps=30)
    text = format_skip_plan(plan)
    assert text.splitlines()[0].startswith("skip-plan stages=6 microbatches=5 skip_ratio=0.5 order=1f1b")
    assert parse_skip_plan(text) == plan
    assert format_skip_plan(parse_skip_plan(text)) == text


def test_plan_text_errors_name_the_line():
    text = format_skip_plan(plan_skip_paths(_problem(4, 2), 0.5))
    with pytest.raises(ValueError, match="line 3: expected 'mb0: <stage>@d<device> ...'"):
        parse_skip_plan(text.replace("mb0:", "mbX:"))
    with pytest.raises(ValueError, match="the paths give 'visits: s0=2 s1=0 s2=0 s3=2', but the dump says"):
        parse_skip_plan(text.replace("s0=2", "s0=3"))


@pytest.mark.parametrize("build, fragment", [
    (lambda: SkipPipeProblem([0, 1], [1.0], lambda a, b: FAST_LINK, 1.0, 2), "one float or one per stage \\(2\\)"),
    (lambda: SkipPipeProblem([0, ()], 1.0, lambda a, b: FAST_LINK, 1.0, 2), "one device per stage"),
    (lambda: SkipPipeProblem([0, 1], 1.0, lambda a, b: FAST_LINK, 1.0, 0), "num_microbatches must be >= 1"),
    (lambda: plan_skip_paths(_problem(4, 2), 0.5, order="zb"), "unknown order 'zb'"),
    (lambda: plan_skip_paths(SkipPipeProblem([0, 1], 1.0, lambda a, b: (0.0, 0.0), 1.0, 1), 0.0),
     r"link\(0, 1\) must return"),
])
def test_argument_errors(build, fragment):
    with pytest.raises(ValueError, match=fragment):
        build()
