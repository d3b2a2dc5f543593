"""The cluster model: nodes, devices, and the links between every pair of devices.

A :class:`Cluster` is pure data. It says how many nodes there are, which devices each node holds
(kind, peak FLOP/s per dtype, memory), how the devices of one node talk to each other (NVSwitch,
NVLink, PCIe or, for CPU ranks, host loopback), which NICs each node has (InfiniBand, RoCE,
Ethernet), how regions of nodes are joined (a slow WAN link), and optionally a full device-pair
latency/bandwidth matrix that overrides everything else. :meth:`Cluster.link` answers "what does a
byte sent from device ``a`` to device ``b`` cross?" and the cost model builds on that.

Specs come from YAML/TOML files, plain dicts, or the built-ins ``local:N``, ``dgx-a100:N`` and
``dgx-h100:N``. Files accept human units ("200Gb/s", "600GB/s", "80GiB", "5us", "312TFLOPS");
:meth:`Cluster.to_dict` writes plain numbers in base units (bytes, bytes/s, seconds, FLOP/s).
Every inconsistency raises :class:`ClusterSpecError` naming the offending field path. The format is
documented in ``docs/clusters.md``.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

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
# Human units
# --------------------------------------------------------------------------------------------------

_NUMBER_UNIT_RE = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([A-Za-zµ/]*)\s*$")
_DECIMAL_PREFIXES = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_BINARY_PREFIXES = {"Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50}
_ALL_PREFIXES = {**_DECIMAL_PREFIXES, **_BINARY_PREFIXES}
_TIME_PREFIXES = {"": 1.0, "m": 1e-3, "u": 1e-6, "µ": 1e-6, "n": 1e-9}

# quantity kind -> (unit suffix -> scale to base units, prefixes allowed, what to tell the user)
_UNITS: dict[str, tuple[dict[str, float], dict[str, float], str]] = {
    "bandwidth": ({"B/s": 1.0, "b/s": 1 / 8, "bit/s": 1 / 8, "bps": 1 / 8}, _ALL_PREFIXES,
                  "a positive number (bytes/s or a string like '200Gb/s')"),
    "bytes": ({"B": 1.0}, _ALL_PREFIXES, "a positive number (bytes or a string like '80GiB')"),
    "time": ({"s": 1.0}, _TIME_PREFIXES, "a non-negative number (seconds or a string like '5us')"),
    "flops": ({"FLOPS": 1.0, "FLOP/s": 1.0, "flops": 1.0}, _DECIMAL_PREFIXES,
              "a positive number (FLOP/s or a string like '312TFLOPS')"),
}


def parse_quantity(value: Any, kind: str, path: str = "") -> float:
    """Parse a number or a string with a unit ("200Gb/s", "80GiB", "5us", "312TFLOPS") into base units.

    ``kind`` is ``bandwidth`` (bytes/s), ``bytes``, ``time`` (seconds) or ``flops`` (FLOP/s). Times
    must be non-negative, everything else positive; anything else raises :class:`ClusterSpecError`
    at ``path``.
    """
    suffixes, prefixes, expected = _UNITS[kind]
    number = _to_number(value, suffixes, prefixes)
    valid = number is not None and not math.isnan(number) and (number >= 0 if kind == "time" else number > 0)
    if not valid:
        raise ClusterSpecError(path, f"expected {expected}, found {value!r}")
    return number


def _to_number(value: Any, suffixes: Mapping[str, float], prefixes: Mapping[str, float]) -> float | None:
    """The value in base units, or None when it is not a number or a number with a known unit."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str):
        return None
    if value.strip().lower() in ("inf", ".inf", "+inf"):
        return math.inf
    match = _NUMBER_UNIT_RE.match(value)
    if not match:
        return None
    number, unit = float(match.group(1)), match.group(2)
    if unit == "":
        return number
    for suffix, scale in suffixes.items():
        if unit.endswith(suffix) and unit[: -len(suffix)] in prefixes:
            return _scaled(_scaled(number, prefixes[unit[: -len(suffix)]]), scale)
    return None


