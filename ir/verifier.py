"""The verifier: rejects an ill-typed or ill-placed graph, naming the node."""
from __future__ import annotations

import sympy
import torch

from ir.core import Graph, Node, Value
from ir.ops.custom import UnknownOpError, resolve_op
from ir.sbp import IN_SBP_ATTR, Partial, Split, format_nd_sbp
from ir.gradients import values_with_grad
from ir.ops.comm import GRADIENT_REDUCING, sums_partials
from ir.types import DTYPE_NAMES, DTYPES_BY_NAME, TensorType, is_float_expr


class VerificationError(ValueError):
    """The graph breaks an IR invariant; the message names the node or value."""


def verify(graph: Graph, *, check_types: bool = True) -> None:
    """Check definitions before uses, layouts against op rules, and (with example dims) types."""
    defined: set[int] = set()
    names: set[str] = set()
    for v in list(graph.inputs) + list(graph.params):
        _define(v, defined, names)
        _check_layout(graph, v, None)
    for node in graph.nodes:
        for v in node.input_values():
            if id(v) not in defined:
                raise VerificationError(f"node {_where(node)} reads %{v.name} before it is defined")
        for v in node.outputs:
            _define(v, defined, names)
            _check_layout(graph, v, node)
        _check_signature(graph, node)
    for v in graph.outputs:
        if id(v) not in defined:
            raise VerificationError(f"graph output %{v.name} is not defined")
    if graph.loss is not None and graph.loss.type.ndim != 0:
        raise VerificationError(f"the loss %{graph.loss.name} must be a scalar, found {graph.loss.type}")
    _check_buffer_updates(graph, defined)
    check_routed_rows(graph)
    check_reduce_dtype(graph)
    dims = graph.attrs.get("example_dims")
    if check_types and dims:
        check_types_by_meta(graph, dims)


def check_routed_rows(graph: Graph) -> None:
    """Expert parallelism's routed rows (``ir/ops/moe.py``) are split in uneven, data-dependent pieces: no
    collective may split or gather their rows (dim 0); other dims (a tensor-parallel split of the features)
    convert as usual."""
    from ir.ops.moe import routed_rows
    for v, node in routed_rows(graph).values():
        for user in v.uses:
            if user.op.startswith("comm.") and 0 in (user.kwargs.get(k) for k in ("dim", "src_dim", "dst_dim")):
                raise VerificationError(
                    f"node {_where(user)} moves rows of %{v.name} between the ranks of axis "
                    f"{user.kwargs.get('axis')!r} ({user.op} on dim 0), but those rows were routed to their experts "
                    f"by %{node.name} (moe.dispatch on axis {node.kwargs.get('axis')!r}): the routing splits them "
                    "unevenly, so no collective may split or gather them; only row-wise ops, moe.expert_mm and "
                    "moe.combine may read them. Keep the experts' activations split S(0) on that axis (remove the "
                    "layout or collective that gathers them), or do not split the experts over it")


def check_reduce_dtype(graph: Graph) -> None:
    """The plan's precision contract (graph attr ``precision``), once gradient buckets exist: every
    gradient reduction runs in the ``reduce`` dtype — each bucket (data-parallel all-reduces) and each
    collective whose adjoint sums gradients (tensor-parallel all-reduces, FSDP's reduce-scatters)."""
    check_forward_reduce_dtype(graph)
    reduce = graph.attrs.get("precision", {}).get("reduce")
    if reduce is None or "grad_buckets" not in graph.attrs:
        return
    for index, bucket in enumerate(graph.attrs["grad_buckets"]):
        found = bucket.get("reduce_dtype")
        if found != reduce:
            names = ", ".join(f"%{p.name}" for p in bucket["params"][:3])
            raise VerificationError(f"gradient bucket {index} ({names}{', ...' if len(bucket['params']) > 3 else ''}) "
                                    f"is reduced in {found or 'its gradients own dtype'}, but the plan's precision "
                                    f"reduces gradients in {reduce}; set its reduce_dtype to {reduce}")
    grad = values_with_grad(graph)
    want = DTYPES_BY_NAME[reduce]
    for node in graph.nodes:
        if node.op in GRADIENT_REDUCING and id(node.outputs[0]) in grad and node.kwargs.get("grad_dtype") != want:
            found = node.kwargs.get("grad_dtype")
            found = DTYPE_NAMES[found] if found is not None else f"{node.outputs[0].type.dtype} (the value's own)"
            raise VerificationError(f"node {_where(node)}: the gradient reduction of {node.op} over "
                                    f"{node.kwargs['axis']} (its adjoint in backward) runs in {found}, but the plan's "
                                    f"precision reduces gradients in {reduce}; give it grad_dtype=torch.{want}"
                                    .replace("torch.torch.", "torch."))


