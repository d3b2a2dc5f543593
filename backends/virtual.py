"""The virtual mesh: every rank of a plan simulated in one process, each holding only its shards.

Each value is a list of local tensors, one per device of its mesh. Ordinary nodes run their
:class:`~ir.ops.registry.LocalCall` on every rank; ``comm.*`` nodes combine the local tensors of
each mesh-axis group with differentiable torch ops, so one ``backward()`` gives every rank the
gradient the real program computes with adjoint collectives. This backend is the reference that
every pass and the generated programs are checked against: it favours plainness over speed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy
import torch

from ir import kernels
from ir.core import Graph, Node, Value, map_structure
from ir.ops.registry import LocalContext, coord_symbol, local_call
from ir.sbp import Broadcast, NdSbp, Partial, Split, format_nd_sbp
from ir.types import Mesh
from ir.verifier import resolve_op


class VirtualRunError(RuntimeError):
    """Bad inputs for a plan, or a node that failed on some rank (named in the message)."""


@dataclass
class VirtualResult:
    """What a virtual run returns."""

    loss: torch.Tensor | None = None
    """The logical loss (train mode)."""
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    """The full gradient of every trainable parameter, by ``named_parameters()`` name."""
    outputs: tuple = ()
    """The logical outputs (infer mode)."""
    local: dict[str, list] = field(default_factory=dict)
    """Per value name, the local tensors of every rank (for inspection in tests)."""


# -- layouts of local tensors ---------------------------------------------------------------------

def shard(full: torch.Tensor, sbp: NdSbp, mesh: Mesh, position: int) -> torch.Tensor:
    """The local tensor of the device at ``position`` for a value held in ``sbp``."""
    coords = mesh.coords(position)
    out = full
    for s, n, c in zip(sbp, mesh.shape, coords):
        if isinstance(s, Split):
            size = out.shape[s.dim] // n
            out = out.narrow(s.dim, c * size, size)
        elif isinstance(s, Partial):
            out = out if c == 0 else out * 0
    return out


def assemble(locals_: list, sbp: NdSbp, mesh: Mesh) -> torch.Tensor:
    """The logical tensor from every device's local tensor (the inverse of :func:`shard`)."""
    grid = {mesh.coords(i): t for i, t in enumerate(locals_)}
    for axis in reversed(range(mesh.ndim)):
        merged: dict[tuple, list] = {}
        for coords, t in sorted(grid.items()):
            merged.setdefault(coords[:axis], []).append(t)
        grid = {k: _combine(v, sbp[axis]) for k, v in merged.items()}
    return grid[()]


def _combine(parts: list, s) -> torch.Tensor:
    if isinstance(s, Split):
        return torch.cat(parts, dim=s.dim)
    if isinstance(s, Broadcast):
        return parts[0]
    if s.op == "max":
        return torch.stack(parts).amax(0)
    return torch.stack(parts).sum(0)


# -- collectives ------------------------------------------------------------------------------------

def collective(op: str, xs: list, mesh: Mesh, axis: int, kwargs: dict) -> list:
    """Apply a ``comm.*`` op to the local tensors of every group along ``axis``."""
    out = list(xs)
    for group in mesh.groups(axis):
        results = _group_collective(op, [xs[i] for i in group], kwargs)
        for i, r in zip(group, results):
            out[i] = r
    return out


def _group_collective(op: str, xs: list, kw: dict) -> list:
    n = len(xs)
    if op == "comm.all_reduce":
        total = torch.stack(xs).amax(0) if kw.get("op") == "max" else torch.stack(xs).sum(0)
        return [total] * n
    if op == "comm.all_gather":
        return [torch.cat(xs, dim=kw["dim"])] * n
    if op == "comm.reduce_scatter":
        return list(torch.stack(xs).sum(0).chunk(n, dim=kw["dim"]))
    if op == "comm.all_to_all":
        return list(torch.cat(xs, dim=kw["src_dim"]).chunk(n, dim=kw["dst_dim"]))
    if op == "comm.slice":
        return [x.chunk(n, dim=kw["dim"])[k] for k, x in enumerate(xs)]
    if op == "comm.mask":
        return [x if k == 0 else x * 0 for k, x in enumerate(xs)]
    raise VirtualRunError(f"unknown collective {op}")


