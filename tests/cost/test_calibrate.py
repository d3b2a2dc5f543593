"""Tests for cost/calibrate.py: a quick real measurement with two gloo processes."""
from __future__ import annotations

import pytest

from cluster import Cluster
import cost.calibrate
from cost.calibrate import (calibrate, fit_collective, host_cores, median_measurements, ranks_computing_at_once,
                            spec_from_measurements, spec_from_sessions)
from cost.collectives import collective_time


@pytest.mark.multiproc
@pytest.mark.timeout(240)  # about 20 s on a quiet machine; a hang is what the limit is for
def test_quick_calibration_writes_a_loadable_sane_cluster(tmp_path):
    out = tmp_path / "calibrated.yaml"
    spec = calibrate(world_size=2, out_path=out, quick=True)

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

    assert spec["metadata"]["calibration"]["backend"] == "gloo"  # no GPU here
    assert cluster.nodes[0].cpu_cores == host_cores()  # the cores its ranks share
    gloo = spec["metadata"]["calibration"]["collective_seconds_by_bytes"]
    for name in ("all_reduce", "all_gather", "send_recv"):
        assert all(0 < seconds < 10 for _, seconds in gloo[name])
    for kind in ("all_reduce", "all_gather", "reduce_scatter"):  # what the emitted programs call on gloo
        measured = link.for_collective(kind)
        assert measured is not link and 1e-7 <= measured.latency_s < 0.1 and 1e6 < measured.bandwidth_Bps < 1e12

    # per-op efficiencies and dispatch overheads the simulator divides by and adds
    forward, backward = device.op_overhead_s
    assert 1e-8 < forward < 1e-3 and 1e-8 < backward < 1e-3
    for key in ("matmul", "attention", "norm", "elementwise", "gelu", "loss"):
        assert all(0.01 <= e <= 10 for e in device.efficiency_of(key)), key
    assert device.efficiency_of("linear", "matmul") == device.efficiency_of("matmul")
    assert 0 <= device.comm_overlap <= 1
    sizes = [point[0] for point in device.efficiency_by_flops["matmul"]]  # matmuls probed at four sizes
    assert len(sizes) == 4 and sizes == sorted(sizes)
    for key in ("attention", "norm", "softmax", "gelu", "elementwise"):  # every kind at three token counts
        assert len(device.efficiency_by_flops[key]) == 3, key
    assert "embedding" not in device.efficiency_by_flops  # no FLOPs to read its size by


def test_calibration_needs_two_ranks():
    with pytest.raises(ValueError, match="world_size >= 2"):
        calibrate(world_size=1)


def test_sessions_combine_into_the_median_of_every_number():
    sessions = [{"device": "cpu", "matmul": {"256": 90.0}, "points": [[8.0, 1e-3], [4096.0, 2e-3]], "n": 3},
                {"device": "cpu", "matmul": {"256": 120.0}, "points": [[8.0, 9e-3], [4096.0, 1e-3]], "n": 5},
                {"device": "cpu", "matmul": {"256": 100.0}, "points": [[8.0, 2e-3], [4096.0, 3e-3]], "n": 4}]
    assert median_measurements(sessions) == {"device": "cpu", "matmul": {"256": 100.0},
                                             "points": [[8.0, 2e-3], [4096.0, 2e-3]], "n": 4}
    assert median_measurements(sessions[:1]) is sessions[0]
    even = median_measurements(sessions[:2])  # the middle two: floats meet halfway, whole numbers keep the lower
    assert even["matmul"] == {"256": 105.0} and even["n"] == 3 and isinstance(even["n"], int)
    with pytest.raises(ValueError, match="at least 1 calibration session"):
        calibrate(2, sessions=0)


def test_fit_collective_recovers_latency_and_bandwidth():
    latency, bandwidth = 50e-6, 2e9
    points = [[n, 2 * latency + n / bandwidth] for n in (4, 1 << 16, 1 << 20, 1 << 24)]  # ring all-reduce, p=2
    fitted = fit_collective("all_reduce", 2, points)
    assert fitted == pytest.approx((latency, bandwidth), rel=1e-6)


def test_fit_collective_stays_physical_on_noisy_points():
    # the small message took longer than the large one: no positive least-squares fit exists
    latency, bandwidth = fit_collective("send_recv", 2, [[4, 3e-3], [1 << 18, 1e-3], [1 << 20, 2e-3]])
    assert latency > 0 and 0 < bandwidth < 1e12


def test_gpu_measurements_make_a_gpu_node():
    """The spec from nccl measurements (numbers as an 8-GPU NVLink node gives): a GPU kind, an nvlink link."""
    ring = lambda latency, bandwidth, a, b: [[n, a * latency + b * n / bandwidth] for n in (8, 1 << 20, 1 << 24)]
    measured = {
        "backend": "nccl", "device": "NVIDIA H100", "device_memory": 80 * 2**30,
        "matmul_fp32_gflops": {"8192": 50e3}, "matmul_bf16_gflops": {"8192": 700e3},
        "elementwise_bytes_per_s": 3e12, "op_overhead_s": [6e-6, 9e-6],
        "efficiency": {"matmul": {"forward": 0.8, "backward": 0.75}}, "comm_overlap": 0.9,
        "collectives": {"all_reduce": ring(10e-6, 150e9, 14, 14 / 8), "send_recv": ring(5e-6, 200e9, 1, 1)},
    }
    cluster = Cluster.from_dict(spec_from_measurements(8, measured))
    device = cluster.devices[0]
    assert device.kind == "gpu-calibrated" and device.memory_bytes == 80 * 2**30
    assert cluster.nodes[0].cpu_cores is None  # each GPU computes on its own
    assert device.peak_flops["bf16"] == pytest.approx(700e12)
    link = cluster.link(0, 7)
    assert link.link_class == "nvlink" and link.bandwidth_Bps == pytest.approx(200e9)
    assert link.for_collective("all_reduce").bandwidth_Bps == pytest.approx(150e9)


