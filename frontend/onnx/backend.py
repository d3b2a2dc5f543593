"""An ``onnx.backend`` implementation running ONNX models through the torch conversion.

``SbpcBackend.prepare(model)`` converts the model with :func:`onnx_to_torch` and returns a
:class:`SbpcBackendRep`, whose ``run(inputs)`` feeds numpy arrays to
``SbpcBackend.runner(module, tensors)`` and hands back numpy arrays with the ONNX dtypes.
The runner defaults to eager execution; to run through the compiler instead, set it once::

    SbpcBackend.runner = lambda module, inputs: compiler.compile(
        module, inputs, strategy=None, mode="infer").run_virtual(*inputs).outputs
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnx.backend.base
import torch

from frontend.onnx.convert import OnnxModule, onnx_to_torch
from frontend.onnx.dtypes import tensor_from_numpy, tensor_to_numpy

Runner = Callable[[OnnxModule, tuple[torch.Tensor, ...]], Sequence[torch.Tensor]]


def eager_runner(module: OnnxModule, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Run the converted module eagerly, without autograd."""
    with torch.no_grad():
        return tuple(module(*inputs))


class SbpcBackendRep(onnx.backend.base.BackendRep):
    """A prepared (converted) model; ``run`` takes and returns numpy arrays.

    Graph inputs that ops read as configuration (``module.config_inputs``: reshape targets,
    slice bounds, axes...) are bound to the values of each run, and the model is converted
    again for every new combination of them, so the runner always gets a static module
    that torch.export can trace.
    """

    def __init__(self, model: onnx.ModelProto, module: OnnxModule, runner: Runner):
        self.model = model
        self.module = module
        self.runner = runner
        self._specialized: dict[tuple, OnnxModule] = {}

    def run(self, inputs: Any, **kwargs: Any) -> tuple[np.ndarray, ...]:
        """Run on ``inputs`` (a list in graph-input order, a dict by name, or one array)."""
        arrays = dict(zip(self.module.input_names, self._ordered(inputs), strict=True))
        module = self._module_for(arrays)
        tensors = tuple(tensor_from_numpy(np.asarray(arrays[name]))
                        for name in module.input_names)
        outputs = self.runner(module, tensors)
        return tuple(tensor_to_numpy(out) for out in outputs)

    def _module_for(self, arrays: dict[str, Any]) -> OnnxModule:
        if not self.module.config_inputs:
            return self.module
        bound = {name: np.asarray(arrays[name]) for name in self.module.config_inputs}
        key = tuple((name, a.dtype.str, a.shape, a.tobytes()) for name, a in bound.items())
        if key not in self._specialized:
            self._specialized[key] = onnx_to_torch(self.model, constant_inputs=bound)
        return self._specialized[key]

    def _ordered(self, inputs: Any) -> list[Any]:
        names = self.module.input_names
        if isinstance(inputs, dict):
            missing = [name for name in names if name not in inputs]
            if missing:
                raise ValueError(f"inputs {missing} of the model were not given; expected "
                                 f"{names}")
            return [inputs[name] for name in names]
        if isinstance(inputs, (list, tuple)):
            if len(inputs) != len(names):
                raise ValueError(f"the model takes {len(names)} inputs {names}, got "
                                 f"{len(inputs)}")
            return list(inputs)
        return [inputs]


class SbpcBackend(onnx.backend.base.Backend):
    """ONNX backend converting models to torch; executes through ``SbpcBackend.runner``."""

    runner: Runner = eager_runner

    @classmethod
    def is_compatible(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> bool:
        """Whether the model converts (unsupported ops, types or opsets make it False)."""
        try:
            onnx_to_torch(model)
        except ValueError:
            return False
        return True

    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any
                ) -> SbpcBackendRep:
        """Check and convert ``model``; the returned rep runs it."""
        if not cls.supports_device(device):
            raise ValueError(f"SbpcBackend runs on CPU only, got device {device!r}")
        super().prepare(model, device, **kwargs)
        # read on the class, a function attribute stays a plain (unbound) function
        return SbpcBackendRep(model, onnx_to_torch(model), cls.runner)

    @classmethod
    def run_model(cls, model: onnx.ModelProto, inputs: Any, device: str = "CPU",
                  **kwargs: Any) -> tuple[np.ndarray, ...]:
        """Prepare and run ``model`` once."""
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def run_node(cls, node: onnx.NodeProto, inputs: Any, device: str = "CPU",
                 outputs_info: Sequence[tuple[Any, tuple[int, ...]]] | None = None,
                 **kwargs: Any) -> tuple[np.ndarray, ...]:
        """Run a single node on numpy inputs (wrapped in a one-node model)."""
        arrays = [np.asarray(a) for a in inputs]
        present = [name for name in node.input if name]
        graph_inputs = [
            onnx.helper.make_tensor_value_info(
                name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype), array.shape)
            for name, array in zip(present, arrays, strict=True)]
        graph_outputs = [onnx.ValueInfoProto(name=name) for name in node.output if name]
        graph = onnx.helper.make_graph([node], "run_node", graph_inputs, graph_outputs)
        opset = kwargs.pop("opset_version", onnx.defs.onnx_opset_version())
        model = onnx.helper.make_model(
            graph, opset_imports=[onnx.helper.make_operatorsetid("", opset)])
        # the checker wants typed outputs: let ONNX type inference fill them in
        model = onnx.shape_inference.infer_shapes(model)
        return cls.run_model(model, arrays, device, **kwargs)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        """Only the CPU device (the eager runner executes on the host)."""
        return device.upper() == "CPU"


prepare = SbpcBackend.prepare
run_model = SbpcBackend.run_model
run_node = SbpcBackend.run_node
supports_device = SbpcBackend.supports_device
