"""SkipPipe-style path scheduling: each microbatch visits only some stages (arXiv 2502.19913).

A plan gives every microbatch an ordered *path* of stages, then builds and times the pipeline
schedule of those paths (:func:`ir.schedules.build_path_schedule`, :func:`cost.timeline.simulate`).
The rules, and where they differ from SkipPipe's own code:

- **Fixed stages.** With ``keep_first_last=True`` (our default) stage 0 (the input embedding) and
  stage K-1 (the loss) are on every path, first and last. SkipPipe instead puts embedding and loss
  on stage 0 and returns there; our pipelines end at the loss stage, so both ends are fixed.
  With ``keep_first_last=False`` every stage may be skipped.
- **Path length.** Every path visits exactly ``L = round_half_up((1 - r) * K)`` stages, clamped to
  at least the fixed stages (and at least one): the visited share nearest to ``1 - r``, ties
  toward visiting more. K=6, r=1/3 gives 4; K=8, r=0.25 gives 6; K=8, r=0.5 gives 4.
- **Order.** A path is its stages in ascending order changed by at most ``max_swaps`` swaps of
  neighbouring positions, i.e. at most ``max_swaps`` inversions (SkipPipe's convergence limit is 2),
  and the fixed stages never move. Reorderings are only tried when r > 0. SkipPipe's "jump at most
  4 stages past the furthest reached" rule is not enforced.
- **Balance.** Fixed stages are visited by every microbatch; each other stage by
  ``floor`` or ``ceil`` of ``m (L - fixed) / (K - fixed)`` microbatches (max - min <= 1), kept by
  every search move.
- **Devices.** A stage on several devices (replicas) takes its microbatches round-robin, in
  microbatch order. Gradients of replicas still need an all-reduce, which is not timed here.
- **Memory.** In 1F1B order a device keeps at most ``min(memory_limit, K - s)`` microbatches in
  flight, s its lowest stage: the plain 1F1B limit, capped. So with r = 0, one device per stage and
  no tighter cap the plan is exactly :func:`ir.schedules.build_1f1b`. GPipe order holds all of a
  device's microbatches, so it is infeasible when they exceed ``memory_limit``.
- **Collisions.** A device runs one F or B at a time in the simulation, so two microbatches never
  overlap on a node; SkipPipe's collision rule (wait) is built in.
- **Time.** The estimate is the simulated makespan of one iteration: F/B from the per-stage
  times, and per message ``latency + bytes / bandwidth`` of the device pair, with messages on one
  directed link queueing for ``bytes / bandwidth`` each. Links are per device pair, as ``link``
  gives them: a node's NIC is not shared between its peers, so paths that spread a slow crossing
  over several node pairs get more aggregate bandwidth than the full pipeline's single pair (an
  optimistic model where a node's own uplink is the real limit). Optimizer step and replica
  all-reduce are excluded.

Search (deterministic for a seed): balanced initial paths (each microbatch takes the least
visited stages), then local search scored by the simulated makespan: exchange one stage between
two paths (keeps the visit counts), swap two neighbouring stages of a path, or swap the paths of
two microbatches; a move is kept only when it lowers the estimate.
"""
from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

from cost.timeline import simulate
from ir.ops.pipeline_ops import Action
from ir.schedules import PATH_ORDERS, ScheduleError, build_path_schedule, default_in_flight_limits

Paths = tuple  # tuple[tuple[int, ...], ...]: one ordered tuple of stages per microbatch
LinkFunction = Callable[[int, int], tuple[float, float]]

_HEADER_RE = re.compile(r"^skip-plan stages=(\d+) microbatches=(\d+) skip_ratio=(\S+) order=(\S+) "
                        r"estimated_iteration_time_s=(\S+)$")
_VISIT_RE = re.compile(r"^(\d+)@d(\d+)$")


