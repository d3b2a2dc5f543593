"""The ONNX op converters; importing this package registers all of them."""
from frontend.onnx.ops import attention, elementwise, misc, nn, reduce, resize, tensor  # noqa: F401
