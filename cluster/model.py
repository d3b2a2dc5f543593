"""The hardware model: nodes, devices, and the links between every pair of devices.

A :class:`Cluster` is pure data. It says how many nodes there are, which devices each node holds
(kind, peak FLOP/s per dtype, memory), how the devices of one node talk to each other (NVSwitch,
NVLink, PCIe or, for CPU ranks, host loopback), which NICs each node has (InfiniBand, RoCE,
Ethernet), how regions of nodes are joined (a slow WAN link), and optionally a full device-pair
latency/bandwidth matrix that overrides everything else. :meth:`Cluster.link` answers "what does a
byte sent from device ``a`` to device ``b`` cross?" and the cost model (:mod:`cost`) builds on that.

Clusters are built from specs (:mod:`cluster.spec`: YAML/TOML files, plain dicts) or the built-ins
(:mod:`cluster.builtins`: ``local:N``, ``dgx-a100:N``, ``dgx-h100:N``); :meth:`Cluster.load`,
:meth:`Cluster.from_dict` and :meth:`Cluster.to_dict` are their entry points. The format is
documented in ``docs/clusters.md``.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

# Link classes from fastest to slowest. "self" is a device talking to itself; the next four are
# intra-node classes ("loopback" is the host's shared memory / TCP loopback between CPU processes);
# the three NIC types follow; "wan" joins regions.
LINK_CLASSES = ("self", "nvswitch", "nvlink", "pcie", "loopback", "infiniband", "roce", "ethernet", "wan")
INTRA_NODE_CLASSES = ("nvswitch", "nvlink", "pcie", "loopback")
NIC_TYPES = ("infiniband", "roce", "ethernet")  # best first: a node pair uses the best type both have
DTYPES = ("fp32", "tf32", "bf16", "fp16", "fp8")
COLLECTIVE_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "send_recv")

# Every server has some host Ethernet even when its spec lists none; nodes without a common NIC type
# fall back to it (sockets), as Holmes observes for mixed InfiniBand/Ethernet clusters.
DEFAULT_HOST_ETHERNET_BANDWIDTH_BPS = 10e9 / 8  # 10 Gb/s
DEFAULT_HOST_ETHERNET_LATENCY_S = 30e-6


class ClusterSpecError(ValueError):
    """A cluster spec that is malformed or inconsistent; ``path`` names the offending field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectivePerf:
    """How one collective kind performs on a link, as measured: per-step figures and/or a bus-bandwidth curve.

    ``busbw_by_size`` holds ``(bytes, bus bandwidth)`` points of a ring collective of ``ranks`` ranks on
    this link, as nccl-tests reports them (bytes in the cost model's convention, see
    :mod:`cost.collectives`; bus bandwidth = algorithm bandwidth x the kind's bus factor). They carry
    what a latency/bandwidth pair cannot: NCCL's protocols and channel counts change with the message
    size, so mid-size messages reach well under the plateau bandwidth. The cost model reads the curve
    (:func:`cost.collectives.hop_bandwidth`).
    """

    kind: str
    latency_s: float | None = None
    """Seconds per algorithm step; None: the link's own."""
    bandwidth_Bps: float | None = None
    """Bytes/s per step at large sizes; None: the curve's (or the link's own without a curve)."""
    busbw_by_size: tuple[tuple[float, float], ...] = ()
    """Measured ``(bytes, bus bandwidth B/s)`` points, by size."""
    ranks: int = 0
    """Ranks of the measurement behind ``busbw_by_size``."""


