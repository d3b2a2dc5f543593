"""The one error the ONNX frontend raises for models it cannot convert."""
from __future__ import annotations


class UnsupportedOnnx(ValueError):
    """An ONNX model uses an op, opset, domain or data type the converter does not handle.

    The message names the node (its name, or its first output when unnamed) or the graph
    input/output/initializer (``kind``), the op type, the domain and opset, the data type where
    that is the problem, and what to do about it.
    """

    def __init__(self, *, node: str, op_type: str, reason: str, opset: int | None = None,
                 domain: str = "ai.onnx", dtype: str | None = None, hint: str = "",
                 kind: str = "node"):
        self.node = node
        self.op_type = op_type
        self.opset = opset
        self.domain = domain or "ai.onnx"
        self.dtype = dtype
        self.reason = reason
        where = f"ONNX {kind} {node!r}"
        if op_type:
            where += f" (op {op_type}, domain {self.domain}"
            where += f", opset {opset})" if opset is not None else ")"
        what = reason if dtype is None else f"{reason} (data type {dtype})"
        message = f"{where}: {what}"
        if hint:
            message += f". {hint}"
        super().__init__(message)