def gloo_measurements(all_reduce_points: list, gflops: float = 100.0) -> dict:
    """What a 2-rank gloo session measures, with the all-reduce's ``[bytes, seconds]`` points and the fp32 matmul
    GFLOP/s as given (bf16 twice that)."""
    return {
        "backend": "gloo", "device": "cpu", "device_memory": 2**34, "matmul_fp32_gflops": {"256": gflops},
        "matmul_bf16_gflops": {"256": 2 * gflops}, "elementwise_bytes_per_s": 2e10, "op_overhead_s": [3e-6, 2e-6],
        "efficiency": {}, "comm_overlap": 0.0, "cpu_cores": 2,
        "collectives": {"all_reduce": all_reduce_points, "send_recv": [[4, 1e-4], [1 << 20, 1e-3]]},
    }


def test_calibrated_all_reduce_follows_the_measured_curve():
    """gloo's all-reduce time on CPU ranks is not linear in size (numbers as measured here): the spec keeps the
    measured points, so each measured size costs what was measured and one in between lies between its
    neighbours (a latency/bandwidth line through them can miss any of them)."""
    points = [[8.0, 1.27e-3], [65536.0, 1.93e-3], [1048576.0, 3.2e-3], [4194304.0, 7.3e-3], [16777216.0, 21.2e-3]]
    cluster = Cluster.from_dict(spec_from_measurements(2, gloo_measurements(points)))
    for nbytes, seconds in points[1:]:  # the smallest is all latency, which the model adds per step
        assert collective_time("all_reduce", nbytes, (0, 1), cluster) == pytest.approx(seconds, rel=1e-6)
    assert 3.2e-3 < collective_time("all_reduce", 3.5e6, (0, 1), cluster) < 7.3e-3


def test_a_size_between_two_measured_ones_costs_between_their_times():
    """Where gloo's bandwidth grows fourteenfold between two measured sizes (a session of this machine: 2.78 ms at
    64 KiB, 3.14 ms at 1 MiB), the 512 KiB all-reduce a tensor-parallel GPT step sends costs between the two;
    interpolating the bandwidth priced it at 2.05 ms, under both, and a 4 KiB one under the 8-byte one."""
    points = [[8.0, 1.25e-3], [65536.0, 2.78e-3], [1048576.0, 3.14e-3], [4194304.0, 5.34e-3]]
    cluster = Cluster.from_dict(spec_from_measurements(2, gloo_measurements(points)))
    times = [collective_time("all_reduce", n, (0, 1), cluster) for n in (4096, 65536, 524288, 1048576)]
    assert times == sorted(times)
    assert 2.78e-3 < times[2] < 3.14e-3
    assert times[2] == pytest.approx(2.78e-3 + (524288 - 65536) / (1048576 - 65536) * (3.14e-3 - 2.78e-3))


def test_two_sessions_make_a_valid_spec_of_their_medians(tmp_path):
    """Sessions taken one at a time (a benchmark calibrating between its rounds) combine into one spec: numbers
    meet halfway, counts stay whole (two sessions' ``cpu_cores: 2`` once became 2.0, which the spec rejects)."""
    def session(gflops: float, latency: float) -> dict:
        return gloo_measurements([[8.0, latency], [1048576.0, 3e-3]], gflops)
    spec = spec_from_sessions(2, [session(90.0, 1e-3), session(110.0, 2e-3)], tmp_path / "two.yaml")
    cluster = Cluster.load(tmp_path / "two.yaml")
    assert cluster.to_dict() == spec
    assert cluster.nodes[0].cpu_cores == 2
    assert cluster.devices[0].peak_flops["fp32"] == pytest.approx(100e9)
    assert spec["metadata"]["calibration"]["collective_seconds_by_bytes"]["all_reduce"][0] == [8.0, 1.5e-3]


@pytest.mark.parametrize("cores, world_size, threads, together", [(2, 2, 1, 2), (2, 4, 1, 2), (2, 3, 1, 2),
                                                                   (16, 4, 4, 4), (16, 3, 5, 3), (1, 2, 1, 1)])
def test_cpu_ranks_measure_compute_as_many_at_once_as_the_cores_hold(monkeypatch, cores, world_size, threads,
                                                                    together):
    """More ranks than cores measuring together would read their share of a core as their speed, which the
    cluster model applies again from ``cpu_cores``; so they measure as many at a time as the cores hold."""
    monkeypatch.setattr(cost.calibrate, "host_cores", lambda: cores)
    assert cost.calibrate.threads_per_rank(world_size) == threads
    assert ranks_computing_at_once(world_size) == together
