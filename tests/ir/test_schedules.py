"""Pipeline schedule builders and the deadlock checker (ir/schedules.py), their timing (cost/timeline.py).

The zero-bubble schedules' bubble is checked against the analytic value of Qi et al., "Zero Bubble Pipeline
Parallelism" (ICLR 2024), section 3.1 (see test_zb_h1_bubble_is_the_analytic_one_with_equal_f_b_w_times)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cost.timeline import peak_in_flight, simulate
from ir.ops.pipeline_ops import ACTION_KINDS, COMPUTE_KINDS, Action, ActionSyntaxError, format_actions, parse_actions
from ir.schedules import (
    ScheduleDeadlock,
    ScheduleError,
    _assemble,
    _Route,
    build_1f1b,
    build_dualpipev,
    build_gpipe,
    build_interleaved_1f1b,
    build_path_schedule,
    build_pipeline_schedule,
    build_schedule,
    build_zb_h1,
    build_zbv,
    check_deadlock,
    default_in_flight_limits,
    pipeline_schedule,
    stage_positions,
    stages_per_position,
)

PIPELINE_SIZES = (2, 3, 4)


def _microbatch_counts(p: int, multiple_of_p: bool = False) -> list[int]:
    counts = sorted({p, 2 * p, 8})
    return [m for m in counts if not multiple_of_p or m % p == 0]


def _plain_cases() -> list[tuple[str, int, int, int]]:
    cases = [(name, p, m, 1) for name in ("gpipe", "1f1b") for p in PIPELINE_SIZES for m in _microbatch_counts(p)]
    cases += [("interleaved_1f1b", p, m, 2) for p in PIPELINE_SIZES for m in _microbatch_counts(p, True)]
    return cases


def _build(name: str, p: int, m: int, v: int) -> dict[int, list[Action]]:
    return build_schedule(name, p * v, m, list(range(p)), v)


def _computes(actions: list[Action]) -> list[str]:
    return [str(a) for a in actions if a.is_compute]


# ------------------------------------------------------------------ actions and their text


@pytest.mark.parametrize("kind", ACTION_KINDS)
def test_action_text_round_trips(kind):
    peer = None if kind in COMPUTE_KINDS else 2
    action = Action(kind, 3, 5, peer)
    assert Action.parse(str(action)) == action


def test_action_text_forms():
    assert str(Action("F", 1, 3)) == "F3@s1"
    assert str(Action("SEND_F", 1, 3, 2)) == "SEND_F3@s1->r2"
    assert str(Action("RECV_B", 2, 0, 1)) == "RECV_B0@s2<-r1"


@pytest.mark.parametrize("text, fragment", [
    ("G3@s1", "expected an action"),
    ("F3@s1->r2", "takes no peer"),
    ("SEND_F3@s1<-r2", "takes '->r<rank>'"),
    ("RECV_B3@s1", "takes '<-r<rank>'"),
])
def test_action_parse_errors_say_what_was_expected(text, fragment):
    with pytest.raises(ActionSyntaxError, match=fragment):
        Action.parse(text)


def test_action_rejects_a_peer_on_compute_and_none_on_send():
    with pytest.raises(ValueError, match="takes no peer"):
        Action("F", 0, 0, 1)
    with pytest.raises(ValueError, match="takes a peer rank"):
        Action("SEND_F", 0, 0)


def test_action_lists_round_trip_through_text():
    schedule = build_interleaved_1f1b(4, 4, [0, 1], 2)
    assert parse_actions(format_actions(schedule)) == schedule


def test_action_list_parse_error_names_the_line():
    with pytest.raises(ActionSyntaxError, match="line 2: .*'F0@x1'"):
        parse_actions("r0: F0@s0 B0@s0\nr1: F0@x1")


# ------------------------------------------------------------------ builders


@pytest.mark.parametrize("name, p, m, v", _plain_cases())
def test_every_builder_passes_the_deadlock_check(name, p, m, v):
    schedule = _build(name, p, m, v)
    order = check_deadlock(schedule, [list(range(p * v))] * m)
    assert len(order) == sum(len(a) for a in schedule.values())
    assert sorted(schedule) == list(range(p))


@pytest.mark.parametrize("name, p, m, v", [c for c in _plain_cases() if c[1] == 4])
def test_each_rank_sends_activations_forward_and_gradients_back(name, p, m, v):
    schedule = _build(name, p, m, v)
    for rank, actions in schedule.items():
        for action in actions:
            if action.kind == "SEND_F":
                assert action.peer == (action.stage + 1) % p
            if action.kind == "SEND_B":
                assert action.peer == (action.stage - 1) % p
        assert sum(a.is_send for a in actions) > 0


def _megatron_1f1b_order(p: int, m: int, position: int) -> list[str]:
    """Megatron-LM's non-interleaved loop, written out: warm-up, steady 1F1B, cool-down."""
    warmup = min(p - position - 1, m)
    order = [f"F{k}@s{position}" for k in range(warmup)]
    for k in range(m - warmup):
        order += [f"F{warmup + k}@s{position}", f"B{k}@s{position}"]
    return order + [f"B{k}@s{position}" for k in range(m - warmup, m)]


