"""The virtual mesh: every rank of a plan simulated in one process, each holding only its shards.

Each value is a list of local tensors, one per device of its mesh. Ordinary nodes run their
:class:`~ir.ops.registry.LocalCall` on every rank; ``comm.*`` nodes combine the local tensors of
each mesh-axis group with differentiable torch ops, so one ``backward()`` gives every rank the
gradient the real program computes with adjoint collectives. This backend is the reference that
every pass and the generated programs are checked against: it favours plainness over speed.
"""
from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch

from backends.runtime.context_parallel import ring_block, merge_blocks, ring_positions
from backends.runtime.core import balance, balanced_part, unbalance
from backends.runtime.moe import (combine_in_process, dispatch_in_process, moe_replicated_combine,
                                  moe_replicated_dispatch)
from backends.runtime.split_backward import WeightWork, backward_input
from ir import kernels
from ir.core import Graph, Node, Value
from ir.ops.attention import RING_ATTENTION, ring_inputs, runs_ring
from ir.ops.moe import DISPATCH, EXCHANGING, OverlappedLayer, exchanges, overlapped_layers
from ir.ops.schema import arg
from ir.ops.pipeline_ops import Action, is_pipelined, microbatch_paths, pipeline_stages, schedule_actions
from ir.ops.registry import (LocalContext, balanced_axes, balanced_comm_kwargs, coord_symbol, local_call,
                             sequence_sizes)
from ir.precision import cast_parameter
from ir.sbp import Broadcast, NdSbp, Partial, Split
from ir.ops.custom import resolve_op
from ir.types import CONTEXT_AXIS, DTYPES_BY_NAME, Mesh, is_float_expr


class VirtualRunError(RuntimeError):
    """Bad inputs for a plan, or a node that failed on some rank (named in the message)."""


@dataclass
class VirtualResult:
    """What a virtual run returns."""

    loss: torch.Tensor | None = None
    """The logical loss (train mode)."""
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    """The full gradient of every trainable parameter, by ``named_parameters()`` name (frozen ones,
    ``requires_grad=False``, have none, as their ``p.grad`` stays None in eager)."""
    outputs: tuple = ()
    """The logical outputs (infer mode)."""
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    """The new full value of every buffer the step updates (``update`` in the IR: BatchNorm's running
    statistics, counters), by ``state_dict`` name. The plan's own weights are not changed."""
    local: dict[str, list] = field(default_factory=dict)
    """Per value name, the local tensors of every rank (for inspection in tests)."""


# -- layouts of local tensors ---------------------------------------------------------------------

def shard(full: torch.Tensor, sbp: NdSbp, mesh: Mesh, position: int, balanced: tuple = ()) -> torch.Tensor:
    """The local tensor of the device at ``position`` for a value held in ``sbp`` (``balanced``: per mesh axis,
    whether its split is load-balanced, see :func:`ir.ops.registry.sequence_sizes`).

    It may share memory with ``full`` (a view); callers that hand it to a rank copy it (see
    :meth:`VirtualMesh._scatter`)."""
    coords = mesh.coords(position)
    balanced = balanced or (False,) * mesh.ndim
    out = full
    for s, n, c, even in zip(sbp, mesh.shape, coords, balanced):
        if isinstance(s, Split) and even:
            out = balanced_part(out, s.dim, n, c)
        elif isinstance(s, Split):
            size = out.shape[s.dim] // n
            out = out.narrow(s.dim, c * size, size)
        elif isinstance(s, Partial):
            out = out if c == 0 else out * 0
    return out


def assemble(locals_: list, sbp: NdSbp, mesh: Mesh, balanced: tuple = ()) -> torch.Tensor:
    """The logical tensor from every device's local tensor (the inverse of :func:`shard`)."""
    grid = {mesh.coords(i): t for i, t in enumerate(locals_)}
    balanced = balanced or (False,) * mesh.ndim
    for axis in reversed(range(mesh.ndim)):
        merged: dict[tuple, list] = {}
        for coords, t in sorted(grid.items()):
            merged.setdefault(coords[:axis], []).append(t)
        grid = {k: _combine(v, sbp[axis], balanced[axis]) for k, v in merged.items()}
    return grid[()]


