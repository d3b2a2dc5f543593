"""Pipeline schedules as per-rank action lists: the standard builders and the deadlock check.

A schedule is a ``dict[rank, list[Action]]``: every rank runs its list from top to bottom.
``F``/``B`` are the forward/backward of one (stage, microbatch); ``SEND_F``/``RECV_F`` move the
activation a stage produced to the rank of the next stage on the microbatch's path, and
``SEND_B``/``RECV_B`` move the gradient a stage produced back to the rank of the previous stage.
The zero-bubble schedules split a backward: ``B`` computes the input gradients (what is sent back)
and ``W``, later on the same rank, the weight gradients (it sends nothing); a ``B`` without a ``W``
is the whole backward.

The schedules a strategy names (``"schedule": ...``) are listed once, in :data:`SCHEDULES`, with
where their stages live (:func:`stage_positions`): GPipe, 1F1B, interleaved 1F1B (Megatron-LM),
ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024, section 3.1), ZB-V (the same
paper, section 6: two stages per rank in a V, the first and the last stage on rank 0) and
DualPipeV (DeepSeek-V3 technical report, section 3.2.1, the V-shaped "cut-in-half" DualPipe).

Conventions every consumer of these lists relies on:

- The ``stage`` of a send or a receive is the stage that *produced* the value, so a matching pair
  agrees on (F or B, stage, microbatch) and differs only in kind and peer.
- A send follows the compute that produced its value, on the producing rank; nothing is sent
  between consecutive stages on the same rank. A receive comes right before the compute that
  needs it, or earlier when its channel's order demands (the value then waits on the rank).
- Communication model (:func:`check_deadlock`): a send is an ``isend`` (non-blocking); by default
  any number of sent-but-unreceived messages may wait in a channel (gloo buffers them), and
  ``channel_capacity`` bounds that number (``0`` makes every send a rendezvous). A receive blocks
  until a message is there. Messages are matched **in order per (src, dst) channel**, as batched
  ``isend``/``irecv`` without tags match them, so a receiver that takes two messages of one
  channel in the other order is an error, not a reordering.
- A microbatch's path is the ordered list of stages it visits (all stages for the plain schedules;
  a subset or reordering for SkipPipe); its backward visits the reversed path.
"""
from __future__ import annotations

from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from ir.ops.pipeline_ops import Action

PATH_ORDERS = ("1f1b", "gpipe")

Task = tuple  # (kind "F"/"B"/"W", stage, microbatch): one compute of a schedule under construction


class ScheduleError(ValueError):
    """A schedule that is malformed: a missing, duplicated or misordered action."""


class ScheduleDeadlock(ScheduleError):
    """A schedule whose ranks end up waiting on each other (or on a send that never comes)."""


# --------------------------------------------------------------------------------------------
# Routes: where each microbatch goes
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Route:
    """Every microbatch's path and the rank that runs each of its visits."""

    paths: tuple[tuple[int, ...], ...]
    ranks: tuple[tuple[int, ...], ...]

    def position(self, stage: int, microbatch: int) -> int:
        return self.paths[microbatch].index(stage)

    def _visit(self, microbatch: int, position: int) -> tuple[int, int] | None:
        if 0 <= position < len(self.paths[microbatch]):
            return self.paths[microbatch][position], self.ranks[microbatch][position]
        return None

    def consumer(self, kind: str, stage: int, microbatch: int) -> tuple[int, int] | None:
        """(stage, rank) that needs what ``kind`` of ``stage`` produces: next visit for F, previous for B."""
        step = 1 if kind == "F" else -1
        return self._visit(microbatch, self.position(stage, microbatch) + step)

    def producer(self, kind: str, stage: int, microbatch: int) -> tuple[int, int] | None:
        """(stage, rank) whose output ``kind`` of ``stage`` consumes: previous visit for F, next for B."""
        step = -1 if kind == "F" else 1
        return self._visit(microbatch, self.position(stage, microbatch) + step)


def _make_route(paths: Sequence[Sequence[int]], stage_ranks: Sequence[int] | None,
                visit_ranks: Sequence[Sequence[int]] | None) -> _Route:
    if not paths:
        raise ValueError("expected at least one microbatch path, found none")
    for microbatch, path in enumerate(paths):
        _check_path_shape(path, microbatch, stage_ranks)
    if visit_ranks is None:
        if stage_ranks is None:
            raise ValueError("give stage_ranks (one rank per stage) or visit_ranks (one rank per visit)")
        visit_ranks = [[stage_ranks[stage] for stage in path] for path in paths]
    elif len(visit_ranks) != len(paths) or any(len(r) != len(p) for r, p in zip(visit_ranks, paths)):
        raise ValueError("visit_ranks must have one rank per stage of each path; found shapes "
                         f"{[len(r) for r in visit_ranks]} for paths of lengths {[len(p) for p in paths]}")
    return _Route(tuple(tuple(p) for p in paths), tuple(tuple(r) for r in visit_ranks))


def _check_path_shape(path: Sequence[int], microbatch: int, stage_ranks: Sequence[int] | None) -> None:
    if not path:
        raise ValueError(f"microbatch {microbatch}: expected a non-empty path of stages, found []")
    repeated = [stage for stage, count in Counter(path).items() if count > 1]
    if repeated:
        raise ValueError(f"microbatch {microbatch}: path {list(path)} visits stage(s) {repeated} twice; "
                         "a path visits each stage at most once")
    if stage_ranks is not None and not all(0 <= s < len(stage_ranks) for s in path):
        raise ValueError(f"microbatch {microbatch}: path {list(path)} names a stage outside "
                         f"0..{len(stage_ranks) - 1} (stage_ranks has {len(stage_ranks)} entries)")


# --------------------------------------------------------------------------------------------
# Turning per-rank compute orders into action lists with sends and receives
# --------------------------------------------------------------------------------------------

