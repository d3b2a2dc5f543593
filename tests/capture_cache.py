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
    graph and of the initial weights. A model given as an ONNX file or proto is captured every time."""
    if not isinstance(model, nn.Module):
        return capture_model(model, args, example_kwargs, **options)
    alive: list = []
    key = fingerprint((model, _shapes(args), _shapes(example_kwargs or {}), options), alive)
    if key not in _CAPTURED:
        _CAPTURED[key] = (alive, capture_model(model, args, example_kwargs, **options))
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
    return hashlib.sha1(repr(_describe(value, alive, {})).encode()).hexdigest()


def _describe(value, alive: list, seen: dict, inside_code: bool = False):
    """A nested tuple of plain values standing for ``value`` (see :func:`fingerprint`); ``seen``: the objects
    already described, by id (shared objects and cycles are described once, then referred to).
    ``inside_code``: ``value`` is what a function closes over or a class holds; there, only plain values,
    containers, functions and classes are looked into, any other object is keyed by its id (a closure may
    reach a whole library's state)."""
    if isinstance(value, _PLAIN):
        return type(value).__name__, repr(value)
    if id(value) in seen:  # shared: tied weights, a config every layer holds
        return "seen", seen[id(value)]
    seen[id(value)] = len(seen)
    alive.append(value)  # what is built here too: no later value may take its id in ``seen``

    def describe(item):
        return _describe(item, alive, seen, inside_code)

    if isinstance(value, torch.Tensor):
        return _tensor(value)
    if isinstance(value, (tuple, list)):
        return type(value).__name__, tuple(describe(item) for item in value)
    if isinstance(value, (set, frozenset)):
        return "set", tuple(sorted(repr(describe(item)) for item in value))
    if isinstance(value, dict):
        return "dict", tuple((repr(k), describe(v)) for k, v in value.items())
    if isinstance(value, types.FunctionType):
        return ("function", value.__qualname__, id(value.__code__), id(value.__globals__),
                _describe((value.__defaults__, value.__kwdefaults__, _closure(value)), alive, seen, True))
    if isinstance(value, types.MethodType):
        return "method", describe(value.__func__), describe(value.__self__)
    if isinstance(value, type):
        return "class", value.__module__, value.__qualname__, _class_body(value, alive, seen)
    if inside_code:
        return "id", type(value).__qualname__, id(value)
    if isinstance(value, nn.Module):
        return ("module", describe(type(value)),
                describe({name: v for name, v in vars(value).items() if name not in _MODULE_SLOTS}),
                *(describe(dict(getattr(value, slot))) for slot in _MODULE_SLOTS))
    if hasattr(value, "__dict__") and not callable(value):
        return "object", describe(type(value)), describe(dict(vars(value)))
    return "id", type(value).__qualname__, id(value)


def _closure(function: types.FunctionType) -> tuple:
    """The values ``function`` closes over (``None`` for a cell not yet filled)."""
    return tuple(_cell_contents(cell) for cell in function.__closure__ or ())


def _cell_contents(cell) -> object:
    """What ``cell`` holds; ``None`` while the enclosing function has not assigned its name."""
    try:
        return cell.cell_contents
    except ValueError:
        return None


def _class_body(cls: type, alive: list, seen: dict):
    """A class defined in a module stands for itself (its id); one defined in a function (a new class at
    each call) by what each call may make different: its functions' closures and its class attributes."""
    if "<locals>" not in cls.__qualname__:
        return id(cls)
    body = {k: v for k, v in vars(cls).items() if k not in _CLASS_BOOKKEEPING}
    return _describe((body, cls.__bases__), alive, seen, True)


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
