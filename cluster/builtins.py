"""The built-in clusters and device kinds (public numbers from vendor data sheets).

``local:N`` (CPU ranks on this host, what tests use), ``dgx-a100:N`` and ``dgx-h100:N`` are spec dicts
that :meth:`~cluster.model.Cluster.load` turns into clusters; :data:`DEVICE_KINDS` are the device kinds
a spec may name without defining them.
"""
from __future__ import annotations

from typing import Any, Callable

from cluster.model import DeviceKind

DEVICE_KINDS: dict[str, DeviceKind] = {
    "a100-80gb": DeviceKind("a100-80gb", {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
                            80 * 2**30, 2.039e12),
    "h100-sxm-80gb": DeviceKind("h100-sxm-80gb",
                                {"fp32": 67e12, "tf32": 494.5e12, "bf16": 989e12, "fp16": 989e12, "fp8": 1979e12},
                                80 * 2**30, 3.35e12),
    "v100-32gb": DeviceKind("v100-32gb", {"fp32": 15.7e12, "fp16": 125e12}, 32 * 2**30, 900e9),
    # A modest CPU core group; calibrate() measures the real numbers for this machine.
    "cpu": DeviceKind("cpu", {"fp32": 50e9, "bf16": 25e9, "fp16": 10e9}, 8 * 2**30, 10e9),
}
"""Device kinds a spec may name without defining them under ``device_kinds``."""


def _dgx_spec(name: str, count: int, device: str, intra_bandwidth: str, ib_bandwidth: str) -> dict[str, Any]:
    return {
        "name": f"{name}:{count}",
        "nodes": [{
            "count": count,
            "device": device,
            "devices": 8,
            "intra_link": {"class": "nvswitch", "bandwidth": intra_bandwidth, "latency": "2us"},
            "nics": [
                {"type": "infiniband", "count": 8, "bandwidth": ib_bandwidth, "latency": "5us"},
                {"type": "ethernet", "count": 2, "bandwidth": "100Gb/s", "latency": "30us"},
            ],
        }],
    }


def _dgx_a100_spec(count: int) -> dict[str, Any]:
    """DGX A100: 8 A100-80GB on NVSwitch (600 GB/s per GPU both ways), 8x200 Gb/s HDR InfiniBand."""
    return _dgx_spec("dgx-a100", count, "a100-80gb", "300GB/s", "200Gb/s")


def _dgx_h100_spec(count: int) -> dict[str, Any]:
    """DGX H100: 8 H100-SXM on NVLink4/NVSwitch (900 GB/s per GPU both ways), 8x400 Gb/s NDR InfiniBand."""
    return _dgx_spec("dgx-h100", count, "h100-sxm-80gb", "450GB/s", "400Gb/s")


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
    "local": local_spec, "dgx-a100": _dgx_a100_spec, "dgx-h100": _dgx_h100_spec,
}
"""Built-in name -> spec of ``count`` nodes (``local``: ``count`` CPU ranks on one node)."""