# -- running a graph --------------------------------------------------------------------------------

def bind_dims(graph: Graph, inputs: tuple) -> dict:
    """Symbol values from the actual input shapes; checks ranks, static dims and even splits."""
    if len(inputs) != len(graph.inputs):
        raise VirtualRunError(f"the plan takes {len(graph.inputs)} inputs "
                              f"({', '.join(v.name for v in graph.inputs)}), found {len(inputs)}")
    bindings: dict = {}
    for v, t in zip(graph.inputs, inputs):
        if not isinstance(t, torch.Tensor) or t.ndim != v.type.ndim:
            found = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise VirtualRunError(f"input {v.name}: expected a tensor of type {v.type}, found {found}")
        for dim, size in zip(v.type.shape, t.shape):
            if dim.is_Symbol:
                bindings.setdefault(dim, int(size))
            if int(dim.subs(bindings)) != int(size):
                raise VirtualRunError(f"input {v.name}: expected shape {v.type}, found {tuple(t.shape)}")
    for v in graph.inputs:
        check_even_split(v, graph.meshes[v.mesh], bindings)
    return bindings


def check_even_split(v: Value, mesh: Mesh, bindings: dict) -> None:
    """A clear error when a dim of an input does not split evenly over its mesh axes."""
    for dim in {s.dim for s in v.sbp if isinstance(s, Split)}:
        axes = [(a, n) for s, a, n in zip(v.sbp, mesh.axes, mesh.shape) if isinstance(s, Split) and s.dim == dim]
        ways = 1
        for _, n in axes:
            ways *= n
        size = int(v.type.shape[dim].subs(bindings))
        if size % ways:
            names = " x ".join(f"{a}={n}" for a, n in axes)
            raise VirtualRunError(f"input {v.name}: dim {dim} has size {size}, which does not divide evenly "
                                  f"over {ways} ranks (mesh axes {names}); use a batch size that is a "
                                  f"multiple of {ways}")


