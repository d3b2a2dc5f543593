"""Collective and point-to-point time over a :class:`~cluster.model.Cluster`, and the bytes each link
class carries.

Collectives are priced the way NCCL runs them (its algorithms, and the bandwidth they reach by message
size), on the links their bytes actually cross. Devices are ordered as NCCL builds its rings: grouped by
node, keeping the caller's order inside a node.

- **ring** (every kind; broadcast as a pipelined chain, all-to-all as a pairwise exchange): a call costs
  the devices' collective overhead once (NCCL's base latency), and a chunk crosses ``steps`` hops
  (all-reduce ``2(p-1)``, reduce-scatter / all-gather ``p-1``), so the latency adds the hops' latencies
  along that path (NCCL's ``base + (steps - inter) x intra + inter x net``); the data
  moves at the ring's bus bandwidth, the slowest of its hops, so ``time = latency + factor x n / busbw``
  with nccl-tests' bus factors (all-reduce ``2(p-1)/p``, the others ``(p-1)/p``). A hop inside a node
  runs at the link's measured bus bandwidth *for that message size* (:func:`hop_bandwidth`: NCCL's
  protocols and channel counts change with the size, so a 16 MB all-reduce reaches half the plateau of
  a 1 GB one); a hop between nodes carries one channel per device of the group on the node, each on its
  own NIC (NCCL's multi-rail rings), so it runs at the group's devices per node x the per-device NIC
  share.
- **tree** (all-reduce across two or more nodes; NCCL's double binary tree): a chain inside each node and
  a binary tree between nodes, reduced up and broadcast down: ``base + 2 x ((k - 1) intra + ceil(log2 N)
  net)`` latencies, and ``2 n / busbw`` (NCCL converts tree bus bandwidth to algorithm bandwidth at half).

The two share their bandwidth, so an all-reduce costs the reduce-scatter and all-gather it is made of
less one call overhead (the tree only shortens latency across many nodes): one all-reduce is cheaper
than the pair, as it is on the hardware. ``auto`` takes the cheaper algorithm.

Conventions for ``nbytes``: the full buffer on each rank for ``all_reduce`` and ``broadcast``; the
gathered *output* for ``all_gather``; the *input* for ``reduce_scatter``; each rank's whole send
buffer for ``all_to_all``; the message for ``send_recv``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import operator
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from cluster import COLLECTIVE_KINDS, INTRA_NODE_CLASSES, Cluster, Link

COLLECTIVES = COLLECTIVE_KINDS
ALGORITHMS = ("ring", "tree")
RING_KINDS = ("all_reduce", "all_gather", "reduce_scatter")
MIN_BANDWIDTH_SHARE = 0.05
"""Of a measured point's time, at least this share is taken as data movement (the rest is latency),
so a latency-bound measurement still gives a finite bandwidth (:func:`hop_bandwidth`)."""


@dataclass(frozen=True)
class CollectiveCost:
    """Time of a collective, the algorithm that gives it, and the bytes each link class carries."""

    time_s: float
    algorithm: str
    traffic: dict[str, float] = field(default_factory=dict)


def p2p_time(nbytes: float, src: int, dst: int, cluster: Cluster) -> float:
    """Seconds to send ``nbytes`` from device ``src`` to device ``dst``: latency + size / bandwidth."""
    return cluster.link(src, dst).for_collective("send_recv").transfer_time(nbytes) if nbytes > 0 else 0.0


def collective_time(kind: str, nbytes: float, devices: Sequence[int], cluster: Cluster,
                    algorithm: str = "auto") -> float:
    """Seconds for collective ``kind`` on ``devices``; ``auto`` picks the cheapest algorithm."""
    return _shared_cost(kind, nbytes, devices, cluster, algorithm).time_s


def collective_traffic(kind: str, nbytes: float, devices: Sequence[int], cluster: Cluster,
                       algorithm: str = "auto") -> dict[str, float]:
    """Bytes crossing links of each class (summed over all links) for collective ``kind``."""
    return dict(_shared_cost(kind, nbytes, devices, cluster, algorithm).traffic)


def best_algorithm(kind: str, nbytes: float, devices: Sequence[int], cluster: Cluster) -> str:
    """The algorithm ``auto`` picks for this collective."""
    return _shared_cost(kind, nbytes, devices, cluster, "auto").algorithm


def collective_cost(kind: str, nbytes: float, devices: Sequence[int], cluster: Cluster,
                    algorithm: str = "auto") -> CollectiveCost:
    """Time, algorithm and traffic of collective ``kind``; see the module docstring for ``nbytes``."""
    cost = _shared_cost(kind, nbytes, devices, cluster, algorithm)
    return dataclasses.replace(cost, traffic=dict(cost.traffic))  # callers may edit their copy


def _shared_cost(kind: str, nbytes: float, devices: Sequence[int], cluster: Cluster,
                 algorithm: str) -> CollectiveCost:
    """The remembered cost of a checked request (shared: not to be edited)."""
    if kind not in COLLECTIVES:
        raise ValueError(f"expected a collective kind in {COLLECTIVES}, found {kind!r}")
    if algorithm != "auto" and algorithm not in ALGORITHMS:
        raise ValueError(f"expected algorithm 'auto' or one of {ALGORITHMS}, found {algorithm!r}")
    if nbytes < 0:
        raise ValueError(f"expected a non-negative byte count for {kind}, found {nbytes}")
    devices = tuple(operator.index(d) for d in devices)  # numpy integers welcome
    if len(set(devices)) != len(devices):
        raise ValueError(f"expected distinct devices for {kind}, found {list(devices)}")
    return _cached_collective_cost(kind, float(nbytes), devices, cluster, algorithm)


@functools.lru_cache(maxsize=8192)
def _cached_collective_cost(kind: str, nbytes: float, devices: tuple[int, ...], cluster: Cluster,
                            algorithm: str) -> CollectiveCost:
    if kind == "send_recv":
        return _send_recv_cost(nbytes, devices, cluster)
    ring = _Ring(devices, cluster)
    if len(devices) == 1 or nbytes == 0:
        return CollectiveCost(0.0, "ring" if algorithm == "auto" else algorithm, {})
    if algorithm == "tree" and not ring.tree_applies(kind):
        raise ValueError(f"the tree algorithm is modelled for all_reduce across two or more nodes (NCCL's "
                         f"double binary tree), not for {kind} on devices {list(devices)}; use 'auto' or 'ring'")
    candidates = [ring.cost(kind, nbytes)] if algorithm != "tree" else []
    if algorithm in ("auto", "tree") and ring.tree_applies(kind):
        candidates.append(ring.tree_cost(nbytes))
    return min(candidates, key=lambda c: c.time_s)


def _send_recv_cost(nbytes: float, devices: tuple[int, ...], cluster: Cluster) -> CollectiveCost:
    if len(devices) != 2:
        raise ValueError(f"expected send_recv devices [src, dst], found {list(devices)}")
    src, dst = devices
    link = cluster.link(src, dst)
    traffic = {link.link_class: nbytes} if nbytes > 0 else {}
    return CollectiveCost(p2p_time(nbytes, src, dst, cluster), "p2p", traffic)


# --------------------------------------------------------------------------------------------------
# Bandwidth of one hop
# --------------------------------------------------------------------------------------------------


def ring_steps(kind: str, ranks: int) -> int:
    """Steps of a ring collective: a chunk crosses ``2(p-1)`` hops in an all-reduce, ``p-1`` otherwise."""
    return 2 * (ranks - 1) if kind == "all_reduce" else ranks - 1


def bus_factor(kind: str, ranks: int) -> float:
    """nccl-tests' bus bandwidth factor: bytes each rank moves per byte of ``nbytes`` (module docstring)."""
    if kind == "all_reduce":
        return 2 * (ranks - 1) / ranks
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return (ranks - 1) / ranks
    return 1.0


