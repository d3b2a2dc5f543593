"""Tests for backends/calibrate.py: a quick real measurement with two gloo processes."""
from __future__ import annotations

import time

import pytest

from backends.calibrate import calibrate
from ir.cluster import Cluster


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_quick_calibration_writes_a_loadable_sane_cluster(tmp_path):
    out = tmp_path / "calibrated.yaml"
    started = time.perf_counter()
    spec = calibrate(world_size=2, out_path=out, quick=True)
    assert time.perf_counter() - started < 60  # budget ~20 s; generous for a loaded 2-core machine

    cluster = Cluster.load(out)
    assert cluster.to_dict() == spec
    assert cluster.world_size == 2 and len(cluster.nodes) == 1

    device = cluster.devices[0]
    assert 0.1e9 < device.peak_flops["fp32"] < 100e12  # somewhere between a slow core and a GPU
    assert device.peak_flops["bf16"] > 0 and device.memory_bytes > 2**28
    assert 1e8 < device.memory_bandwidth_Bps < 1e13

    link = cluster.link(0, 1)
    assert link.link_class == "loopback"
    assert 1e-7 <= link.latency_s < 0.1  # gloo on loopback: tens of microseconds
    assert 1e6 < link.bandwidth_Bps < 1e12

    gloo = spec["metadata"]["calibration"]["gloo"]
    for name in ("all_reduce", "all_gather", "send_recv"):
        assert 0 < gloo[name]["small_s"] < 1 and 0 < gloo[name]["large_s"] < 10


def test_calibration_needs_two_ranks():
    with pytest.raises(ValueError, match="world_size >= 2"):
        calibrate(world_size=1)