class VirtualMesh:
    """Runs one graph over all ranks of its mesh."""

    def __init__(self, graph: Graph, weights: dict[str, torch.Tensor]):
        self.graph = graph
        self.weights = weights
        self.calls: dict[int, Any] = {}

    def run(self, inputs: tuple, mode: str = "train") -> VirtualResult:
        """Run forward (and backward plus gradient sync in ``train`` mode)."""
        graph = self.graph
        bindings = bind_dims(graph, inputs)
        env: dict[int, list] = {}
        for v, t in zip(graph.inputs, inputs):
            env[id(v)] = self._scatter(v, t)
        for p in graph.params:
            env[id(p)] = self._param_leaves(p, train=(mode == "train" and p.kind == "param"))
        for node in graph.nodes:
            self._run_node(node, env, bindings)
        result = VirtualResult(local={v.name: env[id(v)] for v in graph.all_values() if id(v) in env})
        if mode == "train":
            self._backward(env, result)
        else:
            result.outputs = tuple(assemble(env[id(o)], o.sbp, self.mesh(o)) for o in graph.outputs)
        return result

    def mesh(self, v: Value) -> Mesh:
        return self.graph.meshes[v.mesh]

    def _scatter(self, v: Value, full: torch.Tensor) -> list:
        mesh = self.mesh(v)
        return [shard(full, v.sbp, mesh, r) for r in range(mesh.size)]

    def _param_leaves(self, p: Value, train: bool) -> list:
        full = self.weights[p.target]
        leaves = []
        for local in self._scatter(p, full):
            leaf = local.detach().clone()
            leaves.append(leaf.requires_grad_(train))
        return leaves

    def _run_node(self, node: Node, env: dict, bindings: dict) -> None:
        ins = node.input_values()
        if node.op.startswith("comm."):
            mesh = self.mesh(ins[0])
            axis = mesh.axis_index(node.kwargs["axis"])
            env[id(node.outputs[0])] = collective(node.op, env[id(ins[0])], mesh, axis, node.kwargs)
            return
        mesh = self.mesh(node.outputs[0])
        call = self._local_call(node, mesh)
        fn = resolve_callable(call.fn)
        per_rank = []
        for r in range(mesh.size):
            scope = dict(bindings)
            scope.update({coord_symbol(a): c for a, c in zip(mesh.axes, mesh.coords(r))})
            args = evaluate(call.args, env, r, scope)
            kwargs = evaluate(call.kwargs, env, r, scope)
            try:
                per_rank.append(fn(*args, **kwargs))
            except Exception as err:
                raise VirtualRunError(f"node %{node.name} ({node.op}, module {node.attrs.get('module', '?')}) "
                                      f"failed on rank {mesh.devices[r]}: {str(err).splitlines()[0]}") from err
        for i, o in enumerate(node.outputs):
            env[id(o)] = [res[i] if isinstance(res, (list, tuple)) else res for res in per_rank]

    def _local_call(self, node: Node, mesh: Mesh):
        key = id(node)
        if key not in self.calls:
            ctx = LocalContext(mesh, node.outputs[0].mesh, [v.sbp for v in node.input_values()],
                               [v.sbp for v in node.outputs])
            self.calls[key] = local_call(node, ctx)
        return self.calls[key]

    def _backward(self, env: dict, result: VirtualResult) -> None:
        loss = self.graph.loss
        mesh = self.mesh(loss)
        locals_ = env[id(loss)]
        result.loss = assemble([t.detach() for t in locals_], loss.sbp, mesh)
        seeded = [t if is_seed_rank(loss.sbp, mesh, r) else t * 0 for r, t in enumerate(locals_)]
        torch.stack(seeded).sum().backward()
        grads = {p.name: [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in env[id(p)]]
                 for p in self.graph.params if p.kind == "param"}
        for bucket in self.graph.attrs.get("grad_buckets", []):
            for p in bucket["params"]:
                for axis in bucket["axes"]:
                    m = self.mesh(p)
                    grads[p.name] = collective("comm.all_reduce", grads[p.name], m, m.axis_index(axis), {})
        for p in self.graph.params:
            if p.kind == "param":
                result.grads[p.target] = assemble(grads[p.name], _stored_layout(p.sbp), self.mesh(p))


def is_seed_rank(sbp: NdSbp, mesh: Mesh, position: int) -> bool:
    """Whether this rank's copy of a loss counts: every rank on partial axes, coordinate 0 on broadcast ones."""
    coords = mesh.coords(position)
    return all(c == 0 for s, c in zip(sbp, coords) if isinstance(s, Broadcast))


def _stored_layout(sbp: NdSbp) -> NdSbp:
    return tuple(s if isinstance(s, Split) else Broadcast() for s in sbp)


def resolve_callable(name: str):
    """An ``aten.*`` op or a ``kernels.*`` function by name."""
    if name.startswith("kernels."):
        return getattr(kernels, name.split(".", 1)[1])
    return resolve_op(name)


def evaluate(obj: Any, env: dict, rank: int, scope: dict) -> Any:
    """Arguments for one rank: values become its local tensors, expressions become ints."""
    if isinstance(obj, Value):
        return env[id(obj)][rank]
    if isinstance(obj, sympy.Expr):
        result = obj.subs(scope)
        if not result.is_number:
            raise VirtualRunError(f"expression {obj} has unbound symbols {sorted(map(str, result.free_symbols))}")
        if not result.is_integer:
            raise VirtualRunError(f"expression {obj} is {result} here, not a whole number: a dim does not split evenly")
        return int(result)
    if isinstance(obj, list):
        return [evaluate(o, env, rank, scope) for o in obj]
    if isinstance(obj, tuple):
        return tuple(evaluate(o, env, rank, scope) for o in obj)
    if isinstance(obj, dict):
        return {k: evaluate(v, env, rank, scope) for k, v in obj.items()}
    return obj


def run_virtual(graph: Graph, weights: dict, inputs: tuple, mode: str = "train") -> VirtualResult:
    """Simulate every rank of ``graph`` in this process."""
    return VirtualMesh(graph, weights).run(inputs, mode)
