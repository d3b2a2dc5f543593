"""Probes of how fast this machine runs each kind of op, measured against the cost model's roofline.

The simulator prices an op at its roofline (FLOPs over peak FLOP/s, or bytes over memory bandwidth,
whichever is longer, as :mod:`cost.ops` counts them) plus a dispatch overhead. Real kernels
reach only part of that roofline, and how much depends on the kind of op: a large matmul comes close
to peak, ``gelu`` spends its time in ``erf`` rather than in memory traffic, attention computes its
softmax in between. :func:`measure_op_efficiency` runs one probe per kind of op (the ATen calls the
emitted programs make, at transformer-like sizes), times forward and backward, and reports for each
key (an op name or a cost category) the *efficiency*: roofline seconds over measured seconds, after
the per-op dispatch overhead (:func:`measure_op_overhead`) is taken off. A cluster spec carries the
table (``device_kinds.<kind>.efficiency``) and ``op_overhead``; :meth:`cluster.model.Device.efficiency_of`
looks an op up by name, then by category.

Operands rotate through a pool larger than the caches, as in a model where an op's inputs were last
touched several ops earlier; times are medians.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from cost.ops import op_backward_bytes, op_backward_flops, op_bytes, op_flops

aten = torch.ops.aten
POOL_BYTES = 48 * 2**20
"""Operand sets rotate until they span this many bytes (more than a last-level cache)."""
MAX_POOL = 16
OVERHEAD_CHAIN = 200
"""Tiny ops per overhead measurement."""
MIN_EFFICIENCY, MAX_EFFICIENCY = 0.01, 10.0
CPU_PROBE_SIZE = (512, 256)
"""(tokens, width) of the default probes on CPU ranks."""
GPU_PROBE_SIZE = (8192, 2048)
"""(tokens, width) of the default probes on a GPU: large enough to keep it busy."""
SIZE_SCAN = (0.125, 0.25)
"""Every probe is measured again at these multiples of the token count: ops reach less of their roofline on
fewer rows (a pipeline's microbatch, a small per-rank batch), and the efficiency of every kind is then read by
the op's size."""
MATMUL_SIZE_SCAN = (4.0,)
"""Matmuls are also probed at these larger multiples: their efficiency keeps growing with size."""


@dataclass(frozen=True)
class Probe:
    """One measurement: ``run`` on fresh operands of ``shapes``, priced as cost-model op ``op``.

    ``indices`` maps an input position to the exclusive upper bound of the integer values it holds
    (embedding rows, class targets); other inputs are fp32 and take gradients.
    """

    key: str
    op: str
    shapes: tuple
    run: Callable[..., torch.Tensor]
    indices: dict = field(default_factory=dict)
    size: int = 0
    """The token count of the probe set it belongs to (probes of one key at several sizes)."""


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return aten.layer_norm.default(x, [x.shape[-1]], w, b, 1e-5, False)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return aten.scaled_dot_product_attention.default(q, k, v, None, 0.0, True)


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return aten.cross_entropy_loss.default(logits, target, None, 2)  # reduction 2: sum


def default_probes(tokens: int = 512, width: int = 256) -> tuple[Probe, ...]:
    """Probes at transformer-like sizes: ``tokens`` rows of ``width`` features (MLP 4x wider)."""
    t, w, h = tokens, width, 4 * width
    heads, head_dim = max(1, width // 64), min(64, width)
    batch, seq = max(1, tokens // 128), min(128, tokens)
    vocab = 2 * h
    others = (
        Probe("attention", "scaled_dot_product_attention", ((batch, heads, seq, head_dim),) * 3, _causal_attention),
        Probe("norm", "layer_norm", ((t, w), (w,), (w,)), _layer_norm),
        Probe("softmax", "softmax", ((t, vocab),), lambda x: aten._softmax.default(x, -1, False)),
        Probe("loss", "cross_entropy_loss", ((t, vocab), (t,)), _cross_entropy, {1: vocab}),
        Probe("embedding", "embedding", ((vocab, w), (t,)), aten.embedding.default, {1: vocab}),
        Probe("elementwise", "add", ((t, h), (t, h)), aten.add.Tensor),
        Probe("elementwise", "mul", ((t, h), (t, h)), aten.mul.Tensor),
        Probe("gelu", "gelu", ((t, h),), aten.gelu.default),
        Probe("silu", "silu", ((t, h),), aten.silu.default),
        Probe("reduction", "sum", ((t, h),), aten.sum.default),
        Probe("copy", "cat", ((t, w), (t, w)), lambda a, b: aten.cat.default([a, b], -1)),
    )
    return matmul_probes(tokens, width) + tuple(replace(probe, size=tokens) for probe in others)


def matmul_probes(tokens: int, width: int) -> tuple[Probe, ...]:
    """The linear layers of a transformer block and an LM head on ``tokens`` rows."""
    t, w, h = tokens, width, 4 * width
    shapes = (((t, w), (3 * w, w), (3 * w,)), ((t, w), (h, w), (h,)), ((t, h), (w, h), (w,)), ((t, w), (2 * h, w)))
    return tuple(Probe("matmul", "linear", s, aten.linear.default, size=tokens) for s in shapes)


@dataclass
class ProbeTiming:
    """Median forward and backward seconds of one probe, and the roofline the cost model gives it."""

    probe: Probe
    forward_s: float
    backward_s: float
    roofline_forward_s: float
    roofline_backward_s: float
    flops: float
    """The probe's forward FLOPs (as the cost model counts them)."""


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What makes a timer see finished work on ``device``: ``cuda.synchronize`` on GPUs, nothing on CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def measure_op_overhead(repeats: int = 7, device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    """(forward, backward) seconds of dispatching one op: a chain of ops on one-element tensors."""
    sync = synchronizer(device)
    one = torch.ones(1, device=device)
    forward, backward = [], []
    for _ in range(repeats + 1):
        x = torch.zeros(1, requires_grad=True, device=device)
        sync()
        begin = time.perf_counter()
        y = x
        for _ in range(OVERHEAD_CHAIN):
            y = aten.add.Tensor(y, one)
        sync()
        middle = time.perf_counter()
        y.backward()
        sync()
        end = time.perf_counter()
        forward.append((middle - begin) / OVERHEAD_CHAIN)
        backward.append((end - middle) / OVERHEAD_CHAIN)
    return statistics.median(forward[1:]), statistics.median(backward[1:])


def time_probe(probe: Probe, repeats: int, peak_flops: float, memory_bandwidth: float,
               device: torch.device = torch.device("cpu")) -> ProbeTiming:
    """Median forward and backward seconds of ``probe`` over rotating operands, beside its roofline."""
    sync = synchronizer(device)
    pool = _operand_pool(probe, device)
    forward, backward = [], []
    for i in range(repeats + 1):
        operands = pool[i % len(pool)]
        sync()
        begin = time.perf_counter()
        out = probe.run(*operands)
        sync()
        middle = time.perf_counter()
        out.backward(torch.ones_like(out))
        sync()
        end = time.perf_counter()
        if i:  # the first run warms up
            forward.append(middle - begin)
            backward.append(end - middle)
        for x in operands:
            x.grad = None
    ins = [tuple(s) for s in probe.shapes]
    outs = [tuple(out.shape)]
    flops = float(op_flops(probe.op, ins, outs))
    nbytes = float(op_bytes(probe.op, ins, outs))
    backward_flops = float(op_backward_flops(probe.op, ins, outs))
    backward_bytes = float(op_backward_bytes(probe.op, ins, outs))
    return ProbeTiming(probe, statistics.median(forward), statistics.median(backward),
                       max(flops / peak_flops, nbytes / memory_bandwidth),
                       max(backward_flops / peak_flops, backward_bytes / memory_bandwidth), flops)


def _operand_pool(probe: Probe, device: torch.device) -> list[list[torch.Tensor]]:
    set_bytes = sum(4 * _numel(s) for s in probe.shapes)
    count = max(2, min(MAX_POOL, POOL_BYTES // max(set_bytes, 1)))
    return [[_operand(shape, probe.indices.get(position), device) for position, shape in enumerate(probe.shapes)]
            for _ in range(count)]


def _operand(shape: Sequence[int], bound: int | None, device: torch.device) -> torch.Tensor:
    if bound is not None:
        return torch.randint(0, bound, tuple(shape), device=device)
    return torch.randn(tuple(shape), device=device, requires_grad=True)


def _numel(shape: Sequence[int]) -> int:
    total = 1
    for d in shape:
        total *= d
    return total


def efficiency_table(timings: Sequence[ProbeTiming], overhead_s: tuple[float, float]) -> dict[str, dict]:
    """``{key: {forward, backward}}``: per key, summed roofline seconds over summed measured seconds
    less the dispatch overhead (so big probes weigh more), clamped to a sane range. Keys probed at
    several sizes (whose ops the cost model counts FLOPs for) also get ``by_flops``: ``[mean forward FLOPs,
    forward, backward]`` per size."""
    table = {}
    for key, group in _grouped(timings, lambda t: t.probe.key).items():
        table[key] = _efficiency(group, overhead_s)
        sizes = _grouped(group, lambda t: t.probe.size)
        points = sorted([statistics.fmean(t.flops for t in g), *_efficiency(g, overhead_s).values()]
                        for g in sizes.values())
        if len(points) > 1 and points[0][0] > 0:
            table[key]["by_flops"] = points
    return table


def _grouped(timings: Sequence[ProbeTiming], key: Callable) -> dict:
    groups: dict = {}
    for t in timings:
        groups.setdefault(key(t), []).append(t)
    return groups


def _efficiency(timings: Sequence[ProbeTiming], overhead_s: tuple[float, float]) -> dict[str, float]:
    roofline_forward = sum(t.roofline_forward_s for t in timings)
    forward = sum(max(t.forward_s - overhead_s[0], 0.1 * t.forward_s) for t in timings)
    priced = [t for t in timings if t.roofline_backward_s > 0]  # an addition's backward passes its gradient as is:
    roofline_backward = sum(t.roofline_backward_s for t in priced)  # the model prices no traffic, only the launch
    backward = sum(max(t.backward_s - overhead_s[1], 0.1 * t.backward_s) for t in priced)
    return {"forward": _clamp(roofline_forward / forward),
            "backward": _clamp(roofline_backward / backward) if roofline_backward > 0 else 1.0}


def _clamp(value: float) -> float:
    return min(MAX_EFFICIENCY, max(MIN_EFFICIENCY, value))


def measure_op_efficiency(peak_flops: float, memory_bandwidth: float, repeats: int = 9,
                          probes: Sequence[Probe] | None = None, barrier: Callable[[], None] = lambda: None,
                          device: torch.device = torch.device("cpu")
                          ) -> tuple[dict[str, dict[str, float]], tuple[float, float]]:
    """(efficiency table, (forward, backward) overhead seconds) on ``device`` (this process's threads
    on CPU). Default probes: :func:`default_probes` at CPU sizes, or at GPU sizes on a GPU.

    ``barrier`` runs before each probe, so that ranks measuring together run the same probe at once.
    """
    barrier()
    overhead = measure_op_overhead(device=device)
    if probes is None:
        tokens, width = GPU_PROBE_SIZE if device.type == "cuda" else CPU_PROBE_SIZE
        smaller = [p for factor in SIZE_SCAN for p in default_probes(int(tokens * factor), width)]
        larger = [p for factor in MATMUL_SIZE_SCAN for p in matmul_probes(int(tokens * factor), width)]
        probes = default_probes(tokens, width) + tuple(smaller + larger)
    timings = []
    for probe in probes:
        barrier()
        timings.append(time_probe(probe, repeats, peak_flops, memory_bandwidth, device))
    return efficiency_table(timings, overhead), overhead
