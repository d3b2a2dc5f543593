"""The built-in clusters and device kinds, every constant set from a published kernel or collective
measurement (``shared/CALIBRATION.md``, sections 5 and 6; the source is named beside each number).

``local:N`` (CPU ranks on this host, what tests use), ``dgx-a100:N``, ``dgx-h100:N`` and ``jean-zay:N`` (the
A100 nodes BLOOM-176B trained on, with a quarter of a DGX's network) are spec dicts that
:meth:`~cluster.model.Cluster.load` turns into clusters; :data:`DEVICE_KIND_SPECS` are the device kinds a
spec may name without defining them (in the ``device_kinds`` format, read by :mod:`cluster.spec`). No constant
here is fitted to an end-to-end training run: those runs (``benchmarks/published_runs.py``) only check what the
constants predict.

How the cost model reads them (:mod:`cost.ops`, :mod:`cost.collectives`):

- an op takes its roofline time (FLOPs / peak, or bytes / HBM bandwidth, whichever is longer) divided
  by the efficiency the device reaches on that kind of op: dense GEMMs by their size (cuBLASLt sweeps),
  fused flash attention (FlashAttention-2 / cuDNN benchmarks; a causal kernel skips the masked half, so
  its FLOPs are counted halved, as those benchmarks count them), everything else memory-bound at the
  fraction of HBM bandwidth a STREAM copy reaches; plus a per-kernel launch gap;
- a collective within a node follows NCCL's measured bus bandwidth by message size (nccl-tests busbw
  sweeps of 8 GPUs); across nodes NCCL's rings spread over every NIC of the node, at the per-NIC
  bandwidth NCCL's maintainers quote.
"""
from __future__ import annotations

from typing import Any, Callable

# --------------------------------------------------------------------------------------------------
# Kernels (CALIBRATION.md section 6)
# --------------------------------------------------------------------------------------------------

A100_PEAK_BF16 = 312e12  # A100 SXM data sheet: 312 TFLOP/s dense bf16/fp16 (CALIBRATION.md 6a "Theory")
H100_PEAK_BF16 = 989e12  # H100 SXM data sheet: 989 TFLOP/s dense bf16/fp16 (CALIBRATION.md 6a "Theory")


def _gemm_curve(points: list[tuple[int, float]], peak: float) -> tuple[tuple[float, float, float], ...]:
    """``by_flops`` points of square m = n = k GEMMs measured at ``(m, TFLOP/s)``: (2 m^3 FLOPs, fraction
    of peak) for forward and backward alike (backward runs the same shapes, transposed)."""
    return tuple((2.0 * m**3, tflops * 1e12 / peak, tflops * 1e12 / peak) for m, tflops in points)


# cuBLASLt GEMM against size, ND A100 v4, FP16 (Azure/AI-benchmarking-guide; CALIBRATION.md 6a):
# 1024^3 119.4, 2048^3 221.8, 4096^3 228.0, 8192^3 253.7, 16384^3 256.5 TFLOP/s. The brute-force best
# shape reaches 267.9 (85.9%, stas00 MAMF table), the ceiling these sizes approach.
A100_GEMM = _gemm_curve([(1024, 119.4), (2048, 221.8), (4096, 228.0), (8192, 253.7), (16384, 256.5)],
                        A100_PEAK_BF16)

# H100 SXM BF16 GEMM: 1024/2048/4096 -> 177.8 / 557.7 / 742.9 TFLOP/s (profile_matmul.py output,
# secondary; CALIBRATION.md 6a); at 8192 and above the brute-force maximum 792.1 (80.1%, stas00 MAMF,
# primary) rather than the secondary 824.2, which exceeds it.
H100_GEMM = _gemm_curve([(1024, 177.8), (2048, 557.7), (4096, 742.9), (8192, 792.1)], H100_PEAK_BF16)

