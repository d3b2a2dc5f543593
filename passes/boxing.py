"""Boxing: insert the cheapest chain of collectives where a value's layout differs from its use.

The chain is a shortest path over single-axis conversions (``ir.ops.comm.transition``) under a
cost from :mod:`cost.boxing`: seconds on the cluster the graph is compiled for (with the backward
adjoint for values that carry a gradient), bytes on the wire without one (see :func:`boxing_cost`).
A conversion that changes a split of dim ``d`` on axis ``a`` is only taken when no
later (inner) axis splits ``d`` too, so nested splits stay contiguous; a reduction of partial values
on axis ``a`` only when no inner axis holds partial values of the other kind (sum vs max).
"""
from __future__ import annotations

import heapq
from functools import lru_cache

from cost.boxing import BoxingCost, axis_bytes, bytes_cost, mesh_boxing_cost
from ir.core import Graph, Node, Value
from ir.gradients import values_with_grad
from ir.ops.comm import transition
from ir.ops.registry import splits_divide
from ir.precision import narrowing_cast
from ir.sbp import IN_SBP_ATTR, PMAX, NdSbp, Partial, Split, all_sbp_values, format_nd_sbp
from ir.types import Mesh, TensorType, dim_symbol
from passes.manager import PassContext, register_pass
from passes.precision import mark_forward_reductions


def boxing_cost(ctx: PassContext, mesh: Mesh, backward: bool) -> BoxingCost:
    """The cost boxing chains are chosen by: ``ctx.options["boxing_cost"]`` when given, else seconds on
    ``ctx.cluster`` (with the backward adjoint for a value with a gradient, when training), else bytes."""
    if "boxing_cost" in ctx.options:
        return ctx.options["boxing_cost"]
    if ctx.cluster is None:
        return bytes_cost
    return mesh_boxing_cost(ctx.cluster, mesh, backward and ctx.train)


class BoxingError(ValueError):
    """No chain of collectives converts between two layouts."""


def boxing_path(t: TensorType, src: NdSbp, dst: NdSbp, mesh: Mesh, cost: BoxingCost = bytes_cost,
                priced: TensorType | None = None) -> tuple[float, list[tuple[int, str, dict, NdSbp]]]:
    """The cheapest conversion ``src -> dst``: total cost and steps ``(axis, op, kwargs, new sbp)``.
    ``priced``: the type whose sizes the steps are priced at (default ``t``; the boxing pass gives ``t`` at the
    example input's sizes, while which layouts ``t`` may take is still judged on its own dims).

    Raises :class:`BoxingError` when ``src`` or ``dst`` splits a static dim unevenly, and for any
    conversion into ``P(max)``: no collective makes max-partial values (only ops such as ``amax``
    produce them), so a ``P(max)`` input must already be held that way.
    """
    src, dst = tuple(src), tuple(dst)
    if src != dst:
        for layout in (src, dst):
            problem = uneven_split(t, layout, mesh)
            if problem:
                raise BoxingError(f"cannot hold {t} as {format_nd_sbp(layout)} on mesh {_mesh_text(mesh)}: "
                                  f"{problem}")
        if PMAX in dst:
            raise BoxingError(f"no conversion from {format_nd_sbp(src)} to {format_nd_sbp(dst)} for {t} on mesh "
                              f"{_mesh_text(mesh)}: no collective produces P(max) values; a P(max) input "
                              f"must come from an op that outputs P(max) (amax), else use B or S")
    return _search(t, src, dst, mesh, cost, priced or t)


