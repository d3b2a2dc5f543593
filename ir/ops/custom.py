"""Ops by name: ATen ops and custom ops (any namespace registered with ``torch.library``).

An IR node names its op ``<namespace>.<name>.<overload>``: ``aten.linear.default``, or a custom op
that ``torch.export`` left in the graph, such as transformers' ``transformers.grouped_mm_fallback.default``
(torchao, torchtitan and vLLM-style kernels register their own the same way). Every backend runs an
op through the op itself, ``torch.ops.<namespace>.<name>.<overload>``, so a custom op must be
registered in the process that runs it: by importing the library that defines it.

This module answers what the passes and backends ask of an op by name: the torch callable
(:func:`resolve_op`), whether it is a custom op, whether it has a fake (meta) kernel for types or a
decomposition into other ops, and which Python module registers it (:func:`defining_module`, what an
emitted program imports).
"""
from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

BUILTIN_NAMESPACES = ("aten", "prims")
"""Namespaces of torch's own op sets; every other namespace holds custom ops."""
SBPC_NAMESPACES = ("comm", "kernels", "cp", "moe")
"""Names of the compiler's own: boxing collectives, local kernels and context-parallel attention (never
``torch.ops``)."""
TORCH_DIR = Path(torch.__file__).resolve().parent


class UnknownOpError(LookupError):
    """An op name that no registered op overload answers to (the message says what to import)."""


def split_name(name: str) -> tuple[str, str, str]:
    """``"ns.op.overload"`` -> ``("ns", "op", "overload")``; a name without overload gets ``default``."""
    parts = name.split(".")
    if len(parts) == 2:
        return parts[0], parts[1], "default"
    if len(parts) != 3 or not all(parts):
        raise UnknownOpError(f"{name!r} is not an op name; expected <namespace>.<name>.<overload>, "
                             f"e.g. aten.linear.default")
    return parts[0], parts[1], parts[2]


def namespace(name: str) -> str:
    """The op's namespace: ``aten``, ``comm``, ``transformers``, ..."""
    return name.split(".", 1)[0]


def is_custom(name: str) -> bool:
    """Whether ``name`` is a custom op: a ``torch.ops`` op outside torch's ATen and prims namespaces."""
    return namespace(name) not in BUILTIN_NAMESPACES + SBPC_NAMESPACES


def qualified_name(name: str) -> str:
    """The dispatcher's name of an op: ``transformers.grouped_mm_fallback.default`` -> ``transformers::grouped_mm_fallback``."""
    ns, op, _ = split_name(name)
    return f"{ns}::{op}"


def resolve_op(name: str) -> torch._ops.OpOverload:
    """The torch op overload ``torch.ops.<namespace>.<name>.<overload>`` of an IR op name.

    Raises :class:`UnknownOpError` when no such op is registered in this process: for a custom op,
    the library that defines it has not been imported.
    """
    ns, op, overload = split_name(name)
    from ir.ops.attention import RING_ATTENTION, logical_ring_attention
    if name == RING_ATTENTION:  # what it computes on logical tensors (for types and reference values)
        return logical_ring_attention
    from ir.ops.moe import SCHEMAS as MOE_OPS, logical_op
    if name in MOE_OPS:
        return logical_op(name)
    if ns in SBPC_NAMESPACES:
        raise UnknownOpError(f"{name} is an sbpc {ns} op, not a torch op")
    packet = getattr(getattr(torch.ops, ns), op, None) if _has_op(ns, op) else None
    if packet is None:
        where = "an ATen op" if ns == "aten" else f"an op of the torch.library namespace {ns!r}"
        hint = ("spell it as torch.ops.aten.<name>.<overload>" if ns in BUILTIN_NAMESPACES else
                f"import the library that registers it (often the package {ns!r}) before compiling or running")
        raise UnknownOpError(f"{name} names no registered op: torch.ops.{ns}.{op} is not {where} known in this "
                             f"process; {hint}")
    try:
        return getattr(packet, overload)
    except AttributeError:
        raise UnknownOpError(f"{name}: torch.ops.{ns}.{op} has no overload {overload!r} (it has "
                             f"{', '.join(packet.overloads())})") from None


