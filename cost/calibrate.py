"""Measure this machine and write a ``local``-style cluster spec with the measured numbers.

:func:`calibrate` starts ``world_size`` local processes joined as an emitted program's ranks are (gloo
on CPU; nccl with one GPU each when every rank can have one) and measures in all of them at once, each
CPU rank with its share of the cores (:func:`threads_per_rank`), since that is what a rank gets when all
ranks work; compute is measured by at most as many CPU ranks at once as the cores hold
(:func:`ranks_computing_at_once`), and the spec records the host's ``cpu_cores`` so that the cluster model
slows ranks that outnumber them (:attr:`cluster.model.Node.compute_share`):

- compute: fp32 (and bf16) matmul FLOP/s, memory bandwidth (``c = a + b``), the dispatch overhead of
  one op forward and backward, and per kind of op the *efficiency* (roofline over measured time, see
  :mod:`cost.op_probes`);
- communication: all_reduce, all_gather, reduce_scatter, all_to_all and one-way send/recv at several
  sizes, each fitted to the cost model's ring formula ``steps * latency + volume / bandwidth`` (see
  :func:`fit_collective`); the fits become the intra-node link's ``collectives`` table, and send/recv's
  fit is the link itself (``loopback`` between CPU ranks; ``nvlink`` or ``pcie`` between GPUs, by speed).

The result is a one-node cluster whose device kind and link carry those numbers; the raw measurements
go under ``metadata.calibration`` so the file explains itself::

    python -m cost.calibrate --world-size 2 --out my-machine.yaml
    Cluster.load("my-machine.yaml")
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

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cost.collectives import bus_factor
from cost.op_probes import measure_op_efficiency, synchronizer
from cluster import Cluster

PROCESS_GROUP_TIMEOUT = timedelta(seconds=60)
COMPUTE_WAIT_TIMEOUT = timedelta(minutes=15)
"""How long CPU ranks beyond the cores wait for the others to measure compute (about half a minute here)."""
LATENCY_PROBE_BYTES = 4  # one fp32 element: the time is all latency
MIN_LATENCY_S = 1e-7
"""No fitted per-step latency is smaller (a fit can land near zero when bandwidth explains everything)."""
MESSAGE_SIZES = (LATENCY_PROBE_BYTES, 1 << 16, 1 << 20, 1 << 22, 1 << 24)
QUICK_MESSAGE_SIZES = MESSAGE_SIZES[:-1]
COMPUTE_BURST = (512, 512, 1024)
"""The matmul (m, k, n) every rank runs before each timed collective (a few milliseconds on a core)."""
CALLS_PER_REPEAT = 3
"""Calls of a collective per size and repeat: each size's mean is taken over ``3 * repeats`` calls (30 in a full
session). Ten calls of a 1 MiB all-reduce between compute bursts read 3.0-6.0 ms from one session to the next
(the mean of a long tail); thirty, 3.7-4.5 ms (and a 512 KiB one 3.3-3.6 ms against 2.0-4.7)."""
NVLINK_LIKE_BPS = 50e9
"""GPU pairs measured faster than this (one way) are labelled ``nvlink``, slower ones ``pcie``."""
OVERLAP_MLP = (512, 256)
"""(tokens, width) of the MLP whose backward :func:`measure_comm_overlap` reduces gradients during."""
OVERLAP_LAYERS = 8
"""Its linear layers (alternately 4x wider and back; 1 MiB weights on CPU)."""
OVERLAP_BUCKET_BYTES = 4 * 2**20
"""Gradients are all-reduced in buckets of this size (the programs' default), each once its gradients are in."""
GPU_OVERLAP_SCALE = 8
"""On GPUs the MLP's sides are this much longer."""
GPU_BURST_SCALE = 16
"""On GPUs the burst's sides are this much longer (a few milliseconds there too)."""


def calibrate(world_size: int = 2, out_path: str | Path | None = None, quick: bool = False,
              sessions: int = 1) -> dict[str, Any]:
    """Measure compute, memory bandwidth and communication; return (and optionally write) the spec.

    The returned dict is a cluster spec (``Cluster.from_dict`` accepts it) whose
    ``metadata.calibration`` holds the raw measurements. ``quick`` repeats less and leaves out the largest message.
    ``sessions`` > 1 measures that many times, in fresh processes, and keeps the median of every number
    (:func:`median_measurements`): on a shared machine one session's collectives and probes can be off by a
    third.
    """
    if world_size < 2:
        raise ValueError(f"expected world_size >= 2 to measure communication, found {world_size}")
    if sessions < 1:
        raise ValueError(f"expected at least 1 calibration session, found {sessions}")
    return spec_from_sessions(world_size, [measure_session(world_size, quick) for _ in range(sessions)], out_path)


def spec_from_sessions(world_size: int, sessions: list[dict[str, Any]],
                       out_path: str | Path | None = None) -> dict[str, Any]:
    """The cluster spec of the median of ``sessions`` (each what :func:`measure_session` returned), validated, and
    written to ``out_path`` if given. A caller that runs other work between sessions (a benchmark measuring
    programs in rounds) gets a calibration that saw the same spells of a shared machine as that work did."""
    spec = spec_from_measurements(world_size, median_measurements(sessions))
    cluster = Cluster.from_dict(spec)  # validates what we measured
    if out_path is not None:
        cluster.dump_yaml(out_path)
    return cluster.to_dict()


def median_measurements(sessions: list) -> Any:
    """The median of every number across sessions' measurements of the same shape (dicts with the same keys,
    lists of the same length): of an even count, the mean of the middle two, or for whole numbers the lower of
    them; anything else is the first session's. A single session is returned as is."""
    first = sessions[0]
    if len(sessions) == 1:
        return first
    if isinstance(first, dict):
        return {key: median_measurements([s[key] for s in sessions]) for key in first}
    if isinstance(first, list):
        return [median_measurements(list(items)) for items in zip(*sessions)]
    if isinstance(first, bool):
        return first
    if isinstance(first, int):  # counts (cores, bytes of memory) stay whole: the lower middle of an even count
        return statistics.median_low(sessions)
    if isinstance(first, float):
        return statistics.median(sessions)
    return first


def host_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform says, else the machine's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads_per_rank(world_size: int) -> int:
    """The cores each rank gets when ``world_size`` ranks share this machine (at least one thread)."""
    return max(1, host_cores() // world_size)


def ranks_computing_at_once(world_size: int) -> int:
    """How many of ``world_size`` CPU ranks measure compute together: as many as the cores hold at
    :func:`threads_per_rank` threads each. Ranks beyond the cores would take turns on them and read each
    other's share as their own speed; the cluster model applies that sharing itself
    (:attr:`cluster.model.Node.compute_share`), from the ``cpu_cores`` the spec records."""
    return min(world_size, max(1, host_cores() // threads_per_rank(world_size)))


# -- the ranks -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def measure_session(world_size: int, quick: bool = False) -> dict[str, Any]:
    """One calibration session: :func:`_rank_main` in ``world_size`` fresh processes; rank 0's measurements."""
    with tempfile.TemporaryDirectory() as scratch:
        result_path = os.path.join(scratch, "measured.json")
        mp.spawn(_rank_main, args=(world_size, _free_port(), quick, result_path), nprocs=world_size, join=True)
        with open(result_path) as handle:
            return json.load(handle)


def rank_device(rank: int, world_size: int) -> torch.device:
    """This rank's GPU when every rank can have one (and ``SBPC_FORCE_GLOO`` is not set), else the CPU."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus >= world_size and os.environ.get("SBPC_FORCE_GLOO") != "1":
        return torch.device("cuda", rank)
    return torch.device("cpu")


def _rank_main(rank: int, world_size: int, port: int, quick: bool, result_path: str) -> None:
    """One rank: join a process group on 127.0.0.1 (nccl on GPUs, else gloo), measure together with
    the others; rank 0 writes."""
    device = rank_device(rank, world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(threads_per_rank(world_size))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=PROCESS_GROUP_TIMEOUT)
    try:
        measured = _measure_compute_on_own_cores(rank, world_size, quick, device)
        measured["collectives"] = measure_collectives(rank, world_size, QUICK_MESSAGE_SIZES if quick else
                                                      MESSAGE_SIZES, repeats=5 if quick else 10, device=device)
        measured["comm_overlap"] = measure_comm_overlap(device, repeats=10 if quick else 30)
        measured["backend"] = backend
        measured["cpu_cores"] = host_cores()
        measured["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        measured["device_memory"] = (torch.cuda.get_device_properties(device).total_memory
                                     if device.type == "cuda" else _physical_memory_bytes() // world_size)
        if rank == 0:
            Path(result_path).write_text(json.dumps(measured))
    finally:
        dist.destroy_process_group()


# -- compute ----------------------------------------------------------------------------------------


def _measure_compute_on_own_cores(rank: int, world_size: int, quick: bool, device: torch.device) -> dict[str, Any]:
    """:func:`measure_compute` on every GPU rank at once, or on the first :func:`ranks_computing_at_once` CPU
    ranks while the others wait (rank 0, which writes, always measures): each measuring rank on cores of its
    own."""
    measuring = world_size if device.type == "cuda" else ranks_computing_at_once(world_size)
    if measuring == world_size:
        return measure_compute(quick, dist.barrier, device)
    group = dist.new_group(list(range(measuring)))  # every rank takes part in creating it
    measured = measure_compute(quick, lambda: dist.barrier(group), device) if rank < measuring else {}
    dist.monitored_barrier(timeout=COMPUTE_WAIT_TIMEOUT)  # the others wait longer than a collective may
    return measured


def measure_compute(quick: bool, barrier: Callable[[], None] = lambda: None,
                    device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    """Matmul FLOP/s per size, memory bandwidth, op dispatch overhead and op efficiencies on ``device``."""
    gpu = device.type == "cuda"
    barrier()
    matmul = measure_matmul_gflops((2048, 4096, 8192) if gpu else (256, 512, 1024), device=device)
    bf16 = measure_matmul_gflops((8192,) if gpu else (256,), torch.bfloat16, device)
    barrier()
    bandwidth = measure_elementwise_bandwidth((1 << 26) if gpu else (1 << 23), device)
    efficiency, overhead = measure_op_efficiency(max(matmul.values()) * 1e9, bandwidth,
                                                 repeats=5 if quick else 9, barrier=barrier, device=device)
    return {"matmul_fp32_gflops": matmul, "matmul_bf16_gflops": bf16, "elementwise_bytes_per_s": bandwidth,
            "op_overhead_s": list(overhead), "efficiency": efficiency}


def _best_seconds(work: Callable[[], object], device: torch.device, min_total_s: float = 0.05,
                  min_repeats: int = 3) -> float:
    """Fastest of several runs of ``work`` (after one warm-up), repeating for at least ``min_total_s``."""
    sync = synchronizer(device)
    work()
    sync()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - started < min_total_s:
        begin = time.perf_counter()
        work()
        sync()
        times.append(time.perf_counter() - begin)
    return min(times)


def measure_matmul_gflops(sizes: tuple[int, ...], dtype: torch.dtype = torch.float32,
                          device: torch.device = torch.device("cpu")) -> dict[int, float]:
    """GFLOP/s of an n x n x n matmul (2n³ FLOPs) for each size n (on CPU, this process's threads)."""
    result = {}
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        out = torch.empty(n, n, dtype=dtype, device=device)
        result[n] = 2 * n**3 / _best_seconds(lambda: torch.mm(a, b, out=out), device) / 1e9
    return result


def measure_elementwise_bandwidth(elements: int, device: torch.device = torch.device("cpu")) -> float:
    """Bytes/s moved by ``c = a + b`` on fp32 vectors (two reads and one write per element)."""
    a, b = torch.randn(elements, device=device), torch.randn(elements, device=device)
    c = torch.empty(elements, device=device)
    return 3 * 4 * elements / _best_seconds(lambda: torch.add(a, b, out=c), device)


# -- communication ---------------------------------------------------------------------------------


def measure_collectives(rank: int, world_size: int, sizes: tuple[int, ...], repeats: int,
                        device: torch.device = torch.device("cpu")) -> dict[str, list[list[float]]]:
    """Per collective kind, ``[[bytes, mean seconds], ...]`` as rank 0 times it.

    Each call comes right after a burst of compute on every rank, with no barrier, the way a training
    step reaches its collectives: the time includes waking the communication threads of busy
    processes and waiting for the slower rank, which on CPU ranks costs more than the transfer and has a
    long tail (a thread waiting for a busy core), so the mean, tail included, is what a step pays.
    Collectives are called as the emitted runtime calls them (in-place all-reduce of a copy; on
    CPU a reduce-scatter is an all-reduce and a chunk).

    Bytes follow the cost model's convention (:mod:`cost.collectives`): the whole buffer for
    all_reduce, the gathered output for all_gather, the input for reduce_scatter, each rank's send
    buffer for all_to_all, the message for send_recv (one way: half a ping-pong). A kind this
    backend does not implement is left out.
    """
    results: dict[str, list[list[float]]] = {}
    for kind, operation in COLLECTIVE_PROBES.items():
        points = []
        try:
            for nbytes in sizes:
                tensor = torch.ones(max(world_size, nbytes // 4), device=device)
                seconds = _loaded_seconds(operation, tensor, rank, world_size, CALLS_PER_REPEAT * repeats)
                points.append([float(tensor.numel() * 4), seconds / (2 if kind == "send_recv" else 1)])
        except RuntimeError:  # e.g. a collective gloo lacks; every rank fails the same way
            continue
        results[kind] = points
    return results


def _loaded_seconds(operation: Callable[[torch.Tensor, int, int], None], tensor: torch.Tensor, rank: int,
                    world_size: int, repeats: int) -> float:
    """Mean seconds of ``operation`` right after a compute burst."""
    sync = synchronizer(tensor.device)
    operation(tensor, rank, world_size)  # warm-up: connections and buffers
    sync()
    dist.barrier()
    left, right = _burst_operands(tensor.device)
    times = []
    for _ in range(repeats):
        torch.mm(left, right)
        sync()
        begin = time.perf_counter()
        operation(tensor, rank, world_size)
        sync()
        times.append(time.perf_counter() - begin)
    return statistics.fmean(times)


def _burst_operands(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The two matrices of :data:`COMPUTE_BURST` (sides :data:`GPU_BURST_SCALE` times longer on GPUs)."""
    scale = GPU_BURST_SCALE if device.type == "cuda" else 1
    m, k, n = (side * scale for side in COMPUTE_BURST)
    return torch.randn(m, k, device=device), torch.randn(k, n, device=device)


class BucketedBackward:
    """An MLP's forward and backward whose gradients are all-reduced in buckets as the emitted programs do: each
    bucket (:data:`OVERLAP_BUCKET_BYTES`, in backward's order) launched asynchronously from a gradient hook once
    its gradients are in (``hooked``), or all after backward (``after``), or not at all (``alone``)."""

    def __init__(self, device: torch.device):
        self.sync = synchronizer(device)
        scale = GPU_OVERLAP_SCALE if device.type == "cuda" else 1
        tokens, width = (side * scale for side in OVERLAP_MLP)
        self.inputs = torch.randn(tokens, width, device=device)
        shapes = [(4 * width, width) if i % 2 == 0 else (width, 4 * width) for i in range(OVERLAP_LAYERS)]
        self.weights = [torch.randn(*shape, device=device, requires_grad=True) for shape in shapes]
        per_bucket = max(1, OVERLAP_BUCKET_BYTES // (self.weights[0].numel() * self.weights[0].element_size()))
        backward_order = self.weights[::-1]
        self.buckets = [backward_order[i:i + per_bucket] for i in range(0, len(backward_order), per_bucket)]
        self.pending: list = []
        self.hooked = False
        self.hooks = [w.register_post_accumulate_grad_hook(self._ready) for w in self.weights]

    def _ready(self, weight: torch.Tensor) -> None:
        bucket = next(b for b in self.buckets if any(w is weight for w in b))
        if self.hooked and weight is bucket[-1]:
            self.pending.append(dist.all_reduce(_flat_gradients(bucket), async_op=True))

    def step(self, mode: str) -> float:
        """Seconds of one forward and backward with the gradients reduced as ``mode`` says."""
        dist.barrier()
        self.sync()
        begin = time.perf_counter()
        self.hooked = mode == "hooked"
        hidden = self.inputs
        for i, weight in enumerate(self.weights):
            hidden = hidden @ weight.t()
            hidden = torch.nn.functional.gelu(hidden) if i % 2 == 0 else hidden
        hidden.sum().backward()
        for bucket in self.buckets if mode == "after" else ():
            dist.all_reduce(_flat_gradients(bucket))
        for work in self.pending:
            work.wait()
        self.sync()
        seconds = time.perf_counter() - begin
        self.pending.clear()
        for weight in self.weights:
            weight.grad = None
        return seconds

    def close(self) -> None:
        """Remove the gradient hooks."""
        for hook in self.hooks:
            hook.remove()


def _flat_gradients(weights: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([w.grad.reshape(-1) for w in weights])


def measure_comm_overlap(device: torch.device, repeats: int) -> float:
    """Fraction of the gradient all-reduces that hides behind the backward producing them, measured the way the
    emitted programs overlap them (:class:`BucketedBackward`): ``(reduced after backward - reduced from the
    hooks) / (reduced after backward - not reduced)``, medians over ``repeats``, from 0 (none hides: on CPU
    ranks gloo needs the cores backward uses) to 1 (all)."""
    probe = BucketedBackward(device)
    modes = ("alone", "after", "hooked")
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for repeat in range(repeats + 1):  # the modes in turn, so that a slow spell falls on all three
        for mode in modes:
            seconds = probe.step(mode)
            if repeat:
                times[mode].append(seconds)
    probe.close()
    alone, after, overlapped = (statistics.median(times[mode]) for mode in modes)
    return min(1.0, max(0.0, (after - overlapped) / max(after - alone, 1e-9)))


def _all_reduce(tensor: torch.Tensor, rank: int, world_size: int) -> None:
    dist.all_reduce(tensor.clone())


def _all_gather(tensor: torch.Tensor, rank: int, world_size: int) -> None:
    """Gather ``tensor`` (the whole output) from its per-rank shards."""
    shard = tensor[: tensor.numel() // world_size]
    dist.all_gather([torch.empty_like(shard) for _ in range(world_size)], shard)


def _reduce_scatter(tensor: torch.Tensor, rank: int, world_size: int) -> None:
    if tensor.is_cuda:
        parts = list(tensor.chunk(world_size))
        dist.reduce_scatter(torch.empty_like(parts[0]), parts)
    else:  # gloo has no reduce-scatter
        _all_reduce(tensor, rank, world_size)


def _all_to_all(tensor: torch.Tensor, rank: int, world_size: int) -> None:
    sends = list(tensor.chunk(world_size))
    dist.all_to_all([torch.empty_like(s) for s in sends], sends)


def _ping_pong(tensor: torch.Tensor, rank: int, world_size: int) -> None:
    """Rank 0 sends to rank 1 and gets it back: a round trip, two one-way transfers. Other ranks idle."""
    if rank == 0:
        dist.send(tensor, 1)
        dist.recv(tensor, 1)
    elif rank == 1:
        dist.recv(tensor, 0)
        dist.send(tensor, 0)


COLLECTIVE_PROBES: dict[str, Callable[[torch.Tensor, int, int], None]] = {
    "all_reduce": _all_reduce, "all_gather": _all_gather, "reduce_scatter": _reduce_scatter,
    "all_to_all": _all_to_all, "send_recv": _ping_pong,
}


def ring_coefficients(kind: str, p: int) -> tuple[float, float]:
    """(latency terms, fraction of the bytes each rank moves) of the cost model's ring algorithm."""
    if kind == "all_reduce":
        return 2 * (p - 1), 2 * (p - 1) / p
    if kind == "send_recv":
        return 1.0, 1.0
    if kind == "broadcast":
        return p - 1, 1.0
    return p - 1, (p - 1) / p  # all_gather, reduce_scatter, all_to_all (pairwise)


def fit_collective(kind: str, p: int, points: list[list[float]]) -> tuple[float, float]:
    """(latency s, bandwidth B/s) so that ``a * latency + b * bytes / bandwidth`` (``a``, ``b`` from
    :func:`ring_coefficients`) best matches the measured ``[bytes, seconds]`` points in relative error."""
    a, b = ring_coefficients(kind, p)
    sizes = np.array([n for n, _ in points], dtype=float)
    seconds = np.array([s for _, s in points], dtype=float)
    design = np.stack([np.full_like(sizes, a), b * sizes], axis=1) / seconds[:, None]
    (latency, inverse_bandwidth), *_ = np.linalg.lstsq(design, np.ones_like(seconds), rcond=None)
    smallest, largest = int(np.argmin(sizes)), int(np.argmax(sizes))
    if latency <= 0 or inverse_bandwidth <= 0:  # noise won: fit through the smallest and largest message
        latency = max(seconds[smallest], 1e-7) / a
        leftover = seconds[largest] - a * latency
        inverse_bandwidth = (leftover if leftover > 0.1 * seconds[largest] else seconds[largest]) / (b * sizes[largest])
    # the bytes explain at least a tenth of the largest message's time (else noise gives "infinite" bandwidth)
    inverse_bandwidth = max(inverse_bandwidth, 0.1 * seconds[largest] / (b * sizes[largest]))
    return float(max(latency, MIN_LATENCY_S)), float(1.0 / inverse_bandwidth)


# -- spec ------------------------------------------------------------------------------------------


def _physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not every platform exposes these
        return 8 * 2**30


def collective_spec(kind: str, world_size: int, points: list[list[float]], fit: tuple[float, float]) -> dict:
    """The link's figures for collective ``kind``: the fitted per-step latency and bandwidth and, for the
    all-reduce, the measured ``[bytes, seconds]`` points themselves as a bus-bandwidth curve, so that a message
    of a measured size costs what was measured and one in between a time between its neighbours'
    (:func:`cost.collectives.curve_seconds`; gloo's all-reduce time on CPU ranks is not linear in size, and one
    odd point pulls a line through all of them)."""
    latency, bandwidth = fit
    body: dict[str, Any] = {"latency": latency, "bandwidth": bandwidth}
    if kind == "all_reduce":
        factor = bus_factor(kind, world_size)
        body |= {"busbw": [[nbytes, nbytes * factor / seconds] for nbytes, seconds in sorted(points)],
                 "ranks": world_size}
    return body


def spec_from_measurements(world_size: int, measured: dict[str, Any]) -> dict[str, Any]:
    """The cluster spec of what :func:`measure_compute` and :func:`measure_collectives` found."""
    fits = {kind: fit_collective(kind, world_size, points) for kind, points in measured["collectives"].items()}
    latency, bandwidth = fits.get("send_recv", (50e-6, 2e9))
    forward_overhead, backward_overhead = measured["op_overhead_s"]
    gpu = measured["backend"] == "nccl"
    kind = "gpu-calibrated" if gpu else "cpu-calibrated"
    link_class = ("nvlink" if bandwidth > NVLINK_LIKE_BPS else "pcie") if gpu else "loopback"
    return {
        "name": f"calibrated-local:{world_size}",
        "description": f"{world_size} x {measured['device']} measured on {socket.gethostname()} by cost.calibrate",
        "device_kinds": {kind: {
            "peak_flops": {"fp32": max(measured["matmul_fp32_gflops"].values()) * 1e9,
                           "bf16": max(measured["matmul_bf16_gflops"].values()) * 1e9},
            "memory": int(measured["device_memory"]),
            "memory_bandwidth": measured["elementwise_bytes_per_s"],
            "op_overhead": {"forward": forward_overhead, "backward": backward_overhead},
            "efficiency": measured["efficiency"],
            "comm_overlap": measured["comm_overlap"],
        }},
        "nodes": [{
            "name": "localhost", "device": kind, "devices": world_size,
            "intra_link": {"class": link_class, "bandwidth": bandwidth, "latency": latency,
                           "collectives": {name: collective_spec(name, world_size, measured["collectives"][name], fit)
                                           for name, fit in fits.items() if name != "send_recv"}},
            "nics": [{"type": "ethernet", "count": 1, "bandwidth": "10Gb/s", "latency": "30us"}],
            **({} if gpu else {"cpu_cores": measured["cpu_cores"]}),
        }],
        "metadata": {"calibration": {
            "threads_per_rank": threads_per_rank(world_size),
            **{key: measured[key] for key in ("backend", "device", "matmul_fp32_gflops", "matmul_bf16_gflops",
                                              "elementwise_bytes_per_s", "op_overhead_s")},
            "collective_seconds_by_bytes": measured["collectives"],
        }},
    }


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m cost.calibrate [--world-size N] [--out FILE] [--quick] [--sessions N]``."""
    parser = argparse.ArgumentParser(description="Measure this machine and write a cluster YAML.")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--out", default="calibrated-local.yaml")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sessions", type=int, default=1, help="measure this many times and keep the medians")
    args = parser.parse_args(argv)
    spec = calibrate(args.world_size, args.out, args.quick, args.sessions)
    print(json.dumps(spec["metadata"]["calibration"], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
