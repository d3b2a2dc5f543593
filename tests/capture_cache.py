"""Captures shared between the tests of one process: ``compile()`` with each distinct model captured once.

torch.export dominates compile time on a CPU (a tiny 4-layer GPT takes 2-3 s, a tiny T5 or Mamba 10 s and
more), and many tests compile a fresh copy of the same model under other strategies. The passes, the
subject of those tests, run every time on a fresh copy of the captured graph; the capture is shared by
every model that is the same model: the same classes, attributes and parameter values (see
:func:`fingerprint`).
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import types
from unittest import mock

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor

from compiler.api import capture_model

_CAPTURED: dict = {}
"""Capture key -> (the objects the key was built from, the capture). The first part keeps them alive, so
that no other object takes one of the ids the key holds while the entry exists."""

_MADE_FROM: dict = {}
"""id of a captured model -> (the model, its fingerprint right after the capture, the capture's key)."""

_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size, enum.Enum)
_MODULE_SLOTS = ("_parameters", "_buffers", "_modules")
_CLASS_BOOKKEEPING = {"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__annotations__"}


def compile_cached(model: nn.Module, inputs: tuple = (), cluster=None, strategy="dp", **kwargs):
    """``compile(model, inputs, cluster=cluster, strategy=strategy, **kwargs)``, capturing each model once per
    input shapes and dtypes and capture options (:func:`capture_once`). ``cluster``: as ``compile`` takes it,
    or a number of local ranks."""
    from compiler import Cluster, api
    cluster = Cluster.local(cluster) if isinstance(cluster, int) else cluster
    with mock.patch.object(api, "capture_model", capture_once):
        return api.compile(model, inputs, cluster=cluster, strategy=strategy, **kwargs)


def capture_once(model, args: tuple, example_kwargs: dict | None, **options):
    """``compiler.api.capture_model(model, args, example_kwargs, **options)``, run once for every model with the
    same :func:`fingerprint`, input shapes and dtypes, and options; each call gets its own copy of the captured
    graph and of the initial weights. A model given as an ONNX file or proto is captured every time.

    Capturing may change a model (transformers installs output hooks on a model's first call): the model a
    capture was made from keeps it while its fingerprint is the one it had right after that capture."""
    if not isinstance(model, nn.Module):
        return capture_model(model, args, example_kwargs, **options)
    alive: list = []
    request = (_shapes(args), _shapes(example_kwargs or {}), options)
    key = fingerprint((model, *request), alive)
    if key not in _CAPTURED:
        made = _MADE_FROM.get(id(model))
        if made is not None and made[0] is model and made[1] == key:
            key = made[2]
        else:
            _CAPTURED[key] = (alive, capture_model(model, args, example_kwargs, **options))
            _MADE_FROM[id(model)] = (model, fingerprint((model, *request), _CAPTURED[key][0]), key)
    captured = _CAPTURED[key][1]
    return dataclasses.replace(captured, graph=captured.graph.copy(),
                               weights={name: w.clone() for name, w in captured.weights.items()},
                               aliases=dict(captured.aliases), input_names=list(captured.input_names))


def fingerprint(value, alive: list) -> str:
    """A digest of everything a capture of ``value`` (a module, with its example input shapes and capture
    options) depends on: for a module, every submodule's class, attributes, and parameters' and buffers'
    shapes, dtypes, ``requires_grad`` and values (not on the meta device); for a function, its code, defaults
    and the values it closes over. Two modules with the same digest run the same forward on the same weights.

    What cannot be looked into (builtin functions, C objects) is keyed by its ``id``, and appended to
    ``alive``: the caller keeps them alive as long as it keeps the digest."""
    return hashlib.sha1(repr(_Description(alive).of(value)).encode()).hexdigest()


