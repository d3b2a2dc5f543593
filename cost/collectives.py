"""Collective and point-to-point time over a :class:`~cluster.model.Cluster`, and the bytes each link
class carries.

Collectives are costed by the links their bytes actually cross. An algorithm is a sequence of steps;
in one step every participant sends one chunk to one peer at the same time, so a step lasts as long as
its slowest transfer (latency + chunk / bandwidth of that pair's link). Devices are ordered the way
NCCL builds its rings and trees: grouped by node, keeping the caller's order inside a node.

Conventions for ``nbytes``: the full buffer on each rank for ``all_reduce`` and ``broadcast``; the
gathered *output* for ``all_gather``; the *input* for ``reduce_scatter``; each rank's whole send
buffer for ``all_to_all``; the message for ``send_recv``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

from cluster import COLLECTIVE_KINDS, SELF_LINK, Cluster, Link

COLLECTIVES = COLLECTIVE_KINDS
ALGORITHMS = ("ring", "tree", "hierarchical")


@dataclass(frozen=True)
class CollectiveCost:
    """Time of a collective, the algorithm that gives it, and the bytes each link class carries."""

    time_s: float
    algorithm: str
    traffic: dict[str, float] = field(default_factory=dict)

    def then(self, later: "CollectiveCost") -> "CollectiveCost":
        """This phase followed by ``later``: times add, traffic adds."""
        return CollectiveCost(self.time_s + later.time_s, self.algorithm, _add_traffic(self.traffic, later.traffic))

    @staticmethod
    def alongside(costs: Iterable["CollectiveCost"], algorithm: str) -> "CollectiveCost":
        """Phases running at the same time on disjoint devices: the slowest sets the time, traffic adds."""
        costs = list(costs)
        traffic: dict[str, float] = {}
        for cost in costs:
            traffic = _add_traffic(traffic, cost.traffic)
        return CollectiveCost(max((c.time_s for c in costs), default=0.0), algorithm, traffic)


def _add_traffic(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    total = Counter(a)
    total.update(b)
    return dict(total)


def p2p_time(nbytes: float, src: int, dst: int, cluster: Cluster) -> float:
    """Seconds to send ``nbytes`` from device ``src`` to device ``dst``: latency + size / bandwidth."""
    return cluster.link(src, dst).for_collective("send_recv").transfer_time(nbytes) if nbytes > 0 else 0.0


def collective_time(kind: str, nbytes: float, devices: Sequence[int], cluster: Cluster,
                    algorithm: str = "auto") -> float:
    """Seconds for collective ``kind`` on ``devices``; ``auto`` picks the cheapest algorithm."""
    return collective_cost(kind, nbytes, devices, cluster, algorithm).time_s


def collective_traffic(kind: str, nbytes: float, devices: Sequence[int], cluster: Cluster,
                       algorithm: str = "auto") -> dict[str, float]:
    """Bytes crossing links of each class (summed over all links) for collective ``kind``."""
    return dict(collective_cost(kind, nbytes, devices, cluster, algorithm).traffic)


def best_algorithm(kind: str, nbytes: float, devices: Sequence[int], cluster: Cluster) -> str:
    """The algorithm ``auto`` picks for this collective."""
    return collective_cost(kind, nbytes, devices, cluster, "auto").algorithm


def collective_cost(kind: str, nbytes: float, devices: Sequence[int], cluster: Cluster,
                    algorithm: str = "auto") -> CollectiveCost:
    """Time, algorithm and traffic of collective ``kind``; see the module docstring for ``nbytes``."""
    if kind not in COLLECTIVES:
        raise ValueError(f"expected a collective kind in {COLLECTIVES}, found {kind!r}")
    if algorithm != "auto" and algorithm not in ALGORITHMS:
        raise ValueError(f"expected algorithm 'auto' or one of {ALGORITHMS}, found {algorithm!r}")
    if nbytes < 0:
        raise ValueError(f"expected a non-negative byte count for {kind}, found {nbytes}")
    devices = tuple(operator.index(d) for d in devices)  # numpy integers welcome
    if len(set(devices)) != len(devices):
        raise ValueError(f"expected distinct devices for {kind}, found {list(devices)}")
    cost = _cached_collective_cost(kind, float(nbytes), devices, cluster, algorithm)
    return dataclasses.replace(cost, traffic=dict(cost.traffic))  # callers may edit their copy


@functools.lru_cache(maxsize=4096)
def _cached_collective_cost(kind: str, nbytes: float, devices: tuple[int, ...], cluster: Cluster,
                            algorithm: str) -> CollectiveCost:
    if kind == "send_recv":
        return _send_recv_cost(nbytes, devices, cluster)
    ordered = _node_order(devices, cluster)
    if len(ordered) == 1 or nbytes == 0:
        return CollectiveCost(0.0, "ring" if algorithm == "auto" else algorithm, {})
    if algorithm != "auto":
        cost = _algorithm_cost(algorithm, kind, nbytes, ordered, cluster)
        if cost is None:
            raise ValueError(f"the {algorithm} algorithm is not modelled for {kind} on devices {list(devices)} "
                             "(hierarchical needs two or more nodes each holding the same number, two or more, of "
                             "the devices, and is not defined for all_to_all); use 'auto' or 'ring'")
        return cost
    candidates = [_algorithm_cost(a, kind, nbytes, ordered, cluster) for a in ALGORITHMS]
    return min((c for c in candidates if c is not None), key=lambda c: c.time_s)


def _send_recv_cost(nbytes: float, devices: tuple[int, ...], cluster: Cluster) -> CollectiveCost:
    if len(devices) != 2:
        raise ValueError(f"expected send_recv devices [src, dst], found {list(devices)}")
    src, dst = devices
    link = cluster.link(src, dst)
    traffic = {link.link_class: nbytes} if nbytes > 0 else {}
    return CollectiveCost(p2p_time(nbytes, src, dst, cluster), "p2p", traffic)


def _node_order(devices: Sequence[int], cluster: Cluster) -> tuple[int, ...]:
    """Devices grouped by node (nodes in order of first appearance), caller's order kept inside a node."""
    first_seen: dict[int, int] = {}
    for position, device in enumerate(devices):
        first_seen.setdefault(cluster.node_of(device), position)
    return tuple(sorted(devices, key=lambda d: first_seen[cluster.node_of(d)]))


