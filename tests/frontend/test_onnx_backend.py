"""The ONNX backend node tests for the ops the project needs, through the compiler (CompilerBackend).

Every node test whose ops are all in ``REQUIRED_OP_TYPES`` (the exported GPT example's ops
plus the common CNN ops; function-expanded variants included) must pass, except the cases in
``SKIPPED``, each of which needs a data type torch cannot hold. A skipped case must still be
refused with UnsupportedOnnx, so the table cannot go stale silently.
Run ``python scripts/onnx_node_report.py`` for the numbers over all node tests.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from frontend.onnx import UnsupportedOnnx
from frontend.onnx.backend import SbpcBackend, eager_runner
from tests.frontend.onnx_node_cases import (REQUIRED_OP_TYPES, all_node_cases, required_cases,
                                            run_case)

NO_SUBBYTE_DTYPE = ("torch has no usable tensor dtype for the packed sub-byte ONNX types "
                    "(INT4, UINT4, INT2, UINT2, FLOAT4E2M1): torch.int4 & co. cannot even be "
                    "copied into")
NO_STRING_DTYPE = "torch has no string tensors (ONNX STRING)"
NO_SEQUENCE_TYPE = "sequence and optional values are not tensors; the converter takes tensors"

SKIPPED: dict[str, str] = {
    "test_cast_FLOAT16_to_FLOAT4E2M1": NO_SUBBYTE_DTYPE,
    "test_cast_FLOAT16_to_INT2": NO_SUBBYTE_DTYPE,
    "test_cast_FLOAT16_to_INT4": NO_SUBBYTE_DTYPE,
    "test_cast_FLOAT16_to_UINT2": NO_SUBBYTE_DTYPE,
    "test_cast_FLOAT16_to_UINT4": NO_SUBBYTE_DTYPE,
    "test_cast_FLOAT4E2M1_to_FLOAT": NO_SUBBYTE_DTYPE,
    "test_cast_FLOAT4E2M1_to_FLOAT16": NO_SUBBYTE_DTYPE,
    "test_cast_FLOAT_to_FLOAT4E2M1": NO_SUBBYTE_DTYPE,
    "test_cast_FLOAT_to_INT2": NO_SUBBYTE_DTYPE,
    "test_cast_FLOAT_to_INT4": NO_SUBBYTE_DTYPE,
    "test_cast_FLOAT_to_UINT2": NO_SUBBYTE_DTYPE,
    "test_cast_FLOAT_to_UINT4": NO_SUBBYTE_DTYPE,
    "test_cast_INT2_to_FLOAT": NO_SUBBYTE_DTYPE,
    "test_cast_INT2_to_FLOAT16": NO_SUBBYTE_DTYPE,
    "test_cast_INT2_to_INT8": NO_SUBBYTE_DTYPE,
    "test_cast_INT4_to_FLOAT": NO_SUBBYTE_DTYPE,
    "test_cast_INT4_to_FLOAT16": NO_SUBBYTE_DTYPE,
    "test_cast_INT4_to_INT8": NO_SUBBYTE_DTYPE,
    "test_cast_UINT2_to_FLOAT": NO_SUBBYTE_DTYPE,
    "test_cast_UINT2_to_FLOAT16": NO_SUBBYTE_DTYPE,
    "test_cast_UINT2_to_UINT8": NO_SUBBYTE_DTYPE,
    "test_cast_UINT4_to_FLOAT": NO_SUBBYTE_DTYPE,
    "test_cast_UINT4_to_FLOAT16": NO_SUBBYTE_DTYPE,
    "test_cast_UINT4_to_UINT8": NO_SUBBYTE_DTYPE,
    "test_castlike_FLOAT16_to_FLOAT4E2M1_expanded": NO_SUBBYTE_DTYPE,
    "test_castlike_FLOAT16_to_INT2_expanded": NO_SUBBYTE_DTYPE,
    "test_castlike_FLOAT16_to_INT4_expanded": NO_SUBBYTE_DTYPE,
    "test_castlike_FLOAT16_to_UINT2_expanded": NO_SUBBYTE_DTYPE,
    "test_castlike_FLOAT16_to_UINT4_expanded": NO_SUBBYTE_DTYPE,
    "test_castlike_FLOAT4E2M1_to_FLOAT16_expanded": NO_SUBBYTE_DTYPE,
    "test_castlike_FLOAT4E2M1_to_FLOAT_expanded": NO_SUBBYTE_DTYPE,
    "test_castlike_FLOAT_to_FLOAT4E2M1_expanded": NO_SUBBYTE_DTYPE,
    "test_castlike_FLOAT_to_INT2_expanded": NO_SUBBYTE_DTYPE,
    "test_castlike_FLOAT_to_INT4_expanded": NO_SUBBYTE_DTYPE,
    "test_castlike_FLOAT_to_UINT2_expanded": NO_SUBBYTE_DTYPE,
    "test_castlike_FLOAT_to_UINT4_expanded": NO_SUBBYTE_DTYPE,
    "test_castlike_INT2_to_FLOAT16_expanded": NO_SUBBYTE_DTYPE,
    "test_castlike_INT2_to_FLOAT_expanded": NO_SUBBYTE_DTYPE,
    "test_castlike_INT2_to_INT8_expanded": NO_SUBBYTE_DTYPE,
    "test_castlike_INT4_to_FLOAT16_expanded": NO_SUBBYTE_DTYPE,
    "test_castlike_INT4_to_FLOAT_expanded": NO_SUBBYTE_DTYPE,
    "test_castlike_INT4_to_INT8_expanded": NO_SUBBYTE_DTYPE,
    "test_castlike_UINT2_to_FLOAT16_expanded": NO_SUBBYTE_DTYPE,
    "test_castlike_UINT2_to_FLOAT_expanded": NO_SUBBYTE_DTYPE,
    "test_castlike_UINT2_to_UINT8_expanded": NO_SUBBYTE_DTYPE,
    "test_castlike_UINT4_to_FLOAT16_expanded": NO_SUBBYTE_DTYPE,
    "test_castlike_UINT4_to_FLOAT_expanded": NO_SUBBYTE_DTYPE,
    "test_castlike_UINT4_to_UINT8_expanded": NO_SUBBYTE_DTYPE,
    "test_equal_string": NO_STRING_DTYPE,
    "test_equal_string_broadcast": NO_STRING_DTYPE,
    "test_identity_opt": NO_SEQUENCE_TYPE,
    "test_identity_sequence": NO_SEQUENCE_TYPE,
}

REQUIRED = {case.name: case for case in required_cases()}


@pytest.mark.parametrize("name", list(REQUIRED))
def test_required_node_case(name):
    case = REQUIRED[name]
    if name in SKIPPED:
        with pytest.raises(UnsupportedOnnx):
            run_case(case)
        pytest.skip(SKIPPED[name])
    run_case(case)


def test_skip_table_lists_only_required_cases():
    assert set(SKIPPED) <= set(REQUIRED)


def test_every_required_op_type_has_node_cases():
    covered = {node.op_type for case in REQUIRED.values() for node in case.model.graph.node}
    assert covered >= REQUIRED_OP_TYPES
    assert len(REQUIRED) > 400  # the selection did not silently shrink


def _identity_model(elem_type: int) -> onnx.ModelProto:
    info = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [info("x", elem_type, [3])], [info("y", elem_type, [3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("elem_type", [TensorProto.BOOL, TensorProto.INT64, TensorProto.UINT32,
                                       TensorProto.FLOAT16, TensorProto.DOUBLE,
                                       TensorProto.BFLOAT16, TensorProto.FLOAT8E4M3FN])
def test_backend_round_trips_numpy_dtypes(elem_type):
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    x = np.array([0, 1, 0], dtype=np.float32).astype(dtype)
    (y,) = SbpcBackend.prepare(_identity_model(elem_type)).run([x])
    assert y.dtype == dtype
    np.testing.assert_array_equal(y.astype(np.float32), x.astype(np.float32))


def test_backend_accepts_inputs_by_name_and_run_node():
    rep = SbpcBackend.prepare(_identity_model(TensorProto.FLOAT))
    x = np.arange(3, dtype=np.float32)
    np.testing.assert_array_equal(rep.run({"x": x})[0], x)
    (y,) = SbpcBackend.run_node(helper.make_node("Relu", ["a"], ["b"]), [x - 1])
    np.testing.assert_array_equal(y, np.maximum(x - 1, 0))
    assert SbpcBackend.supports_device("CPU") and not SbpcBackend.supports_device("CUDA")
    with pytest.raises(ValueError, match="takes 1 inputs"):
        rep.run([x, x])


def test_a_wrong_result_is_detected(monkeypatch):
    """The comparison is real: a runner that perturbs outputs makes a case fail."""

    def off_by_one(module, inputs):
        return tuple(out + 1 for out in eager_runner(module, inputs))

    monkeypatch.setattr(SbpcBackend, "runner", off_by_one)
    with pytest.raises(AssertionError):
        run_case(REQUIRED["test_relu"], backend=SbpcBackend)


def test_node_cases_are_generated_in_memory():
    cases = all_node_cases()
    assert len(cases) > 1500
    assert all(case.model is not None and case.data_sets for case in cases)
