"""Cluster specs: reading YAML/TOML files and dicts into a :class:`~cluster.model.Cluster`, and writing them.

Files accept human units ("200Gb/s", "600GB/s", "80GiB", "5us", "312TFLOPS"); :func:`spec_dict`
writes plain numbers in base units (bytes, bytes/s, seconds, FLOP/s). Every inconsistency raises
:class:`~cluster.model.ClusterSpecError` naming the offending field path. The format is documented in
``docs/clusters.md``.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import numbers
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from cluster.builtins import BUILTINS, DEVICE_KIND_SPECS
from cluster.model import (COLLECTIVE_KINDS, DTYPES, INTRA_NODE_CLASSES, LINK_CLASSES, NIC_TYPES, Cluster,
                           ClusterSpecError, CollectivePerf, DeviceKind, Link, LinkOverride, Nic, Node, PairMatrix,
                           RegionLink)

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
# Loading
# --------------------------------------------------------------------------------------------------


def load_spec(name_or_path: str | Path) -> dict[str, Any]:
    """The spec of a built-in (``local:N``, ``dgx-a100:N``, ``dgx-h100:N``) or of a YAML/TOML file."""
    text = str(name_or_path)
    builtin, _, count = text.partition(":")
    if builtin in BUILTINS and not Path(text).exists():
        return BUILTINS[builtin](_builtin_count(text, count))
    path = Path(text)
    if not path.is_file():
        raise ClusterSpecError("", f"expected a built-in cluster ({', '.join(k + ':N' for k in BUILTINS)}) "
                                   f"or a YAML/TOML file, found {text!r} (no such file)")
    return _read_spec_file(path)


def parse_spec(spec: Mapping[str, Any]) -> Cluster:
    """Build and validate a cluster from a spec dict."""
    return _SpecParser(spec).parse()


def dump_yaml(cluster: Cluster, path: str | Path) -> None:
    """Write ``cluster``'s spec (:func:`spec_dict`) as YAML to ``path``."""
    Path(path).write_text(yaml.safe_dump(spec_dict(cluster), sort_keys=False))


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
_NODE_KEYS = {"name", "count", "device", "devices", "intra_link", "nics", "region", "cpu_cores"}
_LINK_KEYS = {"class", "bandwidth", "latency"}
_NIC_KEYS = {"type", "count", "bandwidth", "latency"}
_KIND_KEYS = {"peak_flops", "memory", "memory_bandwidth", "op_overhead", "efficiency", "comm_overlap",
              "collective_overhead"}
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
        kinds = dict(builtin_device_kinds())
        for name, body in _mapping(raw, "device_kinds").items():
            kinds[str(name)] = parse_device_kind(str(name), body, f"device_kinds.{name}")
        return kinds

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
                nodes.append(dataclasses.replace(template, name=name))
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
        cores = _positive_int(entry["cpu_cores"], f"{path}.cpu_cores") if entry.get("cpu_cores") is not None else None
        return Node("", kinds[kind_name], num_devices, intra, tuple(nics), str(entry.get("region", "default")), cores)

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


def parse_device_kind(name: str, body: Any, path: str) -> DeviceKind:
    """A ``device_kinds`` entry (``peak_flops``, ``memory``, ...) as a :class:`DeviceKind`; errors name ``path``."""
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
    collective = parse_quantity(body.get("collective_overhead", 0.0), "time", f"{path}.collective_overhead")
    return DeviceKind(name, flops, memory, bandwidth, op_overhead_s=overhead, efficiency=efficiency,
                      efficiency_by_flops=curves, comm_overlap=overlap, collective_overhead_s=collective)


@functools.lru_cache(maxsize=1)
def builtin_device_kinds() -> dict[str, DeviceKind]:
    """The device kinds a spec may name without defining them (:data:`cluster.builtins.DEVICE_KIND_SPECS`)."""
    return {name: parse_device_kind(name, body, f"built-in device kind {name}")
            for name, body in DEVICE_KIND_SPECS.items()}


