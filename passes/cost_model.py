"""Cost model: collective and point-to-point time over a :class:`~cluster.model.Cluster`, per-op FLOPs and
bytes, and per-device memory (including the Megatron-LM activation formula).

Collectives are costed by the links their bytes actually cross. An algorithm is a sequence of steps;
in one step every participant sends one chunk to one peer at the same time, so a step lasts as long as
its slowest transfer (latency + chunk / bandwidth of that pair's link). Devices are ordered the way
NCCL builds its rings and trees: grouped by node, keeping the caller's order inside a node.

Conventions for ``nbytes``: the full buffer on each rank for ``all_reduce`` and ``broadcast``; the
gathered *output* for ``all_gather``; the *input* for ``reduce_scatter``; each rank's whole send
buffer for ``all_to_all``; the message for ``send_recv``.

Op costs take shapes whose entries are ints or sympy symbols and return sympy expressions; see
:func:`op_flops` for the per-op formulas and :data:`BACKWARD_FLOP_FACTOR` for backward factors.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import sympy

from cluster import COLLECTIVE_KINDS, SELF_LINK, Cluster, Device, Link

COLLECTIVES = COLLECTIVE_KINDS
ALGORITHMS = ("ring", "tree", "hierarchical")

# ==================================================================================================
# Collectives
# ==================================================================================================


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


# ==================================================================================================
# Per-op FLOPs and bytes
# ==================================================================================================

Shape = Sequence[Any]  # entries are ints or sympy expressions

NORM_FLOPS_PER_ELEMENT = 5
"""layer_norm / rms_norm / group_norm / batch_norm: mean, centre, variance, normalise, scale-and-shift."""
SOFTMAX_FLOPS_PER_ELEMENT = 5
"""softmax / log_softmax: max, subtract, exp, sum, divide (or log)."""

BACKWARD_FLOP_FACTOR: dict[str, float] = {
    "matmul": 2.0,       # grad input and grad weight are one matmul each
    "conv": 2.0,         # same as matmul
    "attention": 2.5,    # five matmuls backward against two forward (FlashAttention accounting)
    "norm": 2.0,
    "softmax": 2.0,
    "loss": 1.0,
    "elementwise": 1.0,  # e.g. the relu mask or one multiply per element
    "reduction": 1.0,    # broadcasting the gradient back
    "embedding": 1.0,    # a scatter-add of the output gradient into the table rows
    "view": 0.0,
}
"""Backward FLOPs = factor x forward FLOPs, per op category (see :func:`op_category`)."""

_MATMUL_OPS = {"linear", "mm", "bmm", "matmul", "addmm", "baddbmm", "addbmm", "addmv", "mv", "dot"}
_ATTENTION_OPS = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
                  "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
                  "_scaled_dot_product_cudnn_attention"}
_CONV_OPS = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d"}
_NORM_OPS = {"layer_norm", "native_layer_norm", "rms_norm", "group_norm", "native_group_norm", "batch_norm",
             "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training", "instance_norm"}
_SOFTMAX_OPS = {"softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax"}
_LOSS_OPS = {"cross_entropy_loss", "cross_entropy", "nll_loss", "nll_loss_forward", "nll_loss2d", "mse_loss"}
_REDUCTION_OPS = {"sum", "mean", "amax", "amin", "max", "min", "prod", "var", "std", "var_mean", "norm",
                  "linalg_vector_norm", "logsumexp", "argmax", "argmin", "all", "any"}
_VIEW_OPS = {"view", "reshape", "_unsafe_view", "permute", "transpose", "t", "expand", "expand_as", "slice",
             "select", "squeeze", "unsqueeze", "flatten", "unflatten", "alias", "detach", "split", "chunk",
             "split_with_sizes", "unbind", "narrow", "as_strided", "view_as", "lift_fresh_copy", "sym_size",
             "getitem", "_assert_tensor_metadata", "empty", "empty_like", "zeros", "zeros_like", "ones",
             "ones_like", "full", "full_like", "arange", "scalar_tensor"}
_COPY_OPS = {"clone", "contiguous", "cat", "stack", "_to_copy", "to", "copy", "copy_", "index_select", "gather",
             "index", "repeat", "roll", "flip", "pad", "constant_pad_nd", "embedding", "scatter", "index_put"}


def normalize_op_name(op: str) -> str:
    """``aten.linear.default`` / ``aten::linear`` / ``torch.ops.aten.linear`` / ``linear`` -> ``linear``."""
    name = op.replace("::", ".")
    for prefix in ("torch.ops.", "aten.", "prims."):
        name = name[len(prefix):] if name.startswith(prefix) else name
    return name.split(".")[0]


def op_category(op: str) -> str:
    """The cost category of an op: matmul, attention, conv, norm, softmax, loss, reduction, embedding,
    view (no FLOPs), copy (no FLOPs, moves bytes) or elementwise (also the fallback for unknown ops)."""
    name = normalize_op_name(op)
    for category, names in (("matmul", _MATMUL_OPS), ("attention", _ATTENTION_OPS), ("conv", _CONV_OPS),
                            ("norm", _NORM_OPS), ("softmax", _SOFTMAX_OPS), ("loss", _LOSS_OPS),
                            ("reduction", _REDUCTION_OPS), ("view", _VIEW_OPS)):
        if name in names:
            return category
    if name == "embedding":
        return "embedding"
    return "copy" if name in _COPY_OPS else "elementwise"


def numel(shape: Shape) -> sympy.Expr:
    """Number of elements of ``shape`` (1 for a scalar)."""
    return sympy.Mul(*[sympy.sympify(d) for d in shape]) if len(shape) else sympy.Integer(1)


def op_flops(op: str, in_shapes: Sequence[Shape], out_shapes: Sequence[Shape],
             attrs: Mapping[str, Any] | None = None) -> sympy.Expr:
    """Forward FLOPs of one ATen op (a multiply-add counts 2), as a sympy expression.

    matmul-like (linear, mm, bmm, matmul, addmm, ...): 2·(output elements)·K, i.e. 2·M·K·N; bias adds
    are not counted (the usual 6·N·D convention). scaled_dot_product_attention: 2·B·L·S·E (QKᵀ) +
    2·B·L·S·Ev (·V), i.e. 4·b·h·s²·d, counting causal attention as dense and the softmax as free.
    conv: 2·(output elements)·(C_in/groups)·prod(kernel). Norms and softmax:
    :data:`NORM_FLOPS_PER_ELEMENT` / :data:`SOFTMAX_FLOPS_PER_ELEMENT` per element. cross_entropy:
    log-softmax on the logits plus one per target. Reductions: one per input element. Elementwise and
    unknown ops: one per output element. Views, copies and embedding: 0.
    """
    attrs = attrs or {}
    category = op_category(op)
    if category == "matmul":
        return 2 * _contraction_size(op, in_shapes) * _output_numel(op, in_shapes, out_shapes)
    if category == "attention":
        return _attention_flops(in_shapes)
    if category == "conv":
        weight = in_shapes[1]
        return 2 * _output_numel(op, in_shapes, out_shapes, attrs) * numel(weight[1:])
    if category == "norm":
        return NORM_FLOPS_PER_ELEMENT * numel(in_shapes[0])
    if category == "softmax":
        return SOFTMAX_FLOPS_PER_ELEMENT * numel(in_shapes[0])
    if category == "loss":
        return _loss_flops(op, in_shapes)
    if category == "reduction":
        return numel(in_shapes[0])
    if category in ("view", "copy", "embedding"):
        return sympy.Integer(0)
    return _output_numel(op, in_shapes, out_shapes)


def op_backward_flops(op: str, in_shapes: Sequence[Shape], out_shapes: Sequence[Shape],
                      attrs: Mapping[str, Any] | None = None) -> sympy.Expr:
    """Backward FLOPs: :data:`BACKWARD_FLOP_FACTOR` of the op's category times the forward FLOPs
    (embedding: one add per output element, scattered into the table)."""
    category = op_category(op)
    if category == "embedding":
        return _output_numel(op, in_shapes, out_shapes)
    factor = BACKWARD_FLOP_FACTOR.get(category, 0.0)
    return sympy.nsimplify(factor) * op_flops(op, in_shapes, out_shapes, attrs)


def op_bytes(op: str, in_shapes: Sequence[Shape], out_shapes: Sequence[Shape],
             attrs: Mapping[str, Any] | None = None, dtype_bytes: int = 4) -> sympy.Expr:
    """Memory traffic of one op: every input read and output written once, ``dtype_bytes`` each.

    Views move nothing (0). Embedding reads only the looked-up rows: 8-byte indices plus the output
    read from the table and written (2 x output).
    """
    category = op_category(op)
    if category == "view":
        return sympy.Integer(0)
    if category == "embedding":
        indices = in_shapes[1] if len(in_shapes) > 1 else ()
        return 8 * numel(indices) + 2 * dtype_bytes * _output_numel(op, in_shapes, out_shapes)
    elements = sum((numel(s) for s in in_shapes), sympy.Integer(0)) + \
        sum((numel(s) for s in out_shapes), sympy.Integer(0))
    return dtype_bytes * elements


def op_time(op: str, in_shapes: Sequence[Shape], out_shapes: Sequence[Shape], attrs: Mapping[str, Any] | None,
            device: Device, dtype: str = "fp32", dtype_bytes: int = 4) -> sympy.Expr:
    """Roofline time of one op on ``device``: max(FLOPs / peak FLOP/s of ``dtype``, bytes / memory bandwidth)."""
    if dtype not in device.peak_flops:
        raise ValueError(f"device {device.id} ({device.kind}) has no peak FLOP/s for {dtype}; "
                         f"known: {sorted(device.peak_flops)}")
    compute = op_flops(op, in_shapes, out_shapes, attrs) / sympy.Float(device.peak_flops[dtype])
    if not device.memory_bandwidth_Bps:
        return compute
    memory = op_bytes(op, in_shapes, out_shapes, attrs, dtype_bytes) / sympy.Float(device.memory_bandwidth_Bps)
    return sympy.Max(compute, memory)


def _contraction_size(op: str, in_shapes: Sequence[Shape]) -> sympy.Expr:
    """K of a matmul-like op: the last dim of the left operand (addmm-style ops have the bias first)."""
    name = normalize_op_name(op)
    left = in_shapes[1] if name in ("addmm", "baddbmm", "addbmm", "addmv") else in_shapes[0]
    return sympy.sympify(left[-1])


def _output_numel(op: str, in_shapes: Sequence[Shape], out_shapes: Sequence[Shape],
                  attrs: Mapping[str, Any] | None = None) -> sympy.Expr:
    """Elements of the first output; inferred from the inputs when no output shape is given."""
    if out_shapes:
        return numel(out_shapes[0])
    name = normalize_op_name(op)
    inferred = _INFER_OUTPUT.get(name)
    if inferred is None and op_category(op) == "elementwise":
        inferred = _broadcast_shape
    if inferred is None:
        raise ValueError(f"{op}: expected out_shapes (cannot infer the output shape from the inputs)")
    return numel(inferred(in_shapes, attrs or {}))


def _broadcast_shape(in_shapes: Sequence[Shape], attrs: Mapping[str, Any]) -> tuple:
    """NumPy broadcasting of the input shapes (symbolic dims must match or be 1)."""
    rank = max(len(s) for s in in_shapes)
    padded = [(1,) * (rank - len(s)) + tuple(s) for s in in_shapes]
    return tuple(next((d for d in dims if d != 1), 1) for dims in zip(*padded))


def _conv_output_shape(in_shapes: Sequence[Shape], attrs: Mapping[str, Any]) -> tuple:
    """(N, C_out, *spatial) from stride/padding/dilation attrs (ints or per-dim lists; PyTorch defaults)."""
    x, w = in_shapes[0], in_shapes[1]
    spatial = len(w) - 2

    def per_dim(key: str, default: int) -> list:
        value = attrs.get(key, default)
        return list(value) if isinstance(value, (list, tuple)) else [value] * spatial

    stride, padding, dilation = per_dim("stride", 1), per_dim("padding", 0), per_dim("dilation", 1)
    out = [sympy.floor((sympy.sympify(x[2 + i]) + 2 * padding[i] - dilation[i] * (w[2 + i] - 1) - 1) / stride[i]) + 1
           for i in range(spatial)]
    return (x[0], w[0], *out)


_INFER_OUTPUT: dict[str, Callable[[Sequence[Shape], Mapping[str, Any]], tuple]] = {
    "linear": lambda s, a: (*s[0][:-1], s[1][0]),
    "mm": lambda s, a: (s[0][0], s[1][1]),
    "addmm": lambda s, a: (s[1][0], s[2][1]),
    "bmm": lambda s, a: (s[0][0], s[0][1], s[1][2]),
    "baddbmm": lambda s, a: (s[1][0], s[1][1], s[2][2]),
    "embedding": lambda s, a: (*s[1], s[0][1]),
    "conv1d": _conv_output_shape, "conv2d": _conv_output_shape, "conv3d": _conv_output_shape,
    "convolution": _conv_output_shape,
}


def _attention_flops(in_shapes: Sequence[Shape]) -> sympy.Expr:
    query, key, value = in_shapes[0], in_shapes[1], in_shapes[2]
    batch = numel(query[:-2])
    target_len, head_dim = sympy.sympify(query[-2]), sympy.sympify(query[-1])
    source_len, value_dim = sympy.sympify(key[-2]), sympy.sympify(value[-1])
    return 2 * batch * target_len * source_len * head_dim + 2 * batch * target_len * source_len * value_dim


def _loss_flops(op: str, in_shapes: Sequence[Shape]) -> sympy.Expr:
    name = normalize_op_name(op)
    targets = numel(in_shapes[1]) if len(in_shapes) > 1 else sympy.Integer(0)
    if name in ("cross_entropy_loss", "cross_entropy"):
        return SOFTMAX_FLOPS_PER_ELEMENT * numel(in_shapes[0]) + targets
    if name == "mse_loss":
        return 3 * numel(in_shapes[0])  # subtract, square, sum
    return targets  # nll: pick one log-probability per target and sum


# ==================================================================================================
# Memory
# ==================================================================================================

OPTIMIZER_STATE_BYTES_PER_PARAM = {"sgd": 0, "sgd_momentum": 4, "adam": 8, "adamw": 8}
"""fp32 optimizer state per parameter: SGD none (momentum: one buffer), Adam/AdamW two moments."""

PIPELINE_SCHEDULES = ("none", "1f1b", "gpipe")


def param_memory(params: int | sympy.Expr | Iterable[Shape], dtype_bytes: int = 4) -> sympy.Expr:
    """Bytes of parameters given as a count or as shapes (ints or sympy symbols)."""
    if isinstance(params, (int, sympy.Expr)):
        count = sympy.sympify(params)
    else:
        count = sum((numel(s) for s in params), sympy.Integer(0))
    return dtype_bytes * count


def in_flight_microbatches(schedule: str, num_stages: int, stage_index: int, num_microbatches: int) -> int:
    """Microbatches whose activations a stage holds at its peak: 1F1B p - i (at most m), GPipe m, none 1."""
    if schedule not in PIPELINE_SCHEDULES:
        raise ValueError(f"expected a pipeline schedule in {PIPELINE_SCHEDULES}, found {schedule!r}")
    if not 0 <= stage_index < num_stages:
        raise ValueError(f"expected stage_index in 0..{num_stages - 1}, found {stage_index}")
    if schedule == "1f1b":
        return min(num_stages - stage_index, num_microbatches)
    return num_microbatches if schedule == "gpipe" else 1


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-device bytes at the peak of a training step, split by what holds them."""

    parameters: Any
    gradients: Any
    optimizer_state: Any
    activations: Any

    @property
    def total(self) -> Any:
        """Sum of all parts (a number, or a sympy expression if any part is symbolic)."""
        return self.parameters + self.gradients + self.optimizer_state + self.activations

    def fits(self, device: Device, headroom: float = 0.9) -> bool:
        """Whether :attr:`total` stays under ``headroom`` of the device's memory (needs numeric parts)."""
        return float(self.total) <= headroom * device.memory_bytes

    @classmethod
    def estimate(cls, num_params: Any, activation_bytes: Any, *, stage_input_bytes: Any = 0,
                 optimizer: str = "adamw", param_dtype_bytes: int = 4, grad_dtype_bytes: int | None = None,
                 master_weights: bool | None = None, schedule: str = "none", num_stages: int = 1,
                 stage_index: int = 0, num_microbatches: int = 1, recompute: bool = False) -> "MemoryEstimate":
        """Memory of one device holding ``num_params`` parameters of a pipeline stage.

        ``activation_bytes`` is what one microbatch keeps for backward on this stage; ``stage_input_bytes``
        the stage's input per microbatch. Without recomputation every in-flight microbatch keeps its
        activations; with it they keep only the stage input, plus one microbatch re-materialised during
        its backward. Mixed precision (params under 4 bytes) adds an fp32 master copy unless
        ``master_weights`` says otherwise. Optimizer state is :data:`OPTIMIZER_STATE_BYTES_PER_PARAM`.
        """
        if optimizer not in OPTIMIZER_STATE_BYTES_PER_PARAM:
            raise ValueError(f"expected an optimizer in {sorted(OPTIMIZER_STATE_BYTES_PER_PARAM)}, found {optimizer!r}")
        master = param_dtype_bytes < 4 if master_weights is None else master_weights
        optimizer_bytes = (OPTIMIZER_STATE_BYTES_PER_PARAM[optimizer] + (4 if master else 0)) * num_params
        in_flight = in_flight_microbatches(schedule, num_stages, stage_index, num_microbatches)
        kept = in_flight * stage_input_bytes + activation_bytes if recompute else in_flight * activation_bytes
        return cls(parameters=param_dtype_bytes * num_params,
                   gradients=(grad_dtype_bytes or param_dtype_bytes) * num_params,
                   optimizer_state=optimizer_bytes, activations=kept)