@dataclass(frozen=True)
class SkipPipeProblem:
    """The model and cluster a SkipPipe plan is made for."""

    stage_devices: tuple[tuple[int, ...], ...]
    """Per stage, the device(s) holding it; an int is taken as a one-device tuple."""
    forward_time_s: tuple[float, ...]
    """Per stage, seconds of one microbatch's forward; one float is used for every stage."""
    link: LinkFunction
    """``link(a, b) -> (latency_s, bandwidth_bytes_per_s)`` for the directed device pair a -> b;
    a matrix (``link[a][b]`` is that pair) is accepted too."""
    activation_bytes: float
    """Bytes of one microbatch's activation (and of its gradient) between two stages."""
    num_microbatches: int
    """Microbatches per iteration."""
    backward_time_s: tuple[float, ...] | None = None
    """Per stage backward seconds; None means twice the forward."""
    memory_limit: int | None = None
    """Most microbatches a device may hold in flight; None for no cap beyond plain 1F1B's."""

    def __post_init__(self) -> None:
        devices = tuple((d,) if isinstance(d, int) else tuple(d) for d in self.stage_devices)
        if not devices or any(not d for d in devices):
            raise ValueError(f"expected at least one stage and one device per stage, found {self.stage_devices!r}")
        object.__setattr__(self, "stage_devices", devices)
        if not callable(self.link):
            matrix = self.link
            object.__setattr__(self, "link", lambda src, dst: tuple(matrix[src][dst]))
        object.__setattr__(self, "forward_time_s", self._per_stage(self.forward_time_s, "forward_time_s"))
        if self.backward_time_s is not None:
            object.__setattr__(self, "backward_time_s", self._per_stage(self.backward_time_s, "backward_time_s"))
        if self.num_microbatches < 1:
            raise ValueError(f"num_microbatches must be >= 1, found {self.num_microbatches}")
        if self.memory_limit is not None and self.memory_limit < 1:
            raise ValueError(f"memory_limit must be None or >= 1, found {self.memory_limit}")
        if self.activation_bytes < 0:
            raise ValueError(f"activation_bytes must be >= 0, found {self.activation_bytes}")

    @property
    def num_stages(self) -> int:
        """K, the number of stages."""
        return len(self.stage_devices)

    def _per_stage(self, times: float | Sequence[float], name: str) -> tuple[float, ...]:
        if isinstance(times, (int, float)):
            return (float(times),) * len(self.stage_devices)
        if len(times) != len(self.stage_devices):
            raise ValueError(f"{name} must be one float or one per stage ({len(self.stage_devices)}), "
                             f"found {len(times)} values")
        return tuple(float(t) for t in times)

    def backward_times(self) -> tuple[float, ...]:
        """Per stage backward seconds (twice the forward unless given)."""
        return self.backward_time_s or tuple(2.0 * t for t in self.forward_time_s)


@dataclass(frozen=True)
class SkipPlan:
    """Per-microbatch stage paths and the pipeline schedule that runs them."""

    num_stages: int
    """K."""
    skip_ratio: float
    """The r the plan was made for."""
    order: str
    """``1f1b`` or ``gpipe``."""
    paths: list[list[int]]
    """Per microbatch, the stages it visits, in order."""
    path_devices: list[list[int]]
    """Per microbatch, the device of each visit of ``paths``."""
    max_in_flight: dict[int, int] | None
    """Per device, the most microbatches in flight (1F1B); None for GPipe."""
    estimated_iteration_time_s: float
    """Simulated makespan of one iteration (see the module docstring)."""
    actions: dict[int, list[Action]] = field(repr=False)
    """Per device, its ordered actions (from :func:`ir.schedules.build_path_schedule`)."""
    visits_per_stage: dict[int, int]
    """Stage -> how many microbatches visit it."""


def visited_stage_count(num_stages: int, skip_ratio: float, keep_first_last: bool = True) -> int:
    """L, the number of stages every path visits (see the module docstring)."""
    if not 0.0 <= skip_ratio < 1.0:
        raise ValueError(f"skip_ratio must be in [0, 1), found {skip_ratio}")
    fixed = _fixed_count(num_stages, keep_first_last)
    return min(num_stages, max(fixed, 1, math.floor((1.0 - skip_ratio) * num_stages + 0.5)))


def path_inversions(path: Sequence[int]) -> int:
    """How many swaps of neighbours turn ``path`` into ascending order (its inversion count)."""
    return sum(1 for i in range(len(path)) for j in range(i + 1, len(path)) if path[i] > path[j])


def _fixed_count(num_stages: int, keep_first_last: bool) -> int:
    return min(2, num_stages) if keep_first_last else 0