def _parse_link(raw: Any, path: str, classes: Iterable[str], extra_keys: Iterable[str] = ()) -> Link:
    """A ``{class, bandwidth, latency}`` mapping; ``extra_keys`` are fields the caller reads itself."""
    raw = _mapping(raw, path, _LINK_KEYS | set(extra_keys))
    return Link(parse_quantity(_required(raw, "latency", path), "time", f"{path}.latency"),
                parse_quantity(_required(raw, "bandwidth", path), "bandwidth", f"{path}.bandwidth"),
                _choice(_required(raw, "class", path), tuple(classes), f"{path}.class", "link class"))


def _link_collectives(raw: Mapping[str, Any], path: str) -> tuple[CollectivePerf, ...]:
    """The ``collectives: {kind: {latency, bandwidth, busbw, ranks}}`` of a link."""
    out = []
    for kind, body in _mapping(raw.get("collectives", {}), f"{path}.collectives").items():
        where = f"{path}.collectives.{kind}"
        if kind not in COLLECTIVE_KINDS:
            raise ClusterSpecError(where, f"unknown collective; expected one of {', '.join(COLLECTIVE_KINDS)}")
        body = _mapping(body, where, {"latency", "bandwidth", "busbw", "ranks"})
        curve = _busbw_curve(body["busbw"], f"{where}.busbw") if body.get("busbw") is not None else ()
        if not curve and body.get("bandwidth") is None:
            raise ClusterSpecError(f"{where}.bandwidth", "missing required field (or give busbw: [[bytes, bus "
                                                         "bandwidth], ...] measured on `ranks` ranks)")
        if curve and "ranks" not in body:
            raise ClusterSpecError(f"{where}.ranks", "missing required field (the ranks busbw was measured on)")
        ranks = _positive_int(body["ranks"], f"{where}.ranks") if curve else 0
        if curve and ranks < 2:
            raise ClusterSpecError(f"{where}.ranks", f"expected 2 or more ranks, found {ranks}")
        latency = body.get("latency")
        bandwidth = body.get("bandwidth")
        out.append(CollectivePerf(
            str(kind), None if latency is None else parse_quantity(latency, "time", f"{where}.latency"),
            None if bandwidth is None else parse_quantity(bandwidth, "bandwidth", f"{where}.bandwidth"),
            curve, ranks))
    return tuple(out)


def _busbw_curve(raw: Any, path: str) -> tuple[tuple[float, float], ...]:
    """``[[bytes, bus bandwidth], ...]`` with strictly increasing sizes."""
    points = []
    for i, point in enumerate(_sequence(raw, path)):
        where = f"{path}[{i}]"
        point = _sequence(point, where)
        if len(point) != 2:
            raise ClusterSpecError(where, f"expected [bytes, bus bandwidth], found {point!r}")
        points.append((parse_quantity(point[0], "bytes", f"{where}[0]"),
                       parse_quantity(point[1], "bandwidth", f"{where}[1]")))
    if not points:
        raise ClusterSpecError(path, "expected at least one [bytes, bus bandwidth] point, found none")
    sizes = [size for size, _ in points]
    if sizes != sorted(set(sizes)):
        raise ClusterSpecError(path, f"expected strictly increasing sizes, found {sizes}")
    return tuple(points)


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
        body["collectives"] = {perf.kind: _collective_dict(perf) for perf in link.collectives}
    return body


def _collective_dict(perf: CollectivePerf) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if perf.latency_s is not None:
        body["latency"] = perf.latency_s
    if perf.bandwidth_Bps is not None:
        body["bandwidth"] = perf.bandwidth_Bps
    if perf.busbw_by_size:
        body["busbw"] = [list(point) for point in perf.busbw_by_size]
        body["ranks"] = perf.ranks
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
    if kind.collective_overhead_s:
        body["collective_overhead"] = kind.collective_overhead_s
    return body


def _node_dict(node: Node) -> dict[str, Any]:
    body = {"name": node.name, "device": node.device_kind.name, "devices": node.num_devices,
            "intra_link": _link_dict(node.intra_link),
            "nics": [{"type": n.type, "count": n.count, "bandwidth": n.bandwidth_Bps, "latency": n.latency_s}
                     for n in node.nics],
            "region": node.region}
    if node.cpu_cores is not None:
        body["cpu_cores"] = node.cpu_cores
    return body


def spec_dict(cluster: Cluster) -> dict[str, Any]:
    """The spec of ``cluster`` as plain data in base units (``parse_spec(spec_dict(c)) == c``)."""
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
