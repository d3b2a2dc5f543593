"""How much of a plan's work is actually parallel: per mesh axis, the share of FLOPs on split data.

A layout can be correct and still parallelise nothing: one op without a split rule (or a reduction
over the batch) makes its consumers run on the whole tensor on every device of an axis. This module
measures that from the SBP-annotated IR.

Definitions. Work is the **forward FLOPs** of every compute node at the plan's example dims
(``graph.attrs["example_dims"]``), counted on the logical (global) shapes with the cost model's
per-op formulas (:func:`op_flops`: views, copies and embedding lookups cost 0; ``comm.*`` nodes are
not compute and cost 0). On a mesh axis ``a`` of size > 1, a node **runs replicated** when every
input and every output of its chosen signature is ``B`` on ``a``: each device of the axis repeats
the whole op. Otherwise (some tensor is ``S(d)`` or ``P`` on ``a``) it does **split** work: the
axis's devices share it. The split share of ``a`` is split FLOPs / (split + replicated FLOPs) of the
nodes whose mesh has axis ``a`` (pipelines: every stage mesh; the pipeline axis itself is not
measured, each node runs on one stage). A graph with no FLOPs on an axis counts as fully split.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from ir.core import Graph, Node
from ir.sbp import Broadcast
from ir.types import dim_symbol
# The per-op FLOP formulas of the cost model: the one import to change when it moves (to cost/).
from cost.ops import op_flops

MAX_LISTED_OPS = 8


@dataclass(frozen=True)
class ReplicatedOp:
    """A node that runs on replicated (``B``) data on one mesh axis."""

    node: str
    """The node's name (its first output, ``%name`` in the IR)."""
    op: str
    module: str
    """The source module path (``""`` when the node has none)."""
    flops: float
    """Forward FLOPs of the whole op (each device of the axis runs all of them)."""
    share: float
    """``flops`` as a share of the graph's total forward FLOPs."""


@dataclass
class AxisParallelism:
    """The split and replicated work on one mesh axis."""

    axis: str
    size: int
    split_flops: float = 0.0
    replicated_flops: float = 0.0
    replicated_ops: list[ReplicatedOp] = field(default_factory=list)
    """Nodes with FLOPs that run replicated on this axis, largest first."""

    @property
    def split_share(self) -> float:
        """Share of this axis's FLOPs on split (``S``) or partial (``P``) data; 1.0 without FLOPs."""
        total = self.split_flops + self.replicated_flops
        return self.split_flops / total if total else 1.0

    @property
    def replicated_share(self) -> float:
        """Share of this axis's FLOPs that every device of the axis repeats."""
        return 1.0 - self.split_share

    def summary(self, max_ops: int = MAX_LISTED_OPS) -> list[str]:
        """``dp (4 devices): 99.7% of FLOPs split, 0.3% replicated`` and the largest replicated ops."""
        lines = [f"{self.axis} ({self.size} devices): {_percent(self.split_share)} of FLOPs split, "
                 f"{_percent(self.replicated_share)} replicated"]
        for r in self.replicated_ops[:max_ops]:
            where = f" in {r.module}" if r.module else ""
            lines.append(f"  replicated: %{r.node} {r.op}{where}, {_percent(r.share)} of FLOPs")
        if len(self.replicated_ops) > max_ops:
            lines.append(f"  ... {len(self.replicated_ops) - max_ops} more replicated ops")
        return lines


@dataclass
class ParallelismReport:
    """Per mesh axis, how much of the plan's forward work runs split; see the module docstring."""

    total_flops: float
    """Forward FLOPs of every compute node at the example dims."""
    axes: dict[str, AxisParallelism]

    def __getitem__(self, axis: str) -> AxisParallelism:
        if axis not in self.axes:
            raise KeyError(f"no mesh axis {axis!r} of size > 1 in this plan; its axes are {sorted(self.axes)}")
        return self.axes[axis]

    def lines(self, max_ops: int = MAX_LISTED_OPS) -> list[str]:
        """The report as text lines (what ``plan.explain()`` prints)."""
        if not self.axes:
            return ["Parallelism: no mesh axis of size > 1 to split data over (pipeline stages are not measured)"]
        out = [f"Parallelism (share of {self.total_flops:.3g} forward FLOPs on split data, per mesh axis):"]
        for axis in self.axes.values():
            out += [f"  {line}" for line in axis.summary(max_ops)]
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def parallelism_report(graph: Graph) -> ParallelismReport:
    """Measure a laid-out graph (every value has an SBP): see the module docstring."""
    dims = {dim_symbol(k): v for k, v in (graph.attrs.get("example_dims") or {}).items()}
    work = [(node, node_forward_flops(node, dims)) for node in graph.nodes if not node.op.startswith("comm.")]
    total = sum(flops for _, flops in work)
    axes: dict[str, AxisParallelism] = {}
    for node, flops in work:
        mesh = graph.meshes[node.outputs[0].mesh]
        for index, (axis, size) in enumerate(zip(mesh.axes, mesh.shape)):
            if size == 1:
                continue
            report = axes.setdefault(axis, AxisParallelism(axis, size))
            if runs_replicated(node, index):
                report.replicated_flops += flops
                if flops > 0:
                    report.replicated_ops.append(ReplicatedOp(node.name, node.op, node.attrs.get("module", ""),
                                                              flops, flops / total))
            else:
                report.split_flops += flops
    for report in axes.values():
        report.replicated_ops.sort(key=lambda r: -r.flops)
    return ParallelismReport(total, axes)


def runs_replicated(node: Node, axis: int) -> bool:
    """Every input and output of the node is ``B`` on mesh axis ``axis`` (index)."""
    values = node.input_values() + list(node.outputs)
    return all(isinstance(v.sbp[axis], Broadcast) for v in values)


def node_forward_flops(node: Node, dims: dict) -> float:
    """Forward FLOPs of a node on its logical shapes, symbols bound by ``dims`` (symbol -> int)."""
    ins = [_bound(v.type.shape, dims) for v in node.input_values()]
    outs = [_bound(v.type.shape, dims) for v in node.outputs]
    return float(op_flops(node.op, ins, outs))


def _percent(share: float) -> str:
    """``12.3%``; shares that round to 0 or 100 but are not say so (``<0.1%``, ``>99.9%``)."""
    if 0 < share < 0.0005:
        return "<0.1%"
    if 0.9995 <= share < 1:
        return ">99.9%"
    return f"{share:.1%}"


def _bound(shape: tuple, dims: dict) -> tuple:
    return tuple(int(sympy.sympify(d).subs(dims)) for d in shape)