def hop_bandwidth(link: Link, nbytes: float, call_s: float = 0.0) -> float:
    """Bytes/s a ring hop over ``link`` (as a collective sees it, :meth:`~cluster.model.Link.for_collective`)
    moves for a collective of ``nbytes``.

    Without a measured curve: the link's bandwidth. With one (nccl-tests bus bandwidth of a ring of
    ``busbw_ranks`` ranks by size; :func:`curve_seconds` reads its time at this size), the time the curve
    implies, less the latency this model adds for that ring (``call_s``, the devices' collective call
    overhead, and its steps), is the data movement:
    so a collective of the measured size and rank count costs exactly what was measured, one between two
    measured sizes costs between their times, and other rank counts move the same bytes per hop at the same rate.
    """
    if not link.busbw_by_size:
        return link.bandwidth_Bps
    if nbytes <= 0:
        return link.busbw_by_size[0][1]
    ranks = link.busbw_ranks
    factor = bus_factor("all_reduce", ranks)
    measured_s = factor * curve_seconds(link.busbw_by_size, nbytes)
    latency_s = call_s + ring_steps("all_reduce", ranks) * link.latency_s
    moving_s = max(measured_s - latency_s, MIN_BANDWIDTH_SHARE * measured_s)
    return nbytes * factor / moving_s