def uneven_split(t: TensorType, nd: NdSbp, mesh: Mesh) -> str | None:
    """Why ``nd`` cannot hold a tensor of type ``t`` (a split that does not divide), or None."""
    for dim in sorted({s.dim for s in nd if isinstance(s, Split)}):
        axes = [(a, n) for s, a, n in zip(nd, mesh.axes, mesh.shape) if isinstance(s, Split) and s.dim == dim]
        ways = 1
        for _, n in axes:
            ways *= n
        names = ", ".join(f"{a}={n}" for a, n in axes)
        if dim >= t.ndim:
            return f"S({dim}) splits dim {dim}, but the tensor has {t.ndim} dims"
        size = t.shape[dim]
        if size.is_Integer and int(size) % ways:
            return (f"dim {dim} has size {size}, which does not split evenly over {ways} ranks (mesh axes "
                    f"{names}); use a size that is a multiple of {ways}, or a layout that does not split dim {dim}")
    return None


def _mesh_text(mesh: Mesh) -> str:
    return "[" + ", ".join(f"{a}={n}" for a, n in zip(mesh.axes, mesh.shape)) + "]"


@lru_cache(maxsize=65536)
def _search(t, src, dst, mesh, cost, priced):
    if src == dst:
        return 0.0, []
    values = all_sbp_values(t.ndim, ("sum", "max"))
    best = {src: 0.0}
    heap = [(0.0, 0, src, [])]
    counter = 1
    while heap:
        c, _, state, path = heapq.heappop(heap)
        if state == dst:
            return c, path
        if c > best.get(state, float("inf")):
            continue
        for axis in range(mesh.ndim):
            for new in values:
                step = transition(state[axis], new)
                if step is None or not _contiguous(state, axis, new) or not _reduces_in_order(state, axis, step[0]):
                    continue
                nxt = state[:axis] + (new,) + state[axis + 1:]
                if not splits_divide(t, nxt, mesh):
                    continue
                nc = c + cost(step[0], axis_bytes(priced, state, mesh, axis), mesh, axis)
                if nc < best.get(nxt, float("inf")):
                    best[nxt] = nc
                    heapq.heappush(heap, (nc, counter, nxt, path + [(axis, step[0], step[1], nxt)]))
                    counter += 1
    raise BoxingError(f"no conversion from {format_nd_sbp(src)} to {format_nd_sbp(dst)} for {t} "
                      f"on mesh {_mesh_text(mesh)}")


def _contiguous(state: NdSbp, axis: int, new) -> bool:
    """A split of dim d may change on ``axis`` only if no inner axis also splits d."""
    dims = {s.dim for s in (state[axis], new) if isinstance(s, Split)}
    return not any(isinstance(s, Split) and s.dim in dims for s in state[axis + 1:])


def _reduces_in_order(state: NdSbp, axis: int, op: str) -> bool:
    """Partial values combine inner axis first: ``(P(sum), P(max))`` is a sum over the outer axis of
    maxima over the inner one. Reducing an outer axis first is only right when the inner partial
    values combine the same way (sums commute with sums, maxima with maxima, not with each other)."""
    if op not in ("comm.all_reduce", "comm.reduce_scatter"):
        return True
    return all(s == state[axis] for s in state[axis + 1:] if isinstance(s, Partial))


def insert_conversion(graph: Graph, value: Value, dst: NdSbp, before: Node | None, cost: BoxingCost = bytes_cost,
                      origin: Node | None = None) -> Value:
    """Insert the collectives that turn ``value`` into layout ``dst`` just before ``before`` (at the end
    when None); they carry the module of ``origin`` (default: of ``before``)."""
    mesh = graph.meshes[value.mesh]
    priced = at_example_dims(value.type, graph.attrs.get("example_dims") or {})  # sizes the cost model knows
    _, steps = boxing_path(value.type, value.sbp, dst, mesh, cost, priced)
    current = value
    attrs = _origin(origin or before)
    for axis, op, kwargs, new in steps:
        node = graph.create_node(op, [current], {"axis": mesh.axes[axis], **kwargs}, [value.type],
                                 [f"{value.name}_{op.split('.')[1]}"], attrs=attrs, before=before)
        out = node.outputs[0]
        out.sbp, out.mesh = new, value.mesh
        current = out
    return current


def at_example_dims(t: TensorType, dims: dict) -> TensorType:
    """The type with symbolic dims set to the example input's sizes (for costing)."""
    if not dims:
        return t
    return _at_dims(t, tuple(sorted(dims.items())))