# Fused flash attention, causal, head dim 128, sequence 2k, FLOPs halved for causal as the benchmarks count
# them. A100: FlashAttention-2 (Dao 2023, CALIBRATION.md 6b) forward 200 and backward 187 TFLOP/s
# non-causal; causal forward+backward 155 against 196 non-causal, so each phase x 155/196.
A100_FLASH = (200 * 155 / 196 * 1e12 / A100_PEAK_BF16, 187 * 155 / 196 * 1e12 / A100_PEAK_BF16)
# H100: cuDNN fused attention, what Transformer Engine runs on Hopper (FlashAttention-3 paper, figures 5
# and 6 at 16k, secondary; CALIBRATION.md 6c): forward causal hd128 539 TFLOP/s; backward hd128 516
# non-causal, x 539/595 (the forward's causal / non-causal ratio) for causal.
H100_FLASH = (539e12 / H100_PEAK_BF16, 516 * 539 / 595 * 1e12 / H100_PEAK_BF16)

# Memory-bound kernels (elementwise, norms, softmax, copies, embedding lookups, the optimizer step):
# the fraction of HBM bandwidth a STREAM copy reaches (Azure/AI-benchmarking-guide; CALIBRATION.md 6d):
# A100 1.61 of 2.039 TB/s (79%), H100 2.90 of 3.35 TB/s (87%).
A100_STREAM = 1.61 / 2.039
H100_STREAM = 2.90 / 3.35

# Per-kernel launch gap: a minimal CUDA kernel (x + y on 1024 elements) occupies the stream 1.1-1.3 us
# (pytorch/pytorch#161104, CUDA-event timing). Eager dispatch on the host (tens of microseconds per op)
# runs ahead of the GPU on these models' kernels, so only the device-side gap counts; backward ops launch
# about two kernels each.
GPU_KERNEL_GAP_S = (1.2e-6, 2.4e-6)


# Every collective call: NCCL's base latency for the ring LL protocol, 6.6 us (NVIDIA/nccl src/graph/tuning.cc;
# CALIBRATION.md 5d), which the DGX-A100 ring timings of 2..8 GPUs (nccl-tests#123: 10 us at 2 GPUs, 33.7 at 8,
# about 2 us per step) put at 6 us.
NCCL_CALL_S = 6.6e-6


def _gpu_efficiency(gemm: tuple, flash: tuple[float, float], stream: float) -> dict[str, Any]:
    return {"matmul": {"forward": gemm[-1][1], "backward": gemm[-1][2], "by_flops": [list(p) for p in gemm]},
            "attention": {"forward": flash[0], "backward": flash[1]},
            "default": stream}


DEVICE_KIND_SPECS: dict[str, dict[str, Any]] = {
    "a100-80gb": {
        # NVIDIA A100 data sheet (SXM 80GB): tf32 156, fp32 19.5 TFLOP/s, 2.039 TB/s HBM2e.
        "peak_flops": {"fp32": 19.5e12, "tf32": 156e12, "bf16": A100_PEAK_BF16, "fp16": A100_PEAK_BF16},
        "memory": 80 * 2**30, "memory_bandwidth": 2.039e12,
        "op_overhead": {"forward": GPU_KERNEL_GAP_S[0], "backward": GPU_KERNEL_GAP_S[1]},
        "efficiency": _gpu_efficiency(A100_GEMM, A100_FLASH, A100_STREAM),
        "collective_overhead": NCCL_CALL_S,
    },
    "h100-sxm-80gb": {
        # NVIDIA H100 SXM data sheet: fp8 1979, tf32 494.5, fp32 67 TFLOP/s dense, 3.35 TB/s HBM3.
        "peak_flops": {"fp32": 67e12, "tf32": 494.5e12, "bf16": H100_PEAK_BF16, "fp16": H100_PEAK_BF16,
                       "fp8": 1979e12},
        "memory": 80 * 2**30, "memory_bandwidth": 3.35e12,
        "op_overhead": {"forward": GPU_KERNEL_GAP_S[0], "backward": GPU_KERNEL_GAP_S[1]},
        "efficiency": _gpu_efficiency(H100_GEMM, H100_FLASH, H100_STREAM),
        "collective_overhead": NCCL_CALL_S,
    },
    # V100 data sheet (SXM2 32GB); no calibration published here: ops at their roofline.
    "v100-32gb": {"peak_flops": {"fp32": 15.7e12, "fp16": 125e12}, "memory": 32 * 2**30,
                  "memory_bandwidth": 900e9},
    # A modest CPU core group; `sbpc calibrate` measures the real numbers for this machine.
    "cpu": {"peak_flops": {"fp32": 50e9, "bf16": 25e9, "fp16": 10e9}, "memory": 8 * 2**30,
            "memory_bandwidth": 10e9},
}
"""Device kinds a spec may name without defining them, as ``device_kinds`` entries (``docs/clusters.md``)."""


