"""Progress lines of emitted programs (``backends/runtime/progress.py``, in this process as rank 0): a bar redrawn
in place on a terminal, one plain line per step otherwise, and --metrics JSON lines with the same fields."""
from __future__ import annotations

import io
import json
import time

import pytest

from backends.runtime import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def rank_zero(monkeypatch):
    monkeypatch.setattr(progress.dist, "get_rank", lambda: 0)


def report(step: int, metrics=None) -> None:
    progress.report_step(metrics, step, 2.5, time.perf_counter() - 0.5,
                         {"tokens": 1000, "lr": 0.01, "grad_norm": 1.25}, total_steps=4)


def test_a_plain_line_per_step_off_a_terminal(monkeypatch, tmp_path):
    out = io.StringIO()
    monkeypatch.setattr(progress.sys, "stdout", out)
    with open(tmp_path / "m.jsonl", "w") as metrics:
        report(0, metrics)
        report(1, metrics)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("step 1 loss 2.500000 tokens/s ")
    assert " step_time 0.5" in lines[1] and "MiB lr 0.01 grad_norm 1.25" in lines[1]
    record = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[1])
    assert set(record) == {"step", "loss", "seconds", "memory_bytes", "tokens_per_s", "lr", "grad_norm"}
    assert record["step"] == 1 and 1000 / 0.6 < record["tokens_per_s"] <= 1000 / 0.5
    assert record["memory_bytes"] > 2 ** 20


def test_a_bar_redrawn_in_place_on_a_terminal(monkeypatch):
    out = Terminal()
    monkeypatch.setattr(progress.sys, "stdout", out)
    for step in range(4):
        report(step)
    text = out.getvalue()
    assert text.count("\r") == 4 and text.count("\n") == 1 and text.endswith("\n")  # one line, ended at the last
    assert "\r[#####               ] 1/4 step 0 loss 2.500000" in text
    assert "\r[####################] 4/4 step 3 loss" in text