class _Description:
    """Builds the nested tuple of plain values standing for a value (see :func:`fingerprint`).

    Containers (tuples, lists, dicts, sets) are described by their items wherever they appear: whether two
    attributes hold one list or two equal ones does not change a forward (and capturing a model may copy
    them). Objects with an identity — tensors (tied weights), modules, functions, classes, other objects —
    are described once and referred to by their order of appearance after that."""

    def __init__(self, alive: list):
        self.alive = alive
        self.order: dict[int, int] = {}
        self.open: set[int] = set()  # the containers being described (a container holding itself)

    def of(self, value, inside_code: bool = False):
        """``value`` described; ``inside_code``: it is what a function closes over or a class holds, where only
        plain values, containers, tensors, functions and classes are looked into and any other object is keyed
        by its id (a closure may reach a whole library's state)."""
        if isinstance(value, _PLAIN):
            return type(value).__name__, repr(value)
        if isinstance(value, (tuple, list, dict, set, frozenset)):
            return self._container(value, inside_code)
        if id(value) in self.order:
            return "seen", self.order[id(value)]
        self.order[id(value)] = len(self.order)
        self.alive.append(value)  # no later value may take its id while the description is in use
        return self._object(value, inside_code)

    def _container(self, value, inside_code: bool):
        if id(value) in self.open:
            return "cycle", type(value).__name__
        self.open.add(id(value))
        self.alive.append(value)
        try:
            if isinstance(value, dict):
                return "dict", tuple((repr(k), self.of(v, inside_code)) for k, v in value.items())
            items = tuple(self.of(item, inside_code) for item in value)
            if isinstance(value, (set, frozenset)):
                return "set", tuple(sorted(map(repr, items)))
            return type(value).__name__, items
        finally:
            self.open.discard(id(value))

    def _object(self, value, inside_code: bool):
        if isinstance(value, torch.Tensor):
            return _tensor(value)
        if isinstance(value, types.FunctionType):
            return ("function", value.__qualname__, id(value.__code__), id(value.__globals__),
                    self.of((value.__defaults__, value.__kwdefaults__, _closure(value)), True))
        if isinstance(value, types.MethodType):
            return "method", self.of(value.__func__, inside_code), self.of(value.__self__, inside_code)
        if isinstance(value, type):
            return "class", value.__module__, value.__qualname__, self._class_body(value)
        if inside_code:
            return "id", type(value).__qualname__, id(value)
        if isinstance(value, nn.Module):
            attributes = {name: v for name, v in vars(value).items() if name not in _MODULE_SLOTS}
            return ("module", self.of(type(value)), self.of(attributes),
                    *(self.of(dict(getattr(value, slot))) for slot in _MODULE_SLOTS))
        if hasattr(value, "__dict__") and not callable(value):
            return "object", self.of(type(value)), self.of(dict(vars(value)))
        return "id", type(value).__qualname__, id(value)

    def _class_body(self, cls: type):
        """A class defined in a module stands for itself (its id); one defined in a function (a new class at
        each call) by what each call may make different: its functions' closures and its class attributes."""
        if "<locals>" not in cls.__qualname__:
            return id(cls)
        body = {k: v for k, v in vars(cls).items() if k not in _CLASS_BOOKKEEPING}
        return self.of((body, cls.__bases__), True)


def _closure(function: types.FunctionType) -> tuple:
    """The values ``function`` closes over (``None`` for a cell not yet filled)."""
    return tuple(_cell_contents(cell) for cell in function.__closure__ or ())


def _cell_contents(cell) -> object:
    """What ``cell`` holds; ``None`` while the enclosing function has not assigned its name."""
    try:
        return cell.cell_contents
    except ValueError:
        return None


def _tensor(tensor: torch.Tensor) -> tuple:
    """Shape, dtype, device, ``requires_grad`` and a digest of the values: none on the meta device or for a
    fake tensor, the id for a tensor of another subclass or layout."""
    if tensor.device.type == "meta" or isinstance(tensor, FakeTensor):
        values = None
    elif type(tensor) in (torch.Tensor, nn.Parameter, nn.Buffer) and tensor.layout == torch.strided:
        flat = tensor.detach().contiguous().reshape(-1).cpu()
        values = hashlib.sha1(flat.view(torch.uint8).numpy().tobytes()).hexdigest()
    else:
        values = id(tensor)
    return "tensor", tuple(tensor.shape), str(tensor.dtype), tensor.device.type, tensor.requires_grad, values


def _shapes(values) -> tuple:
    """What a capture depends on in example inputs: each tensor's shape and dtype (other values as written)."""
    items = values.items() if isinstance(values, dict) else enumerate(values)
    return tuple((k, (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else repr(v)) for k, v in items)