def _scaled(number: float, factor: float) -> float:
    """``number * factor``, dividing by the reciprocal for small factors so "5us" gives exactly 5e-06."""
    return number * factor if factor >= 1 else number / round(1 / factor)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """What a byte from one device to another crosses: one-way latency, bandwidth per direction, class."""

    latency_s: float
    bandwidth_Bps: float
    link_class: str
    collectives: tuple[tuple[str, float, float], ...] = ()
    """Per collective kind, ``(kind, latency_s, bandwidth_Bps)`` that collective's implementation
    achieves per algorithm step on this link (measured by calibration: software collectives such as
    gloo's copy, reduce and hand buffers between threads, so they reach less than a raw transfer)."""

    def transfer_time(self, nbytes: float) -> float:
        """Seconds to move ``nbytes`` over this link alone (latency + size / bandwidth)."""
        return self.latency_s + nbytes / self.bandwidth_Bps

    def for_collective(self, kind: str) -> "Link":
        """The link as collective ``kind`` sees it: its measured figures when it has them, else itself."""
        for name, latency, bandwidth in self.collectives:
            if name == kind:
                return Link(latency, bandwidth, self.link_class)
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


@dataclass(frozen=True, eq=True)
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
            kind = node.device_kind
            for local in range(node.num_devices):
                devices.append(Device(len(devices), node_index, kind.name, dict(kind.peak_flops),
                                      kind.memory_bytes, kind.memory_bandwidth_Bps, local,
                                      op_overhead_s=kind.op_overhead_s, efficiency=dict(kind.efficiency),
                                      efficiency_by_flops=dict(kind.efficiency_by_flops),
                                      comm_overlap=kind.comm_overlap))
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

    def __repr__(self) -> str:
        return f"Cluster({self.name!r}, {len(self.nodes)} nodes, {self.world_size} devices)"

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def local(cls, n: int) -> "Cluster":
        """``n`` CPU ranks on one node talking over host loopback (gloo); what tests use."""
        return cls.from_dict(_local_spec(n))

    @classmethod
    def load(cls, name_or_path: str | Path) -> "Cluster":
        """A built-in (``local:N``, ``dgx-a100:N``, ``dgx-h100:N``) or a ``.yaml``/``.yml``/``.toml`` file."""
        text = str(name_or_path)
        builtin, _, count = text.partition(":")
        if builtin in _BUILTINS and not Path(text).exists():
            return cls.from_dict(_BUILTINS[builtin](_builtin_count(text, count)))
        path = Path(text)
        if not path.is_file():
            raise ClusterSpecError("", f"expected a built-in cluster ({', '.join(k + ':N' for k in _BUILTINS)}) "
                                       f"or a YAML/TOML file, found {text!r} (no such file)")
        return cls.from_dict(_read_spec_file(path))

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> "Cluster":
        """Build and validate a cluster from a spec dict (the YAML format, see ``docs/clusters.md``)."""
        return _SpecParser(spec).parse()

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data in base units; ``Cluster.from_dict(c.to_dict()) == c``."""
        return _spec_dict(self)

    def dump_yaml(self, path: str | Path) -> None:
        """Write :meth:`to_dict` as YAML to ``path``."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

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


# --------------------------------------------------------------------------------------------------
# Built-ins (public numbers from vendor data sheets)
# --------------------------------------------------------------------------------------------------