RECOMPUTE_MODES = ("none", "selective", "full")


def megatron_activation_bytes(s: Any, b: Any, h: Any, a: Any, t: Any = 1, sequence_parallel: bool = False,
                              recompute: str = "none") -> sympy.Expr:
    """Activation bytes one transformer layer keeps for backward (Korthikanti et al., 2022, 16-bit).

    ``s`` sequence length, ``b`` microbatch size, ``h`` hidden size, ``a`` attention heads, ``t``
    tensor-parallel size. none: sbh(34 + 5as/h); tensor parallel: sbh(10 + 24/t + 5as/(ht)); tensor +
    sequence parallel: (sbh/t)(34 + 5as/h); selective recompute: 34·sbh/t with sequence parallelism
    (sbh(10 + 24/t) without, as in the paper); full recompute: 2sbh (only the layer input).
    """
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"expected recompute in {RECOMPUTE_MODES}, found {recompute!r}")
    s, b, h, a, t = (sympy.sympify(v) for v in (s, b, h, a, t))
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh
    if recompute == "selective":
        return 34 * sbh / t if sequence_parallel else sbh * (10 + 24 / t)
    if sequence_parallel:
        return sbh / t * (34 + 5 * a * s / h)
    return sbh * (10 + 24 / t + 5 * a * s / (h * t))