def _algorithm_cost(algorithm: str, kind: str, nbytes: float, ordered: tuple[int, ...],
                    cluster: Cluster) -> CollectiveCost | None:
    if algorithm == "ring":
        return _ring_cost(kind, nbytes, ordered, cluster)
    if algorithm == "tree":
        return _tree_cost(kind, nbytes, ordered, cluster)
    return _hierarchical_cost(kind, nbytes, ordered, cluster)


# -- steps -----------------------------------------------------------------------------------------

Transfer = tuple[int, int, float]  # (src, dst, bytes), all transfers of a step run at once


def _steps_cost(steps: Iterable[tuple[int, Sequence[Transfer]]], cluster: Cluster, algorithm: str,
                kind: str) -> CollectiveCost:
    """Cost of ``(repeats, transfers)`` steps of collective ``kind``: each step lasts as long as its
    slowest transfer."""
    link_of = _link_lookup(cluster, kind)
    time_s = 0.0
    traffic: Counter[str] = Counter()
    for repeats, transfers in steps:
        slowest = 0.0
        for (src, dst, nbytes), count in Counter(transfers).items():
            link = link_of(src, dst)
            slowest = max(slowest, link.transfer_time(nbytes))
            traffic[link.link_class] += repeats * count * nbytes
        time_s += repeats * slowest
    return CollectiveCost(time_s, algorithm, dict(traffic))


def _link_lookup(cluster: Cluster, kind: str) -> Callable[[int, int], Link]:
    """``cluster.link`` as collective ``kind`` sees it (:meth:`~cluster.model.Link.for_collective`), memoised
    for one costing; by node pair when links follow nodes (big collectives)."""
    if not cluster.links_follow_nodes:
        return functools.lru_cache(maxsize=None)(lambda src, dst: cluster.link(src, dst).for_collective(kind))
    node_of = [d.node for d in cluster.devices]

    def link(src: int, dst: int) -> Link:
        return SELF_LINK if src == dst else cluster.node_link(node_of[src], node_of[dst]).for_collective(kind)
    return link


def _ring_cost(kind: str, n: float, ring: tuple[int, ...], cluster: Cluster) -> CollectiveCost:
    """Ring algorithms: every step moves one 1/p chunk over every ring link at once.

    all_reduce = reduce-scatter + all-gather: 2(p-1) steps; all_gather / reduce_scatter: p-1 steps;
    broadcast: a pipelined chain (p-1 hops of latency, the whole buffer once through the slowest hop);
    all_to_all: pairwise exchange (see :func:`_pairwise_all_to_all_cost`).
    """
    p = len(ring)
    neighbours = [(ring[i], ring[(i + 1) % p], n / p) for i in range(p)]
    if kind in ("all_reduce", "all_gather", "reduce_scatter"):
        repeats = 2 * (p - 1) if kind == "all_reduce" else p - 1
        return _steps_cost([(repeats, neighbours)], cluster, "ring", kind)
    if kind == "broadcast":
        return _chain_broadcast_cost(n, ring, cluster)
    return _pairwise_all_to_all_cost(n, ring, cluster)