@lru_cache(maxsize=65536)
def _at_dims(t: TensorType, dims: tuple) -> TensorType:
    subs = {dim_symbol(k): v for k, v in dims}
    return TensorType(tuple(d.subs(subs) for d in t.shape), t.dtype)


def _origin(node: Node | None) -> dict:
    return {"module": node.attrs["module"]} if node is not None and "module" in node.attrs else {}


@register_pass("boxing", requires=("propagated",), produces=("boxed",))
def boxing_pass(graph: Graph, ctx: PassContext) -> None:
    """Make every node's inputs arrive in the layout its chosen signature needs (``in_sbp``), and every
    buffer's new value in the buffer's layout."""
    grad = values_with_grad(graph)
    for node in list(graph.nodes):
        wanted = node.attrs.pop(IN_SBP_ATTR, None)
        if wanted is None:
            continue
        converted: dict[tuple, Value] = {}
        for v, dst in zip(node.input_values(), wanted):
            if v.sbp == dst:
                continue
            key = (id(v), dst)
            if key not in converted:
                cost = boxing_cost(ctx, graph.meshes[v.mesh], id(v) in grad)
                converted[key] = insert_conversion(graph, v, dst, node, cost)
            new = converted[key]
            _replace_one_use(node, v, new)
    _box_buffer_updates(graph, ctx)
    _cast_shards_before_gathers(graph)
    mark_forward_reductions(graph)  # the sums of partials in the plan's forward_reduce dtype, if it names one


def _box_buffer_updates(graph: Graph, ctx: PassContext) -> None:
    """A buffer's new value is stored in its place, so it must be held as the buffer is: convert it right
    after it is made (with the module of its producer, so a pipeline cut keeps them together)."""
    for buffer, value in list(graph.buffer_updates.items()):
        if value.sbp == buffer.sbp:
            continue
        producer = value.producer
        position = graph.nodes.index(producer) + 1 if producer is not None else 0
        before = graph.nodes[position] if position < len(graph.nodes) else None
        cost = boxing_cost(ctx, graph.meshes[value.mesh], backward=False)  # new statistics carry no gradient
        graph.buffer_updates[buffer] = insert_conversion(graph, value, buffer.sbp, before, cost, origin=producer)


def _cast_shards_before_gathers(graph: Graph) -> None:
    """A parameter gathered only to be cast to a narrower dtype (FSDP under ``bf16-mixed``: fp32 shards, bf16
    compute) is cast on its shard and gathered in the narrow dtype, as ``fully_shard`` with ``param_dtype``
    does: half the bytes on the wire, the same values (a cast commutes with a gather). The parameter stays in its
    dtype (the fp32 master shard the optimizer updates); its gradient is reduce-scattered in the gather's
    ``grad_dtype`` (``grad_sync``) and reaches the parameter unrounded (``ir.precision.cast_parameter``)."""
    for gather in [n for n in graph.nodes if n.op == "comm.all_gather"]:
        param, full = gather.input_values()[0], gather.outputs[0]
        cast = full.uses[0] if len(full.uses) == 1 else None
        if param.kind != "param" or not narrowing_cast(cast) or full in graph.outputs:
            continue
        narrow = cast.outputs[0]
        graph.replace_all_uses(narrow, full)  # its readers read the gathered narrow tensor
        cast.map_values(lambda v: param if v is full else v)
        gather.map_values(lambda v: narrow if v is param else v)
        narrow.sbp, narrow.mesh = param.sbp, param.mesh
        full.type = TensorType(full.type.shape, narrow.type.dtype)
        graph.nodes.remove(cast)
        graph.nodes.insert(graph.nodes.index(gather), cast)


def _replace_one_use(node: Node, old: Value, new: Value) -> None:
    done = [False]

    def swap(v: Value) -> Value:
        if v is old and not done[0]:
            done[0] = True
            return new
        return v

    node.map_values(swap)