@pytest.mark.parametrize("p, m", [(p, m) for p in PIPELINE_SIZES for m in _microbatch_counts(p)] + [(4, 2)])
def test_1f1b_matches_megatron_order(p, m):
    schedule = build_1f1b(p, m, list(range(p)))
    for rank in range(p):
        assert _computes(schedule[rank]) == _megatron_1f1b_order(p, m, rank)


def test_gpipe_runs_all_forwards_then_all_backwards():
    schedule = build_gpipe(3, 4, [0, 1, 2])
    assert _computes(schedule[1]) == [f"F{k}@s1" for k in range(4)] + [f"B{k}@s1" for k in range(4)]


def test_stage_ranks_place_stages_on_any_rank_ids():
    schedule = build_1f1b(3, 2, [7, 4, 9])
    assert sorted(schedule) == [4, 7, 9]
    assert Action("SEND_F", 0, 0, 4) in schedule[7]
    assert Action("RECV_B", 2, 1, 9) in schedule[4]


def test_nothing_is_sent_between_stages_on_one_rank():
    schedule = build_1f1b(4, 4, [0, 0, 1, 1])
    transfers = {(a.kind, a.stage) for actions in schedule.values() for a in actions if a.is_send}
    assert transfers == {("SEND_F", 1), ("SEND_B", 2)}
    check_deadlock(schedule, [[0, 1, 2, 3]] * 4)


def test_interleaved_places_stage_s_on_rank_s_mod_p_and_groups_chunks():
    schedule = build_interleaved_1f1b(6, 6, [0, 1, 2], 2)
    for rank, actions in schedule.items():
        assert {a.stage % 3 for a in actions if a.is_compute} == {rank}
    # rank 0 warms up with chunk 0 of microbatches 0..p-1, then chunk 1 of the same ones
    assert _computes(schedule[0])[:6] == ["F0@s0", "F1@s0", "F2@s0", "F0@s3", "F1@s3", "F2@s3"]


def test_interleaved_accepts_one_rank_per_stage_when_consistent():
    assert build_interleaved_1f1b(4, 4, [5, 6, 5, 6], 2) == build_interleaved_1f1b(4, 4, [5, 6], 2)
    with pytest.raises(ValueError, match="stage s must live on the rank of stage s % 2"):
        build_interleaved_1f1b(4, 4, [5, 6, 6, 5], 2)


def test_interleaved_with_one_chunk_is_plain_1f1b():
    assert build_schedule("interleaved_1f1b", 3, 6, [0, 1, 2]) == build_1f1b(3, 6, [0, 1, 2])


def test_interleaved_needs_two_buffered_sends_when_two_ranks_trade_activations():
    schedule = build_interleaved_1f1b(4, 4, [0, 1], 2)
    with pytest.raises(ScheduleDeadlock, match="already holds 1 unreceived message"):
        check_deadlock(schedule, channel_capacity=1)
    check_deadlock(schedule, channel_capacity=2)
    check_deadlock(build_interleaved_1f1b(8, 8, [0, 1, 2, 3], 2), channel_capacity=1)


def test_build_schedule_rejects_unknown_names_listing_the_valid_ones():
    with pytest.raises(ValueError, match="'zero_bubble'.*gpipe, 1f1b, interleaved_1f1b"):
        build_schedule("zero_bubble", 4, 4, [0, 1, 2, 3])


