"""The ONNX backend node tests, materialised in memory, and a runner for one of them.

The onnx wheel ships the generators of its node tests (``onnx.backend.test.case.node``) but
not their data; ``collect_testcases`` runs the generators (a few seconds) and returns each
case with its model and input/expected-output arrays. Cases are compared exactly as ONNX's
own ``BackendTest`` runner does (same dtype and shape, allclose with the case's rtol/atol).
Used by ``tests/frontend/test_onnx_backend.py`` and ``scripts/onnx_node_report.py``.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
from onnx.backend.test.case.test_case import TestCase
from onnx.backend.test.runner import Runner

from frontend.onnx import UnsupportedOnnx
from compiler.onnx_backend import CompilerBackend
from frontend.onnx.backend import SbpcBackend

# Op types of examples/gpt.py exported with torch.onnx.export (opset 17 with dynamo=False and
# True, and opset 14); tests/frontend/test_onnx_convert.py checks this list stays complete.
GPT_OP_TYPES = frozenset({
    "Add", "Cast", "Concat", "Constant", "Div", "Equal", "Erf", "Expand", "Gather", "Identity",
    "LayerNormalization", "MatMul", "Mul", "Pow", "ReduceMean", "Reshape", "Shape", "Slice",
    "Softmax", "Split", "Sqrt", "Sub", "Transpose", "Trilu", "Where",
})
REQUIRED_OP_TYPES = GPT_OP_TYPES | frozenset({
    "Conv", "BatchNormalization", "MaxPool", "AveragePool", "GlobalAveragePool", "Relu",
    "Concat", "Flatten", "Gemm", "Clip", "Sigmoid", "Tanh", "Erf", "Sqrt", "Pow", "Div", "Sub",
    "ReduceMean", "Expand", "Unsqueeze", "Squeeze", "Slice", "Shape", "Cast",
    "ConstantOfShape", "Range", "Equal", "Less", "Not",
})


@functools.cache
def all_node_cases() -> tuple[TestCase, ...]:
    """Every ONNX backend node test case (generated once per process)."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return tuple(sorted(collect_testcases(), key=lambda case: case.name))


def graph_op_types(graph: onnx.GraphProto) -> frozenset[str]:
    """Op types of a graph's nodes, including those inside subgraph attributes."""
    found: set[str] = set()
    for node in graph.node:
        found.add(node.op_type)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                found |= graph_op_types(attribute.g)
            for subgraph in attribute.graphs:
                found |= graph_op_types(subgraph)
    return frozenset(found)


def case_op_types(case: TestCase) -> frozenset[str]:
    """The op types a node test exercises (its model's nodes)."""
    return graph_op_types(case.model.graph)


def required_cases() -> list[TestCase]:
    """Node tests all of whose ops are in REQUIRED_OP_TYPES (function-expanded ones too)."""
    return [case for case in all_node_cases() if case_op_types(case) <= REQUIRED_OP_TYPES]


def _as_array(value: object) -> object:
    if isinstance(value, onnx.TensorProto):
        return onnx.numpy_helper.to_array(value)
    return value


def run_case(case: TestCase, backend: type[SbpcBackend] = CompilerBackend) -> None:
    """Convert and run one node test through ``backend`` (by default the whole compiler);
    AssertionError on a mismatch (ONNX's own comparison)."""
    rep = backend.prepare(case.model, "CPU")
    for inputs, expected in case.data_sets:
        outputs = rep.run([_as_array(a) for a in inputs])
        Runner.assert_similar_outputs([_as_array(e) for e in expected], list(outputs),
                                      rtol=case.rtol, atol=case.atol)


@dataclass(frozen=True)
class Outcome:
    """How one node test went: ``status`` is pass, fail, unsupported or error."""

    status: str
    detail: str = ""


def classify(case: TestCase) -> Outcome:
    """Run ``case`` and say how it went (never raises)."""
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            run_case(case)
    except UnsupportedOnnx as error:
        return Outcome("unsupported", str(error))
    except AssertionError as error:
        return Outcome("fail", str(error).strip().splitlines()[0] if str(error).strip() else
                       "outputs differ")
    except Exception as error:  # noqa: BLE001 - reported, grouped by exception type
        return Outcome("error", f"{type(error).__name__}: {error}")
    return Outcome("pass")