def _assemble(compute_orders: Mapping[int, Sequence[Task]], route: _Route) -> dict[int, list[Action]]:
    """Insert sends right after each compute and receives right before the compute needing them.

    Receives follow the sender's order on each channel (messages match in order): a compute
    that needs a later message of a channel first receives the earlier ones, which then wait
    on the receiving rank until their own consumer runs.
    """
    channels = _channel_sequences(compute_orders, route)
    positions = {channel: {value: i for i, value in enumerate(seq)} for channel, seq in channels.items()}
    return {rank: _rank_actions(rank, tasks, route, channels, positions)
            for rank, tasks in compute_orders.items()}


def _channel_sequences(compute_orders: Mapping[int, Sequence[Task]],
                       route: _Route) -> dict[tuple[int, int], list[Task]]:
    channels: dict[tuple[int, int], list[Task]] = defaultdict(list)
    for rank, tasks in compute_orders.items():
        for task in tasks:
            if task[0] == "W":
                continue
            target = route.consumer(*task)
            if target is not None and target[1] != rank:
                channels[(rank, target[1])].append(task)
    return channels


def _rank_actions(rank: int, tasks: Sequence[Task], route: _Route,
                  channels: Mapping[tuple[int, int], list[Task]],
                  positions: Mapping[tuple[int, int], Mapping[Task, int]]) -> list[Action]:
    received: Counter = Counter()  # channel -> how many of its messages this rank has taken
    actions: list[Action] = []
    for kind, stage, microbatch in tasks:
        if kind == "W":  # weight gradients stay on the rank
            actions.append(Action(kind, stage, microbatch))
            continue
        source = route.producer(kind, stage, microbatch)
        if source is not None and source[1] != rank:
            channel = (source[1], rank)
            wanted = positions[channel][(kind, source[0], microbatch)]
            for value in channels[channel][received[channel]:wanted + 1]:
                actions.append(Action("RECV_" + value[0], value[1], value[2], source[1]))
            received[channel] = max(received[channel], wanted + 1)
        actions.append(Action(kind, stage, microbatch))
        target = route.consumer(kind, stage, microbatch)
        if target is not None and target[1] != rank:
            actions.append(Action("SEND_" + kind, stage, microbatch, target[1]))
    return actions


# --------------------------------------------------------------------------------------------
# Compute orders
# --------------------------------------------------------------------------------------------

def _visits_by_rank(route: _Route) -> dict[int, list[tuple[int, int, int, int]]]:
    """rank -> its visits as (stage, microbatch, position in path, path length)."""
    visits: dict[int, list[tuple[int, int, int, int]]] = defaultdict(list)
    for microbatch, (path, ranks) in enumerate(zip(route.paths, route.ranks)):
        for position, (stage, rank) in enumerate(zip(path, ranks)):
            visits[rank].append((stage, microbatch, position, len(path)))
    return visits


def default_in_flight_limits(paths: Sequence[Sequence[int]],
                             visit_ranks: Sequence[Sequence[int]]) -> dict[int, int]:
    """The 1F1B window per rank: how many ranks (itself included) the paths can reach from it.

    For the plain pipeline (stage i on rank i of p) this is p - i, Megatron-LM's warm-up plus one:
    just enough microbatches in flight to keep the downstream stages busy when communication is
    free. It never grows along a path (what is reachable from a later rank is reachable from an
    earlier one), which is what keeps the 1F1B order free of deadlocks.
    """
    successors: dict[int, set[int]] = defaultdict(set)
    for ranks in visit_ranks:
        for here, there in zip(ranks, ranks[1:]):
            if here != there:
                successors[here].add(there)
    all_ranks = {rank for ranks in visit_ranks for rank in ranks}
    return {rank: len(_reachable(rank, successors)) for rank in sorted(all_ranks)}


def _reachable(start: int, successors: Mapping[int, set[int]]) -> set[int]:
    seen = {start}
    frontier = [start]
    while frontier:
        for rank in successors.get(frontier.pop(), ()):
            if rank not in seen:
                seen.add(rank)
                frontier.append(rank)
    return seen


def _path_compute_orders(route: _Route, order: str,
                         limits: Mapping[int, int] | None) -> dict[int, list[Task]]:
    orders = {}
    for rank, visits in _visits_by_rank(route).items():
        if order == "gpipe":
            # By position first: every dependency then has a smaller key, so no cycle can form.
            forwards = sorted(visits, key=lambda v: (v[2], v[1]))
            backwards = sorted(visits, key=lambda v: (v[3] - v[2], v[1]))
            orders[rank] = [("F", v[0], v[1]) for v in forwards] + [("B", v[0], v[1]) for v in backwards]
        else:
            forwards = sorted(visits, key=lambda v: (v[1], v[2]))
            backwards = sorted(visits, key=lambda v: (v[1], -v[2]))
            orders[rank] = _one_f_one_b(forwards, backwards, limits[rank])
    return orders


def _one_f_one_b(forwards: list[tuple[int, int, int, int]], backwards: list[tuple[int, int, int, int]],
                 limit: int) -> list[Task]:
    """Run the next forward while its microbatch is within ``limit`` of the oldest one still in
    flight here (by microbatch index), else the oldest pending backward.

    The window counts microbatch *indices*, not only those that visit this rank, so a rank that
    some paths skip does not run ahead of the ranks feeding it (that would deadlock: it would wait
    for a forward its upstream only sends after getting a backward from it). In-flight count <=
    window, and on a plain pipeline this is exactly Megatron-LM's warm-up / 1F1B / cool-down order.
    """
    pending_backwards = Counter(v[1] for v in backwards)
    in_flight: set[int] = set()
    tasks: list[Task] = []
    next_forward = next_backward = 0
    while next_forward < len(forwards) or next_backward < len(backwards):
        if next_forward < len(forwards):
            stage, microbatch = forwards[next_forward][:2]
            if microbatch in in_flight or not in_flight or microbatch < min(in_flight) + limit:
                in_flight.add(microbatch)
                tasks.append(("F", stage, microbatch))
                next_forward += 1
                continue
        stage, microbatch = backwards[next_backward][:2]
        pending_backwards[microbatch] -= 1
        if pending_backwards[microbatch] == 0:
            in_flight.discard(microbatch)
        tasks.append(("B", stage, microbatch))
        next_backward += 1
    return tasks