def curve_seconds(points: tuple[tuple[float, float], ...], nbytes: float) -> float:
    """Seconds a bus-bandwidth curve (``(bytes, busbw)`` points sorted by size) implies for ``nbytes``, per unit
    of bus factor: between two measured sizes the time runs linearly in size (each segment a latency and a
    rate), so it lies between theirs; beyond the ends, at the end point's bus bandwidth. (Interpolating the
    bandwidth instead, in log size, priced a 512 KiB gloo all-reduce at 2.0 ms between 2.8 ms at 64 KiB and
    3.1 ms at 1 MiB: where the bandwidth grows fourteenfold between two points, sizes between them cost less than
    either.)"""
    sizes = [p[0] for p in points]
    if nbytes <= sizes[0]:
        return nbytes / points[0][1]
    if nbytes >= sizes[-1]:
        return nbytes / points[-1][1]
    k = bisect_left(sizes, nbytes)
    (x0, busbw0), (x1, busbw1) = points[k - 1], points[k]
    t0, t1 = x0 / busbw0, x1 / busbw1
    return t0 + (nbytes - x0) / (x1 - x0) * (t1 - t0)


# --------------------------------------------------------------------------------------------------
# Rings and trees
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Hop:
    """One ring hop: the link (as seen by the collective), whether it joins two nodes, and how many
    channels run over it at once (devices of the group on the smaller side, for NIC hops)."""

    link: Link
    inter: bool
    channels: int
    call_s: float = 0.0
    """The collective call overhead of the devices at its ends (what the link's measured curve includes)."""

    def bandwidth(self, nbytes: float) -> float:
        return self.channels * hop_bandwidth(self.link, nbytes, self.call_s)


