"""The ONNX op converters; importing this package registers all of them."""
from frontend.onnx.ops import (  # noqa: F401
    attention, elementwise, misc, nn, recurrent, reduce, resize, tensor)