def check_forward_reduce_dtype(graph: Graph) -> None:
    """With a precision ``forward_reduce``: every collective summing partial values in forward (an all-reduce
    of a ``P(sum)`` value, a reduce-scatter) runs in that dtype (kwarg ``reduce_dtype``)."""
    forward = graph.attrs.get("precision", {}).get("forward_reduce")
    if forward is None:
        return
    want = DTYPES_BY_NAME[forward]
    for node in graph.nodes:
        if sums_partials(node) and node.kwargs.get("reduce_dtype") != want:
            found = node.kwargs.get("reduce_dtype")
            found = DTYPE_NAMES[found] if found is not None else f"{node.input_values()[0].type.dtype} (the value's own)"
            raise VerificationError(f"node {_where(node)}: {node.op} over {node.kwargs['axis']} sums its partial "
                                    f"values in {found}, but the plan's precision sums forward partials in "
                                    f"{forward}; give it reduce_dtype=torch.{want}".replace("torch.torch.", "torch."))


def _check_buffer_updates(graph: Graph, defined: set[int]) -> None:
    """``update %buffer <- %value``: a buffer of the graph takes a defined value of its own type; once
    boxing has run (no node waits for its input layouts), held as the buffer is, on its mesh."""
    boxed = not any(IN_SBP_ATTR in n.attrs for n in graph.nodes)
    for buffer, value in graph.buffer_updates.items():
        where = f"update %{buffer.name} <- %{value.name}"
        if buffer.kind != "buffer" or not any(buffer is p for p in graph.params):
            raise VerificationError(f"{where}: %{buffer.name} is a {buffer.kind}, not a buffer of the graph; "
                                    f"only buffers take new values after a step")
        if id(value) not in defined:
            raise VerificationError(f"{where}: %{value.name} is not defined")
        if value.type != buffer.type:
            raise VerificationError(f"{where}: the buffer is {buffer.type} but the value is {value.type}")
        if boxed and value.sbp is not None and buffer.sbp is not None \
                and (value.sbp, value.mesh) != (buffer.sbp, buffer.mesh):
            raise VerificationError(f"{where}: the value is held {format_nd_sbp(value.sbp)} @{value.mesh} but the "
                                    f"buffer {format_nd_sbp(buffer.sbp)} @{buffer.mesh}; run the boxing pass")


def _where(node: Node) -> str:
    module = node.attrs.get("module")
    return f"%{node.name} ({node.op}{', module ' + module if module else ''})"


def _define(v: Value, defined: set, names: set) -> None:
    if v.name in names:
        raise VerificationError(f"value %{v.name} is defined twice")
    names.add(v.name)
    defined.add(id(v))


def _check_layout(graph: Graph, v: Value, node: Node | None) -> None:
    if v.sbp is None:
        return
    where = _where(node) if node else f"%{v.name}"
    if v.mesh not in graph.meshes:
        raise VerificationError(f"{where}: value %{v.name} is placed on unknown mesh @{v.mesh}")
    mesh = graph.meshes[v.mesh]
    if len(v.sbp) != mesh.ndim:
        raise VerificationError(f"{where}: %{v.name} has SBP {format_nd_sbp(v.sbp)} with {len(v.sbp)} entries "
                                f"but mesh @{v.mesh} has {mesh.ndim} axes")
    for s, n, axis in zip(v.sbp, mesh.shape, mesh.axes):
        if isinstance(s, Split):
            if s.dim >= v.type.ndim:
                raise VerificationError(f"{where}: %{v.name} of type {v.type} cannot be split on dim {s.dim}")
    from ir.ops.registry import splits_divide
    if not splits_divide(v.type, v.sbp, mesh):
        raise VerificationError(f"{where}: %{v.name} of type {v.type} is split {format_nd_sbp(v.sbp)} over "
                                f"mesh {dict(zip(mesh.axes, mesh.shape))}, which does not divide it evenly")
    if v.kind in ("param", "buffer", "input") and any(isinstance(s, Partial) for s in v.sbp):
        raise VerificationError(f"%{v.name}: {v.kind}s cannot be partial values, found {format_nd_sbp(v.sbp)}")