@dataclass(frozen=True)
class _PathShape:
    """The constraints every path of one plan meets."""

    num_stages: int
    length: int
    keep_first_last: bool
    max_swaps: int

    @property
    def free_stages(self) -> list[int]:
        """Stages a path may skip."""
        return list(range(1, self.num_stages - 1)) if self.keep_first_last else list(range(self.num_stages))

    @property
    def free_per_path(self) -> int:
        return self.length - _fixed_count(self.num_stages, self.keep_first_last)

    def ascending(self, free: set[int] | Sequence[int]) -> tuple[int, ...]:
        """The path of the fixed stages plus ``free``, in ascending order."""
        middle = tuple(sorted(free))
        if not self.keep_first_last:
            return middle
        return (0,) + middle + ((self.num_stages - 1,) if self.num_stages > 1 else ())

    def free_of(self, path: Sequence[int]) -> list[int]:
        """The skippable stages ``path`` visits."""
        fixed = {0, self.num_stages - 1} if self.keep_first_last else set()
        return [s for s in path if s not in fixed]

    def movable_positions(self) -> range:
        """Positions of a path whose stage may be swapped with a neighbour."""
        return range(1, self.length - 1) if self.keep_first_last else range(self.length)


def plan_skip_paths(problem: SkipPipeProblem, skip_ratio: float, *, keep_first_last: bool = True,
                    max_swaps: int = 2, order: str = "1f1b", search_steps: int = 300,
                    seed: int = 0) -> SkipPlan:
    """The SkipPipe plan with the lowest estimated iteration time the seeded search finds."""
    if order not in PATH_ORDERS:
        raise ValueError(f"unknown order {order!r}; expected one of {', '.join(PATH_ORDERS)}")
    if max_swaps < 0:
        raise ValueError(f"max_swaps must be >= 0, found {max_swaps}")
    shape = _PathShape(problem.num_stages, visited_stage_count(problem.num_stages, skip_ratio, keep_first_last),
                       keep_first_last, max_swaps if skip_ratio > 0 else 0)
    rng = random.Random(seed)
    evaluator = _Evaluator(problem, order)
    paths = _balanced_paths(shape, problem.num_microbatches, rng)
    if evaluator.time(paths) == math.inf:
        raise ScheduleError(evaluator.infeasible_reason(paths))
    paths = _local_search(paths, shape, evaluator, rng, search_steps)
    return evaluator.plan(paths, float(skip_ratio))


def _balanced_paths(shape: _PathShape, num_microbatches: int, rng: random.Random) -> Paths:
    """Each microbatch in turn takes the least visited free stages (ties in a seeded order)."""
    free = shape.free_stages
    tie_break = {stage: i for i, stage in enumerate(rng.sample(free, len(free)))}
    visits = Counter({stage: 0 for stage in free})
    paths = []
    for _ in range(num_microbatches):
        chosen = sorted(free, key=lambda s: (visits[s], tie_break[s]))[:shape.free_per_path]
        visits.update(chosen)
        paths.append(shape.ascending(chosen))
    return tuple(paths)