DEVICE_KINDS: dict[str, DeviceKind] = {
    "a100-80gb": DeviceKind("a100-80gb", {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
                            80 * 2**30, 2.039e12),
    "h100-sxm-80gb": DeviceKind("h100-sxm-80gb",
                                {"fp32": 67e12, "tf32": 494.5e12, "bf16": 989e12, "fp16": 989e12, "fp8": 1979e12},
                                80 * 2**30, 3.35e12),
    "v100-32gb": DeviceKind("v100-32gb", {"fp32": 15.7e12, "fp16": 125e12}, 32 * 2**30, 900e9),
    # A modest CPU core group; calibrate() measures the real numbers for this machine.
    "cpu": DeviceKind("cpu", {"fp32": 50e9, "bf16": 25e9, "fp16": 10e9}, 8 * 2**30, 10e9),
}
"""Device kinds a spec may name without defining them under ``device_kinds``."""


def _dgx_spec(name: str, count: int, device: str, intra_bandwidth: str, ib_bandwidth: str) -> dict[str, Any]:
    return {
        "name": f"{name}:{count}",
        "nodes": [{
            "count": count,
            "device": device,
            "devices": 8,
            "intra_link": {"class": "nvswitch", "bandwidth": intra_bandwidth, "latency": "2us"},
            "nics": [
                {"type": "infiniband", "count": 8, "bandwidth": ib_bandwidth, "latency": "5us"},
                {"type": "ethernet", "count": 2, "bandwidth": "100Gb/s", "latency": "30us"},
            ],
        }],
    }


def _dgx_a100_spec(count: int) -> dict[str, Any]:
    """DGX A100: 8 A100-80GB on NVSwitch (600 GB/s per GPU both ways), 8x200 Gb/s HDR InfiniBand."""
    return _dgx_spec("dgx-a100", count, "a100-80gb", "300GB/s", "200Gb/s")


def _dgx_h100_spec(count: int) -> dict[str, Any]:
    """DGX H100: 8 H100-SXM on NVLink4/NVSwitch (900 GB/s per GPU both ways), 8x400 Gb/s NDR InfiniBand."""
    return _dgx_spec("dgx-h100", count, "h100-sxm-80gb", "450GB/s", "400Gb/s")


def _local_spec(count: int) -> dict[str, Any]:
    """``count`` CPU ranks on one host; gloo over loopback moves a few GB/s with tens of microseconds latency."""
    return {
        "name": f"local:{count}",
        "nodes": [{
            "name": "localhost",
            "device": "cpu",
            "devices": count,
            "intra_link": {"class": "loopback", "bandwidth": "2GB/s", "latency": "50us"},
            "nics": [{"type": "ethernet", "count": 1, "bandwidth": "10Gb/s", "latency": "30us"}],
        }],
    }


_BUILTINS: dict[str, Callable[[int], dict[str, Any]]] = {
    "local": _local_spec, "dgx-a100": _dgx_a100_spec, "dgx-h100": _dgx_h100_spec,
}


def _builtin_count(text: str, count: str) -> int:
    if not count.isdigit() or int(count) < 1:
        raise ClusterSpecError("", f"expected a built-in like 'dgx-a100:2' with a positive count, found {text!r}")
    return int(count)


def _read_spec_file(path: Path) -> dict[str, Any]:
    """Parse a YAML or TOML cluster file into a dict."""
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib  # Python 3.11+
            spec = tomllib.loads(text)
        else:
            spec = yaml.safe_load(text)
    except Exception as error:  # the parsers' own errors, re-raised with the file name
        raise ClusterSpecError("", f"{path}: not valid {path.suffix.lstrip('.').upper() or 'YAML'}: {error}") from error
    if not isinstance(spec, dict):
        raise ClusterSpecError("", f"{path}: expected a mapping at the top level, found {type(spec).__name__}")
    return spec


# --------------------------------------------------------------------------------------------------
# Parsing and validation
# --------------------------------------------------------------------------------------------------

_TOP_KEYS = {"name", "description", "device_kinds", "nodes", "inter_region", "link_overrides", "matrix", "metadata"}
_NODE_KEYS = {"name", "count", "device", "devices", "intra_link", "nics", "region"}
_LINK_KEYS = {"class", "bandwidth", "latency"}
_NIC_KEYS = {"type", "count", "bandwidth", "latency"}
_KIND_KEYS = {"peak_flops", "memory", "memory_bandwidth", "op_overhead", "efficiency", "comm_overlap"}
_PHASES = ("forward", "backward")


class _SpecParser:
    """Turns a spec dict into a :class:`Cluster`, naming the field path in every error."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.spec = spec

    def parse(self) -> Cluster:
        spec = _mapping(self.spec, "", _TOP_KEYS)
        kinds = self._device_kinds(spec.get("device_kinds", {}))
        nodes = self._nodes(_required(spec, "nodes", ""), kinds)
        region_links = self._region_links(spec.get("inter_region", []), nodes)
        world_size = sum(n.num_devices for n in nodes)
        overrides = tuple(self._override(o, f"link_overrides[{i}]", nodes, world_size)
                          for i, o in enumerate(_sequence(spec.get("link_overrides", []), "link_overrides")))
        matrix = self._matrix(spec["matrix"], world_size) if spec.get("matrix") is not None else None
        return Cluster(name=str(spec.get("name", "cluster")), nodes=nodes, region_links=region_links,
                       link_overrides=overrides, matrix=matrix, description=str(spec.get("description", "")),
                       metadata=copy.deepcopy(dict(spec.get("metadata") or {})))

    def _device_kinds(self, raw: Any) -> dict[str, DeviceKind]:
        kinds = dict(DEVICE_KINDS)
        for name, body in _mapping(raw, "device_kinds").items():
            kinds[str(name)] = self._device_kind(str(name), body, f"device_kinds.{name}")
        return kinds

    @staticmethod
    def _device_kind(name: str, body: Any, path: str) -> DeviceKind:
        body = _mapping(body, path, _KIND_KEYS)
        flops_raw = _mapping(_required(body, "peak_flops", path), f"{path}.peak_flops")
        if not flops_raw:
            raise ClusterSpecError(f"{path}.peak_flops",
                                   "expected at least one dtype (e.g. fp32: 19.5TFLOPS), found none")
        flops = {}
        for dtype, value in flops_raw.items():
            if dtype not in DTYPES:
                raise ClusterSpecError(f"{path}.peak_flops.{dtype}",
                                       f"unknown dtype; expected one of {', '.join(DTYPES)}")
            flops[dtype] = parse_quantity(value, "flops", f"{path}.peak_flops.{dtype}")
        memory = int(parse_quantity(_required(body, "memory", path), "bytes", f"{path}.memory"))
        bandwidth = body.get("memory_bandwidth")
        bandwidth = None if bandwidth is None else parse_quantity(bandwidth, "bandwidth", f"{path}.memory_bandwidth")
        overhead = body.get("op_overhead")
        overhead = None if overhead is None else _per_phase(overhead, f"{path}.op_overhead",
                                                           lambda v, p: parse_quantity(v, "time", p))
        efficiency, curves = {}, {}
        for key, value in _mapping(body.get("efficiency", {}), f"{path}.efficiency").items():
            efficiency[str(key)], curve = _efficiency_entry(value, f"{path}.efficiency.{key}")
            if curve:
                curves[str(key)] = curve
        overlap = _fraction(body.get("comm_overlap", 1.0), f"{path}.comm_overlap")
        return DeviceKind(name, flops, memory, bandwidth, op_overhead_s=overhead, efficiency=efficiency,
                          efficiency_by_flops=curves, comm_overlap=overlap)

    def _nodes(self, raw: Any, kinds: Mapping[str, DeviceKind]) -> tuple[Node, ...]:
        entries = _sequence(raw, "nodes")
        if not entries:
            raise ClusterSpecError("nodes", "expected at least one node, found an empty list")
        nodes: list[Node] = []
        seen_names: set[str] = set()
        for i, entry in enumerate(entries):
            path = f"nodes[{i}]"
            entry = _mapping(entry, path, _NODE_KEYS)
            count = _positive_int(entry.get("count", 1), f"{path}.count")
            template = self._node(entry, path, kinds)
            for k in range(count):
                name = entry.get("name")
                name = f"node{len(nodes)}" if name is None else (str(name) if count == 1 else f"{name}-{k}")
                if name in seen_names:
                    raise ClusterSpecError(f"{path}.name", f"duplicate node name {name!r}; names must be unique")
                seen_names.add(name)
                nodes.append(Node(name, template.device_kind, template.num_devices, template.intra_link,
                                  template.nics, template.region))
        return tuple(nodes)

    @staticmethod
    def _node(entry: Mapping[str, Any], path: str, kinds: Mapping[str, DeviceKind]) -> Node:
        kind_name = str(_required(entry, "device", path))
        if kind_name not in kinds:
            raise ClusterSpecError(f"{path}.device", f"unknown device kind {kind_name!r}; define it under "
                                                     f"device_kinds or use one of {', '.join(sorted(kinds))}")
        num_devices = _positive_int(_required(entry, "devices", path), f"{path}.devices")
        intra = _parse_link(_required(entry, "intra_link", path), f"{path}.intra_link", INTRA_NODE_CLASSES,
                            extra_keys=("collectives",))
        intra = dataclasses.replace(intra, collectives=_link_collectives(entry["intra_link"], f"{path}.intra_link"))
        nics = []
        for j, nic in enumerate(_sequence(entry.get("nics", []), f"{path}.nics")):
            nics.append(_parse_nic(nic, f"{path}.nics[{j}]"))
            if [n.type for n in nics].count(nics[-1].type) > 1:
                raise ClusterSpecError(f"{path}.nics[{j}].type", f"NIC type {nics[-1].type!r} listed twice; "
                                                                 "give one entry with a count")
        return Node("", kinds[kind_name], num_devices, intra, tuple(nics), str(entry.get("region", "default")))

    @staticmethod
    def _region_links(raw: Any, nodes: tuple[Node, ...]) -> tuple[RegionLink, ...]:
        regions = sorted({n.region for n in nodes})
        links = []
        for i, entry in enumerate(_sequence(raw, "inter_region")):
            path = f"inter_region[{i}]"
            entry = _mapping(entry, path, {"regions", "bandwidth", "latency"})
            pair = _sequence(_required(entry, "regions", path), f"{path}.regions")
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ClusterSpecError(f"{path}.regions", f"expected two different region names, found {pair!r}")
            for j, region in enumerate(pair):
                if region not in regions:
                    raise ClusterSpecError(f"{path}.regions[{j}]", f"no node is in region {region!r}; "
                                                                   f"regions are {regions}")
            bandwidth = parse_quantity(_required(entry, "bandwidth", path), "bandwidth", f"{path}.bandwidth")
            latency = parse_quantity(_required(entry, "latency", path), "time", f"{path}.latency")
            links.append(RegionLink(tuple(sorted(map(str, pair))), bandwidth, latency))
        joined = {frozenset(r.regions) for r in links}
        for a_index, a in enumerate(regions):
            for b in regions[a_index + 1:]:
                if frozenset((a, b)) not in joined:
                    raise ClusterSpecError("inter_region", f"expected a link between regions {a!r} and {b!r}, "
                                                           "found none; add {regions: [a, b], bandwidth, latency}")
        return tuple(links)

    @staticmethod
    def _override(entry: Any, path: str, nodes: tuple[Node, ...], world_size: int) -> LinkOverride:
        entry = _mapping(entry, path, {"devices", "nodes"} | _LINK_KEYS)
        scopes = [s for s in ("devices", "nodes") if s in entry]
        if len(scopes) != 1:
            raise ClusterSpecError(path, f"expected exactly one of 'devices' or 'nodes', found {scopes or 'neither'}")
        scope = scopes[0]
        pair = _sequence(entry[scope], f"{path}.{scope}")
        if len(pair) != 2:
            raise ClusterSpecError(f"{path}.{scope}", f"expected a pair [a, b], found {pair!r}")
        names = [n.name for n in nodes]
        resolve = (lambda v, p: _index(v, world_size, p, "device")) if scope == "devices" else \
            (lambda v, p: names.index(v) if v in names else _index(v, len(nodes), p, "node"))
        a, b = (resolve(v, f"{path}.{scope}[{j}]") for j, v in enumerate(pair))
        return LinkOverride(scope, a, b, _parse_link(entry, path, LINK_CLASSES[1:], extra_keys=(scope,)))

    @staticmethod
    def _matrix(raw: Any, world_size: int) -> PairMatrix:
        raw = _mapping(raw, "matrix", {"latency", "bandwidth", "class"})
        latency = _square(_required(raw, "latency", "matrix"), "matrix.latency", world_size,
                          lambda v, p: parse_quantity(v, "time", p))
        bandwidth = _square(_required(raw, "bandwidth", "matrix"), "matrix.bandwidth", world_size,
                            lambda v, p: parse_quantity(v, "bandwidth", p))
        classes = None
        if raw.get("class") is not None:
            classes = _square(raw["class"], "matrix.class", world_size,
                              lambda v, p: _choice(v, LINK_CLASSES, p, "link class"))
        return PairMatrix(latency, bandwidth, classes)


def _parse_link(raw: Any, path: str, classes: Iterable[str], extra_keys: Iterable[str] = ()) -> Link:
    """A ``{class, bandwidth, latency}`` mapping; ``extra_keys`` are fields the caller reads itself."""
    raw = _mapping(raw, path, _LINK_KEYS | set(extra_keys))
    return Link(parse_quantity(_required(raw, "latency", path), "time", f"{path}.latency"),
                parse_quantity(_required(raw, "bandwidth", path), "bandwidth", f"{path}.bandwidth"),
                _choice(_required(raw, "class", path), tuple(classes), f"{path}.class", "link class"))


def _link_collectives(raw: Mapping[str, Any], path: str) -> tuple[tuple[str, float, float], ...]:
    """The ``collectives: {kind: {latency, bandwidth}}`` of a link, as ``(kind, latency, bandwidth)``."""
    out = []
    for kind, body in _mapping(raw.get("collectives", {}), f"{path}.collectives").items():
        where = f"{path}.collectives.{kind}"
        if kind not in COLLECTIVE_KINDS:
            raise ClusterSpecError(where, f"unknown collective; expected one of {', '.join(COLLECTIVE_KINDS)}")
        body = _mapping(body, where, {"latency", "bandwidth"})
        out.append((str(kind), parse_quantity(_required(body, "latency", where), "time", f"{where}.latency"),
                    parse_quantity(_required(body, "bandwidth", where), "bandwidth", f"{where}.bandwidth")))
    return tuple(out)


def _per_phase(raw: Any, path: str, parse: Callable[[Any, str], float]) -> tuple[float, float]:
    """A ``{forward, backward}`` pair, or one value for both."""
    if isinstance(raw, Mapping):
        raw = _mapping(raw, path, _PHASES)
        return tuple(parse(_required(raw, phase, path), f"{path}.{phase}") for phase in _PHASES)  # type: ignore
    value = parse(raw, path)
    return value, value


def _efficiency_entry(raw: Any, path: str) -> tuple[tuple[float, float], tuple]:
    """``0.7``, ``{forward, backward}``, or that with ``by_flops: [[flops, forward, backward], ...]``."""
    if not isinstance(raw, Mapping) or "by_flops" not in raw:
        return _per_phase(raw, path, _positive_number), ()
    points = []
    for i, point in enumerate(_sequence(raw["by_flops"], f"{path}.by_flops")):
        where = f"{path}.by_flops[{i}]"
        point = _sequence(point, where)
        if len(point) != 3:
            raise ClusterSpecError(where, f"expected [flops, forward, backward], found {point!r}")
        points.append(tuple(_positive_number(v, f"{where}[{j}]") for j, v in enumerate(point)))
    rest = {k: v for k, v in raw.items() if k != "by_flops"}
    return _per_phase(rest, path, _positive_number), tuple(sorted(points))


def _fraction(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise ClusterSpecError(path, f"expected a number from 0 to 1, found {value!r}")
    return float(value)


def _positive_number(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ClusterSpecError(path, f"expected a positive number, found {value!r}")
    return float(value)


def _parse_nic(raw: Any, path: str) -> Nic:
    raw = _mapping(raw, path, _NIC_KEYS)
    return Nic(_choice(_required(raw, "type", path), NIC_TYPES, f"{path}.type", "NIC type"),
               _positive_int(raw.get("count", 1), f"{path}.count"),
               parse_quantity(_required(raw, "bandwidth", path), "bandwidth", f"{path}.bandwidth"),
               parse_quantity(_required(raw, "latency", path), "time", f"{path}.latency"))


def _square(raw: Any, path: str, size: int, parse_entry: Callable[[Any, str], Any]) -> tuple[tuple, ...]:
    """A ``size`` x ``size`` table; diagonal entries are ignored (a device reaches itself for free)."""
    rows = _sequence(raw, path)
    if len(rows) != size:
        raise ClusterSpecError(path, f"expected {size} rows (one per device), found {len(rows)}")
    table = []
    for i, row in enumerate(rows):
        row = _sequence(row, f"{path}[{i}]")
        if len(row) != size:
            raise ClusterSpecError(f"{path}[{i}]", f"expected {size} entries (one per device), found {len(row)}")
        table.append(tuple(None if i == j else parse_entry(v, f"{path}[{i}][{j}]") for j, v in enumerate(row)))
    return tuple(table)


def _mapping(raw: Any, path: str, allowed: Iterable[str] | None = None) -> Mapping[str, Any]:
    if raw is None and allowed is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ClusterSpecError(path, f"expected a mapping, found {type(raw).__name__} {raw!r}")
    if allowed is not None:
        unknown = sorted(set(map(str, raw)) - set(allowed))
        if unknown:
            where = f"{path}.{unknown[0]}" if path else unknown[0]
            raise ClusterSpecError(where, f"unknown field; expected one of {', '.join(sorted(allowed))}")
    return raw


def _sequence(raw: Any, path: str) -> list[Any]:
    if not isinstance(raw, (list, tuple)):
        raise ClusterSpecError(path, f"expected a list, found {type(raw).__name__} {raw!r}")
    return list(raw)


def _required(raw: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in raw or raw[key] is None:
        raise ClusterSpecError(f"{path}.{key}" if path else key, "missing required field")
    return raw[key]


def _positive_int(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ClusterSpecError(path, f"expected a positive integer, found {value!r}")
    return value


def _index(value: Any, size: int, path: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
        raise ClusterSpecError(path, f"expected a {what} index in 0..{size - 1}"
                                     f"{' or a node name' if what == 'node' else ''}, found {value!r}")
    return value


def _choice(value: Any, options: tuple[str, ...], path: str, what: str) -> str:
    if value not in options:
        raise ClusterSpecError(path, f"unknown {what} {value!r}; expected one of {', '.join(options)}")
    return value


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _link_dict(link: Link) -> dict[str, Any]:
    body: dict[str, Any] = {"class": link.link_class, "bandwidth": link.bandwidth_Bps, "latency": link.latency_s}
    if link.collectives:
        body["collectives"] = {kind: {"latency": latency, "bandwidth": bandwidth}
                               for kind, latency, bandwidth in link.collectives}
    return body


def _kind_dict(kind: DeviceKind) -> dict[str, Any]:
    body: dict[str, Any] = {"peak_flops": dict(kind.peak_flops), "memory": kind.memory_bytes}
    if kind.memory_bandwidth_Bps is not None:
        body["memory_bandwidth"] = kind.memory_bandwidth_Bps
    if kind.op_overhead_s is not None:
        body["op_overhead"] = dict(zip(_PHASES, kind.op_overhead_s))
    if kind.efficiency:
        body["efficiency"] = {key: dict(zip(_PHASES, pair)) for key, pair in kind.efficiency.items()}
        for key, curve in kind.efficiency_by_flops.items():
            body["efficiency"][key]["by_flops"] = [list(point) for point in curve]
    if kind.comm_overlap != 1.0:
        body["comm_overlap"] = kind.comm_overlap
    return body


def _node_dict(node: Node) -> dict[str, Any]:
    return {"name": node.name, "device": node.device_kind.name, "devices": node.num_devices,
            "intra_link": _link_dict(node.intra_link),
            "nics": [{"type": n.type, "count": n.count, "bandwidth": n.bandwidth_Bps, "latency": n.latency_s}
                     for n in node.nics],
            "region": node.region}


def _spec_dict(cluster: Cluster) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": cluster.name}
    if cluster.description:
        spec["description"] = cluster.description
    spec["device_kinds"] = {n.device_kind.name: _kind_dict(n.device_kind) for n in cluster.nodes}
    spec["nodes"] = [_node_dict(n) for n in cluster.nodes]
    if cluster.region_links:
        spec["inter_region"] = [{"regions": list(r.regions), "bandwidth": r.bandwidth_Bps, "latency": r.latency_s}
                                for r in cluster.region_links]
    if cluster.link_overrides:
        spec["link_overrides"] = [{o.scope: [o.a, o.b], **_link_dict(o.link)} for o in cluster.link_overrides]
    if cluster.matrix is not None:
        matrix = cluster.matrix
        spec["matrix"] = {"latency": [list(r) for r in matrix.latency_s],
                          "bandwidth": [list(r) for r in matrix.bandwidth_Bps]}
        if matrix.link_class is not None:
            spec["matrix"]["class"] = [list(r) for r in matrix.link_class]
    if cluster.metadata:
        spec["metadata"] = copy.deepcopy(cluster.metadata)
    return spec