def _combine(parts: list, s, balanced: bool = False) -> torch.Tensor:
    if isinstance(s, Split):
        whole = torch.cat(parts, dim=s.dim)
        return unbalance(whole, s.dim, len(parts)) if balanced else whole
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
    """The outputs of one group. Every rank gets a tensor of its own (``clone`` keeps the autograd
    graph): a real rank's result lives in its own memory, so an in-place op on one rank must not
    reach another. ``kw["balanced"]``: the split (for all-to-all: the source and the destination split) is
    load-balanced (:func:`ir.ops.registry.balanced_comm_kwargs`), put in sequence order as the emitted
    program's collectives do."""
    n = len(xs)
    balanced = kw.get("balanced", False)
    if op == "comm.all_gather" and balanced:
        return [unbalance(x, kw["dim"], n) for x in _group_collective(op, xs, {**kw, "balanced": False})]
    if kw.get("cast") is not None and kw.get("grad_dtype") is None:  # no reduce dtype: autograd casts back
        xs = [x.to(kw["cast"]) for x in xs]
    if kw.get("grad_dtype") is not None and op in ("comm.all_reduce", "comm.all_gather") and kw.get("op") != "max":
        return list(GroupCollective.apply(op, kw.get("dim"), kw["grad_dtype"], kw.get("reduce_dtype"), kw.get("cast"),
                                          *xs))
    if op == "comm.all_reduce":
        total = torch.stack(xs).amax(0) if kw.get("op") == "max" else partial_sum(xs, kw.get("reduce_dtype"))
        return [total.clone() for _ in range(n)]
    if op == "comm.all_gather":
        gathered = torch.cat(xs, dim=kw["dim"])
        return [gathered.clone() for _ in range(n)]
    if op == "comm.reduce_scatter":
        total = partial_sum(xs, kw.get("reduce_dtype"))
        return [part.clone() for part in (balance(total, kw["dim"], n) if balanced else total).chunk(n, dim=kw["dim"])]
    if op == "comm.all_to_all":
        source, dest = balanced or (False, False)
        sends = [balance(x, kw["dst_dim"], n) if dest else x for x in xs]
        parts = torch.cat(sends, dim=kw["src_dim"]).chunk(n, dim=kw["dst_dim"])
        return [unbalance(p, kw["src_dim"], n) if source else p.clone() for p in parts]
    if op == "comm.slice":
        if balanced:
            return [balanced_part(x, kw["dim"], n, k) for k, x in enumerate(xs)]
        return [x.chunk(n, dim=kw["dim"])[k] for k, x in enumerate(xs)]
    if op == "comm.mask":
        return [x if k == 0 else x * 0 for k, x in enumerate(xs)]
    raise VirtualRunError(f"unknown collective {op}")


def partial_sum(xs: list, dtype: torch.dtype | None) -> torch.Tensor:
    """The ranks' partial values summed in ``dtype`` (the plan's forward_reduce; None: their own) and rounded
    back to their dtype once, as the program's collective does."""
    if dtype is None:
        return torch.stack(xs).sum(0)
    return torch.stack([x.to(dtype) for x in xs]).sum(0).to(xs[0].dtype)


class GroupCollective(torch.autograd.Function):
    """One group's all-reduce (sum) or all-gather whose backward sums the ranks' gradients in ``grad_dtype``
    (the plan's reduce dtype) and rounds the sum to the value's dtype once, as the real program's adjoint
    collective does; autograd alone would add the gradients up in their own dtype. ``cast``: a dtype the
    inputs (parameter shards) are cast to before the gather; their gradients come back in their own dtype."""

    @staticmethod
    def forward(ctx, op, dim, grad_dtype, reduce_dtype, cast, *xs):
        ctx.op, ctx.dim, ctx.grad_dtype, ctx.dtype = op, dim, grad_dtype, xs[0].dtype
        xs = [x.to(cast) for x in xs] if cast is not None else xs
        whole = partial_sum(xs, reduce_dtype) if op == "comm.all_reduce" else torch.cat(xs, dim=dim)
        return tuple(whole.clone() for _ in xs)

    @staticmethod
    def backward(ctx, *grads):
        total = torch.stack([g.to(ctx.grad_dtype) for g in grads]).sum(0).to(ctx.dtype)
        parts = [total] * len(grads) if ctx.op == "comm.all_reduce" else total.chunk(len(grads), dim=ctx.dim)
        return (None, None, None, None, None, *(p.clone() for p in parts))