@dataclass(frozen=True)
class Link:
    """What a byte from one device to another crosses: one-way latency, bandwidth per direction, class."""

    latency_s: float
    bandwidth_Bps: float
    link_class: str
    collectives: tuple[CollectivePerf, ...] = ()
    """Per collective kind, what that collective's implementation achieves on this link (measured by
    calibration or published: software collectives such as gloo's copy, reduce and hand buffers between
    threads, so they reach less than a raw transfer; NCCL's reach less at mid sizes)."""
    busbw_by_size: tuple[tuple[float, float], ...] = ()
    """The measured bus-bandwidth curve of the collective this link is seen by (see :meth:`for_collective`)."""
    busbw_ranks: int = 0
    """Ranks of that measurement."""

    def transfer_time(self, nbytes: float) -> float:
        """Seconds to move ``nbytes`` over this link alone (latency + size / bandwidth)."""
        return self.latency_s + nbytes / self.bandwidth_Bps

    def for_collective(self, kind: str) -> "Link":
        """The link as collective ``kind`` sees it: its measured figures when it has them, else itself."""
        for perf in self.collectives:
            if perf.kind == kind:
                bandwidth = perf.bandwidth_Bps or (max(b for _, b in perf.busbw_by_size) if perf.busbw_by_size
                                                   else self.bandwidth_Bps)
                return Link(self.latency_s if perf.latency_s is None else perf.latency_s, bandwidth,
                            self.link_class, busbw_by_size=perf.busbw_by_size, busbw_ranks=perf.ranks)
        return self


SELF_LINK = Link(0.0, math.inf, "self")


@dataclass(frozen=True)
class DeviceKind:
    """A kind of accelerator (or CPU rank): peak FLOP/s per dtype, memory size and bandwidth."""

    name: str
    peak_flops: dict[str, float]
    memory_bytes: int
    memory_bandwidth_Bps: float | None = None
    op_overhead_s: tuple[float, float] | None = None
    """Measured (forward, backward) launch/dispatch seconds of one op; None: the cost model's default."""
    efficiency: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Op name or cost category -> (forward, backward) roofline time / measured time (see
    :meth:`Device.efficiency_of`); empty: ops run at their roofline."""
    efficiency_by_flops: dict[str, tuple[tuple[float, float, float], ...]] = field(default_factory=dict)
    """Key -> ``(forward FLOPs of the op, forward, backward)`` points, by FLOPs: efficiency that depends
    on the op's size (small matmuls reach less of the peak)."""
    comm_overlap: float = 1.0
    """Fraction of a collective's time that hides behind compute running at the same time (1: GPUs,
    whose copy engines and spare SMs move data while kernels run; CPU ranks measure far less, as
    their communication threads need the cores the compute uses)."""
    collective_overhead_s: float = 0.0
    """Seconds every collective call costs once, before its steps (NCCL's base latency: the kernel
    launch and the channels' set-up); 0: included in the per-step latencies."""

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.peak_flops.items())), self.memory_bytes))


@dataclass(frozen=True)
class Nic:
    """``count`` network interfaces of one type on a node, each with ``bandwidth_Bps`` per direction."""

    type: str
    count: int
    bandwidth_Bps: float
    latency_s: float


@dataclass(frozen=True)
class Node:
    """One server: ``num_devices`` devices of one kind, the link joining them, its NICs and its region."""

    name: str
    device_kind: DeviceKind
    num_devices: int
    intra_link: Link
    nics: tuple[Nic, ...] = ()
    region: str = "default"
    cpu_cores: int | None = None
    """Cores of the host that the node's CPU ranks share (what ``sbpc calibrate`` found); None: every device
    computes on its own (GPUs, or a spec that does not say)."""

    @property
    def compute_share(self) -> float:
        """The share of its own speed a rank computes at while every rank of the node computes: each rank runs
        at least one thread (:func:`cost.calibrate.threads_per_rank`), so ranks that outnumber the cores take
        turns on them, ``cpu_cores / num_devices``; 1 otherwise."""
        if self.cpu_cores is None:
            return 1.0
        return min(1.0, self.cpu_cores / self.num_devices)

    def nic(self, nic_type: str) -> Nic | None:
        """This node's NICs of ``nic_type``, or None."""
        return next((n for n in self.nics if n.type == nic_type), None)

    def nic_share_Bps(self, nic_type: str) -> float:
        """Bandwidth per device when every device of the node sends over the ``nic_type`` NICs at once."""
        nic = self.nic(nic_type)
        if nic is None:  # only the host Ethernet fallback can be missing
            return DEFAULT_HOST_ETHERNET_BANDWIDTH_BPS / self.num_devices
        return nic.count * nic.bandwidth_Bps / self.num_devices

    def nic_latency_s(self, nic_type: str) -> float:
        """One-way latency over this node's ``nic_type`` NICs (the host Ethernet default when absent)."""
        nic = self.nic(nic_type)
        return DEFAULT_HOST_ETHERNET_LATENCY_S if nic is None else nic.latency_s