def _has_op(ns: str, op: str) -> bool:
    try:
        getattr(getattr(torch.ops, ns), op)
    except (AttributeError, RuntimeError):
        return False
    return True


# -- what a custom op brings ---------------------------------------------------------------------

def has_fake_kernel(op: torch._ops.OpOverload) -> bool:
    """Whether ``op`` can compute its output types without data: a fake kernel registered with
    ``torch.library.register_fake`` (or a Meta kernel), which capture and the verifier run."""
    opdef = _custom_op_def(op)
    if opdef is not None:  # torch.library.custom_op registers a placeholder that raises until register_fake
        return opdef._abstract_fn is not None
    qualname = op.name()
    if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta"):
        return True
    from torch._library.simple_registry import singleton
    return singleton.find(qualname).fake_impl.kernel is not None


def has_composite_implicit(op: torch._ops.OpOverload) -> bool:
    """Whether ``op`` has a CompositeImplicitAutograd kernel: it is defined by other ops."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd")


def decomposition(op: torch._ops.OpOverload) -> Callable | None:
    """A decomposition of ``op`` into other ops, or None: one registered in torch's decomposition
    table (``torch._decomp.register_decomposition``), else its CompositeImplicitAutograd kernel (as
    ``torch.export.default_decompositions`` runs it)."""
    from torch._decomp import global_decomposition_table
    for kind in ("post_autograd", "pre_autograd"):
        registered = global_decomposition_table[kind].get(op)
        if registered is not None:
            return registered
    if has_composite_implicit(op):
        table = torch.export.default_decompositions()  # reading it picks up the custom ops registered so far
        return table[op] if op in table else None
    return None


def _custom_op_def(op: torch._ops.OpOverload):
    """The ``torch.library.custom_op`` definition of ``op``, or None for ops defined otherwise."""
    from torch._library.custom_ops import OPDEFS
    return OPDEFS.get(op.name())


# -- where a custom op comes from ----------------------------------------------------------------

def defining_module(name: str) -> str | None:
    """The importable Python module that registers the op ``name``: what a program that calls it
    imports first. ``"torch"`` for ops that ``import torch`` alone registers; None when no importable
    module is known: an op of a C++ extension loaded by other means, or one registered by a script run
    as ``__main__`` (see :func:`defining_file`).
    """
    if namespace(name) in BUILTIN_NAMESPACES:
        return "torch"
    path = defining_file(name)
    if path is not None and _inside(path, TORCH_DIR):
        return "torch"
    for module_name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if path is not None and module_name != "__main__" and file and Path(file).resolve() == path:
            return module_name
    if path is None and _registered_by_torch_alone(name):
        return "torch"
    return None


@functools.lru_cache(maxsize=None)
def _registered_by_torch_alone(name: str) -> bool:
    """Whether a fresh interpreter knows the op after ``import torch`` alone (torch's own native ops
    outside ATen, whose registration records no Python file)."""
    ns, op, _ = split_name(name)
    probe = f"import torch, sys; sys.exit(0 if hasattr(getattr(torch.ops, {ns!r}), {op!r}) else 1)"
    try:
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def defining_file(name: str) -> Path | None:
    """The source file that registers the op ``name``: the function given to
    ``torch.library.custom_op``, else the place the dispatcher records for its definition
    (``Library.define``, ``TORCH_LIBRARY``). None when unknown."""
    op = resolve_op(name)
    opdef = _custom_op_def(op)
    if opdef is not None:
        source = getattr(sys.modules.get(opdef._init_fn.__module__), "__file__", None)
        if source:
            return Path(source).resolve()
    match = re.search(r"^debug: registered at (.+?):\d+$", torch._C._dispatch_dump(op.name()), re.M)
    if match and match.group(1).endswith(".py"):
        return Path(match.group(1)).resolve()
    return None


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.relative_to(directory)
    except ValueError:
        return False
    return True


def package_version(module: str) -> str | None:
    """The installed version of the distribution that provides ``module``'s top-level package."""
    from importlib import metadata
    top = module.split(".")[0]
    for dist in metadata.packages_distributions().get(top, [top]):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None