# --------------------------------------------------------------------------------------------------
# Collectives (CALIBRATION.md section 5)
# --------------------------------------------------------------------------------------------------

KiB, MiB, GiB = 2**10, 2**20, 2**30
NCCL_TEST_SIZES = (1 * KiB, 8 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB,
                   1 * GiB, 8 * GiB)

# Single-node all_reduce bus bandwidth (GB/s) by size, 8 GPUs, NCCL 2.18.5 in place (Azure/AI-benchmarking-
# guide ND A100 v4 and ND H100 v5 results; CALIBRATION.md 5b). A100: NCCL's default (ring) algorithm;
# H100: NVLink SHARP (NVLS), which only all_reduce uses.
A100_ALL_REDUCE_BUSBW = (0.04, 0.33, 2.70, 10.11, 36.22, 71.43, 109.22, 166.63, 213.87, 228.10, 231.58)
H100_ALL_REDUCE_BUSBW = (0.07, 0.53, 2.72, 10.86, 43.70, 128.73, 234.45, 361.78, 423.38, 466.35, 478.87)
# Ring collectives on H100 NVLink4 without NVLS reach "effective NVLink BW ~370 GB/s" (sjeaugey,
# NVIDIA/nccl-tests#212): all_gather and reduce_scatter follow the all_reduce sweep up to that plateau
# (an assumption: the same protocol switch points by size).
H100_RING_PLATEAU = 370.0

# Per-step latency inside a node: the sweeps' small-message floor (A100 ~43 us, H100 ~26 us for 8 GPUs;
# CALIBRATION.md 5b, derived) less the call's base latency, over the 14 steps of an 8-GPU ring all_reduce.
A100_NVSWITCH_STEP_S = 2.6e-6   # (43 - 6.6) / 14
H100_NVSWITCH_STEP_S = 1.39e-6  # (26 - 6.6) / 14

# NICs: HDR 200 Gb/s reaches ~24 GB/s each (sjeaugey, NVIDIA/nccl#412), and 8 of them give a DGX A100
# "192GB/s AllReduce BusBW" across nodes (AddyLaddy, NVIDIA/nccl#812); NDR 400 Gb/s reaches "46-48GB/s
# per NIC" (NVIDIA/nccl-tests#290, #267): 47. A 100 Gb/s card: "12.2 GB/s ... as good as you can get"
# (sjeaugey, NVIDIA/nccl-tests#29).
HDR_NIC_BPS, NDR_NIC_BPS, ETHERNET_100G_BPS = 24e9, 47e9, 12.2e9
# Per network hop: NCCL's latency model for the ring LL128 protocol over the network, 4.0 us, and for the
# Simple protocol, 14 us (NVIDIA/nccl src/graph/tuning.cc; CALIBRATION.md 5d): InfiniBand at LL128 (what
# NCCL runs at the sizes where latency matters), host Ethernet at Simple.
IB_HOP_S, ETHERNET_HOP_S = 4.0e-6, 14e-6


def _busbw(values_gbs: tuple[float, ...], cap_gbs: float | None = None) -> list[list[float]]:
    return [[float(size), min(v, cap_gbs or v) * 1e9] for size, v in zip(NCCL_TEST_SIZES, values_gbs)]


def _nvswitch(busbw_gbs: tuple[float, ...], step_s: float, ring_cap_gbs: float | None) -> dict[str, Any]:
    """An NVSwitch intra-node link: all_reduce on its measured sweep, the other ring collectives on the same
    sweep (capped at the ring plateau where all_reduce runs another algorithm); point-to-point and
    all-to-all at the ring plateau."""
    ring = _busbw(busbw_gbs, ring_cap_gbs)
    plateau = ring[-1][1]
    return {"class": "nvswitch", "bandwidth": plateau, "latency": step_s,
            "collectives": {"all_reduce": {"busbw": _busbw(busbw_gbs), "ranks": 8},
                            "all_gather": {"busbw": ring, "ranks": 8},
                            "reduce_scatter": {"busbw": ring, "ranks": 8}}}