@pytest.mark.parametrize("call, fragment", [
    (lambda: build_1f1b(4, 4, [0, 1, 2, 3], virtual_stages=2), "use build_interleaved_1f1b"),
    (lambda: build_gpipe(4, 4, [0, 1, 2]), "one rank per stage \\(4\\), found 3"),
    (lambda: build_interleaved_1f1b(4, 3, [0, 1], 2), "multiple of the pipeline size \\(2 ranks\\); use 4"),
    (lambda: build_interleaved_1f1b(5, 4, [0, 1], 2), "positive multiple of virtual_stages"),
    (lambda: build_1f1b(0, 4, []), "at least one stage"),
    (lambda: build_path_schedule([[0, 1, 0]], [0, 1]), "visits stage\\(s\\) \\[0\\] twice"),
    (lambda: build_path_schedule([[0, 1]], [0, 1], "zb"), "unknown path schedule order 'zb'"),
    (lambda: build_path_schedule([[0, 1]], [0, 1], "gpipe", max_in_flight=1), "takes no max_in_flight"),
])
def test_builder_argument_errors(call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call()


# ------------------------------------------------------------------ general paths


def test_path_schedule_skips_and_reorders_stages():
    paths = [[0, 1, 2, 3], [0, 2, 3], [0, 2, 1, 3], [0, 3]]
    schedule = build_path_schedule(paths, [0, 1, 2, 3])
    check_deadlock(schedule, paths)
    assert Action("SEND_F", 0, 1, 2) in schedule[0]   # microbatch 1 skips stage 1
    assert Action("SEND_B", 1, 2, 2) in schedule[1]   # microbatch 2 goes back to stage 2
    assert Action("SEND_F", 0, 3, 3) in schedule[0]


def test_path_schedule_with_replicated_stage():
    paths = [[0, 1, 2]] * 4
    visit_ranks = [[0, 1 if m % 2 == 0 else 3, 2] for m in range(4)]
    schedule = build_path_schedule(paths, None, visit_ranks=visit_ranks)
    assert {a.microbatch for a in schedule[3] if a.kind == "F"} == {1, 3}
    check_deadlock(schedule, paths)


def test_default_window_is_megatron_warmup_on_a_plain_pipeline_and_never_grows_along_a_path():
    assert default_in_flight_limits([[0, 1, 2, 3]] * 2, [[0, 1, 2, 3]] * 2) == {0: 4, 1: 3, 2: 2, 3: 1}
    paths = [[0, 2, 1, 3], [0, 1, 3]]
    limits = default_in_flight_limits(paths, paths)
    for path in paths:
        assert [limits[s] for s in path] == sorted((limits[s] for s in path), reverse=True)


@st.composite
def _skip_paths(draw):
    num_stages = draw(st.integers(3, 7))
    paths = []
    for _ in range(draw(st.integers(1, 9))):
        middle = draw(st.lists(st.integers(1, num_stages - 2), unique=True, max_size=num_stages - 2))
        path = [0, *sorted(middle), num_stages - 1]
        for _ in range(draw(st.integers(0, 2))):
            if len(path) > 3:
                i = draw(st.integers(1, len(path) - 3))
                path[i], path[i + 1] = path[i + 1], path[i]
        paths.append(path)
    return num_stages, paths


@settings(max_examples=60, deadline=None)
@given(_skip_paths(), st.sampled_from(["1f1b", "gpipe"]), st.sampled_from([None, 1, 2]))
def test_any_skip_paths_give_a_valid_schedule(case, order, cap):
    num_stages, paths = case
    schedule = build_path_schedule(paths, list(range(num_stages)), order,
                                   max_in_flight=cap if order == "1f1b" else None)
    check_deadlock(schedule, paths)
    if cap is not None and order == "1f1b":
        assert max(peak_in_flight(schedule).values()) <= cap


# ------------------------------------------------------------------ broken schedules


def _replace(schedule, rank, index, new):
    broken = {r: list(a) for r, a in schedule.items()}
    if new is None:
        del broken[rank][index]
    else:
        broken[rank][index] = new
    return broken


def test_dropped_send_is_a_deadlock_naming_the_blocked_rank():
    schedule = build_1f1b(3, 3, [0, 1, 2])
    # the last activation on channel r0->r1: dropping an earlier one would shift the pairing instead
    index = schedule[0].index(Action("SEND_F", 0, 2, 1))
    with pytest.raises(ScheduleDeadlock, match=r"rank 1 waits at action #\d+ RECV_F2@s0<-r0: no message from rank 0"):
        check_deadlock(_replace(schedule, 0, index, None))


def test_receives_swapped_across_channels_deadlock_and_every_blocked_rank_is_named():
    schedule = build_gpipe(3, 2, [0, 1, 2])
    rank1 = list(schedule[1])
    first_forward, first_backward = rank1.index(Action("RECV_F", 0, 0, 0)), rank1.index(Action("RECV_B", 2, 0, 2))
    rank1[first_forward], rank1[first_backward] = rank1[first_backward], rank1[first_forward]
    broken = {**schedule, 1: rank1}
    with pytest.raises(ScheduleDeadlock) as error:
        check_deadlock(broken)
    message = str(error.value)
    assert "rank 1 waits at action #0 RECV_B0@s2<-r2" in message
    assert "rank 2 waits at action #0 RECV_F0@s1<-r1" in message
    assert "rank 0 waits at action #4 RECV_B0@s1<-r1" in message  # after its forwards, on rank 1


def test_receives_swapped_on_one_channel_are_a_mismatch():
    schedule = build_gpipe(2, 2, [0, 1])
    rank1 = list(schedule[1])
    a, b = rank1.index(Action("RECV_F", 0, 0, 0)), rank1.index(Action("RECV_F", 0, 1, 0))
    rank1[a], rank1[b] = rank1[b], rank1[a]
    expected = "RECV_F1@s0<-r0 is matched, in order on channel r0->r1, with .*SEND_F0@s0->r1"
    with pytest.raises(ScheduleError, match=expected):
        check_deadlock({**schedule, 1: rank1})


def test_moving_a_receive_after_its_consumer_is_caught_with_paths():
    schedule = build_gpipe(2, 1, [0, 1])
    rank1 = list(schedule[1])
    assert rank1[:2] == [Action("RECV_F", 0, 0, 0), Action("F", 1, 0)]
    rank1[0], rank1[1] = rank1[1], rank1[0]
    with pytest.raises(ScheduleError, match="F0@s1 runs before the activation of stage 0"):
        check_deadlock({**schedule, 1: rank1}, [[0, 1]])


@pytest.mark.parametrize("mutate, fragment", [
    (lambda s: {**s, 0: s[0] + [Action("F", 0, 0)]}, "F0@s0 appears twice"),
    (lambda s: {**s, 0: [a for a in s[0] if str(a) != "B1@s0"]}, "F1@s0 on rank 0 has no matching B1@s0"),
    (lambda s: {**s, 0: [Action("B", 0, 0)] + [a for a in s[0] if str(a) != "B0@s0"]}, "runs B0@s0 .* before"),
    (lambda s: {**s, 0: s[0] + [Action("SEND_F", 0, 0, 1)]}, "SEND_F0@s0->r1 is never received"),
    (lambda s: {**s, 0: [Action("SEND_B", 0, 0, 1)] + s[0]}, "sends a value that rank 0 has not computed"),
    (lambda s: {**s, 0: s[0] + [Action("SEND_F", 0, 0, 5)]}, "the peer must be another rank"),
])
def test_malformed_schedules_are_rejected(mutate, fragment):
    schedule = build_gpipe(2, 2, [0, 1])
    with pytest.raises(ScheduleError, match=fragment):
        check_deadlock(mutate(schedule))


def test_paths_that_do_not_match_the_computes_are_rejected():
    with pytest.raises(ScheduleError, match=r"missing \(microbatch, stage\) \[\(1, 2\)\]"):
        check_deadlock(build_gpipe(2, 2, [0, 1]), [[0, 1], [0, 1, 2]])


def test_1f1b_needs_buffered_sends_but_gpipe_and_1f1b_fit_in_one_slot():
    """Megatron batches each send with the next receive; a rendezvous send deadlocks 1F1B."""
    schedule = build_1f1b(3, 6, [0, 1, 2])
    with pytest.raises(ScheduleDeadlock, match="rendezvous send"):
        check_deadlock(schedule, channel_capacity=0)
    check_deadlock(schedule, channel_capacity=1)
    check_deadlock(build_gpipe(3, 6, [0, 1, 2]), channel_capacity=1)
    check_deadlock(build_gpipe(3, 6, [0, 1, 2]), channel_capacity=0)


def test_global_order_puts_every_receive_after_its_send():
    order = check_deadlock(build_interleaved_1f1b(6, 6, [0, 1, 2], 2))
    sent = set()
    for rank, action in order:
        if action.is_send:
            sent.add((rank, action.peer, action.value))
        if action.is_recv:
            assert (action.peer, rank, action.value) in sent


# ------------------------------------------------------------------ timing


@pytest.mark.parametrize("name, p, m, v", _plain_cases())
def test_bubble_fraction_matches_the_closed_forms(name, p, m, v):
    timeline = simulate(_build(name, p, m, v), fwd_time=1.0 / v, bwd_time=2.0 / v)
    expected = (p - 1) / (v * m + p - 1)
    assert timeline.bubble_fraction == pytest.approx(expected, abs=0.01)


def test_interleaving_shrinks_the_bubble():
    plain = simulate(build_1f1b(4, 8, [0, 1, 2, 3]), 1.0, 2.0)
    interleaved = simulate(build_interleaved_1f1b(8, 8, [0, 1, 2, 3], 2), 0.5, 1.0)
    assert interleaved.makespan < plain.makespan
    assert interleaved.bubble_fraction < plain.bubble_fraction


def test_simulate_adds_communication_and_link_queueing():
    one = build_gpipe(2, 1, [0, 1])
    assert simulate(one, 1.0, 2.0, comm_time=0.5).makespan == pytest.approx(1 + 0.5 + 1 + 2 + 0.5 + 2)
    # two activations leave rank 0 at t=1 and t=2; each holds the link 3 s, so the second arrives at 7
    two = build_gpipe(2, 2, [0, 1])
    timeline = simulate(two, 1.0, 0.0, comm_time=lambda src, dst: 3.0, link_busy_time=3.0)
    second_forward = next(e for e in timeline.events[1] if str(e.action) == "F1@s1")
    assert second_forward.start_s == pytest.approx(1 + 3 + 3)


def test_simulate_takes_per_stage_times_and_names_a_missing_stage():
    schedule = build_gpipe(2, 1, [0, 1])
    assert simulate(schedule, {0: 1.0, 1: 3.0}, {0: 2.0, 1: 6.0}).makespan == pytest.approx(12.0)
    with pytest.raises(ValueError, match="fwd_time has no entry for stage 1"):
        simulate(schedule, {0: 1.0}, 1.0)


@pytest.mark.parametrize("p, m", [(p, m) for p in PIPELINE_SIZES for m in _microbatch_counts(p)])
def test_1f1b_keeps_at_most_p_in_flight_and_gpipe_all(p, m):
    peaks = peak_in_flight(build_1f1b(p, m, list(range(p))))
    assert peaks[0] == min(p, m)
    assert all(peaks[rank] == min(p - rank, m) for rank in range(p))
    assert peak_in_flight(build_gpipe(p, m, list(range(p))))[0] == m


# ------------------------------------------------------------------ zero-bubble schedules (split backward)

ZB_CASES = [(name, p, m) for name in ("zb-h1", "zbv", "dualpipev") for p in (1, 2, 3, 4) for m in (1, 2, 3, 8, 9)
            if name != "dualpipev" or m >= 2 * p]


def _stage_count(name: str, p: int) -> int:
    return p * stages_per_position(name)


@pytest.mark.parametrize("name, p, m", ZB_CASES)
def test_zero_bubble_schedules_split_every_backward_once_and_pass_the_deadlock_check(name, p, m):
    stages = _stage_count(name, p)
    schedule = build_pipeline_schedule(name, p, stages, m)
    check_deadlock(schedule, [list(range(stages))] * m)
    check_deadlock(schedule, channel_capacity=2)
    positions = stage_positions(name, p, stages)
    split = 0
    for rank, actions in schedule.items():
        index = {(a.kind, a.stage, a.microbatch): i for i, a in enumerate(actions) if a.is_compute}
        for kind, stage, microbatch in index:
            assert positions[stage] == rank
            if kind == "W":
                split += 1
                assert index[("B", stage, microbatch)] < index[("W", stage, microbatch)]
    # ZB-H1 and ZB-V split every backward; DualPipeV those of its warm-up and the last p of each rank
    assert split == (stages * m if name != "dualpipev" else sum(2 * p - r - 1 for r in range(p)))


def test_the_v_puts_the_first_and_the_last_stage_on_rank_zero():
    assert stage_positions("zbv", 3, 6) == [0, 1, 2, 2, 1, 0]
    assert stage_positions("dualpipev", 2, 4) == [0, 1, 1, 0]
    assert stage_positions("interleaved", 2, 4) == [0, 1, 0, 1]
    schedule = build_zbv(4, 4, [0, 1])
    # rank 1 runs the turn of the V (stages 1 and 2) without a transfer; ranks trade both ways
    transfers = {(a.kind, a.stage, a.peer) for actions in schedule.values() for a in actions if a.is_send}
    assert transfers == {("SEND_F", 0, 1), ("SEND_F", 2, 0), ("SEND_B", 3, 1), ("SEND_B", 1, 0)}


def test_zb_h1_delays_the_weight_passes_of_later_stages():
    schedule = build_zb_h1(4, 8, [0, 1, 2, 3])
    assert _computes(schedule[0])[:7] == ["F0@s0", "F1@s0", "F2@s0", "F3@s0", "B0@s0", "W0@s0", "F4@s0"]
    assert _computes(schedule[3])[:10] == ["F0@s3", "B0@s3", "F1@s3", "B1@s3", "F2@s3", "B2@s3", "F3@s3", "B3@s3",
                                            "W0@s3", "F4@s3"]


@pytest.mark.parametrize("p, m", [(4, 8), (2, 8), (4, 16), (3, 5)])
def test_zb_h1_bubble_is_the_analytic_one_with_equal_f_b_w_times(p, m):
    """Qi et al., "Zero Bubble Pipeline Parallelism" (ICLR 2024), section 3.1: with T_F = T_B = T_W, ZB-H1
    leaves ``(p - 1)(T_F + T_B - T_W)`` idle per rank beside ``m (T_F + T_B + T_W)`` of work, so its bubble
    fraction is ``(p - 1) / (3m + p - 1)`` (p=4, m=8: 1/9, about 11.1%), a third of 1F1B's
    ``3(p - 1) / (3m + 3(p - 1))`` (27.3%)."""
    timeline = simulate(build_pipeline_schedule("zb-h1", p, p, m), 1.0, 2.0, weight_time=1.0)
    analytic = (p - 1) / (3 * m + p - 1)
    assert abs(timeline.bubble_fraction - analytic) < 0.01
    one_f_one_b = simulate(build_pipeline_schedule("1f1b", p, p, m), 1.0, 2.0)
    assert one_f_one_b.bubble_fraction == pytest.approx(3 * (p - 1) / (3 * m + 3 * (p - 1)), abs=0.01)


@pytest.mark.parametrize("name", ["zbv", "dualpipev"])
@pytest.mark.parametrize("p, m", [(2, 8), (4, 8), (4, 16)])
def test_v_schedules_idle_only_while_the_v_fills(name, p, m):
    """With equal F, B and W times per stage (half a rank's layers each), rank p-1 gets its first input
    after p - 1 forwards and then never waits: the step is ``6m + p - 1`` units."""
    timeline = simulate(build_pipeline_schedule(name, p, 2 * p, m), 1.0, 2.0, weight_time=1.0)
    assert timeline.makespan == pytest.approx(6 * m + p - 1)


@pytest.mark.parametrize("name, p, m", [("zb-h1", 4, 8), ("zbv", 4, 8), ("dualpipev", 4, 8), ("zb-h1", 3, 2)])
def test_zero_bubble_memory_stays_at_the_1f1b_peak(name, p, m):
    """1F1B's first stage holds min(p, m) microbatches of a rank's layers. ZB-H1 holds as many on every rank
    (counting those waiting for their W); the V shapes hold up to 2p stage-microbatches of half the layers."""
    schedule = build_pipeline_schedule(name, p, _stage_count(name, p), m)
    if name == "zb-h1":
        assert max(peak_in_flight(schedule).values()) == min(p, m)
        return
    for actions in schedule.values():
        pending = peak = 0
        last = {a.value[1:]: a.kind for a in actions if a.kind in ("B", "W")}
        for a in actions:
            pending += (a.kind == "F") - (a.is_compute and a.kind != "F" and last[a.value[1:]] == a.kind)
            peak = max(peak, pending)
        assert peak <= 2 * p + (name == "dualpipev")


def test_zbv_is_never_slower_than_torch_pipelinings_order_on_these_times():
    """torch.distributed.pipelining's ZB-V order for p=2, m=4 (read from ScheduleZBVZeroBubble, its B/W
    and I/W actions as our B/W), timed beside ours under unequal F, B, W times."""
    theirs = {0: "F0a F1a F2a F0b B0b W0b F1b B1b W1b F3a B0a W0a F2b B2b W2b B1a W1a F3b B3b W3b B2a W2a B3a W3a",
              1: "F0a F0b F1a F1b B0b W0b F2a B0a W0a F2b B1b W1b F3a B1a W1a F3b B2b W2b B2a B3b B3a W2a W3b W3a"}
    ours = build_pipeline_schedule("zbv", 2, 4, 4)
    stage = {0: {"a": 0, "b": 3}, 1: {"a": 1, "b": 2}}
    tasks = {r: [Action(t[0], stage[r][t[-1]], int(t[1:-1])) for t in text.split()] for r, text in theirs.items()}
    route = _Route(tuple((0, 1, 2, 3) for _ in range(4)), tuple((0, 1, 1, 0) for _ in range(4)))
    reference = _assemble({r: [(a.kind, a.stage, a.microbatch) for a in acts] for r, acts in tasks.items()}, route)
    for fwd, bwd, weight in [(1, 2, 1), (2, 3, 1), (1, 3, 1), (2, 5, 2), (1, 3, 2), (3, 3, 1)]:
        assert simulate(ours, fwd, bwd, weight_time=weight).makespan <= \
            simulate(reference, fwd, bwd, weight_time=weight).makespan + 1e-9


def test_split_backward_mistakes_are_named():
    good = build_zb_h1(2, 2, [0, 1])
    late = {r: list(a) for r, a in good.items()}
    w = next(a for a in late[1] if a.kind == "W")
    late[1].remove(w)
    late[1].insert(0, w)
    with pytest.raises(ScheduleError, match=r"rank 1 runs W\d@s1 .* before B\d@s1"):
        check_deadlock(late)
    orphan = {r: list(a) for r, a in good.items()}
    orphan[0].append(Action("W", 0, 5))
    with pytest.raises(ScheduleError, match="W5@s0 on rank 0 has no B5@s0"):
        check_deadlock(orphan)
    twice = {r: list(a) for r, a in good.items()}
    twice[0].append(Action("W", 0, 0))
    with pytest.raises(ScheduleError, match="W0@s0 appears twice"):
        check_deadlock(twice)
    with pytest.raises(ValueError, match="give weight_time"):
        simulate(good, 1.0, 2.0)


@pytest.mark.parametrize("call, fragment", [
    (lambda: build_dualpipev(4, 3, [0, 1]), "at least as many microbatches as stages \\(4\\), found 3"),
    (lambda: build_zbv(3, 4, [0, 1]), "an even number of stages; found 3"),
    (lambda: build_zbv(4, 4, [0, 1, 0, 1]), "expected stage_ranks \\[0, 1, 1, 0\\]"),
    (lambda: build_zbv(4, 4, [0, 1], virtual_stages=1), "two stages per rank"),
    (lambda: build_zb_h1(4, 4, [0, 1, 2, 3], virtual_stages=2), "use build_interleaved_1f1b"),
    (lambda: stages_per_position("zbv", 3), "virtual_stages=3 does not apply: schedule 'zbv' always runs 2"),
    (lambda: stages_per_position("1f1b", 2), "virtual_stages=2 needs schedule 'interleaved'"),
    (lambda: pipeline_schedule("zero-bubble"), "expected one of gpipe, 1f1b, interleaved, zb-h1, zbv, dualpipev"),
])
def test_zero_bubble_argument_errors(call, fragment):
    with pytest.raises(ValueError, match=fragment):
        call()
