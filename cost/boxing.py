"""What one boxing step costs: the price the boxing search (:func:`passes.boxing.boxing_path`) minimises.

A boxing step is one ``comm.*`` op on one mesh axis. Its cost is a function of the op, the bytes of the
tensor as one group along that axis sees it (:func:`axis_bytes`, with the real element size of the
tensor's dtype), the mesh and the axis (:data:`BoxingCost`). Two costs exist:

- :data:`bytes_cost`: OneFlow's bytes each rank puts on the wire (ring algorithms), for graphs compiled
  without a cluster;
- :class:`ClusterBoxingCost`: seconds on a real cluster (``cost.collectives``), the step's collective
  on the device groups of its axis (the slowest group), plus the backward adjoint for values that carry
  a gradient. The planner and ``compile()`` both choose chains with it, so the compiled program runs
  the collectives the planner priced.

Both are hashable, so the boxing search's cache (per type, layout pair, mesh and cost) serves equal
costs, and both say how many decimal places of their values are meaningful (``digits``): propagation
treats boxing costs that agree to that many places as equal and lets the compute size decide.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence

from cluster import Cluster
from cost.collectives import collective_time
from cost.segments import split_ways
from ir.ops.comm import ADJOINTS, LOCAL_COMM_OPS
from ir.ops.shape_ops import _magnitude
from ir.sbp import NdSbp
from ir.types import Mesh, TensorType


class BoxingCost(Protocol):
    """``cost(op, bytes of the tensor as the axis group sees it, mesh, axis)``; ``digits``: the decimal
    places of its values that are meaningful."""

    digits: int

    def __call__(self, op: str, local_bytes: float, mesh: Mesh, axis: int) -> float: ...


OP_PENALTY = 1e-3
"""Bytes-cost units added per step, so that at equal bytes fewer collectives win."""
STEP_EPSILON_S = 1e-9
"""Seconds added per step, so that at equal time fewer collectives win."""


def axis_bytes(t: TensorType, sbp: NdSbp, mesh: Mesh, axis: int) -> float:
    """Bytes of a tensor of type ``t`` held as ``sbp`` as one group along ``axis`` sees it (split by the
    other axes only), at the element size of its dtype."""
    others = [s if i != axis else None for i, s in enumerate(sbp)]
    ways = math.prod(split_ways(others, mesh.shape, t.ndim))
    return _magnitude(t.numel()) * t.torch_dtype.itemsize / ways


def wire_factor(op: str, n: int) -> float:
    """Bytes each rank sends, as a multiple of the logical tensor's bytes (ring algorithms).

    These are OneFlow's byte counts per rank; :class:`ClusterBoxingCost` prices the steps on real links.
    """
    if n <= 1 or op in LOCAL_COMM_OPS:
        return 0.0
    return {"comm.all_reduce": 2 * (n - 1) / n, "comm.all_gather": (n - 1) / n,
            "comm.reduce_scatter": (n - 1) / n, "comm.all_to_all": (n - 1) / (n * n)}[op]


@dataclass(frozen=True)
class BytesCost:
    """OneFlow-style cost: bytes each rank puts on the wire (plus a small per-op penalty)."""

    digits: int = 6

    def __call__(self, op: str, local_bytes: float, mesh: Mesh, axis: int) -> float:
        into_partial = 1e-4 * local_bytes if op == "comm.mask" else 0.0
        return wire_factor(op, mesh.shape[axis]) * local_bytes + OP_PENALTY + into_partial


bytes_cost = BytesCost()
"""The cost of graphs compiled without a cluster."""


@dataclass(frozen=True)
class ClusterBoxingCost:
    """Seconds of one boxing step on ``cluster``: its collective on the groups of ``groups[axis]`` at once
    (the slowest one counts), plus, with ``backward``, the adjoint collective the gradient runs.

    ``scale`` multiplies the bytes (the planner prices 2-byte mixed precision on fp32 graphs).
    """

    cluster: Cluster
    groups: tuple
    """Per mesh axis, the device groups along it (tuples of device ids)."""
    scale: float = 1.0
    backward: bool = False
    digits: int = 12
    _seconds: dict = field(default_factory=dict, compare=False, repr=False)
    """(op, bytes, axis) -> seconds already priced (one boxing search asks for the same steps often)."""

    def __call__(self, op: str, local_bytes: float, mesh: Mesh, axis: int) -> float:
        if op in LOCAL_COMM_OPS:
            return STEP_EPSILON_S
        key = (op, local_bytes, axis)
        if key not in self._seconds:
            nbytes = local_bytes * self.scale
            seconds = self._slowest(op, nbytes, axis)
            if self.backward:
                seconds += self._slowest(ADJOINTS[op], nbytes, axis)
            self._seconds[key] = seconds + STEP_EPSILON_S
        return self._seconds[key]

    def _slowest(self, op: str, nbytes: float, axis: int) -> float:
        return max(collective_seconds(op, nbytes, group, self.cluster) for group in self.groups[axis])


def collective_seconds(op: str, nbytes: float, group: tuple, cluster: Cluster) -> float:
    """Seconds of the ``comm.*`` collective ``op`` on ``group`` for a tensor of ``nbytes`` as the group
    sees it (an all-to-all sends each rank's share of it)."""
    kind = op.split(".", 1)[1]
    if kind == "all_to_all":
        nbytes /= len(group)
    return collective_time(kind, nbytes, group, cluster)


@functools.lru_cache(maxsize=256)
def mesh_boxing_cost(cluster: Cluster, mesh: Mesh, backward: bool) -> ClusterBoxingCost:
    """The :class:`ClusterBoxingCost` of every group of ``mesh`` (groups alike on the cluster priced once)."""
    groups = []
    for axis in range(mesh.ndim):
        found = [tuple(mesh.devices[i] for i in g) for g in mesh.groups(axis)]
        groups.append(distinct_groups(found, cluster))
    return ClusterBoxingCost(cluster, tuple(groups), 1.0, backward)


def distinct_groups(groups: Sequence[tuple], cluster: Cluster) -> tuple:
    """One group per :func:`_group_shape` (groups of one shape cost the same in any collective), or all groups
    where links do not follow nodes."""
    if not cluster.links_follow_nodes:
        return tuple(groups)
    by_shape: dict[tuple, tuple] = {}
    for g in groups:
        by_shape.setdefault(_group_shape(g, cluster), g)
    return tuple(by_shape.values())


def _group_shape(group: tuple, cluster: Cluster) -> tuple:
    """Per device, its node's links and which of the group's nodes it is on: what a collective's cost
    depends on when links follow nodes (node identities themselves where node pairs have overrides)."""
    nodes = [cluster.node_of(d) for d in group]
    if cluster.link_overrides:
        return tuple(nodes)
    first: dict[int, int] = {}
    return tuple((_node_links(cluster, n), first.setdefault(n, len(first))) for n in nodes)


def _node_links(cluster: Cluster, node: int) -> tuple:
    """What the links of ``node`` are made of (its intra-node link, NICs, device count and region), and what a
    collective call costs on its devices."""
    spec = cluster.nodes[node]
    overhead = cluster.device(cluster.devices_of_node(node)[0]).collective_overhead_s
    return spec.intra_link, spec.nics, spec.num_devices, spec.region, overhead