class _Evaluator:
    """Builds, times and caches the schedule of a set of paths."""

    def __init__(self, problem: SkipPipeProblem, order: str):
        self.problem = problem
        self.order = order
        self.forward = dict(enumerate(problem.forward_time_s))
        self.backward = dict(enumerate(problem.backward_times()))
        self.links: dict[tuple[int, int], tuple[float, float]] = {}
        self.times: dict[Paths, float] = {}

    def devices(self, paths: Paths) -> list[list[int]]:
        """Round-robin replica of each visit, in microbatch order."""
        taken: Counter = Counter()
        devices = []
        for path in paths:
            devices.append([self.problem.stage_devices[s][taken[s] % len(self.problem.stage_devices[s])]
                            for s in path])
            taken.update(path)
        return devices

    def limits(self, paths: Paths, devices: list[list[int]]) -> dict[int, int] | None:
        """Per device the 1F1B window: the default of build_path_schedule, capped by memory."""
        if self.order == "gpipe":
            return None
        limits = default_in_flight_limits(paths, devices)
        cap = self.problem.memory_limit
        return {d: min(cap, n) for d, n in limits.items()} if cap else limits

    def schedule(self, paths: Paths) -> tuple[list[list[int]], dict[int, int] | None, dict[int, list[Action]]]:
        devices = self.devices(paths)
        limits = self.limits(paths, devices)
        actions = build_path_schedule([list(p) for p in paths], None, self.order, visit_ranks=devices,
                                      max_in_flight=limits, verify=False)
        return devices, limits, actions

    def time(self, paths: Paths) -> float:
        """Estimated iteration time of ``paths``; inf when infeasible (deadlock or memory)."""
        if paths not in self.times:
            self.times[paths] = self._simulate(paths)
        return self.times[paths]

    def _simulate(self, paths: Paths) -> float:
        if self._gpipe_memory_excess(paths):
            return math.inf
        try:
            _, _, actions = self.schedule(paths)
            return simulate(actions, self.forward, self.backward, self._comm_time,
                            link_busy_time=self._busy_time).makespan
        except ScheduleError:
            return math.inf

    def _gpipe_memory_excess(self, paths: Paths) -> dict[int, int]:
        if self.order != "gpipe" or self.problem.memory_limit is None:
            return {}
        per_device = Counter(d for visit in self.devices(paths) for d in set(visit))
        return {d: n for d, n in per_device.items() if n > self.problem.memory_limit}

    def infeasible_reason(self, paths: Paths) -> str:
        """Why ``paths`` cannot be scheduled, for the error message."""
        excess = self._gpipe_memory_excess(paths)
        if excess:
            return (f"order='gpipe' keeps every microbatch of a device in memory; devices {excess} "
                    f"(device: microbatches) exceed memory_limit={self.problem.memory_limit}; use order='1f1b'")
        try:
            _, _, actions = self.schedule(paths)
            simulate(actions, self.forward, self.backward)
        except ScheduleError as error:
            return f"the initial balanced paths cannot be scheduled: {error}"
        return "the schedule could not be timed"

    def _link(self, src: int, dst: int) -> tuple[float, float]:
        if (src, dst) not in self.links:
            latency, bandwidth = self.problem.link(src, dst)
            if bandwidth <= 0 or latency < 0:
                raise ValueError(f"link({src}, {dst}) must return (latency_s >= 0, bandwidth > 0), "
                                 f"found ({latency}, {bandwidth})")
            self.links[(src, dst)] = (float(latency), float(bandwidth))
        return self.links[(src, dst)]

    def _busy_time(self, src: int, dst: int) -> float:
        return self.problem.activation_bytes / self._link(src, dst)[1]

    def _comm_time(self, src: int, dst: int) -> float:
        return self._link(src, dst)[0] + self._busy_time(src, dst)

    def plan(self, paths: Paths, skip_ratio: float) -> SkipPlan:
        """The :class:`SkipPlan` of ``paths``."""
        devices, limits, actions = self.schedule(paths)
        visits = Counter(s for path in paths for s in path)
        return SkipPlan(self.problem.num_stages, skip_ratio, self.order, [list(p) for p in paths], devices,
                        limits, self.time(paths), actions,
                        {s: visits[s] for s in range(self.problem.num_stages)})


def _local_search(paths: Paths, shape: _PathShape, evaluator: _Evaluator, rng: random.Random,
                  steps: int) -> Paths:
    moves = [_exchange_stage, _swap_paths] if len(paths) >= 2 else []
    if shape.max_swaps > 0 and len(shape.movable_positions()) >= 2:
        moves.append(_swap_neighbours)
    if not moves:
        return paths
    best = evaluator.time(paths)
    for _ in range(steps):
        candidate = rng.choice(moves)(paths, shape, rng)
        if candidate is None or candidate == paths:
            continue
        time = evaluator.time(candidate)
        if time < best * (1.0 - 1e-9):
            paths, best = candidate, time
    return paths


def _exchange_stage(paths: Paths, shape: _PathShape, rng: random.Random) -> Paths | None:
    """Microbatch a gives one of its free stages to b and takes one of b's: visit counts stay."""
    a, b = rng.sample(range(len(paths)), 2)
    free_a, free_b = set(shape.free_of(paths[a])), set(shape.free_of(paths[b]))
    only_a, only_b = sorted(free_a - free_b), sorted(free_b - free_a)
    if not only_a or not only_b:
        return None
    given, taken = rng.choice(only_a), rng.choice(only_b)
    changed = list(paths)
    changed[a] = shape.ascending(free_a - {given} | {taken})
    changed[b] = shape.ascending(free_b - {taken} | {given})
    return tuple(changed)


def _swap_paths(paths: Paths, shape: _PathShape, rng: random.Random) -> Paths | None:
    """Microbatches a and b trade paths (changes which goes first)."""
    a, b = rng.sample(range(len(paths)), 2)
    if paths[a] == paths[b]:
        return None
    changed = list(paths)
    changed[a], changed[b] = paths[b], paths[a]
    return tuple(changed)


