"""ONNX element types <-> torch dtypes, and numpy <-> torch tensor conversion.

ONNX names its element types with ``TensorProto.DataType`` integers; torch has a native dtype
for most of them. The ones without a torch dtype (strings, complex numbers, the packed 2/4/6-bit
types) are refused with :class:`UnsupportedOnnx` so the error names the node and the type.
numpy has no bfloat16 or float8 types; ONNX uses ``ml_dtypes`` for those, so conversions to and
from numpy go through a same-width integer view.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import torch

from frontend.onnx.errors import UnsupportedOnnx

TP = onnx.TensorProto

ONNX_TO_TORCH: dict[int, torch.dtype] = {
    TP.FLOAT: torch.float32,
    TP.UINT8: torch.uint8,
    TP.INT8: torch.int8,
    TP.UINT16: torch.uint16,
    TP.INT16: torch.int16,
    TP.INT32: torch.int32,
    TP.INT64: torch.int64,
    TP.BOOL: torch.bool,
    TP.FLOAT16: torch.float16,
    TP.DOUBLE: torch.float64,
    TP.UINT32: torch.uint32,
    TP.UINT64: torch.uint64,
    TP.BFLOAT16: torch.bfloat16,
    TP.FLOAT8E4M3FN: torch.float8_e4m3fn,
    TP.FLOAT8E4M3FNUZ: torch.float8_e4m3fnuz,
    TP.FLOAT8E5M2: torch.float8_e5m2,
    TP.FLOAT8E5M2FNUZ: torch.float8_e5m2fnuz,
    TP.FLOAT8E8M0: torch.float8_e8m0fnu,
}
TORCH_TO_ONNX: dict[torch.dtype, int] = {v: k for k, v in ONNX_TO_TORCH.items()}

# numpy dtypes that torch.from_numpy cannot take: reinterpret them through an integer of the
# same width (the bit patterns are identical between ml_dtypes and torch).
_VIEW_AS_INT: dict[torch.dtype, tuple[np.dtype, np.dtype, torch.dtype]] = {
    torch.bfloat16: (np.dtype(ml_dtypes.bfloat16), np.dtype(np.int16), torch.int16),
    torch.float8_e4m3fn: (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(np.uint8), torch.uint8),
    torch.float8_e4m3fnuz: (np.dtype(ml_dtypes.float8_e4m3fnuz), np.dtype(np.uint8), torch.uint8),
    torch.float8_e5m2: (np.dtype(ml_dtypes.float8_e5m2), np.dtype(np.uint8), torch.uint8),
    torch.float8_e5m2fnuz: (np.dtype(ml_dtypes.float8_e5m2fnuz), np.dtype(np.uint8), torch.uint8),
    torch.float8_e8m0fnu: (np.dtype(ml_dtypes.float8_e8m0fnu), np.dtype(np.uint8), torch.uint8),
}
_NUMPY_VIEW_TO_TORCH = {view[0]: torch_dtype for torch_dtype, view in _VIEW_AS_INT.items()}

FLOAT_DTYPES = frozenset(
    {torch.float16, torch.bfloat16, torch.float32, torch.float64}
)
# torch has no arithmetic kernels for these; ops compute in int64 and cast back.
WIDE_UNSIGNED = frozenset({torch.uint16, torch.uint32, torch.uint64})


def onnx_type_name(elem_type: int) -> str:
    """The ONNX spelling of an element type, e.g. ``FLOAT`` or ``STRING``."""
    try:
        return TP.DataType.Name(elem_type)
    except ValueError:
        return f"<unknown element type {elem_type}>"


def torch_dtype(elem_type: int, *, node: str, op_type: str = "", opset: int | None = None,
                kind: str = "node") -> torch.dtype:
    """The torch dtype of an ONNX element type; :class:`UnsupportedOnnx` when torch has none.

    ``node`` / ``op_type`` / ``kind`` say where the type appears, for the error message.
    """
    try:
        return ONNX_TO_TORCH[elem_type]
    except KeyError:
        raise UnsupportedOnnx(
            node=node, op_type=op_type, opset=opset, dtype=onnx_type_name(elem_type), kind=kind,
            reason="torch has no tensor dtype for this ONNX element type",
            hint="only bool, (u)int8-64, float16/32/64, bfloat16 and float8 tensors convert",
        ) from None


def tensor_from_numpy(array: np.ndarray | np.generic) -> torch.Tensor:
    """A torch tensor with the same dtype and values as ``array`` (a copy, never a view)."""
    array = np.array(array, order="C", copy=True)  # keeps 0-D arrays 0-D
    torch_view = _NUMPY_VIEW_TO_TORCH.get(array.dtype)
    if torch_view is not None:
        _, int_numpy, _ = _VIEW_AS_INT[torch_view]
        return torch.from_numpy(array.view(int_numpy)).view(torch_view)
    if array.dtype == object or array.dtype.kind in "USc":
        raise UnsupportedOnnx(node="<numpy array>", op_type="", dtype=str(array.dtype),
                              kind="value", reason="string and complex tensors have no torch "
                              "equivalent here")
    return torch.from_numpy(array)


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """The numpy array (ml_dtypes for bfloat16 / float8) holding ``tensor``'s values."""
    tensor = tensor.detach().cpu().contiguous()
    view = _VIEW_AS_INT.get(tensor.dtype)
    if view is not None:
        ml_numpy, _, int_torch = view
        return tensor.view(int_torch).numpy().view(ml_numpy)
    return tensor.numpy()


def sparse_to_dense(sparse: onnx.SparseTensorProto, base_dir: str = "") -> np.ndarray:
    """A SparseTensorProto as a dense numpy array."""
    values = onnx.numpy_helper.to_array(sparse.values, base_dir=base_dir)
    indices = onnx.numpy_helper.to_array(sparse.indices, base_dir=base_dir).astype(np.int64)
    dims = tuple(sparse.dims)
    dense = np.zeros(int(np.prod(dims)), dtype=values.dtype)
    if indices.ndim == 2:  # [nnz, rank] coordinates
        indices = np.ravel_multi_index(tuple(indices.T), dims)
    dense[indices.reshape(-1)] = values.reshape(-1)
    return dense.reshape(dims)
