"""Seed layouts from the strategy: the mesh, the SBP of every input and parameter."""
from __future__ import annotations

import fnmatch


from ir.core import Graph, Value
from ir.sbp import PINNED_ATTR, B, Split
from ir.types import Mesh
from passes.manager import PassContext, register_pass
from strategy import CONTEXT_AXIS, DATA_AXIS, EXPERT_AXIS, PIPELINE_AXIS, Layout, Strategy, StrategyError, closest

MESH_NAME = "world"
BATCH_AXES = (DATA_AXIS, EXPERT_AXIS)
"""Axes that split the batch: data parallelism, and expert parallelism (whose tokens go to their experts by
all-to-all; elsewhere it is data parallelism)."""


@register_pass("layouts", produces=("laid_out",))
def layouts_pass(graph: Graph, ctx: PassContext) -> None:
    """Create the mesh, split batch inputs over data-parallel axes (their sequence over a cp axis), and lay
    out parameters."""
    strategy = ctx.strategy
    # a pure pipeline mesh ({"pp": 4}) still needs one axis per stage: a data-parallel axis of size 1
    stage_mesh = strategy.mesh_spec.without(PIPELINE_AXIS)
    mesh = Mesh.make(list(stage_mesh.axes), [int(n) for n in stage_mesh.sizes]) if len(stage_mesh) \
        else Mesh.make([DATA_AXIS], [1])
    graph.meshes[MESH_NAME] = mesh
    for v in graph.inputs:
        _place(v, tuple(_input_sbp(v, axis) for axis in mesh.axes))
    for v in graph.params:
        _place(v, tuple(B for _ in mesh.axes))
    if strategy.vocab_parallel:
        _vocab_parallel(graph, mesh, strategy)
    _param_globs(graph, mesh, strategy.params)
    if strategy.fsdp_axis:
        _fsdp(graph, mesh, strategy.fsdp_axis)
    graph.attrs["strategy"] = strategy.to_dict()


def _place(v: Value, sbp: tuple) -> None:
    v.sbp, v.mesh = sbp, MESH_NAME


def _input_sbp(v: Value, axis: str):
    """Batch inputs ``[batch, seq, ...]`` split the batch over data-parallel axes and the sequence over
    the context-parallel axis."""
    batch_like = v.type.ndim > 0 and not v.type.shape[0].is_Integer
    if axis == CONTEXT_AXIS:
        return Split(1) if batch_like and v.type.ndim > 1 else B
    return Split(0) if axis in BATCH_AXES and batch_like else B


def _fsdp(graph: Graph, mesh: Mesh, axis: str) -> None:
    """Sharded data parallelism: parameters stored split on dim 0 over the axis where it divides."""
    a = mesh.axis_index(axis)
    n = mesh.shape[a]
    for p in graph.params:
        if p.kind == "param" and p.type.ndim > 0 and int(p.type.shape[0]) % n == 0:
            # used gathered (B) on the fsdp axis, as laid out on the others
            graph.attrs.setdefault(PINNED_ATTR, {})[p.name] = p.sbp
            p.sbp = p.sbp[:a] + (Split(0),) + p.sbp[a + 1:]


def _vocab_parallel(graph: Graph, mesh: Mesh, strategy: Strategy) -> None:
    """Embedding tables split over the vocabulary on the tensor-parallel axis (the strategy has one:
    :func:`strategy.normalize` checks it)."""
    a = mesh.axis_index(strategy.tensor_axis)
    for node in graph.nodes:
        if node.op == "aten.embedding.default":
            w = node.input_values()[0]
            token_ids = node.input_values()[1].kind == "input"
            if w.kind == "param" and token_ids and int(w.type.shape[0]) % mesh.shape[a] == 0:
                w.sbp = w.sbp[:a] + (Split(0),) + w.sbp[a + 1:]


def _param_globs(graph: Graph, mesh: Mesh, layouts: tuple[Layout, ...]) -> None:
    params = {p.target: p for p in graph.params}
    aliases = graph.attrs.get("aliases", {})
    for layout in layouts:
        pattern = layout.glob
        names = [n for n in params if fnmatch.fnmatchcase(n, pattern)]
        names += [aliases[a] for a in aliases if fnmatch.fnmatchcase(a, pattern) and aliases[a] in params]
        if not names:
            raise StrategyError(f"parameter pattern {pattern!r} matches no parameter"
                                f"{closest(pattern, list(params) + list(aliases))}")
        per_axis = _per_axis(layout, mesh)
        for name in dict.fromkeys(names):
            _set_param_sbp(params[name], per_axis, mesh)
            graph.attrs.setdefault(PINNED_ATTR, {})[params[name].name] = params[name].sbp


def _per_axis(layout: Layout, mesh: Mesh) -> dict[str, object]:
    per_axis = layout.per_axis()
    for axis in per_axis:
        if axis not in mesh.axes:
            raise StrategyError(f"params[{layout.glob!r}] names mesh axis {axis!r}{closest(axis, mesh.axes)}; "
                                f"the mesh has axes {list(mesh.axes)}")
    return per_axis


def _set_param_sbp(p: Value, per_axis: dict, mesh: Mesh) -> None:
    sbp = list(p.sbp)
    for axis, s in per_axis.items():
        a = mesh.axis_index(axis)
        if isinstance(s, Split):
            if s.dim >= p.type.ndim:
                raise StrategyError(f"parameter {p.target} of shape {_shape(p)} has no dim {s.dim} to split "
                                    f"over mesh axis {axis}")
            size, n = int(p.type.shape[s.dim]), mesh.shape[a]
            if size % n:
                raise StrategyError(f"parameter {p.target} of shape {_shape(p)}: dim {s.dim} (size {size}) "
                                    f"does not split evenly over mesh axis {axis} of size {n}")
        elif not s == B:
            raise StrategyError(f"parameter {p.target}: parameters are stored S(d) or B, not {s}")
        sbp[a] = s
    p.sbp = tuple(sbp)


def _shape(p: Value) -> list:
    return [int(d) if d.is_Integer else str(d) for d in p.type.shape]