def ring_attention(node: Node, env: dict, mesh: Mesh) -> list:
    """Every rank's output of ring attention: in each group along the node's axis, rank ``c`` attends its
    queries to the key/value blocks of ranks ``c, c - 1, ...`` (the emitted ring's order, each block's part its
    masks keep), merged online. The ops are differentiable, so the one backward gives every rank the ring's
    gradients."""
    q, k, v, mask = ring_inputs(node)
    causal, scale, balanced = arg(node, "causal"), arg(node, "scale"), bool(arg(node, "balanced"))
    qs, ks, vs = env[id(q)], env[id(k)], env[id(v)]
    masks = env[id(mask)] if mask is not None else [None] * mesh.size
    out = list(qs)
    for group in mesh.groups(mesh.axis_index(arg(node, "axis"))):
        n = len(group)
        for me, rank in enumerate(group):
            length = qs[rank].shape[-2]
            s = scale if scale is not None else qs[rank].shape[-1] ** -0.5
            q_pos = ring_positions(me, n, length, balanced)
            result = lse = None
            for step in range(n):
                source = (me - step) % n
                part = ring_block(qs[rank], ks[group[source]], vs[group[source]], masks[rank], q_pos,
                                  ring_positions(source, n, length, balanced), causal, s)
                if part is not None:
                    result, lse = merge_blocks(result, lse, *part)
            out[rank] = result
    return out


def expert_exchange(node: Node, env: dict, mesh: Mesh) -> list[list]:
    """Every rank's outputs of a MoE dispatch or combine (``ir/ops/moe.py``): where tokens are split over the
    node's axis, each group of that axis exchanges rows in this process as the emitted all-to-alls do (the ops
    are differentiable: one backward is the reverse exchange); elsewhere each rank routes its own tokens."""
    ins = [env[id(v)] for v in node.input_values()]
    experts = arg(node, "experts")
    if not exchanges(node, mesh, node.input_values()[0].sbp):
        if node.op == DISPATCH:
            outs = [moe_replicated_dispatch(h, i, experts, arg(node, "ranks")) for h, i in zip(*ins)]
        else:
            outs = [moe_replicated_combine(*locals_, experts) for locals_ in zip(*ins)]
        return [list(o) for o in zip(*outs)] if node.op == DISPATCH else [outs]
    results = [[None] * mesh.size for _ in node.outputs]
    for group in mesh.groups(mesh.axis_index(arg(node, "axis"))):
        mine = [[locals_[i] for i in group] for locals_ in ins]
        if node.op == DISPATCH:
            outs = dispatch_in_process(*mine, experts)
        else:
            rows, index, weights, route = mine
            outs = (combine_in_process(rows, route, index, weights, experts),)
        for result, per_rank in zip(results, outs):
            for i, t in zip(group, per_rank):
                result[i] = t
    return results


def chunked_layer_inputs(layer: OverlappedLayer, env: dict, chunks: int) -> list[dict]:
    """Per chunk, the layer's token inputs (hidden states, top-k indices and weights) cut as
    ``moe_overlapped`` cuts them: every rank's tokens in ``chunks`` pieces (``tensor_split``)."""
    tokens = {id(v) for v in (*layer.dispatch.input_values(), layer.combine.input_values()[2])}
    return [{key: [t.tensor_split(chunks)[c] for t in env[key]] for key in tokens} for c in range(chunks)]


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
        chunks = ways * (2 if any(a == CONTEXT_AXIS for a, _ in axes) else 1)  # cp: two chunks per rank
        size = int(v.type.shape[dim].subs(bindings))
        if size % chunks:
            names = " x ".join(f"{a}={n}" for a, n in axes)
            balanced = ", two load-balanced chunks per cp rank" if chunks > ways else ""
            raise VirtualRunError(f"input {v.name}: dim {dim} has size {size}, which does not divide evenly "
                                  f"over {ways} ranks (mesh axes {names}{balanced}); use a {_dim_word(dim)} that "
                                  f"is a multiple of {chunks}")


def _dim_word(dim: int) -> str:
    """What an input's split dim holds: the batch (dim 0, data parallelism) or the sequence (dim 1, context
    parallelism)."""
    return {0: "batch size", 1: "sequence length"}.get(dim, f"size of dim {dim}")