def _interleaved_compute_orders(num_ranks: int, chunks: int, num_microbatches: int,
                                rank_ids: Sequence[int]) -> dict[int, list[Task]]:
    """Megatron-LM's interleaved 1F1B (reading of ``forward_backward_pipelining_with_interleaving``).

    The k-th forward on every rank runs chunk ``(k mod p*v) // p`` of microbatch
    ``(k // (p*v)) * p + k mod p``; backwards walk the chunks in reverse. Rank i warms up with
    ``2(p-i-1) + (v-1)p`` forwards (all of them when m == p), then alternates, then cools down.
    """
    total = num_microbatches * chunks

    def task(kind: str, k: int, position: int) -> Task:
        chunk = (k % (num_ranks * chunks)) // num_ranks
        if kind == "B":
            chunk = chunks - 1 - chunk
        microbatch = (k // (num_ranks * chunks)) * num_ranks + k % num_ranks
        return (kind, chunk * num_ranks + position, microbatch)

    orders = {}
    for position, rank in enumerate(rank_ids):
        warmup = total if num_microbatches == num_ranks else min(
            2 * (num_ranks - position - 1) + (chunks - 1) * num_ranks, total)
        forwards = [task("F", k, position) for k in range(total)]
        backwards = [task("B", k, position) for k in range(total)]
        steady = [t for pair in zip(forwards[warmup:], backwards) for t in pair]
        orders[rank] = forwards[:warmup] + steady + backwards[total - warmup:]
    return orders


# --------------------------------------------------------------------------------------------
# Public builders
# --------------------------------------------------------------------------------------------

def build_path_schedule(paths: Sequence[Sequence[int]], stage_ranks: Sequence[int] | None,
                        order: str = "1f1b", *, visit_ranks: Sequence[Sequence[int]] | None = None,
                        max_in_flight: int | Mapping[int, int] | None = None,
                        verify: bool = True) -> dict[int, list[Action]]:
    """Each rank's actions when microbatch m visits the stages ``paths[m]`` in order.

    ``stage_ranks[s]`` is the rank of stage s; ``visit_ranks[m][i]`` overrides it per visit (for
    stages replicated over several ranks). ``order`` is ``1f1b`` (a rank starts a new microbatch
    only within a window of the oldest one it still holds, else runs the oldest pending backward;
    the window is :func:`default_in_flight_limits`, lowered to ``max_in_flight`` (one int for all
    ranks, or per rank) to cap memory) or ``gpipe`` (all forwards, then all backwards). With every
    path ``[0..K-1]`` this is exactly :func:`build_1f1b` / :func:`build_gpipe`.
    ``verify`` runs :func:`check_deadlock` on the result (small in-flight limits on general paths
    can deadlock; the error says where).
    """
    if order not in PATH_ORDERS:
        raise ValueError(f"unknown path schedule order {order!r}; expected one of {', '.join(PATH_ORDERS)}")
    route = _make_route(paths, stage_ranks, visit_ranks)
    limits = _resolve_limits(route, order, max_in_flight)
    actions = {rank: [] for rank in _all_ranks(route, stage_ranks)}
    actions.update(_assemble(_path_compute_orders(route, order, limits), route))
    if verify:
        check_deadlock(actions, paths)
    return actions


def _all_ranks(route: _Route, stage_ranks: Sequence[int] | None) -> list[int]:
    ranks = set(stage_ranks or ()) | {rank for visit in route.ranks for rank in visit}
    return sorted(ranks)


def _resolve_limits(route: _Route, order: str,
                    max_in_flight: int | Mapping[int, int] | None) -> dict[int, int] | None:
    if order == "gpipe":
        if max_in_flight is not None:
            raise ValueError("order='gpipe' runs every forward before any backward, so it takes no "
                             f"max_in_flight; found {max_in_flight!r} (use order='1f1b' to bound memory)")
        return None
    limits = default_in_flight_limits(route.paths, route.ranks)
    if isinstance(max_in_flight, int):
        max_in_flight = {rank: max_in_flight for rank in limits}
    for rank, cap in (max_in_flight or {}).items():
        if cap < 1:
            raise ValueError(f"max_in_flight for rank {rank} must be >= 1, found {cap}")
        if rank in limits:
            limits[rank] = min(limits[rank], cap)
    return limits


def _full_paths(num_stages: int, num_microbatches: int) -> list[list[int]]:
    _check_counts(num_stages, num_microbatches)
    return [list(range(num_stages)) for _ in range(num_microbatches)]


def _check_counts(num_stages: int, num_microbatches: int) -> None:
    if num_stages < 1 or num_microbatches < 1:
        raise ValueError(f"expected at least one stage and one microbatch, found num_stages={num_stages} "
                         f"num_microbatches={num_microbatches}")


def _check_stage_ranks(stage_ranks: Sequence[int], num_stages: int, builder: str) -> None:
    if len(stage_ranks) != num_stages:
        raise ValueError(f"{builder}: stage_ranks must give one rank per stage ({num_stages}), "
                         f"found {len(stage_ranks)}: {list(stage_ranks)}")


def _require_one_chunk(virtual_stages: int, builder: str) -> None:
    if virtual_stages != 1:
        raise ValueError(f"{builder} takes virtual_stages=1, found {virtual_stages}; use "
                         "build_interleaved_1f1b (schedule 'interleaved_1f1b') for virtual stages")


def build_gpipe(num_stages: int, num_microbatches: int, stage_ranks: Sequence[int],
                virtual_stages: int = 1) -> dict[int, list[Action]]:
    """GPipe: every rank runs all its forwards, then all its backwards (in microbatch order)."""
    _require_one_chunk(virtual_stages, "build_gpipe")
    _check_stage_ranks(stage_ranks, num_stages, "build_gpipe")
    return build_path_schedule(_full_paths(num_stages, num_microbatches), stage_ranks, "gpipe")


def build_1f1b(num_stages: int, num_microbatches: int, stage_ranks: Sequence[int],
               virtual_stages: int = 1) -> dict[int, list[Action]]:
    """1F1B (PipeDream-flush, Megatron-LM): stage i warms up with p-1-i forwards, then alternates."""
    _require_one_chunk(virtual_stages, "build_1f1b")
    _check_stage_ranks(stage_ranks, num_stages, "build_1f1b")
    return build_path_schedule(_full_paths(num_stages, num_microbatches), stage_ranks, "1f1b")


def build_interleaved_1f1b(num_stages: int, num_microbatches: int, stage_ranks: Sequence[int],
                           virtual_stages: int = 1) -> dict[int, list[Action]]:
    """Megatron-LM's interleaved 1F1B: p = num_stages / v ranks, stage s on ``stage_ranks[s % p]``.

    ``stage_ranks`` lists either the p ranks or one rank per stage (then stage s and s + p must
    share a rank). ``num_microbatches`` must be a multiple of p. With ``virtual_stages=1`` this is
    :func:`build_1f1b`, as in Megatron-LM, which runs the plain schedule when there are no chunks.
    """
    _check_counts(num_stages, num_microbatches)
    if virtual_stages == 1:
        return build_1f1b(num_stages, num_microbatches, stage_ranks)
    if virtual_stages < 1 or num_stages % virtual_stages:
        raise ValueError(f"build_interleaved_1f1b: num_stages ({num_stages}) must be a positive multiple "
                         f"of virtual_stages ({virtual_stages})")
    num_ranks = num_stages // virtual_stages
    if num_microbatches % num_ranks:
        rounded_up = num_ranks * -(-num_microbatches // num_ranks)
        raise ValueError(f"build_interleaved_1f1b: num_microbatches ({num_microbatches}) must be a multiple "
                         f"of the pipeline size ({num_ranks} ranks); use {rounded_up}")
    rank_ids = _interleaved_rank_ids(stage_ranks, num_stages, num_ranks)
    route = _Route(tuple(tuple(range(num_stages)) for _ in range(num_microbatches)),
                   tuple(tuple(rank_ids[s % num_ranks] for s in range(num_stages))
                         for _ in range(num_microbatches)))
    orders = _interleaved_compute_orders(num_ranks, virtual_stages, num_microbatches, rank_ids)
    actions = _assemble(orders, route)
    check_deadlock(actions, route.paths)
    return actions


def _position_ranks(stage_ranks: Sequence[int], num_stages: int, num_ranks: int, builder: str) -> list[int]:
    """The rank of each pipeline position from ``stage_ranks`` (one per position or one per stage)."""
    if len(stage_ranks) not in (num_ranks, num_stages):
        raise ValueError(f"{builder}: stage_ranks must list {num_ranks} ranks (one per pipeline position) or "
                         f"{num_stages} (one per stage), found {len(stage_ranks)}")
    rank_ids = list(stage_ranks[:num_ranks])
    if len(set(rank_ids)) != num_ranks:
        raise ValueError(f"{builder}: the {num_ranks} pipeline ranks must differ, found {rank_ids}")
    return rank_ids


def _interleaved_rank_ids(stage_ranks: Sequence[int], num_stages: int, num_ranks: int) -> list[int]:
    rank_ids = _position_ranks(stage_ranks, num_stages, num_ranks, "build_interleaved_1f1b")
    misplaced = [s for s in range(len(stage_ranks)) if stage_ranks[s] != rank_ids[s % num_ranks]]
    if misplaced:
        raise ValueError(f"build_interleaved_1f1b: stage s must live on the rank of stage s % {num_ranks}; "
                         f"stages {misplaced} do not ({list(stage_ranks)})")
    return rank_ids


# --------------------------------------------------------------------------------------------
# Zero-bubble schedules: backward split into B (input gradients) and W (weight gradients)
# --------------------------------------------------------------------------------------------

def _with_weight_passes(tasks: Sequence[Task], pending: int) -> list[Task]:
    """``tasks`` (F and whole B) with every B split: after each B, the W of the oldest B whose W has
    not run, once more than ``pending`` W's wait; the W's still waiting at the end run last."""
    out: list[Task] = []
    waiting: deque = deque()
    for task in tasks:
        out.append(task)
        if task[0] == "B":
            waiting.append(task)
            if len(waiting) > pending:
                out.append(("W",) + waiting.popleft()[1:])
    return out + [("W",) + task[1:] for task in waiting]


def build_zb_h1(num_stages: int, num_microbatches: int, stage_ranks: Sequence[int],
                virtual_stages: int = 1) -> dict[int, list[Action]]:
    """ZB-H1 (Qi et al., ICLR 2024, section 3.1): 1F1B's order with split backwards, stage i's W's
    running i places late.

    The first stage runs each W right after its B, as 1F1B does; stage i keeps its i oldest W's
    waiting, so its B's (which the stages before wait for) come earlier and the W's fill the time
    1F1B spends waiting for gradients. With equal F, B and W times the idle time of every rank is
    ``(p-1)(T_F + T_B - T_W)``, a third of 1F1B's ``(p-1)(T_F + T_B + T_W)``, and stage i holds at
    most p microbatches' activations (p - i before their B, up to i after it, waiting for their
    W): 1F1B's peak, which its first stage reaches.
    """
    _require_one_chunk(virtual_stages, "build_zb_h1")
    _check_stage_ranks(stage_ranks, num_stages, "build_zb_h1")
    route = _make_route(_full_paths(num_stages, num_microbatches), stage_ranks, None)
    orders = _path_compute_orders(route, "1f1b", default_in_flight_limits(route.paths, route.ranks))
    orders = {rank: _with_weight_passes(tasks, tasks[0][1]) for rank, tasks in orders.items()}
    actions = _assemble(orders, route)
    check_deadlock(actions, route.paths)
    return actions


def v_stage_positions(num_positions: int) -> list[int]:
    """Where the 2p stages of a V-shaped pipeline live: stage s on position s for s < p, then back,
    stage 2p-1-s on position s (rank 0 holds the first and the last stage)."""
    return list(range(num_positions)) + list(reversed(range(num_positions)))


ZBV_PHASES = (
    ("F0", lambda p, r, m: 2 * (p - r) - 1),
    ("F1 F0", lambda p, r, m: r),
    ("F1 I1 W", lambda p, r, m: p - r),
    ("F0 I0 W F1 I1 W", lambda p, r, m: m - 2 * p + r + 1),
    ("I0 W F1 I1 W", lambda p, r, m: p - r - 1),
    ("I0 I1", lambda p, r, m: r),
    ("I0 W", lambda p, r, m: p - r),
)
"""ZB-V (Qi et al., section 6) as phases of rank r of p over m microbatches: ``(tokens, repeats)``.
``F0``/``F1``: the forward of the next microbatch on the rank's stage on the way down (r) or up
(2p-1-r); ``I0``/``I1``: the next backward there, split (its W waits in a queue); ``B0``/``B1``: the
next whole backward; ``W``: the W of the oldest split backward waiting. Queued W's left at the end
run last. Warm-up fills the V with 2p - 1 - r forwards of the lower chunk interleaved with the upper
one; then the rank alternates F, I, W on its two stages; in the cool-down the W's of the last
backwards fill the bubble."""

DUALPIPEV_PHASES = (
    ("F0", lambda p, r, m: 2 * (p - r - 1)),
    ("F0 F1", lambda p, r, m: r + 1),
    ("I1 W F1", lambda p, r, m: p - r - 1),
    ("F0 B1 F1 B0", lambda p, r, m: m - 2 * p + r + 1),
    ("B1 F1 B0", lambda p, r, m: p - r - 1),
    ("B1 B0", lambda p, r, m: r + 1),
    ("W B0", lambda p, r, m: p - r - 1),
    ("W", lambda p, r, m: r + 1),
)
"""DualPipeV (DeepSeek-V3 report, section 3.2.1; the V-shaped DualPipe) as phases, tokens as in
:data:`ZBV_PHASES`. In the steady phase each forward of one stage is paired with a whole backward of
the rank's other stage (the pair DualPipe overlaps, computation with the other's communication);
the rank's last p backwards are split (their W's are the ``W`` of the last two phases)."""


def _phase_tokens(phases: Sequence, p: int, r: int, m: int) -> list[str]:
    return [token for text, repeats in phases for _ in range(repeats(p, r, m)) for token in text.split()]


def _split_last_backwards(tokens: list[str], count: int) -> list[str]:
    """The last ``count`` whole backwards (``B0``/``B1``) become split ones (``I0``/``I1``)."""
    out = list(tokens)
    for index in reversed(range(len(out))):
        if count and out[index][0] == "B":
            out[index] = "I" + out[index][1]
            count -= 1
    return out


def _v_tasks(tokens: Sequence[str], stages: tuple[int, int], microbatches: int) -> list[Task]:
    """Tasks from phase tokens; microbatches at or beyond ``microbatches`` (phases may assume more) are dropped."""
    nxt: Counter = Counter()
    waiting: deque = deque()
    tasks: list[Task] = []
    for token in tokens:
        if token == "W":
            tasks.append(("W",) + waiting.popleft()[1:])
            continue
        kind, stage = token[0], stages[int(token[1])]
        counter = ("F" if kind == "F" else "B", stage)
        task = ("F" if kind == "F" else "B", stage, nxt[counter])
        nxt[counter] += 1
        tasks.append(task)
        if kind == "I":
            waiting.append(task)
    tasks += [("W",) + task[1:] for task in waiting]
    return [t for t in tasks if t[2] < microbatches]


def _v_rank_ids(stage_ranks: Sequence[int], num_stages: int, builder: str) -> list[int]:
    if num_stages % 2:
        raise ValueError(f"{builder}: a V-shaped pipeline has two stages per rank, so an even number of stages; "
                         f"found {num_stages}")
    num_ranks = num_stages // 2
    rank_ids = _position_ranks(stage_ranks, num_stages, num_ranks, builder)
    expected = [rank_ids[q] for q in v_stage_positions(num_ranks)]
    if len(stage_ranks) == num_stages and list(stage_ranks) != expected:
        raise ValueError(f"{builder}: in a V, stage s lives on the rank of stage {num_stages - 1} - s; expected "
                         f"stage_ranks {expected}, found {list(stage_ranks)}")
    return rank_ids


def _build_v(phases: Sequence, builder: str, num_stages: int, num_microbatches: int,
             stage_ranks: Sequence[int], virtual_stages: int, split_last: bool,
             min_microbatches: Callable[[int], int]) -> dict[int, list[Action]]:
    _check_counts(num_stages, num_microbatches)
    if virtual_stages != 2:
        raise ValueError(f"{builder} runs two stages per rank (virtual_stages=2), found virtual_stages={virtual_stages}")
    rank_ids = _v_rank_ids(stage_ranks, num_stages, builder)
    p = len(rank_ids)
    positions = v_stage_positions(p)
    route = _Route(tuple(tuple(range(num_stages)) for _ in range(num_microbatches)),
                   tuple(tuple(rank_ids[q] for q in positions) for _ in range(num_microbatches)))
    assumed = max(num_microbatches, min_microbatches(p))
    orders = {}
    for r, rank in enumerate(rank_ids):
        tokens = _phase_tokens(phases, p, r, assumed)
        if split_last:
            tokens = _split_last_backwards(tokens, p)
        orders[rank] = _v_tasks(tokens, (r, num_stages - 1 - r), num_microbatches)
    actions = _assemble(orders, route)
    check_deadlock(actions, route.paths)
    return actions


def build_zbv(num_stages: int, num_microbatches: int, stage_ranks: Sequence[int],
              virtual_stages: int = 2) -> dict[int, list[Action]]:
    """ZB-V: 2p stages on p ranks in a V (:func:`v_stage_positions`), every backward split, the phases of
    :data:`ZBV_PHASES`. With equal F, B and W times only the fill of the V stays idle (rank i waits i
    forwards for its first input), and each rank holds at most 2p microbatch-stages of activations,
    the memory of 1F1B's first stage. Fewer than 2p - 1 microbatches run the phases of 2p - 1 without
    the missing ones."""
    return _build_v(ZBV_PHASES, "build_zbv", num_stages, num_microbatches, stage_ranks, virtual_stages,
                    split_last=False, min_microbatches=lambda p: 2 * p - 1)


def build_dualpipev(num_stages: int, num_microbatches: int, stage_ranks: Sequence[int],
                    virtual_stages: int = 2) -> dict[int, list[Action]]:
    """DualPipeV: 2p stages on p ranks in a V, the phases of :data:`DUALPIPEV_PHASES`; needs at least
    2p microbatches (its steady phase pairs the forwards of one wave with the backwards of another)."""
    if num_microbatches < num_stages:
        raise ValueError(f"build_dualpipev: DualPipeV needs at least as many microbatches as stages ({num_stages}), "
                         f"found {num_microbatches}; use microbatches {num_stages} or more")
    return _build_v(DUALPIPEV_PHASES, "build_dualpipev", num_stages, num_microbatches, stage_ranks, virtual_stages,
                    split_last=True, min_microbatches=lambda p: 2 * p)


SCHEDULE_BUILDERS: dict[str, Callable[..., dict[int, list[Action]]]] = {
    "gpipe": build_gpipe,
    "1f1b": build_1f1b,
    "interleaved_1f1b": build_interleaved_1f1b,
    "zb_h1": build_zb_h1,
    "zbv": build_zbv,
    "dualpipev": build_dualpipev,
}
"""Schedule name -> builder, for :func:`build_schedule`."""


def build_schedule(name: str, num_stages: int, num_microbatches: int, stage_ranks: Sequence[int],
                   virtual_stages: int = 1) -> dict[int, list[Action]]:
    """Build the schedule called ``name`` (a key of :data:`SCHEDULE_BUILDERS`)."""
    builder = SCHEDULE_BUILDERS.get(name)
    if builder is None:
        raise ValueError(f"unknown pipeline schedule {name!r}; expected one of {', '.join(SCHEDULE_BUILDERS)}")
    return builder(num_stages, num_microbatches, stage_ranks, virtual_stages)


# --------------------------------------------------------------------------------------------
# The schedules a strategy names
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PipelineSchedule:
    """A schedule as a strategy names it (``"schedule": "zbv"``): its builder and what it needs."""

    name: str
    builder: str
    """Its key in :data:`SCHEDULE_BUILDERS`."""
    stages_per_position: int | None
    """Stages each pipeline position holds; None: the strategy's ``virtual_stages`` (default 2)."""
    v_shape: bool = False
    """Stages placed in a V (:func:`v_stage_positions`) rather than round-robin (stage s on s mod p)."""
    split_backward: bool = False
    """Its ranks run ``W`` actions (backward split into input and weight gradients)."""
    takes_paths: bool = False
    """It orders SkipPipe's microbatch paths (``skip_ratio``)."""


SCHEDULES: dict[str, PipelineSchedule] = {s.name: s for s in (
    PipelineSchedule("gpipe", "gpipe", 1, takes_paths=True),
    PipelineSchedule("1f1b", "1f1b", 1, takes_paths=True),
    PipelineSchedule("interleaved", "interleaved_1f1b", None),
    PipelineSchedule("zb-h1", "zb_h1", 1, split_backward=True),
    PipelineSchedule("zbv", "zbv", 2, v_shape=True, split_backward=True),
    PipelineSchedule("dualpipev", "dualpipev", 2, v_shape=True, split_backward=True),
)}
"""Every schedule a strategy (and the DSL's ``schedule`` statement) may name, by that name."""

SCHEDULE_NAMES = tuple(SCHEDULES)
"""The schedule names, in the order errors and docs list them."""

DEFAULT_VIRTUAL_STAGES = 2
"""Stages per position of the interleaved schedule when the strategy does not say."""


def pipeline_schedule(name: str) -> PipelineSchedule:
    """The schedule a strategy calls ``name``; a ``ValueError`` listing the names otherwise."""
    found = SCHEDULES.get(name)
    if found is None:
        raise ValueError(f"unknown pipeline schedule {name!r}; expected one of {', '.join(SCHEDULE_NAMES)}")
    return found


def stages_per_position(name: str, virtual_stages: int | None = None) -> int:
    """How many stages each position holds under schedule ``name`` (``virtual_stages``: what the strategy
    gave, for the interleaved schedule). A fixed count that ``virtual_stages`` contradicts is an error."""
    fixed = pipeline_schedule(name).stages_per_position
    if fixed is None:
        return int(virtual_stages or DEFAULT_VIRTUAL_STAGES)
    if virtual_stages not in (None, fixed):
        needs = ("needs schedule 'interleaved'" if fixed == 1 else
                 f"does not apply: schedule {name!r} always runs {fixed} stages per position")
        raise ValueError(f"virtual_stages={virtual_stages} {needs}, found schedule {name!r}")
    return fixed


def stage_positions(name: str, num_positions: int, num_stages: int) -> list[int]:
    """The pipeline position of every stage: a V for V-shaped schedules, else stage s on s mod p."""
    if pipeline_schedule(name).v_shape:
        if num_stages != 2 * num_positions:
            raise ValueError(f"schedule {name!r} places 2 stages per position in a V: expected "
                             f"{2 * num_positions} stages on {num_positions} positions, found {num_stages}")
        return v_stage_positions(num_positions)
    return [s % num_positions for s in range(num_stages)]


def build_pipeline_schedule(name: str, num_positions: int, num_stages: int,
                            num_microbatches: int) -> dict[int, list[Action]]:
    """Each position's action list (ranks are the positions 0..p-1) under the schedule a strategy names."""
    spec = pipeline_schedule(name)
    positions = stage_positions(name, num_positions, num_stages)
    return SCHEDULE_BUILDERS[spec.builder](num_stages, num_microbatches, positions, num_stages // num_positions)


# --------------------------------------------------------------------------------------------
# Checking: structure, paths, and send/recv matching
# --------------------------------------------------------------------------------------------

def check_deadlock(actions: Mapping[int, Sequence[Action]], paths: Sequence[Sequence[int]] | None = None,
                   *, channel_capacity: int | None = None) -> list[tuple[int, Action]]:
    """Run every rank's list against the others; return a global execution order.

    Checks first that every (stage, microbatch) has exactly one F and one B, on one rank, F first,
    at most one W (split backward), after its B on that rank, and that each send follows the
    compute that produced its value. With ``paths``, also that
    microbatch m runs F and B on exactly the stages of ``paths[m]`` and that every F/B has its
    input (computed on the rank or received) before it runs. Then simulates the channels (see
    the module docstring: non-blocking sends, in-order matching per (src, dst) channel, at most
    ``channel_capacity`` unreceived messages per channel, None for unbounded, 0 for rendezvous).
    The builders' schedules pass with None; GPipe and 1F1B also with 1, interleaved 1F1B with 2
    (with p = 2 both directions of one rank pair carry activations); 1F1B deadlocks with 0, which
    is why Megatron-LM posts each send together with the next receive.
    Raises :class:`ScheduleDeadlock` naming every blocked rank and what it waits on, or
    :class:`ScheduleError` for a malformed schedule or a mismatched send/recv pair.
    """
    _check_structure(actions)
    if paths is not None:
        _check_against_paths(actions, paths)
    return _ChannelSimulation(actions, channel_capacity).run()


def _check_structure(actions: Mapping[int, Sequence[Action]]) -> None:
    computes: dict[tuple[str, int, int], tuple[int, int]] = {}
    for rank, rank_actions in actions.items():
        done: set[tuple[str, int, int]] = set()
        for index, action in enumerate(rank_actions):
            if not isinstance(action, Action):
                raise ScheduleError(f"rank {rank} action #{index}: expected an Action, found {action!r}")
            if action.is_compute:
                _record_compute(computes, rank, index, action)
                done.add(action.value)
            else:
                _check_transfer(actions, rank, index, action, done)
    _check_forward_backward_pairs(computes)


def _record_compute(computes: dict, rank: int, index: int, action: Action) -> None:
    if action.value in computes:
        first_rank, first_index = computes[action.value]
        raise ScheduleError(f"{action} appears twice: rank {first_rank} action #{first_index} and rank {rank} "
                            f"action #{index}; each (stage, microbatch) runs one forward and one backward "
                            "(and at most one W)")
    computes[action.value] = (rank, index)


def _check_transfer(actions: Mapping[int, Sequence[Action]], rank: int, index: int, action: Action,
                    done: set) -> None:
    if action.peer == rank or action.peer not in actions:
        raise ScheduleError(f"rank {rank} action #{index} {action}: the peer must be another rank of the "
                            f"schedule ({sorted(actions)}), found r{action.peer}")
    if action.is_send and action.value not in done:
        raise ScheduleError(f"rank {rank} action #{index} {action} sends a value that rank {rank} has not "
                            f"computed before it; expected {action.direction}{action.microbatch}@s{action.stage} "
                            "earlier on the same rank")


def _check_forward_backward_pairs(computes: Mapping[tuple[str, int, int], tuple[int, int]]) -> None:
    """Every F has its B on the same rank after it; a W (split backward) follows its B there."""
    for (kind, stage, microbatch), (rank, index) in sorted(computes.items()):
        other = ("F" if kind == "B" else "B", stage, microbatch)
        label = f"{other[0]}{microbatch}@s{stage}"
        if other not in computes:
            if kind == "W":
                raise ScheduleError(f"W{microbatch}@s{stage} on rank {rank} has no {label}; a W computes the weight "
                                    "gradients of a split backward, so the B before it must exist")
            raise ScheduleError(f"{kind}{microbatch}@s{stage} on rank {rank} has no matching {label}; "
                                "every stage a microbatch visits needs both its forward and its backward")
        other_rank, other_index = computes[other]
        if other_rank != rank:
            raise ScheduleError(f"{kind}{microbatch}@s{stage} runs on rank {rank} but {label} on rank "
                                f"{other_rank}; a backward needs the activations its forward kept on its rank")
        if kind != "F" and index < other_index:
            raise ScheduleError(f"rank {rank} runs {kind}{microbatch}@s{stage} (action #{index}) before "
                                f"{label} (action #{other_index}); a W follows its B, and a B its F")


def _check_against_paths(actions: Mapping[int, Sequence[Action]], paths: Sequence[Sequence[int]]) -> None:
    expected = {(stage, m) for m, path in enumerate(paths) for stage in path}
    found = {(a.stage, a.microbatch) for acts in actions.values() for a in acts if a.kind == "F"}
    if expected != found:
        missing = sorted((m, s) for s, m in expected - found)[:5]
        extra = sorted((m, s) for s, m in found - expected)[:5]
        raise ScheduleError("the computes do not follow the microbatch paths: missing (microbatch, stage) "
                            f"{missing}, unexpected {extra} (first five of each)")
    for rank, rank_actions in actions.items():
        _check_inputs_present(rank, rank_actions, paths)


def _check_inputs_present(rank: int, rank_actions: Sequence[Action], paths: Sequence[Sequence[int]]) -> None:
    available: set[tuple[str, int, int]] = set()
    for index, action in enumerate(rank_actions):
        if action.is_compute and action.kind != "W":  # a W reads only what its B kept on the rank
            path = paths[action.microbatch]
            position = path.index(action.stage) + (-1 if action.kind == "F" else 1)
            if 0 <= position < len(path) and (action.kind, path[position], action.microbatch) not in available:
                what = "activation" if action.kind == "F" else "gradient"
                raise ScheduleError(f"rank {rank} action #{index} {action} runs before the {what} of stage "
                                    f"{path[position]} (microbatch {action.microbatch}, path {list(path)}) "
                                    f"reaches rank {rank}; receive or compute it first")
        if action.is_compute or action.is_recv:
            available.add(action.value)


class _ChannelSimulation:
    """Steps every rank as far as it can go until all finish or none can move."""

    def __init__(self, actions: Mapping[int, Sequence[Action]], capacity: int | None):
        if capacity is not None and capacity < 0:
            raise ValueError(f"channel_capacity must be None or >= 0, found {capacity}")
        self.actions = actions
        self.capacity = capacity
        self.next_index = {rank: 0 for rank in actions}
        self.channels: dict[tuple[int, int], deque] = defaultdict(deque)
        self.order: list[tuple[int, Action]] = []

    def run(self) -> list[tuple[int, Action]]:
        progress = True
        while progress:
            progress = False
            for rank in sorted(self.actions):
                while self._step(rank):
                    progress = True
        blocked = [rank for rank in sorted(self.actions) if self._current(rank) is not None]
        if blocked:
            raise ScheduleDeadlock(self._describe_deadlock(blocked))
        self._check_drained()
        return self.order

    def _current(self, rank: int) -> Action | None:
        index = self.next_index[rank]
        return self.actions[rank][index] if index < len(self.actions[rank]) else None

    def _advance(self, rank: int, action: Action) -> None:
        self.order.append((rank, action))
        self.next_index[rank] += 1

    def _step(self, rank: int) -> bool:
        action = self._current(rank)
        if action is None:
            return False
        if action.is_compute:
            self._advance(rank, action)
            return True
        return self._try_send(rank, action) if action.is_send else self._try_receive(rank, action)

    def _try_send(self, rank: int, action: Action) -> bool:
        queue = self.channels[(rank, action.peer)]
        if self.capacity is None or len(queue) < self.capacity:
            queue.append((rank, self.next_index[rank], action))
            self._advance(rank, action)
            return True
        waiting = self._current(action.peer)
        if self.capacity == 0 and waiting is not None and waiting.is_recv and waiting.peer == rank:
            queue.append((rank, self.next_index[rank], action))  # rendezvous: both sides move together
            self._advance(rank, action)
            return self._try_receive(action.peer, waiting)
        return False

    def _try_receive(self, rank: int, action: Action) -> bool:
        queue = self.channels[(action.peer, rank)]
        if not queue:
            return False
        sender, send_index, send = queue.popleft()
        if send.value != action.value:
            raise ScheduleError(
                f"rank {rank} action #{self.next_index[rank]} {action} is matched, in order on channel "
                f"r{sender}->r{rank}, with rank {sender} action #{send_index} {send}; a channel delivers "
                f"messages in the order they were sent, so reorder the receives on rank {rank} or the "
                f"sends on rank {sender}")
        self._advance(rank, action)
        return True

    def _describe_deadlock(self, blocked: list[int]) -> str:
        lines = [f"schedule deadlocks: {len(blocked)} rank(s) blocked, "
                 f"{len(self.order)} of {sum(len(a) for a in self.actions.values())} actions ran"]
        for rank in blocked:
            lines.append(f"  rank {rank} waits at action #{self.next_index[rank]} "
                         f"{self._current(rank)}: {self._blocked_reason(rank)}")
        hint = ("every blocked rank waits on another blocked or finished rank: reorder the sends and "
                "receives on these ranks, or add the missing send or receive")
        if self.capacity is not None:
            hint += f", or allow more than {self.capacity} unreceived message(s) per channel"
        lines.append(hint)
        return "\n".join(lines)

    def _blocked_reason(self, rank: int) -> str:
        action = self._current(rank)
        peer_state = self._peer_state(action.peer)
        if action.is_recv:
            return f"no message from rank {action.peer} on channel r{action.peer}->r{rank} ({peer_state})"
        if self.capacity == 0:
            return f"rendezvous send, but rank {action.peer} is not at a receive from rank {rank} ({peer_state})"
        return (f"channel r{rank}->r{action.peer} already holds {self.capacity} unreceived message(s), "
                f"its capacity ({peer_state})")

    def _peer_state(self, peer: int) -> str:
        waiting = self._current(peer)
        if waiting is None:
            return f"rank {peer} has finished"
        return f"rank {peer} is at action #{self.next_index[peer]} {waiting}"

    def _check_drained(self) -> None:
        for (sender, receiver), queue in sorted(self.channels.items()):
            if queue:
                _, index, send = queue[0]
                raise ScheduleError(f"rank {sender} action #{index} {send} is never received: rank {receiver} "
                                    f"finished with {len(queue)} message(s) left on channel "
                                    f"r{sender}->r{receiver}; add the matching receive(s) or drop the send(s)")