def _check_signature(graph: Graph, node: Node) -> None:
    ins, outs = node.input_values(), node.outputs
    if any(v.sbp is None for v in ins + outs):
        return
    if IN_SBP_ATTR in node.attrs and len(node.attrs[IN_SBP_ATTR]) != len(ins):
        raise VerificationError(f"node {_where(node)}: {len(node.attrs[IN_SBP_ATTR])} input layouts for {len(ins)} "
                                "inputs")
    if node.op.startswith("comm."):
        _check_comm(graph, node)
        return
    _check_placement(graph, node)
    from ir.ops.registry import nd_signatures
    mesh = graph.meshes[outs[0].mesh]
    pending = node.attrs.get(IN_SBP_ATTR)  # layouts chosen by propagation, before boxing
    actual = (tuple(pending) if pending else tuple(v.sbp for v in ins), tuple(v.sbp for v in outs))
    if actual not in nd_signatures(node, mesh):
        found = ", ".join(format_nd_sbp(s) for s in actual[0]) + " -> " + ", ".join(format_nd_sbp(s) for s in actual[1])
        raise VerificationError(f"node {_where(node)} has layouts {found}, which is not a valid signature of "
                                f"{node.op}; run the boxing pass or choose layouts from the op's rules")


def _check_placement(graph: Graph, node: Node) -> None:
    """A node's values share one mesh; a transfer moves a value between meshes.

    One exception: a pipeline's ``whole_batch`` node (run once per step on the whole batch) may read
    a graph input placed on another stage. Every device loads the whole batch of each step, so the
    input is at hand on every stage in its layout, provided the stage meshes have the same shape.
    """
    from ir.ops.pipeline_ops import WHOLE_BATCH
    outs = node.outputs
    whole = bool(node.attrs.get(WHOLE_BATCH))
    home = outs[0].mesh
    for v in node.input_values() + outs[1:]:
        if v.mesh == home:
            continue
        if whole and v.kind == "input" and _same_shape(graph.meshes[v.mesh], graph.meshes[home]):
            continue
        raise VerificationError(f"node {_where(node)} mixes placements {sorted({home, v.mesh})} (%{v.name}); "
                                "insert a transfer")


def _same_shape(a, b) -> bool:
    return tuple(a.axes) == tuple(b.axes) and tuple(a.shape) == tuple(b.shape)


def _check_comm(graph: Graph, node: Node) -> None:
    from ir.ops.comm import transition
    from ir.ops.pipeline_ops import TRANSFER_OPS, transfer_problem
    if node.op in TRANSFER_OPS:  # moves a value between stage meshes (see ir/ops/pipeline_ops.py)
        problem = transfer_problem(graph, node)
        if problem:
            raise VerificationError(f"node {_where(node)}: {problem}")
        return
    (x,), (y,) = node.input_values(), node.outputs
    mesh = graph.meshes[x.mesh]
    axis = mesh.axis_index(node.kwargs["axis"])
    changed = [i for i, (a, b) in enumerate(zip(x.sbp, y.sbp)) if a != b]
    step = transition(x.sbp[axis], y.sbp[axis])
    if changed != [axis] or step is None or step[0] != node.op:
        raise VerificationError(f"node {_where(node)} converts {format_nd_sbp(x.sbp)} -> {format_nd_sbp(y.sbp)} "
                                f"on axis {node.kwargs['axis']}, which {node.op} does not do")


def check_types_by_meta(graph: Graph, dims: dict) -> None:
    """Run every node on meta tensors at the example dims and compare shapes and dtypes."""
    typer = MetaTyper(graph, dims)
    for node in graph.nodes:
        typer.run(node)


