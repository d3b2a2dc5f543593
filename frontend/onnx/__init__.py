"""ONNX frontend: convert an ONNX model into a torch module the compiler can capture.

``onnx_to_torch(model)`` builds a :class:`OnnxModule` (a ``torch.fx.GraphModule``) whose
forward reproduces the ONNX graph's semantics with torch ops, one fx node per ONNX node.
:class:`SbpcBackend` (in :mod:`frontend.onnx.backend`) runs models through it with the
``onnx.backend`` API, which is how the ONNX backend node tests exercise the converter.
"""
from frontend.onnx.backend import SbpcBackend
from frontend.onnx.convert import OnnxModule, onnx_to_torch
from frontend.onnx.errors import UnsupportedOnnx

__all__ = ["OnnxModule", "SbpcBackend", "UnsupportedOnnx", "onnx_to_torch"]