def _swap_neighbours(paths: Paths, shape: _PathShape, rng: random.Random) -> Paths | None:
    """Swap two neighbouring free stages of one path, within the inversion limit."""
    movable = shape.movable_positions()
    microbatch = rng.randrange(len(paths))
    position = rng.choice(movable[:-1])
    path = list(paths[microbatch])
    path[position], path[position + 1] = path[position + 1], path[position]
    if path_inversions(path) > shape.max_swaps:
        return None
    changed = list(paths)
    changed[microbatch] = tuple(path)
    return tuple(changed)


# --------------------------------------------------------------------------------------------
# Text form
# --------------------------------------------------------------------------------------------

def format_skip_plan(plan: SkipPlan) -> str:
    """The plan dump: a header with the estimate, in-flight limits, one line per microbatch path."""
    lines = [f"skip-plan stages={plan.num_stages} microbatches={len(plan.paths)} skip_ratio={plan.skip_ratio!r} "
             f"order={plan.order} estimated_iteration_time_s={plan.estimated_iteration_time_s!r}"]
    limits = plan.max_in_flight
    lines.append("in-flight: " + (" ".join(f"d{d}={n}" for d, n in sorted(limits.items())) if limits else "none"))
    for microbatch, (path, devices) in enumerate(zip(plan.paths, plan.path_devices)):
        lines.append(f"mb{microbatch}: " + " ".join(f"{s}@d{d}" for s, d in zip(path, devices)))
    lines.append("visits: " + " ".join(f"s{s}={n}" for s, n in sorted(plan.visits_per_stage.items())))
    return "\n".join(lines)


def parse_skip_plan(text: str) -> SkipPlan:
    """Parse :func:`format_skip_plan` text back; the actions are rebuilt from the paths."""
    lines = [line.strip() for line in text.strip().splitlines()]
    header = _match(_HEADER_RE, lines[0] if lines else "", 1, "skip-plan stages=<K> microbatches=<m> "
                    "skip_ratio=<r> order=<order> estimated_iteration_time_s=<t>")
    num_stages, num_microbatches = int(header.group(1)), int(header.group(2))
    if len(lines) != num_microbatches + 3:
        raise ValueError(f"expected {num_microbatches + 3} lines (header, in-flight, {num_microbatches} paths, "
                         f"visits), found {len(lines)}")
    limits = _parse_limits(lines[1])
    paths, devices = zip(*(_parse_path_line(line, i, line_number=i + 3) for i, line in enumerate(lines[2:-1])))
    order = header.group(4)
    actions = build_path_schedule([list(p) for p in paths], None, order, visit_ranks=devices,
                                  max_in_flight=limits)
    visits = Counter(s for path in paths for s in path)
    visits_per_stage = {s: visits[s] for s in range(num_stages)}
    _check_visits_line(lines[-1], visits_per_stage, len(lines))
    return SkipPlan(num_stages, float(header.group(3)), order, [list(p) for p in paths],
                    [list(d) for d in devices], limits, float(header.group(5)), actions, visits_per_stage)


def _match(pattern: re.Pattern, line: str, line_number: int, expected: str) -> re.Match:
    match = pattern.match(line)
    if match is None:
        raise ValueError(f"line {line_number}: expected '{expected}', found {line!r}")
    return match


def _parse_limits(line: str) -> dict[int, int] | None:
    if not line.startswith("in-flight: "):
        raise ValueError(f"line 2: expected 'in-flight: d<device>=<n> ...' or 'in-flight: none', found {line!r}")
    body = line[len("in-flight: "):].strip()
    if body == "none":
        return None
    limits = {}
    for token in body.split():
        match = _match(re.compile(r"^d(\d+)=(\d+)$"), token, 2, "d<device>=<n>")
        limits[int(match.group(1))] = int(match.group(2))
    return limits


def _parse_path_line(line: str, microbatch: int, line_number: int) -> tuple[list[int], list[int]]:
    prefix = f"mb{microbatch}: "
    if not line.startswith(prefix):
        raise ValueError(f"line {line_number}: expected '{prefix}<stage>@d<device> ...', found {line!r}")
    visits = [_match(_VISIT_RE, token, line_number, "<stage>@d<device>") for token in line[len(prefix):].split()]
    return [int(v.group(1)) for v in visits], [int(v.group(2)) for v in visits]


def _check_visits_line(line: str, visits_per_stage: dict[int, int], line_number: int) -> None:
    expected = "visits: " + " ".join(f"s{s}={n}" for s, n in sorted(visits_per_stage.items()))
    if line != expected:
        raise ValueError(f"line {line_number}: the paths give '{expected}', but the dump says {line!r}")