class MetaTyper:
    """Runs nodes one by one on meta tensors at the example dims, checking each output's declared type.

    With ``adopt_dtypes`` an output takes the dtype its op gives instead (shapes are still checked): for
    passes that change some values' dtypes (the casts of mixed precision) and let the rest follow, node
    by node, so that each node's inputs have their final dtypes when the pass looks at it."""

    def __init__(self, graph: Graph, dims: dict, *, adopt_dtypes: bool = False):
        self.dims = dims
        self.adopt_dtypes = adopt_dtypes
        self.bindings = {sympy.Symbol(k, integer=True, positive=True): v for k, v in dims.items()}
        self.bound: dict[sympy.Expr, int | float] = {}  # each symbolic size substituted once
        self.env: dict[int, torch.Tensor] = {}
        for v in list(graph.inputs) + list(graph.params):
            self.env[id(v)] = torch.empty(v.type.concrete_shape(self.bindings), dtype=v.type.torch_dtype,
                                          device="meta")

    def run(self, node: Node) -> None:
        """Type ``node``'s outputs (its inputs must have been run or be graph inputs)."""
        from ir.core import map_structure
        env = self.env
        if node.op.startswith("comm."):
            for o, i in zip(node.outputs, node.input_values()):
                env[id(o)] = env[id(i)]
            return
        args = map_structure(node.args, lambda v: env[id(v)])
        kwargs = map_structure(node.kwargs, lambda v: env[id(v)])
        args, kwargs = self._bind(args), self._bind(kwargs)
        results = _run_on_meta(node, args, kwargs)
        for o, r in zip(node.outputs, results):
            want = o.type.concrete_shape(self.bindings)
            if self.adopt_dtypes and isinstance(r, torch.Tensor) and r.dtype != o.type.torch_dtype:
                o.type = TensorType(o.type.shape, DTYPE_NAMES[r.dtype])
            if tuple(r.shape) != want or r.dtype != o.type.torch_dtype:
                raise VerificationError(f"node {_where(node)}: %{o.name} is declared {o.type}, but {node.op} "
                                        f"gives {tuple(r.shape)} {r.dtype} at dims {self.dims}")
            env[id(o)] = r

    def _bind(self, obj):
        """``obj`` with every symbolic size set to its example value and devices made ``meta``."""
        if isinstance(obj, sympy.Expr):
            value = self.bound.get(obj)
            if value is None:
                value = obj.subs(self.bindings)
                value = self.bound[obj] = float(value) if is_float_expr(obj) else int(value)
            return value
        if isinstance(obj, list):
            return [self._bind(o) for o in obj]
        if isinstance(obj, tuple):
            return tuple(self._bind(o) for o in obj)
        if isinstance(obj, dict):
            return {k: self._bind(v) for k, v in obj.items()}
        if isinstance(obj, torch.device):
            return torch.device("meta")
        return obj


_META_RESULTS: dict = {}
_META_RESULTS_LIMIT = 100_000


def _run_on_meta(node: Node, args, kwargs) -> list[torch.Tensor]:
    """The op's meta outputs. An op is a function of its meta inputs (shape, stride, dtype) and other
    arguments, so each distinct call runs once (the same op in every layer costs one run) and later
    calls rebuild the remembered outputs."""
    key = (node.op, _describe((args, kwargs)))
    known = _META_RESULTS.get(key)
    if known is None:
        try:
            op = resolve_op(node.op)
        except UnknownOpError as err:
            raise VerificationError(f"node {_where(node)}: {err}") from None
        try:
            result = op(*args, **kwargs)  # a custom op runs its registered fake kernel here
        except Exception as err:  # the op's own shape check failed
            known = str(err).splitlines()[0] if str(err) else type(err).__name__
        else:
            results = list(result) if isinstance(result, (list, tuple)) else [result]
            known = tuple((tuple(r.shape), tuple(r.stride()), r.dtype) if isinstance(r, torch.Tensor) else r
                          for r in results)
        if len(_META_RESULTS) >= _META_RESULTS_LIMIT:
            _META_RESULTS.clear()
        _META_RESULTS[key] = known
    if isinstance(known, str):
        raise VerificationError(f"node {_where(node)} is ill-typed: {known}")
    return [torch.empty_strided(r[0], r[1], dtype=r[2], device="meta") if isinstance(r, tuple) else r
            for r in known]


def _describe(obj):
    """A hashable description of bound arguments: meta tensors by shape, stride and dtype."""
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), tuple(obj.stride()), obj.dtype)
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, tuple(_describe(o) for o in obj))
    if isinstance(obj, dict):
        return ("dict", tuple((k, _describe(v)) for k, v in obj.items()))
    return repr(obj)


