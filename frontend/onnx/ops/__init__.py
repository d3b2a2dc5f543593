"""The ONNX op converters; importing this package registers all of them."""
from frontend.onnx.ops import elementwise, nn, reduce, tensor  # noqa: F401
