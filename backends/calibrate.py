"""Measure this machine and write a ``local``-style cluster spec with the measured numbers.

:func:`calibrate` times fp32 (and bf16) matmuls, an elementwise add (memory bandwidth), and gloo
collectives (all_reduce, all_gather, send/recv ping-pong) between ``world_size`` local processes, then
builds a one-node cluster whose device kind and loopback link carry those numbers. The raw
measurements go under ``metadata.calibration`` so the file explains itself::

    python -m backends.calibrate --world-size 2 --out my-machine.yaml
    Cluster.load("my-machine.yaml")

Each rank is given ``cpu_count // world_size`` threads while measuring compute, since that is its
share when all ranks run at once.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ir.cluster import Cluster

PROCESS_GROUP_TIMEOUT = timedelta(seconds=60)
LATENCY_PROBE_BYTES = 4  # one fp32 element: the time is all latency


def calibrate(world_size: int = 2, out_path: str | Path | None = None, quick: bool = False) -> dict[str, Any]:
    """Measure compute, memory bandwidth and gloo communication; return (and optionally write) the spec.

    The returned dict is a cluster spec (``Cluster.from_dict`` accepts it) whose
    ``metadata.calibration`` holds the raw measurements. ``quick`` uses fewer and smaller sizes.
    """
    if world_size < 2:
        raise ValueError(f"expected world_size >= 2 to measure communication, found {world_size}")
    threads = max(1, (os.cpu_count() or 1) // world_size)
    matmul = measure_matmul_gflops((128, 256) if quick else (256, 512, 1024), threads)
    bf16 = measure_matmul_gflops((256,), threads, torch.bfloat16)
    elementwise = measure_elementwise_bandwidth((1 << 20) if quick else (1 << 23), threads)
    comm = measure_gloo(world_size, (1 << 20) if quick else (1 << 24), repeats=3 if quick else 10)
    spec = _spec_from_measurements(world_size, matmul, bf16, elementwise, comm)
    cluster = Cluster.from_dict(spec)  # validates what we measured
    if out_path is not None:
        cluster.dump_yaml(out_path)
    return cluster.to_dict()


# -- compute ----------------------------------------------------------------------------------------


def _best_seconds(work: Callable[[], object], min_total_s: float = 0.05, min_repeats: int = 3) -> float:
    """Fastest of several runs of ``work`` (after one warm-up), repeating for at least ``min_total_s``."""
    work()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - started < min_total_s:
        begin = time.perf_counter()
        work()
        times.append(time.perf_counter() - begin)
    return min(times)


def _with_threads(threads: int, measure: Callable[[], Any]) -> Any:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return measure()
    finally:
        torch.set_num_threads(previous)


def measure_matmul_gflops(sizes: tuple[int, ...], threads: int, dtype: torch.dtype = torch.float32) -> dict[int, float]:
    """GFLOP/s of an n x n x n matmul (2n³ FLOPs) for each size n, using ``threads`` threads."""
    def measure() -> dict[int, float]:
        result = {}
        for n in sizes:
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            out = torch.empty(n, n, dtype=dtype)
            result[n] = 2 * n**3 / _best_seconds(lambda: torch.mm(a, b, out=out)) / 1e9
        return result
    return _with_threads(threads, measure)


def measure_elementwise_bandwidth(elements: int, threads: int) -> float:
    """Bytes/s moved by ``c = a + b`` on fp32 vectors (two reads and one write per element)."""
    def measure() -> float:
        a, b, c = torch.randn(elements), torch.randn(elements), torch.empty(elements)
        return 3 * 4 * elements / _best_seconds(lambda: torch.add(a, b, out=c))
    return _with_threads(threads, measure)


# -- communication ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def measure_gloo(world_size: int, large_bytes: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds of all_reduce, all_gather and one-way send/recv, for a 4-byte and a large message.

    Returns ``{"all_reduce": {"small_s", "large_s", "large_bytes"}, ...}`` as timed by rank 0.
    """
    with tempfile.TemporaryDirectory() as scratch:
        result_path = os.path.join(scratch, "gloo.json")
        mp.spawn(_gloo_worker, args=(world_size, _free_port(), large_bytes, repeats, result_path),
                 nprocs=world_size, join=True)
        with open(result_path) as handle:
            return json.load(handle)


