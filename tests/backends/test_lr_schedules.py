"""The learning-rate schedules of emitted programs (``backends/runtime/controls.py``, in this process): linear
warmup, then constant or a cosine or linear decay that would reach zero at step --steps (one past the last); a schedule restored from its
state continues at the same rate."""
from __future__ import annotations

import argparse
import math

import pytest
import torch

from backends.runtime.controls import lr_factor, make_schedule, restore_schedule


@pytest.mark.parametrize("kind, expected", [
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]),
])
def test_warmup_then_a_decay_that_reaches_zero_at_step_total(kind, expected):
    assert [lr_factor(kind, 2, 6, step) for step in range(6)] == pytest.approx(expected, abs=1e-12)


def test_a_restored_schedule_continues_at_the_same_rate():
    args = argparse.Namespace(lr_schedule="cosine", warmup_steps=1, steps=8)
    rates = []
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    schedule = make_schedule(args, optimizer)
    for _ in range(3):
        optimizer.step()
        schedule.step()
    saved = schedule.state_dict()
    rates.append(optimizer.param_groups[0]["lr"])
    fresh = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)
    resumed = make_schedule(args, fresh)
    restore_schedule(resumed, saved)
    assert fresh.param_groups[0]["lr"] == rates[0] == pytest.approx(0.2 * lr_factor("cosine", 1, 8, 3))
    optimizer.step(), schedule.step(), fresh.step(), resumed.step()
    assert fresh.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
