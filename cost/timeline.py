"""Timing of pipeline schedules: when each action of every rank's list runs, and what the ranks hold.

:func:`simulate` runs the action lists (:mod:`ir.schedules`) with given forward/backward times (and
the weight-gradient part of a backward, for the split backwards of zero-bubble schedules) and
point-to-point costs: each rank runs its list in order, sends do not block, a receive waits for its
message, and messages on one link may queue. The estimator (:mod:`cost.estimate`) and SkipPipe
(:mod:`passes.skippipe`) price schedules with it; :func:`peak_in_flight` counts what a schedule keeps.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, Union

from ir.ops.pipeline_ops import Action
from ir.schedules import check_deadlock

TimeSpec = Union[float, Mapping[int, float]]
"""Seconds per forward (or backward, or W): one float for every stage or a per-stage mapping."""
CommSpec = Union[float, Callable[[int, int], float]]
"""Seconds per message: one float or ``f(src_rank, dst_rank)``."""


@dataclass(frozen=True)
class TimelineEvent:
    """One interval of one rank's (or device's) step.

    :func:`simulate` makes one per action: ``compute`` for a forward, backward or W, ``comm`` for a send
    (no length: it does not block), ``idle`` for a receive (it spans its wait). The simulator's device
    timelines split computes into their compute and collective parts and add idle time, the exposed
    gradient all-reduce and the optimizer step.
    """

    start_s: float
    """Seconds from the start of the step."""
    end_s: float
    """Seconds from the start of the step."""
    category: str
    """``compute``, ``comm`` or ``idle``."""
    name: str
    """What runs (``F0@s1``, ``gradient all-reduce (exposed)``, ...)."""
    action: Action | None = None
    """The schedule action of the interval, if it comes from one."""


@dataclass(frozen=True)
class ScheduleTimeline:
    """When every action of a schedule runs, under the costs given to :func:`simulate`."""

    events: dict[int, list[TimelineEvent]]
    """rank -> its events in program order."""
    makespan: float
    """End of the last event (the iteration time, optimizer step excluded)."""
    bubble_fraction: float
    """Idle share of all ranks' time: 1 - (sum of F/B/W time) / (number of ranks * makespan)."""

    def busy_time(self, rank: int) -> float:
        """Seconds ``rank`` spends in F, B and W."""
        return sum(e.end_s - e.start_s for e in self.events[rank] if e.category == "compute")


def simulate(actions: Mapping[int, Sequence[Action]], fwd_time: TimeSpec, bwd_time: TimeSpec,
             comm_time: CommSpec = 0.0, *, link_busy_time: CommSpec | None = None,
             weight_time: TimeSpec | None = None) -> ScheduleTimeline:
    """Time a schedule: each rank runs its list in order, one action at a time.

    ``fwd_time``/``bwd_time``: seconds per F / per whole backward, one float or a per-stage mapping.
    ``weight_time`` (same forms): the weight-gradient part of a backward, for schedules that split
    backwards: a ``W`` takes it and the ``B`` of the same (stage, microbatch) the rest of ``bwd_time``
    (a ``B`` without a ``W`` takes all of it). ``comm_time``: seconds from a send to its arrival, a
    float or ``f(src_rank, dst_rank)``. Sends do not block the sender; a receive waits until its
    message has arrived. ``link_busy_time`` (optional, same forms) is how long a message occupies its
    directed link (size / bandwidth): messages on one (src, dst) link then queue behind each other;
    without it links never congest.
    """
    order = check_deadlock(actions)
    split = {a.value[1:] for rank_actions in actions.values() for a in rank_actions if a.kind == "W"}
    if split and weight_time is None:
        raise ValueError("this schedule splits backwards (it has W actions): give weight_time, the seconds of "
                         "the weight-gradient part of a backward")
    clock = {rank: 0.0 for rank in actions}
    arrivals: dict[tuple, float] = {}
    link_free: dict[tuple[int, int], float] = defaultdict(float)
    events: dict[int, list[TimelineEvent]] = {rank: [] for rank in actions}
    for rank, action in order:
        start = clock[rank]
        end = start
        if action.is_compute:
            end = start + _compute_time(action, fwd_time, bwd_time, weight_time, split)
        elif action.is_send:
            departure = max(start, link_free[(rank, action.peer)])
            link_free[(rank, action.peer)] = departure + _link_time(link_busy_time, rank, action.peer)
            arrivals[(rank, action.peer, action.value)] = departure + _link_time(comm_time, rank, action.peer)
        else:
            end = max(start, arrivals.pop((action.peer, rank, action.value)))
        clock[rank] = end
        events[rank].append(TimelineEvent(start, end, _category(action), str(action), action))
    return _timeline(events)


def _compute_time(action: Action, fwd_time: TimeSpec, bwd_time: TimeSpec, weight_time: TimeSpec | None,
                  split: set) -> float:
    if action.kind == "F":
        return _stage_time(fwd_time, action, "fwd_time")
    if action.kind == "W":
        return _stage_time(weight_time, action, "weight_time")
    whole = _stage_time(bwd_time, action, "bwd_time")
    if (action.stage, action.microbatch) in split:
        return whole - _stage_time(weight_time, action, "weight_time")
    return whole


def _category(action: Action) -> str:
    return "compute" if action.is_compute else "comm" if action.is_send else "idle"


def _timeline(events: dict[int, list[TimelineEvent]]) -> ScheduleTimeline:
    makespan = max((e.end_s for rank_events in events.values() for e in rank_events), default=0.0)
    busy = sum(e.end_s - e.start_s for rank_events in events.values() for e in rank_events if e.category == "compute")
    capacity = makespan * len(events)
    bubble = 1.0 - busy / capacity if capacity > 0 else 0.0
    return ScheduleTimeline(events, makespan, bubble)


def _stage_time(spec: TimeSpec, action: Action, which: str) -> float:
    if isinstance(spec, Mapping):
        if action.stage not in spec:
            raise ValueError(f"{which} has no entry for stage {action.stage} (needed by {action}); give one "
                             f"float or a time for every stage, found stages {sorted(spec)}")
        return float(spec[action.stage])
    return float(spec)


def _link_time(spec: CommSpec | None, src: int, dst: int) -> float:
    if spec is None:
        return 0.0
    return float(spec(src, dst)) if callable(spec) else float(spec)


def peak_in_flight(actions: Mapping[int, Sequence[Action]]) -> dict[int, int]:
    """rank -> the most microbatches at once with a forward done and a backward still to run there (for
    a split backward: its W, which reads what the forward kept).

    A microbatch with several stages on one rank counts once while any of them is pending.
    """
    peaks = {}
    for rank, rank_actions in actions.items():
        last = {(a.stage, a.microbatch): a.kind for a in rank_actions if a.kind in ("B", "W")}
        pending: Counter = Counter()
        peak = 0
        for action in rank_actions:
            if action.kind == "F":
                pending[action.microbatch] += 1
            elif action.is_compute and last[(action.stage, action.microbatch)] == action.kind:
                pending[action.microbatch] -= 1
                if pending[action.microbatch] == 0:
                    del pending[action.microbatch]
            peak = max(peak, len(pending))
        peaks[rank] = peak
    return peaks