def _gloo_worker(rank: int, world_size: int, port: int, large_bytes: int, repeats: int, result_path: str) -> None:
    """One rank: join a gloo group on 127.0.0.1 and time the collectives; rank 0 writes the results."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=PROCESS_GROUP_TIMEOUT)
    try:
        results = {}
        for name, operation in (("all_reduce", _all_reduce), ("all_gather", _all_gather), ("send_recv", _ping_pong)):
            small = _median_seconds(operation, LATENCY_PROBE_BYTES, rank, world_size, repeats)
            large = _median_seconds(operation, large_bytes, rank, world_size, repeats)
            results[name] = {"small_s": small, "large_s": large, "large_bytes": large_bytes}
        if rank == 0:
            Path(result_path).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def _median_seconds(operation: Callable[[torch.Tensor, int, int], None], nbytes: int, rank: int,
                    world_size: int, repeats: int) -> float:
    tensor = torch.ones(max(1, nbytes // 4))
    operation(tensor, rank, world_size)  # warm-up: connections and buffers
    times = []
    for _ in range(repeats):
        dist.barrier()
        begin = time.perf_counter()
        operation(tensor, rank, world_size)
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def _all_reduce(tensor: torch.Tensor, rank: int, world_size: int) -> None:
    dist.all_reduce(tensor)


def _all_gather(tensor: torch.Tensor, rank: int, world_size: int) -> None:
    """Gather ``tensor`` (one shard) from every rank; its size is the per-rank shard."""
    dist.all_gather([torch.empty_like(tensor) for _ in range(world_size)], tensor)


def _ping_pong(tensor: torch.Tensor, rank: int, world_size: int) -> None:
    """Rank 0 sends to rank 1 and gets it back: a round trip, two one-way transfers. Other ranks idle."""
    if rank == 0:
        dist.send(tensor, 1)
        dist.recv(tensor, 1)
    elif rank == 1:
        dist.recv(tensor, 0)
        dist.send(tensor, 0)


# -- spec ------------------------------------------------------------------------------------------


def _fit_link(small_s: float, large_s: float, large_bytes: int) -> tuple[float, float]:
    """(latency s, bandwidth B/s) of ``t(n) = latency + n / bandwidth`` through two measurements."""
    latency = max(small_s, 1e-7)
    extra = large_s - small_s
    bandwidth = (large_bytes - LATENCY_PROBE_BYTES) / extra if extra > 0 else large_bytes / max(large_s, 1e-9)
    return latency, bandwidth


def _physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not every platform exposes these
        return 8 * 2**30


def _spec_from_measurements(world_size: int, matmul: dict[int, float], bf16: dict[int, float],
                            elementwise_Bps: float, comm: dict[str, dict[str, float]]) -> dict[str, Any]:
    ping = comm["send_recv"]
    # A ping-pong is two one-way trips.
    latency, bandwidth = _fit_link(ping["small_s"] / 2, ping["large_s"] / 2, int(ping["large_bytes"]))
    p = world_size
    all_reduce = comm["all_reduce"]
    bus_bandwidth = 2 * (p - 1) / p * all_reduce["large_bytes"] / all_reduce["large_s"]
    return {
        "name": f"calibrated-local:{world_size}",
        "description": f"measured on {socket.gethostname()} by backends.calibrate",
        "device_kinds": {"cpu-calibrated": {
            "peak_flops": {"fp32": max(matmul.values()) * 1e9, "bf16": max(bf16.values()) * 1e9},
            "memory": _physical_memory_bytes() // world_size,
            "memory_bandwidth": elementwise_Bps,
        }},
        "nodes": [{
            "name": "localhost", "device": "cpu-calibrated", "devices": world_size,
            "intra_link": {"class": "loopback", "bandwidth": bandwidth, "latency": latency},
            "nics": [{"type": "ethernet", "count": 1, "bandwidth": "10Gb/s", "latency": "30us"}],
        }],
        "metadata": {"calibration": {
            "threads_per_rank": max(1, (os.cpu_count() or 1) // world_size),
            "matmul_fp32_gflops": {str(n): v for n, v in matmul.items()},
            "matmul_bf16_gflops": {str(n): v for n, v in bf16.items()},
            "elementwise_bytes_per_s": elementwise_Bps,
            "gloo": comm,
            "all_reduce_bus_bandwidth_bytes_per_s": bus_bandwidth,
        }},
    }


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m backends.calibrate [--world-size N] [--out FILE] [--quick]``."""
    parser = argparse.ArgumentParser(description="Measure this machine and write a cluster YAML.")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--out", default="calibrated-local.yaml")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    spec = calibrate(args.world_size, args.out, args.quick)
    print(json.dumps(spec["metadata"]["calibration"], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