@dataclass(frozen=True)
class RegionLink:
    """The WAN joining two regions; ``bandwidth_Bps`` is what one device-pair stream gets across it."""

    regions: tuple[str, str]
    bandwidth_Bps: float
    latency_s: float


@dataclass(frozen=True)
class LinkOverride:
    """A measured link replacing the modelled one: between two devices, or all devices of two nodes."""

    scope: str  # "devices" or "nodes"
    a: int
    b: int
    link: Link


@dataclass(frozen=True)
class PairMatrix:
    """A full device-pair table: ``latency_s[a][b]``, ``bandwidth_Bps[a][b]`` and optionally classes."""

    latency_s: tuple[tuple[float, ...], ...]
    bandwidth_Bps: tuple[tuple[float, ...], ...]
    link_class: tuple[tuple[str, ...], ...] | None = None


@dataclass(frozen=True)
class Device:
    """One rank of the cluster: global ``id``, the ``node`` index holding it, and its capabilities."""

    id: int
    node: int
    kind: str
    peak_flops: dict[str, float]
    memory_bytes: int
    memory_bandwidth_Bps: float | None = None
    local_index: int = 0
    """Position of the device inside its node (0 .. devices per node - 1)."""
    op_overhead_s: tuple[float, float] | None = None
    """Measured (forward, backward) seconds of dispatching one op (see :class:`DeviceKind`)."""
    efficiency: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Op name or cost category -> (forward, backward) fraction of the roofline the device reaches."""
    efficiency_by_flops: dict[str, tuple[tuple[float, float, float], ...]] = field(default_factory=dict)
    """Key -> (forward FLOPs, forward, backward) points (see :class:`DeviceKind`)."""
    comm_overlap: float = 1.0
    """Fraction of a collective's time that hides behind concurrent compute (see :class:`DeviceKind`)."""
    collective_overhead_s: float = 0.0
    """Seconds every collective call costs once (see :class:`DeviceKind`)."""
    compute_share: float = 1.0
    """The share of its kind's speed the device computes at (:attr:`Node.compute_share`); the figures above
    already carry it."""

    def __hash__(self) -> int:
        return hash((self.id, self.node, self.kind))

    def efficiency_of(self, *keys: str, flops: float | None = None) -> tuple[float, float]:
        """(forward, backward) efficiency of the first of ``keys`` (say the op's name, then its cost
        category) the device lists, else its ``default`` entry, else (1, 1): the roofline. Given the
        op's forward ``flops`` and a key measured at several sizes, the efficiency at that size
        (interpolated in log FLOPs, the end points beyond the measured range)."""
        for key in (*keys, "default"):
            if key in self.efficiency:
                curve = self.efficiency_by_flops.get(key)
                if flops is not None and curve:
                    return _interpolate(curve, flops)
                return self.efficiency[key]
        return 1.0, 1.0


def _shared(kind: DeviceKind, share: float) -> DeviceKind:
    """``kind`` as a rank computing at ``share`` of its speed sees it: peak FLOP/s and memory bandwidth times
    ``share``, each op's dispatch overhead divided by it."""
    if share == 1.0:
        return kind
    overhead = None if kind.op_overhead_s is None else tuple(s / share for s in kind.op_overhead_s)
    bandwidth = None if kind.memory_bandwidth_Bps is None else kind.memory_bandwidth_Bps * share
    return replace(kind, peak_flops={k: v * share for k, v in kind.peak_flops.items()},
                   memory_bandwidth_Bps=bandwidth, op_overhead_s=overhead)