class _Ring:
    """A group of devices in NCCL's ring order and the hops between consecutive ones."""

    def __init__(self, devices: Sequence[int], cluster: Cluster):
        first_seen: dict[int, int] = {}
        for position, device in enumerate(devices):
            first_seen.setdefault(cluster.node_of(device), position)
        self.order = tuple(sorted(devices, key=lambda d: first_seen[cluster.node_of(d)]))
        self.count_on = Counter(cluster.node_of(d) for d in self.order)
        """Node -> devices of the group on it."""
        self.cluster = cluster
        self.call_s = max(cluster.device(d).collective_overhead_s for d in self.order)
        """What a collective call costs once (the slowest device's overhead)."""

    @property
    def nodes(self) -> int:
        """Nodes the group spans."""
        return len(self.count_on)

    def tree_applies(self, kind: str) -> bool:
        """NCCL's tree is an all-reduce algorithm between nodes."""
        return kind == "all_reduce" and self.nodes >= 2

    def hops(self, kind: str, cyclic: bool = True) -> list[_Hop]:
        """The ring's hops (the chain's without ``cyclic``), as collective ``kind`` sees their links."""
        order, cluster = self.order, self.cluster
        pairs = list(zip(order, order[1:])) + ([(order[-1], order[0])] if cyclic and len(order) > 2 else [])
        out = []
        for a, b in pairs:
            link = cluster.link(a, b)
            inter = cluster.node_of(a) != cluster.node_of(b)
            out.append(_Hop(link.for_collective(kind), inter, self._channels(a, b, link) if inter else 1,
                            max(cluster.device(a).collective_overhead_s, cluster.device(b).collective_overhead_s)))
        return out

    def _channels(self, a: int, b: int, link: Link) -> int:
        """Rings over a NIC hop: one per device of the group on the smaller node (NCCL's channels each take
        their own NIC); one over a WAN or a link that does not follow the nodes."""
        cluster = self.cluster
        if link.link_class in INTRA_NODE_CLASSES or link.link_class == "wan" or not cluster.links_follow_nodes:
            return 1
        return min(self.count_on[cluster.node_of(a)], self.count_on[cluster.node_of(b)])

    def cost(self, kind: str, nbytes: float) -> CollectiveCost:
        """The ring algorithm of ``kind`` (broadcast: pipelined chain; all-to-all: pairwise exchange)."""
        if kind == "all_to_all":
            return _pairwise_all_to_all_cost(nbytes, self.order, self.cluster, self.call_s)
        if kind == "broadcast":
            return self._chain_broadcast_cost(nbytes)
        p = len(self.order)
        hops = self.hops(kind)
        steps = ring_steps(kind, p)
        inter_steps = (2 if kind == "all_reduce" else 1) * (self.nodes - 1)
        latency = self.call_s + (steps - inter_steps) * _worst_latency(hops, inter=False) + \
            inter_steps * _worst_latency(hops, inter=True)
        factor = bus_factor(kind, p)
        busbw = min(hop.bandwidth(nbytes) for hop in hops)
        traffic: Counter[str] = Counter()
        for hop in hops:
            traffic[hop.link.link_class] += factor * nbytes
        return CollectiveCost(latency + factor * nbytes / busbw, "ring", dict(traffic))

    def tree_cost(self, nbytes: float) -> CollectiveCost:
        """NCCL's all-reduce tree: chains inside the nodes, a binary tree between them, up then down (every
        edge carries the buffer once each way)."""
        hops = self.hops("all_reduce")
        depth = math.ceil(math.log2(self.nodes))
        latency = self.call_s + 2 * ((max(self.count_on.values()) - 1) * _worst_latency(hops, inter=False)
                                     + depth * _worst_latency(hops, inter=True))
        busbw = min(hop.bandwidth(nbytes) for hop in hops)
        edges = {False: len(self.order) - self.nodes, True: self.nodes - 1}  # chain edges, tree edges
        traffic: Counter[str] = Counter()
        for inter, count in edges.items():
            classes = [hop.link.link_class for hop in hops if hop.inter == inter]
            for link_class in classes:
                traffic[link_class] += 2 * nbytes * count / len(classes)
        return CollectiveCost(latency + 2 * nbytes / busbw, "tree", dict(traffic))

    def _chain_broadcast_cost(self, nbytes: float) -> CollectiveCost:
        """Pipelined chain from the first device: every hop's latency, the buffer once at the slowest hop."""
        hops = self.hops("broadcast", cyclic=False)
        latency = self.call_s + sum(hop.link.latency_s for hop in hops)
        traffic: Counter[str] = Counter()
        for hop in hops:
            traffic[hop.link.link_class] += nbytes
        return CollectiveCost(latency + nbytes / min(hop.bandwidth(nbytes) for hop in hops), "ring", dict(traffic))


def _worst_latency(hops: list[_Hop], inter: bool) -> float:
    """The largest latency among the intra-node (or inter-node) hops; 0 when there are none."""
    return max((hop.link.latency_s for hop in hops if hop.inter == inter), default=0.0)


def _pairwise_all_to_all_cost(n: float, order: tuple[int, ...], cluster: Cluster, call_s: float) -> CollectiveCost:
    """Pairwise exchange: p-1 steps, step s sends rank i's n/p chunk to rank i+s.

    Every step is charged the slowest pair of the group (all-to-all cannot spread one rank's traffic over
    several NICs: "the performance you should see is the performance of a single NIC", nccl-tests#267);
    on a multi-node group every step has a cross-node pair, so this is exact for uniform nodes and an
    upper bound otherwise. Traffic is exact. Pairs are costed per node pair when links follow nodes,
    keeping 1000+ device groups cheap.
    """
    chunk = n / len(order)
    if cluster.links_follow_nodes:
        per_node = Counter(cluster.node_of(d) for d in order)
        weighted = [(cluster.node_link(a, b).for_collective("all_to_all"), count_a * (count_b - (a == b)))
                    for a, count_a in per_node.items() for b, count_b in per_node.items()]
    else:
        weighted = [(cluster.link(a, b).for_collective("all_to_all"), 1) for a in order for b in order if a != b]
    weighted = [(link, pairs) for link, pairs in weighted if pairs > 0]
    traffic: Counter[str] = Counter()
    for link, pairs in weighted:
        traffic[link.link_class] += pairs * chunk
    slowest = max(link.latency_s + chunk / hop_bandwidth(link, n, call_s) for link, _ in weighted)
    return CollectiveCost(call_s + (len(order) - 1) * slowest, "ring", dict(traffic))