class VirtualMesh:
    """Runs one graph over all ranks of its mesh."""

    def __init__(self, graph: Graph, weights: dict[str, torch.Tensor]):
        self.graph = graph
        self.weights = weights
        self.calls: dict[int, Any] = {}
        self.sequences = sequence_sizes(graph)
        """The sequence lengths whose splits over the cp axis are load-balanced."""
        self.overlapped = overlapped_layers(graph)
        """MoE layers run in chunks (``moe_overlap_chunks``), by the ids of their nodes."""

    def run(self, inputs: tuple, mode: str = "train", loss_scale: torch.Tensor | None = None) -> VirtualResult:
        """Run forward (and backward plus gradient sync in ``train`` mode, from the loss times ``loss_scale``
        when given: the gradients come back scaled, see :func:`run_virtual`)."""
        graph = self.graph
        bindings = bind_dims(graph, inputs)
        env: dict[int, list] = {}
        for v, t in zip(graph.inputs, inputs):
            env[id(v)] = self._scatter(v, t)
        for p in graph.params:
            env[id(p)] = self._param_leaves(p, train=(mode == "train" and p.trainable))
        for node in graph.nodes:
            self._run_node(node, env, bindings)
        result = VirtualResult(local={v.name: env[id(v)] for v in graph.all_values() if id(v) in env})
        result.buffers = {b.target: assemble([t.detach() for t in env[id(v)]], v.sbp, self.mesh(v))
                          for b, v in graph.buffer_updates.items()}
        if mode == "train":
            self._backward(env, result, loss_scale)
        else:
            result.outputs = tuple(assemble(env[id(o)], o.sbp, self.mesh(o), self.balanced(o)) for o in graph.outputs)
        return result

    def mesh(self, v: Value) -> Mesh:
        return self.graph.meshes[v.mesh]

    def balanced(self, v: Value) -> tuple[bool, ...]:
        """Per mesh axis, whether ``v``'s split there is load-balanced (never for parameters and buffers)."""
        if v.kind in ("param", "buffer"):
            return ()
        return balanced_axes(v.type, v.sbp, self.mesh(v), self.sequences)

    def _scatter(self, v: Value, full: torch.Tensor) -> list:
        """Every rank's own copy of its shard (never the caller's tensor, nor another rank's)."""
        mesh = self.mesh(v)
        return [shard(full, v.sbp, mesh, r, self.balanced(v)).clone() for r in range(mesh.size)]

    def _param_leaves(self, p: Value, train: bool) -> list:
        full = self.weights[p.target]
        return [local.detach().requires_grad_(train) for local in self._scatter(p, full)]

    def _run_node(self, node: Node, env: dict, bindings: dict) -> None:
        layer = self.overlapped.get(id(node))
        if layer is not None:  # the whole layer runs at its combine, chunk by chunk
            if node is layer.combine:
                self._run_chunked_layer(layer, env, bindings)
            return
        self._run_one(node, env, bindings)

    def _run_chunked_layer(self, layer: OverlappedLayer, env: dict, bindings: dict) -> None:
        """A MoE layer in chunks of every rank's tokens, as ``moe_overlapped`` runs it: per chunk, dispatch, the
        experts' nodes and combine; the chunks' outputs concatenated."""
        outs = []
        for tokens in chunked_layer_inputs(layer, env, layer.chunks):
            chunk_env = {**env, **tokens}
            for node in (layer.dispatch, *layer.experts, layer.combine):
                self._run_one(node, chunk_env, bindings)
            outs.append(chunk_env[id(layer.combine.outputs[0])])
        env[id(layer.combine.outputs[0])] = [torch.cat(parts) for parts in zip(*outs)]

    def _run_one(self, node: Node, env: dict, bindings: dict) -> None:
        ins = node.input_values()
        if node.op.startswith("comm."):
            mesh = self.mesh(ins[0])
            axis = mesh.axis_index(node.kwargs["axis"])
            kwargs = {**node.kwargs, **balanced_comm_kwargs(node, self.sequences)}
            param = cast_parameter(ins[0]) if node.op == "comm.all_gather" else None
            if param is not None:  # a parameter's shard cast, then gathered: one collective from the parameter
                kwargs["cast"] = ins[0].type.torch_dtype
            xs = env[id(param if param is not None else ins[0])]
            env[id(node.outputs[0])] = collective(node.op, xs, mesh, axis, kwargs)
            return
        mesh = self.mesh(node.outputs[0])
        if node.op == RING_ATTENTION and runs_ring(node, mesh, ins[0].sbp):
            env[id(node.outputs[0])] = ring_attention(node, env, mesh)
            return
        if node.op in EXCHANGING:
            for o, locals_ in zip(node.outputs, expert_exchange(node, env, mesh)):
                env[id(o)] = locals_
            return
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
                               [v.sbp for v in node.outputs], self.sequences)
            self.calls[key] = local_call(node, ctx)
        return self.calls[key]

    def _backward(self, env: dict, result: VirtualResult, loss_scale: torch.Tensor | None) -> None:
        loss = self.graph.loss
        mesh = self.mesh(loss)
        locals_ = env[id(loss)]
        result.loss = assemble([t.detach() for t in locals_], loss.sbp, mesh)
        seeded_loss(locals_, loss.sbp, mesh, loss_scale).backward()
        result.grads = synced_gradients(self.graph, {p.name: env[id(p)] for p in self.graph.params})