def _node_spec(name: str, count: int, device: str, intra_link: dict, nics: list[dict]) -> dict[str, Any]:
    return {"name": f"{name}:{count}",
            "nodes": [{"count": count, "device": device, "devices": 8, "intra_link": intra_link, "nics": nics}]}


def _dgx_spec(name: str, count: int, device: str, intra_link: dict, ib_nic_Bps: float) -> dict[str, Any]:
    return _node_spec(name, count, device, intra_link, [
        {"type": "infiniband", "count": 8, "bandwidth": ib_nic_Bps, "latency": IB_HOP_S},
        {"type": "ethernet", "count": 2, "bandwidth": ETHERNET_100G_BPS, "latency": ETHERNET_HOP_S},
    ])


def _a100_nvswitch() -> dict[str, Any]:
    """The NVSwitch (NVLink3) inside an 8 x A100 node, as the DGX A100's NCCL sweep measured it."""
    return _nvswitch(A100_ALL_REDUCE_BUSBW, A100_NVSWITCH_STEP_S, None)


def dgx_a100_spec(count: int) -> dict[str, Any]:
    """DGX A100: 8 A100-80GB on NVSwitch (NVLink3), 8x200 Gb/s HDR InfiniBand, 2x100 GbE."""
    return _dgx_spec("dgx-a100", count, "a100-80gb", _a100_nvswitch(), HDR_NIC_BPS)


def dgx_h100_spec(count: int) -> dict[str, Any]:
    """DGX H100: 8 H100-SXM on NVSwitch (NVLink4, NVLS all_reduce), 8x400 Gb/s NDR InfiniBand, 2x100 GbE."""
    return _dgx_spec("dgx-h100", count, "h100-sxm-80gb",
                     _nvswitch(H100_ALL_REDUCE_BUSBW, H100_NVSWITCH_STEP_S, H100_RING_PLATEAU), NDR_NIC_BPS)


# Jean Zay's A100 nodes, where BLOOM-176B trained: 8 A100 80GB each, "4 OmniPath links" per node (bigscience
# tr11-176B-ml README; CALIBRATION.md 7d). Omni-Path runs at 100 Gb/s and NCCL drives it through its InfiniBand
# verbs transport; a 100 Gb/s card reaches 12.2 GB/s, four of them 48 GB/s (sjeaugey, NVIDIA/nccl-tests#29;
# CALIBRATION.md 5c). Inside a node: the DGX A100's NVSwitch sweep (an assumption: the README names NVLink only).
OMNI_PATH_100G_BPS = ETHERNET_100G_BPS


def jean_zay_spec(count: int) -> dict[str, Any]:
    """Jean Zay's A100 partition: 8 A100-80GB on NVSwitch (NVLink3), 4x100 Gb/s Omni-Path per node."""
    return _node_spec("jean-zay", count, "a100-80gb", _a100_nvswitch(),
                      [{"type": "infiniband", "count": 4, "bandwidth": OMNI_PATH_100G_BPS, "latency": IB_HOP_S}])


def local_spec(count: int) -> dict[str, Any]:
    """``count`` CPU ranks on one host; gloo over loopback moves a few GB/s with tens of microseconds latency."""
    return {
        "name": f"local:{count}",
        "nodes": [{
            "name": "localhost",
            "device": "cpu",
            "devices": count,
            "intra_link": {"class": "loopback", "bandwidth": "2GB/s", "latency": "50us"},
            "nics": [{"type": "ethernet", "count": 1, "bandwidth": "10Gb/s", "latency": "30us"}],
        }],
    }


BUILTINS: dict[str, Callable[[int], dict[str, Any]]] = {
    "local": local_spec, "dgx-a100": dgx_a100_spec, "dgx-h100": dgx_h100_spec, "jean-zay": jean_zay_spec,
}
"""Built-in name -> spec of ``count`` nodes (``local``: ``count`` CPU ranks on one node)."""
