"""The ONNX backend over the compiler: every ONNX model runs through capture, the passes and the virtual mesh.

``CompilerBackend`` is an ``onnx.backend.base.Backend``: the ONNX project's backend test suite
runs against it (``tests/frontend/test_onnx_backend.py``, ``scripts/onnx_node_report.py``).
"""
from __future__ import annotations

import warnings

import torch

from frontend.onnx.backend import SbpcBackend
from frontend.onnx.convert import OnnxModule


def compiled_runner(module: OnnxModule, inputs: tuple[torch.Tensor, ...], ranks: int = 1) -> tuple:
    """Compile ``module`` for inference on ``ranks`` CPU ranks and run it on the virtual mesh."""
    from compiler.api import compile
    from cluster import Cluster
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ops without SBP rules are expected here: one rank
        plan = compile(module, inputs, cluster=Cluster.local(ranks), strategy="dp", mode="infer")
        with torch.no_grad():
            return plan.run_virtual(*inputs).outputs


class CompilerBackend(SbpcBackend):
    """``SbpcBackend`` whose models run through ``compile(..., mode="infer").run_virtual``."""

    runner = staticmethod(compiled_runner)