def synced_gradients(graph: Graph, leaves: dict[str, list]) -> dict[str, torch.Tensor]:
    """Full gradients by ``state_dict`` name from every rank's parameter leaves, after the plan's sync.

    Buckets all-reduce partial gradients over their axes; copies of a parameter on several
    pipeline stages (``tied_params``) are summed, as the generated programs do. Frozen parameters
    have no gradient.
    """
    grads = {p.name: [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves[p.name]]
             for p in graph.params if p.trainable}
    for bucket in graph.attrs.get("grad_buckets", []):
        reduce = DTYPES_BY_NAME.get(bucket.get("reduce_dtype"))
        for p in bucket["params"]:
            m = graph.meshes[p.mesh]
            own = grads[p.name][0].dtype
            grads[p.name] = [g.to(reduce or own) for g in grads[p.name]]  # summed in the plan's reduce dtype
            for axis in bucket["axes"]:
                grads[p.name] = collective("comm.all_reduce", grads[p.name], m, m.axis_index(axis), {})
            grads[p.name] = [g.to(own) for g in grads[p.name]]
    planned = DTYPES_BY_NAME.get(graph.attrs.get("precision", {}).get("reduce"))
    for group in graph.attrs.get("tied_params", []):
        own = grads[group[0].name][0].dtype
        wide = planned or own  # the copies' sum in the plan's reduce dtype
        total = [sum(part.to(wide) for part in parts).to(own) for parts in zip(*(grads[p.name] for p in group))]
        for p in group:
            grads[p.name] = total
    out: dict[str, torch.Tensor] = {}
    for p in graph.params:
        if p.trainable and p.target not in out:
            out[p.target] = assemble(grads[p.name], _stored_layout(p.sbp), graph.meshes[p.mesh])
    return out


def seeded_loss(locals_: list, sbp: NdSbp, mesh: Mesh, loss_scale: torch.Tensor | None) -> torch.Tensor:
    """What backward starts from: every rank's loss share (zero off the seed ranks), times the loss scale
    (fp16 plans), as each rank of a program starts its own backward; stacked, each share's gradient is
    the scale exactly."""
    seeded = [t if is_seed_rank(sbp, mesh, r) else t * 0 for r, t in enumerate(locals_)]
    if loss_scale is not None:
        seeded = [t * loss_scale for t in seeded]
    return torch.stack(seeded).sum()


def is_seed_rank(sbp: NdSbp, mesh: Mesh, position: int) -> bool:
    """Whether this rank's copy of a loss counts: every rank on partial axes, coordinate 0 on broadcast ones."""
    coords = mesh.coords(position)
    return all(c == 0 for s, c in zip(sbp, coords) if isinstance(s, Broadcast))


def _stored_layout(sbp: NdSbp) -> NdSbp:
    return tuple(s if isinstance(s, Split) else Broadcast() for s in sbp)


def resolve_callable(name: str):
    """A torch op (``aten.*`` or a custom op, see ``ir.ops.custom``) or a ``kernels.*`` function by name."""
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
        if is_float_expr(obj):
            return float(result)
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


def run_virtual(graph: Graph, weights: dict, inputs: tuple, mode: str = "train", *,
                stages: list[int] | None = None, loss_scale: torch.Tensor | None = None) -> VirtualResult:
    """Simulate every rank of ``graph`` in this process.

    A pipelined graph runs its schedule (see :class:`PipelineRunner`); ``stages`` (pipelines,
    ``infer`` mode) runs every microbatch through that subset of stages only. ``loss_scale`` (fp16
    plans' dynamic loss scaling, ``DynamicLossScaler.scale`` of ``backends/runtime/loss_scaling.py``):
    backward starts from the loss times it, and the gradients come back synced but still scaled, as
    an emitted program's are before its scaler unscales them (``DynamicLossScaler.unscale``, whose
    found-inf over the full gradients is the flag's all-reduce over every rank).
    """
    if is_pipelined(graph):
        return PipelineRunner(graph, weights).run(inputs, mode, stages, loss_scale)
    if stages is not None:
        raise VirtualRunError("stages= chooses pipeline stages, but this plan has no pipeline")
    return VirtualMesh(graph, weights).run(inputs, mode, loss_scale)


# -- pipelines -----------------------------------------------------------------------------------------

def is_batch_like(v: Value) -> bool:
    """Inputs whose first dim is symbolic (the batch) are split into microbatches; others are shared."""
    return v.type.ndim > 0 and not v.type.shape[0].is_Integer


