"""Emitted programs warn when their innermost mesh axis (tensor parallelism) would join ranks of different nodes
(``backends/runtime/core.py``, in this process as one rank of a dp2 x tp2 mesh)."""
from __future__ import annotations

import pytest

from backends.runtime import core


@pytest.fixture
def dp2_tp2(monkeypatch):
    """Rank 0 of a dp2 x tp2 world of 4: its tp group is ranks 0 and 1."""
    monkeypatch.setattr(core, "MESH_AXES", ("dp", "tp"))
    monkeypatch.setattr(core.dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(core, "GROUPS", {"dp": (None, [0, 2], 0), "tp": (None, [0, 1], 0)})


@pytest.mark.parametrize("per_node, warns", [("1", True), ("2", False), ("4", False)])
def test_a_tensor_axis_across_nodes_is_named(dp2_tp2, monkeypatch, capsys, per_node, warns):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", per_node)
    core.check_node_placement()
    err = capsys.readouterr().err
    assert ("warning: mesh axis tp (innermost) joins ranks [0, 1] on different nodes (1 processes per node); "
            "launch with --nproc-per-node a multiple of 2" in err) == warns
    assert bool(err) == warns