def _pairwise_all_to_all_cost(n: float, order: tuple[int, ...], cluster: Cluster) -> CollectiveCost:
    """Pairwise exchange: p-1 steps, step s sends rank i's n/p chunk to rank i+s.

    Every step is charged the slowest pair of the group; on a multi-node group every step has a
    cross-node pair, so this is exact for uniform nodes and an upper bound otherwise. Traffic is exact.
    Pairs are costed per node pair when links follow nodes, keeping 1000+ device groups cheap.
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
    slowest = max(link.transfer_time(chunk) for link, _ in weighted)
    return CollectiveCost((len(order) - 1) * slowest, "ring", dict(traffic))


def _chain_broadcast_cost(n: float, chain: tuple[int, ...], cluster: Cluster) -> CollectiveCost:
    """Pipelined chain broadcast from ``chain[0]``: (p-1) latencies + n over the slowest hop."""
    links = [cluster.link(chain[i], chain[i + 1]).for_collective("broadcast") for i in range(len(chain) - 1)]
    time_s = sum(link.latency_s for link in links) + n / min(link.bandwidth_Bps for link in links)
    traffic: Counter[str] = Counter()
    for link in links:
        traffic[link.link_class] += n
    return CollectiveCost(time_s, "ring", dict(traffic))


def _tree_cost(kind: str, n: float, order: tuple[int, ...], cluster: Cluster) -> CollectiveCost:
    """Tree-shaped algorithms with ceil(log2 p) latency terms.

    all_reduce: pipelined binary tree, reduce to the root then broadcast back (2 log p latencies,
    every tree edge carries the whole buffer up and down); broadcast: the downward half only;
    all_gather / reduce_scatter: recursive doubling / halving (step k exchanges 2^k/p of the data with
    the partner 2^k away); all_to_all: Bruck (log p steps of half the buffer each).
    Non powers of two are approximated by skipping partners past the end.
    """
    p = len(order)
    depth = math.ceil(math.log2(p))
    if kind in ("all_reduce", "broadcast"):
        edges = [(order[(i - 1) // 2], order[i]) for i in range(1, p)]  # heap-shaped binary tree
        directions = 2 if kind == "all_reduce" else 1
        links = [cluster.link(a, b).for_collective(kind) for a, b in edges]
        time_s = directions * (depth * max(l.latency_s for l in links) + n / min(l.bandwidth_Bps for l in links))
        traffic: Counter[str] = Counter()
        for link in links:
            traffic[link.link_class] += directions * n
        return CollectiveCost(time_s, "tree", dict(traffic))
    if kind == "all_to_all":
        return _steps_cost([(1, [(order[i], order[(i + 2**k) % p], n / 2) for i in range(p)]) for k in range(depth)],
                           cluster, "tree", kind)
    distances = [2**k for k in range(depth)]
    if kind == "reduce_scatter":
        distances.reverse()  # halving: the biggest chunks go to the farthest partners first
    steps = []
    for distance in distances:
        chunk = distance * n / p  # doubling grows the chunk with the distance; halving shrinks both
        pairs = [(order[i], order[i ^ distance]) for i in range(p) if (i ^ distance) < p]
        steps.append((1, [(a, b, chunk) for a, b in pairs]))
    return _steps_cost(steps, cluster, "tree", kind)


def _hierarchical_cost(kind: str, n: float, order: tuple[int, ...], cluster: Cluster) -> CollectiveCost | None:
    """Two-level algorithms over nodes; None where not two-level (all_to_all, a single node, one device
    per node) or not modelled (nodes holding different numbers of the devices).

    all_reduce: intra-node reduce-scatter, then the k devices of a node each all-reduce their 1/k
    shard with the same-position devices of the other nodes (all k "rails" at once), then intra-node
    all-gather. reduce_scatter / all_gather: the first / last two of those phases. broadcast: among one
    device per node, then inside each node. Each phase uses the cheaper of ring and tree.
    """
    groups = _node_groups(order, cluster)
    k = len(groups[0])
    if kind == "all_to_all" or len(groups) < 2 or k < 2 or any(len(g) != k for g in groups):
        return None  # with one node, or one device per node, it would just be a flat algorithm
    rails = [tuple(g[r] for g in groups) for r in range(k)]

    def across(phase_kind: str, nbytes: float, teams: list[tuple[int, ...]]) -> CollectiveCost:
        return CollectiveCost.alongside((_flat_cost(phase_kind, nbytes, t, cluster) for t in teams), "hierarchical")

    if kind == "all_reduce":
        return across("reduce_scatter", n, groups).then(across("all_reduce", n / k, rails)) \
            .then(across("all_gather", n, groups))
    if kind == "reduce_scatter":
        return across("reduce_scatter", n, groups).then(across("reduce_scatter", n / k, rails))
    if kind == "all_gather":
        return across("all_gather", n / k, rails).then(across("all_gather", n, groups))
    return across("broadcast", n, rails[:1]).then(across("broadcast", n, groups))


def _flat_cost(kind: str, n: float, team: tuple[int, ...], cluster: Cluster) -> CollectiveCost:
    """The cheaper of ring and tree for one phase of a hierarchical collective."""
    if len(team) == 1 or n == 0:
        return CollectiveCost(0.0, "hierarchical", {})
    return min((_ring_cost(kind, n, team, cluster), _tree_cost(kind, n, team, cluster)), key=lambda c: c.time_s)


def _node_groups(order: tuple[int, ...], cluster: Cluster) -> list[tuple[int, ...]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for device in order:
        groups[cluster.node_of(device)].append(device)
    return [tuple(g) for g in groups.values()]