def split_microbatches(graph: Graph, inputs: tuple, count: int) -> list[tuple]:
    """The inputs of each microbatch: batch-like inputs cut into ``count`` equal chunks along dim 0."""
    chunks = []
    for v, t in zip(graph.inputs, inputs):
        if is_batch_like(v):
            if t.shape[0] % count:
                raise VirtualRunError(f"input {v.name}: the batch ({t.shape[0]}) does not split into {count} "
                                      f"microbatches; use a batch size that is a multiple of {count}")
            chunks.append(t.chunk(count, dim=0))
        else:
            chunks.append([t] * count)
    return [tuple(parts) for parts in zip(*chunks)]


@dataclass
class _Saved:
    """What a stage's forward of one microbatch keeps for its backward."""

    entries: list
    """Per slot, the leaf tensors the stage received (one per device)."""
    exits: list
    """Per slot, the tensors the stage sent on (one per device; part of the autograd graph)."""
    loss: list | None
    """On the last stage of the path: the loss of every device."""


class PipelineRunner:
    """Runs a pipelined graph: every device's action list, with send/recv through in-order channels.

    The devices of a pipeline position run the same list (talking to the device at the same mesh
    index of the peer position), so one lane of devices is stepped, in the order
    :func:`ir.schedules.check_deadlock` uses: each device in turn runs until it waits on a
    receive. An ``F`` runs the stage's nodes for one microbatch on every device of the stage's
    mesh, on leaves made of what it received; its ``B`` back-propagates the received gradients
    (or the loss) into those leaves, whose gradients are what ``SEND_B`` carries back; a ``W``
    (zero-bubble schedules) computes the parameter gradients of a backward whose ``B`` left them
    for later. Parameter
    gradients accumulate over microbatches, then the plan's sync (buckets, tied copies) runs.
    """

    def __init__(self, graph: Graph, weights: dict[str, torch.Tensor]):
        self.graph = graph
        self.mesh_runner = VirtualMesh(graph, weights)
        self.stages = pipeline_stages(graph)
        self.microbatches = int(graph.attrs["pipeline"]["microbatches"])
        self.paths = microbatch_paths(graph)
        self.ready: dict[tuple, list] = {}
        self.saved: dict[tuple, _Saved] = {}
        self.losses: dict[int, torch.Tensor] = {}
        self.loss_scale: torch.Tensor | None = None
        """fp16 plans: what the losses backward starts from are multiplied by."""
        self.deferred: set[tuple[int, int]] = set()
        """(stage, microbatch) whose backward is split: a ``W`` follows its ``B``."""
        self.weight_work: dict[tuple[int, int], WeightWork] = {}

    def run(self, inputs: tuple, mode: str = "train", stages: list[int] | None = None,
            loss_scale: torch.Tensor | None = None) -> VirtualResult:
        """Forward and backward of every microbatch (train, from the losses times ``loss_scale`` when given),
        or forward through ``stages`` (infer)."""
        self.loss_scale = loss_scale
        self.full_dims = bind_dims(self.graph, inputs)
        self.micro = split_microbatches(self.graph, inputs, self.microbatches)
        self.micro_dims = [bind_dims(self.graph, mb) for mb in self.micro]
        self.train = mode == "train"
        self.shared = self._shared_values(inputs)
        if stages is not None:
            if self.train:
                raise VirtualRunError("stages= runs inference through a subset of stages; use mode='infer'")
            self.paths = [self._checked_subset(stages)] * self.microbatches
        if not self.train:
            return self._infer()
        self._run_schedule()
        # stacked, a low-precision loss's microbatch shares are summed in float32 and rounded once
        result = VirtualResult(loss=torch.stack([self.losses[m] for m in sorted(self.losses)]).sum(0),
                               buffers=self._buffers())
        result.grads = synced_gradients(self.graph, {p.name: self.shared[id(p)] for p in self.graph.params})
        return result

    def _buffers(self) -> dict[str, torch.Tensor]:
        """The full value of every updated buffer after the last microbatch."""
        return {b.target: assemble(self.shared[id(b)], b.sbp, self.graph.meshes[b.mesh])
                for b in self.graph.buffer_updates}

    # -- values shared by all microbatches: parameters and whole-batch nodes --------------------------
    def _shared_values(self, inputs: tuple) -> dict[int, list]:
        env: dict[int, list] = {}
        for p in self.graph.params:
            env[id(p)] = self.mesh_runner._param_leaves(p, train=self.train and p.trainable)
        whole = [n for st in self.stages for n in st.whole_batch_nodes]
        if whole:
            for v, t in zip(self.graph.inputs, inputs):
                env[id(v)] = self.mesh_runner._scatter(v, t)
            for node in whole:
                self.mesh_runner._run_node(node, env, self.full_dims)
            for v in self.graph.inputs:
                del env[id(v)]
        return env

    def _checked_subset(self, stages: list[int]) -> list[int]:
        count = len(self.stages)
        path = [int(s) for s in stages]
        if not path or path[0] != 0 or path[-1] != count - 1 or len(set(path)) != len(path) \
                or any(not 0 <= s < count for s in path):
            raise VirtualRunError(f"stages={stages}: expected distinct stages from 0 to {count - 1}, starting at 0 "
                                  f"(the input embedding) and ending at {count - 1} (the output)")
        if path != list(range(count)) and not self.graph.attrs["pipeline"].get("skippable"):
            raise VirtualRunError("this pipeline's stages cannot be skipped: its cuts carry different values")
        return path

    # -- one stage, one microbatch --------------------------------------------------------------------
    def _neighbour(self, stage: int, microbatch: int, step: int) -> int | None:
        path = self.paths[microbatch]
        i = path.index(stage) + step
        return path[i] if 0 <= i < len(path) else None

    def forward(self, stage: int, microbatch: int) -> None:
        """``F``: the stage's nodes on one microbatch, on leaves of what the previous stage sent."""
        st = self.stages[stage]
        env = dict(self.shared)
        for v in st.inputs:
            env[id(v)] = self.mesh_runner._scatter(v, self.micro[microbatch][self.graph.inputs.index(v)])
        previous = self._neighbour(stage, microbatch, -1)
        leaves = []
        if previous is not None:
            for v, locals_ in zip(st.entries, self.ready.pop(("F", previous, microbatch))):
                leaves.append([_leaf(t, self.train) for t in locals_])
                env[id(v)] = leaves[-1]
        elif st.entries:
            raise VirtualRunError(f"microbatch {microbatch} starts at stage {stage}, which needs values from an "
                                  "earlier stage; paths start at stage 0")
        for node in st.nodes:
            self.mesh_runner._run_node(node, env, self.micro_dims[microbatch])
        for buffer, value in self.graph.buffer_updates.items():
            if buffer.mesh == st.mesh:  # each microbatch's forward moves the buffers, as in eager pipelines
                self.shared[id(buffer)] = [t.detach() for t in env[id(value)]]
        if self._neighbour(stage, microbatch, +1) is None:
            self._finish(stage, microbatch, env, leaves)
            return
        exits = [env[id(v)] for v in st.exits]
        self.ready[("F", stage, microbatch)] = [[t.detach() for t in locals_] for locals_ in exits]
        self.saved[(stage, microbatch)] = _Saved(leaves, exits, None)

    def _finish(self, stage: int, microbatch: int, env: dict, leaves: list) -> None:
        if stage != len(self.stages) - 1:
            raise VirtualRunError(f"microbatch {microbatch} ends at stage {stage}; paths end at the last stage "
                                  f"({len(self.stages) - 1}), which computes the outputs")
        if not self.train:
            self.ready[("out", microbatch)] = [env[id(o)] for o in self.graph.outputs]
            return
        loss = self.graph.loss
        mesh = self.graph.meshes[loss.mesh]
        locals_ = env[id(loss)]
        self.losses[microbatch] = assemble([t.detach() for t in locals_], loss.sbp, mesh)
        self.saved[(stage, microbatch)] = _Saved(leaves, [], locals_)

    def backward(self, stage: int, microbatch: int) -> None:
        """``B``: back-propagate the loss or the received gradients; keep the entries' gradients to send.

        When the schedule has a ``W`` for this (stage, microbatch), only the entries' gradients are
        computed here and the parameters' wait for :meth:`weight` (a split backward)."""
        saved = self.saved.pop((stage, microbatch))
        outs, seeds = self._backward_seeds(stage, microbatch, saved)
        if (stage, microbatch) in self.deferred:
            leaves = [leaf for slot in saved.entries for leaf in slot]
            found, self.weight_work[(stage, microbatch)] = backward_input(outs, seeds, leaves)
            grads = dict(zip(map(id, leaves), found))
        else:
            if outs:
                torch.autograd.backward(outs, seeds)
            grads = {id(leaf): leaf.grad for slot in saved.entries for leaf in slot}
        if saved.entries:
            self.ready[("B", stage, microbatch)] = [[_entry_grad(leaf, grads[id(leaf)]) for leaf in slot]
                                                    for slot in saved.entries]

    def weight(self, stage: int, microbatch: int) -> None:
        """``W``: the parameters' gradients of a split backward, from what its ``B`` kept."""
        self.weight_work.pop((stage, microbatch)).run()

    def _backward_seeds(self, stage: int, microbatch: int, saved: _Saved) -> tuple[list, list]:
        """The tensors a backward starts from and their gradients (None: the seeded loss)."""
        if saved.loss is not None:
            loss = self.graph.loss
            mesh = self.graph.meshes[loss.mesh]
            return [seeded_loss(saved.loss, loss.sbp, mesh, self.loss_scale)], [None]
        grads = self.ready.pop(("B", self._neighbour(stage, microbatch, +1), microbatch))
        outs, seeds = [], []
        for locals_, slot_grads in zip(saved.exits, grads):
            for t, g in zip(locals_, slot_grads):
                if g is not None and t.requires_grad:
                    outs.append(t)
                    seeds.append(g)
        return outs, seeds

    # -- the schedule ---------------------------------------------------------------------------------
    def _run_schedule(self) -> None:
        lists = self._lane_lists()
        self.deferred = {a.value[1:] for actions in lists.values() for a in actions if a.kind == "W"}
        channels: dict[tuple[int, int], deque] = defaultdict(deque)
        position = {rank: 0 for rank in lists}
        progress = True
        while progress:
            progress = False
            for rank in sorted(lists):
                while position[rank] < len(lists[rank]) and self._step(rank, lists[rank][position[rank]], channels):
                    position[rank] += 1
                    progress = True
        stuck = {rank: str(lists[rank][i]) for rank, i in position.items() if i < len(lists[rank])}
        if stuck:
            raise VirtualRunError(f"the schedule deadlocks: devices wait at {stuck}; check it with "
                                  "ir.schedules.check_deadlock")

    def _step(self, rank: int, action: Action, channels: dict) -> bool:
        if action.kind == "F":
            self.forward(action.stage, action.microbatch)
        elif action.kind == "B":
            self.backward(action.stage, action.microbatch)
        elif action.kind == "W":
            self.weight(action.stage, action.microbatch)
        elif action.is_send:
            channels[(rank, action.peer)].append((action.value, self.ready.pop(action.value)))
        else:
            queue = channels[(action.peer, rank)]
            if not queue:
                return False
            value, payload = queue.popleft()
            if value != action.value:
                raise VirtualRunError(f"device {rank} runs {action} but the next message from device {action.peer} "
                                      f"is {value}; channels deliver in order")
            self.ready[value] = payload
        return True

    def _lane_lists(self) -> dict[int, list[Action]]:
        """The action lists of the first device of every position; checks the other devices agree."""
        actions = schedule_actions(self.graph)
        first_of = {}
        for st in self.stages:
            devices = self.graph.meshes[st.mesh].devices
            for index, device in enumerate(devices):
                first_of[device] = (devices[0], index)
        lane = {first_of[d][0]: actions[d] for d in actions if first_of[d][1] == 0}
        for device, acts in actions.items():
            first, _ = first_of[device]
            renamed = [a if a.peer is None else Action(a.kind, a.stage, a.microbatch, first_of[a.peer][0])
                       for a in acts]
            if renamed != lane[first]:
                raise VirtualRunError(f"device {device} runs a different action list from device {first}, the first "
                                      "device of its stage; every device of a stage runs the same list")
        return lane

    def _infer(self) -> VirtualResult:
        for microbatch, path in enumerate(self.paths):
            for stage in path:
                with torch.no_grad():
                    self.forward(stage, microbatch)
        outputs = []
        for i, o in enumerate(self.graph.outputs):
            parts = [assemble(self.ready[("out", m)][i], o.sbp, self.graph.meshes[o.mesh], self.mesh_runner.balanced(o))
                     for m in range(self.microbatches)]
            if o is self.graph.loss:
                outputs.append(sum(parts))
            elif o.type.ndim > 0 and not o.type.shape[0].is_Integer:
                outputs.append(torch.cat(parts, dim=0))
            else:
                outputs.append(parts[0])
        return VirtualResult(outputs=tuple(outputs), buffers=self._buffers())


def _leaf(t: torch.Tensor, train: bool) -> torch.Tensor:
    return t.detach().requires_grad_(train and t.is_floating_point())


def _entry_grad(leaf: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor | None:
    """What SEND_B carries for one entry: its gradient, zeros where it got none, None for a non-float one."""
    if not leaf.requires_grad:
        return None
    return grad if grad is not None else torch.zeros_like(leaf)