def _interpolate(curve: tuple[tuple[float, float, float], ...], flops: float) -> tuple[float, float]:
    """(forward, backward) at ``flops`` on ``(flops, forward, backward)`` points sorted by FLOPs."""
    if flops <= curve[0][0]:
        return curve[0][1], curve[0][2]
    for (x0, f0, b0), (x1, f1, b1) in zip(curve, curve[1:]):
        if flops <= x1:
            t = math.log(flops / x0) / math.log(x1 / x0) if x1 > x0 else 1.0
            return f0 + t * (f1 - f0), b0 + t * (b1 - b0)
    return curve[-1][1], curve[-1][2]


def link_class_rank(link_class: str) -> int:
    """Position of ``link_class`` in :data:`LINK_CLASSES` (smaller is faster)."""
    if link_class not in LINK_CLASSES:
        raise ValueError(f"unknown link class {link_class!r}; expected one of {', '.join(LINK_CLASSES)}")
    return LINK_CLASSES.index(link_class)


@dataclass(frozen=True, eq=False)
class Cluster:
    """A set of nodes and the links between their devices. Build with :meth:`load`, :meth:`local`,
    :meth:`from_dict`; treat as immutable."""

    name: str
    nodes: tuple[Node, ...]
    region_links: tuple[RegionLink, ...] = ()
    link_overrides: tuple[LinkOverride, ...] = ()
    matrix: PairMatrix | None = None
    description: str = ""
    metadata: dict = field(default_factory=dict, compare=False)
    """Free-form information (e.g. calibration measurements); not used by the model."""

    def __post_init__(self) -> None:
        devices = []
        for node_index, node in enumerate(self.nodes):
            kind = _shared(node.device_kind, node.compute_share)
            for local in range(node.num_devices):
                devices.append(Device(len(devices), node_index, kind.name, dict(kind.peak_flops),
                                      kind.memory_bytes, kind.memory_bandwidth_Bps, local,
                                      op_overhead_s=kind.op_overhead_s, efficiency=dict(kind.efficiency),
                                      efficiency_by_flops=dict(kind.efficiency_by_flops),
                                      comm_overlap=kind.comm_overlap,
                                      collective_overhead_s=kind.collective_overhead_s,
                                      compute_share=node.compute_share))
        object.__setattr__(self, "_devices", tuple(devices))
        firsts = [0]
        for node in self.nodes:
            firsts.append(firsts[-1] + node.num_devices)
        object.__setattr__(self, "_node_first_device", tuple(firsts[:-1]))
        object.__setattr__(self, "_node_link_cache", {})
        object.__setattr__(self, "_device_overrides",
                           {frozenset((o.a, o.b)): o.link for o in self.link_overrides if o.scope == "devices"})
        object.__setattr__(self, "_node_overrides",
                           {frozenset((o.a, o.b)): o.link for o in self.link_overrides if o.scope == "nodes"})

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    def __eq__(self, other: object) -> bool:
        """Clusters are equal when their specs are (metadata aside): compared by :meth:`fingerprint`, once
        computed, since the cost model's caches compare a cluster of thousands of devices on every lookup."""
        if not isinstance(other, Cluster):
            return NotImplemented
        return self is other or self.fingerprint() == other.fingerprint()

    def __repr__(self) -> str:
        return f"Cluster({self.name!r}, {len(self.nodes)} nodes, {self.world_size} devices)"

    # -- construction ------------------------------------------------------------------------------

    # The spec reader builds Clusters, so these entry points import it when called.

    @classmethod
    def local(cls, n: int) -> "Cluster":
        """``n`` CPU ranks on one node talking over host loopback (gloo); what tests use."""
        from cluster.builtins import local_spec
        return cls.from_dict(local_spec(n))

    @classmethod
    def load(cls, name_or_path: str | Path) -> "Cluster":
        """A built-in (``local:N``, ``dgx-a100:N``, ``dgx-h100:N``) or a ``.yaml``/``.yml``/``.toml`` file."""
        from cluster.spec import load_spec
        return cls.from_dict(load_spec(name_or_path))

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> "Cluster":
        """Build and validate a cluster from a spec dict (the YAML format, see ``docs/clusters.md``)."""
        from cluster.spec import parse_spec
        return parse_spec(spec)

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data in base units; ``Cluster.from_dict(c.to_dict()) == c``."""
        from cluster.spec import spec_dict
        return spec_dict(self)

    def dump_yaml(self, path: str | Path) -> None:
        """Write :meth:`to_dict` as YAML to ``path``."""
        from cluster.spec import dump_yaml
        dump_yaml(self, path)

    def fingerprint(self) -> str:
        """A short stable hash of the spec, for caching plans made for this cluster."""
        cached = self.__dict__.get("_fingerprint")
        if cached is None:  # computed once: the spec never changes
            canonical = json.dumps(self.to_dict() | {"metadata": None}, sort_keys=True, default=str)
            cached = hashlib.sha256(canonical.encode()).hexdigest()[:16]
            object.__setattr__(self, "_fingerprint", cached)
        return cached

    # -- queries -----------------------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        """Number of devices (ranks)."""
        return len(self._devices)

    @property
    def devices(self) -> list[Device]:
        """Every device, indexed by global rank."""
        return list(self._devices)

    def device(self, device_id: int) -> Device:
        """The device with global rank ``device_id``."""
        self._check_device(device_id)
        return self._devices[device_id]

    def node_of(self, device: int | Device) -> int:
        """Index of the node holding ``device`` (a rank or a :class:`Device`)."""
        device_id = device.id if isinstance(device, Device) else device
        return self.device(device_id).node

    def devices_of_node(self, node: int) -> list[int]:
        """Global ranks of the devices on node ``node``."""
        first = self._node_first_device[node]
        return list(range(first, first + self.nodes[node].num_devices))

    def nic_type(self, node: int | str) -> str:
        """The best NIC type of ``node`` (index or name); ``ethernet`` when the spec lists none."""
        nics = self.nodes[self._node_index(node)].nics
        return next((t for t in NIC_TYPES if any(n.type == t for n in nics)), "ethernet")

    def link(self, a: int, b: int) -> Link:
        """The link a message from device ``a`` to device ``b`` crosses.

        Precedence: the device itself (``self``), a device-pair override, the pair matrix, a node-pair
        override, then the modelled topology (intra-node link, best common NIC, WAN between regions).
        """
        self._check_device(a)
        self._check_device(b)
        if a == b:
            return SELF_LINK
        override = self._device_overrides.get(frozenset((a, b)))
        if override is not None:
            return override
        if self.matrix is not None:
            return self._matrix_link(a, b)
        return self.node_link(self._devices[a].node, self._devices[b].node)

    @property
    def links_follow_nodes(self) -> bool:
        """True when ``link(a, b)`` for a != b depends only on the nodes of ``a`` and ``b`` (no matrix or
        device-pair overrides), so callers may cost whole node pairs at once."""
        return self.matrix is None and not self._device_overrides

    def node_link(self, node_a: int, node_b: int) -> Link:
        """The link between a device of node ``node_a`` and one of node ``node_b``: a node-pair override or
        the topology (ignores the matrix and device-pair overrides; see :meth:`link`)."""
        key = (node_a, node_b)
        if key not in self._node_link_cache:
            self._node_link_cache[key] = self._compute_node_link(node_a, node_b)
        return self._node_link_cache[key]

    def domains(self, link_class: str) -> list[list[int]]:
        """Groups of devices in which every pair is joined by ``link_class`` or a faster class.

        Groups are built greedily in rank order, so on a regular cluster they are whole nodes (for an
        intra-node class), sets of nodes sharing a network, or one group for everything.
        """
        threshold = link_class_rank(link_class)
        if self.links_follow_nodes:
            return self._node_level_domains(threshold)
        groups: list[list[int]] = []
        for device in range(self.world_size):
            home = next((g for g in groups if all(self._within(device, m, threshold) for m in g)), None)
            if home is None:
                groups.append([device])
            else:
                home.append(device)
        return groups

    def fast_domains(self) -> list[list[int]]:
        """Groups joined by an intra-node class (NVSwitch/NVLink/PCIe/loopback): where tensor parallelism fits."""
        return self.domains(INTRA_NODE_CLASSES[-1])

    # -- helpers -----------------------------------------------------------------------------------

    def _check_device(self, device_id: int) -> None:
        if type(device_id) is int and 0 <= device_id < len(self._devices):
            return  # the common case, without the abstract-class check below
        if isinstance(device_id, bool) or not isinstance(device_id, numbers.Integral) \
                or not 0 <= device_id < self.world_size:
            raise IndexError(f"expected a device id in 0..{self.world_size - 1} of cluster {self.name!r}, "
                             f"found {device_id!r}")

    def _node_index(self, node: int | str) -> int:
        if isinstance(node, str):
            names = [n.name for n in self.nodes]
            if node not in names:
                raise KeyError(f"no node named {node!r} in cluster {self.name!r}; nodes are {names}")
            return names.index(node)
        if not 0 <= node < len(self.nodes):
            raise IndexError(f"expected a node index in 0..{len(self.nodes) - 1}, found {node}")
        return node

    def _within(self, a: int, b: int, threshold: int) -> bool:
        return link_class_rank(self.link(a, b).link_class) <= threshold and \
            link_class_rank(self.link(b, a).link_class) <= threshold

    def _node_level_domains(self, threshold: int) -> list[list[int]]:
        """Domains when links depend only on the node pair: group whole nodes, then list their devices."""
        def close(na: int, nb: int) -> bool:
            return link_class_rank(self.node_link(na, nb).link_class) <= threshold \
                and link_class_rank(self.node_link(nb, na).link_class) <= threshold

        node_groups: list[list[int]] = []
        singletons: list[list[int]] = []
        for node in range(len(self.nodes)):
            devices = self.devices_of_node(node)
            if len(devices) > 1 and not close(node, node):  # its own link is too slow: each device alone
                singletons.extend([d] for d in devices)
                continue
            home = next((g for g in node_groups if all(close(node, m) for m in g)), None)
            if home is None:
                node_groups.append([node])
            else:
                home.append(node)
        groups = [[d for n in g for d in self.devices_of_node(n)] for g in node_groups] + singletons
        return sorted(groups, key=lambda g: g[0])

    def _matrix_link(self, a: int, b: int) -> Link:
        matrix = self.matrix
        assert matrix is not None
        if matrix.link_class is not None:
            link_class = matrix.link_class[a][b]
        else:
            link_class = self.node_link(self._devices[a].node, self._devices[b].node).link_class
        return Link(matrix.latency_s[a][b], matrix.bandwidth_Bps[a][b], link_class)

    def _compute_node_link(self, node_a: int, node_b: int) -> Link:
        override = self._node_overrides.get(frozenset((node_a, node_b)))
        if override is not None:
            return override
        first, second = self.nodes[node_a], self.nodes[node_b]
        if node_a == node_b:
            return first.intra_link
        nic_type = next((t for t in NIC_TYPES if first.nic(t) and second.nic(t)), "ethernet")
        bandwidth = min(first.nic_share_Bps(nic_type), second.nic_share_Bps(nic_type))
        latency = max(first.nic_latency_s(nic_type), second.nic_latency_s(nic_type))
        if first.region == second.region:
            return Link(latency, bandwidth, nic_type)
        wan = self._region_link(first.region, second.region)
        return Link(latency + wan.latency_s, min(bandwidth, wan.bandwidth_Bps), "wan")

    def _region_link(self, region_a: str, region_b: str) -> RegionLink:
        wanted = {region_a, region_b}
        found = next((r for r in self.region_links if set(r.regions) == wanted), None)
        if found is None:  # from_dict rejects such specs; a hand-built Cluster may still lack one
            raise ClusterSpecError("inter_region", f"no link between regions {region_a!r} and {region_b!r}")
        return found
