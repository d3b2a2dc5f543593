"""Tests for the cluster package: built-ins, example files, round trips, validation, links and domains."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest

from cluster import (
    DEFAULT_HOST_ETHERNET_BANDWIDTH_BPS,
    Cluster,
    ClusterSpecError,
    Device,
    parse_quantity,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "clusters"
EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


def small_spec() -> dict:
    """Three 2-device CPU nodes, the third with InfiniBand: a valid base that the bad specs mutate."""
    node = {"device": "cpu", "devices": 2, "intra_link": {"class": "pcie", "bandwidth": "10GB/s", "latency": "2us"},
            "nics": [{"type": "ethernet", "count": 1, "bandwidth": "25Gb/s", "latency": "20us"}]}
    nodes = [copy.deepcopy(node) for _ in range(3)]
    nodes[2]["nics"].insert(0, {"type": "infiniband", "count": 2, "bandwidth": "200Gb/s", "latency": "5us"})
    return {"name": "small", "nodes": nodes}


# -- built-ins and files ----------------------------------------------------------------------------


def test_builtins_have_the_public_numbers():
    a100 = Cluster.load("dgx-a100:2")
    assert a100.world_size == 16 and len(a100.nodes) == 2
    device = a100.devices[9]
    assert device == a100.device(9) and device.node == 1 and device.local_index == 1
    assert device.peak_flops["bf16"] == 312e12 and device.peak_flops["fp16"] == 312e12
    assert device.peak_flops["fp32"] == 19.5e12 and device.memory_bytes == 80 * 2**30
    # calibrated, not data-sheet, figures (cluster/builtins.py cites each): NCCL's ring plateau on NVSwitch
    # (231.58 GB/s busbw at 8 GB, not the 300 GB/s line rate), ~24 GB/s per 200 Gb/s HDR NIC, one per GPU
    assert a100.link(0, 1).bandwidth_Bps == 231.58e9
    assert a100.link(0, 8).bandwidth_Bps == 24e9
    assert a100.link(0, 1).for_collective("all_reduce").busbw_by_size[-1] == (8 * 2**30, 231.58e9)
    assert device.efficiency_of("linear", "matmul", flops=2 * 8192**3)[0] == pytest.approx(253.7 / 312)

    h100 = Cluster.load("dgx-h100:1")
    assert h100.world_size == 8 and h100.devices[0].peak_flops["bf16"] == 989e12
    assert h100.link(0, 7).bandwidth_Bps == 370e9  # NVLink4 ring without NVLS (nccl-tests#212)

    # BLOOM's Jean Zay: the DGX A100's nodes inside, 4 x 100 Gb/s Omni-Path (12.2 GB/s each) shared by 8 GPUs
    jean_zay = Cluster.load("jean-zay:2")
    assert jean_zay.devices[0] == a100.devices[0] and jean_zay.link(0, 1) == a100.link(0, 1)
    assert jean_zay.link(0, 8).bandwidth_Bps == pytest.approx(4 * 12.2e9 / 8)

    local = Cluster.local(3)
    assert local.world_size == 3 and Cluster.load("local:3") == local
    assert local.link(0, 2).link_class == "loopback" and local.fast_domains() == [[0, 1, 2]]


def test_every_example_file_loads_and_round_trips(tmp_path):
    assert {p.name for p in EXAMPLE_FILES} >= {"dgx-a100-2.yaml", "hetero-ib-ethernet.yaml", "hetero-a100-v100.yaml",
                                               "two-regions.yaml", "pair-matrix.yaml", "h100-ethernet.yaml"}
    for path in EXAMPLE_FILES:
        cluster = Cluster.load(path)
        assert cluster.world_size > 0
        assert Cluster.from_dict(cluster.to_dict()) == cluster, path.name
        cluster.dump_yaml(tmp_path / path.name)
        assert Cluster.load(tmp_path / path.name) == cluster, path.name


@pytest.mark.parametrize("name", ["local:2", "dgx-a100:3", "dgx-h100:2", "jean-zay:2"])
def test_builtins_round_trip(name):
    cluster = Cluster.load(name)
    assert Cluster.from_dict(cluster.to_dict()) == cluster
    assert hash(Cluster.from_dict(cluster.to_dict())) == hash(cluster)


def test_written_out_dgx_file_equals_the_builtin():
    assert Cluster.load(EXAMPLES / "dgx-a100-2.yaml") == Cluster.load("dgx-a100:2")


def test_mixed_h100_example_prices_nodes_as_the_builtin_and_crosses_at_ethernet_speed():
    from cost.collectives import collective_time
    mixed, dgx = Cluster.load(EXAMPLES / "h100-ethernet.yaml"), Cluster.load("dgx-h100:2")
    for kind in ("all_reduce", "all_gather", "reduce_scatter"):
        for first in (0, 16):  # an InfiniBand node and an Ethernet-only node
            node = tuple(range(first, first + 8))
            assert collective_time(kind, 2**28, node, mixed) == pytest.approx(
                collective_time(kind, 2**28, tuple(range(8)), dgx), rel=1e-12), (kind, first)
    assert collective_time("all_reduce", 2**28, (0, 8), mixed) == pytest.approx(
        collective_time("all_reduce", 2**28, (0, 8), dgx), rel=1e-12)
    assert mixed.link(0, 16).link_class == "ethernet"
    assert collective_time("all_reduce", 2**28, (0, 16), mixed) > 5 * collective_time("all_reduce", 2**28, (0, 8), mixed)


def test_toml_files_load(tmp_path):
    path = tmp_path / "two.toml"
    path.write_text('name = "toml-pair"\n'
                    '[[nodes]]\ncount = 2\ndevice = "cpu"\ndevices = 1\n'
                    'intra_link = { class = "loopback", bandwidth = "2GB/s", latency = "50us" }\n'
                    'nics = [ { type = "roce", count = 1, bandwidth = "100Gb/s", latency = "8us" } ]\n')
    cluster = Cluster.load(path)
    assert cluster.world_size == 2 and cluster.link(0, 1) == cluster.link(1, 0)
    assert cluster.link(0, 1).link_class == "roce" and cluster.link(0, 1).bandwidth_Bps == 12.5e9


def test_unknown_builtin_or_missing_file_is_explained():
    with pytest.raises(ClusterSpecError, match="built-in cluster"):
        Cluster.load("dgx-b200:2")
    with pytest.raises(ClusterSpecError, match="positive count"):
        Cluster.load("dgx-a100:zero")


@pytest.mark.parametrize("text, kind, expected", [
    ("200Gb/s", "bandwidth", 25e9), ("600GB/s", "bandwidth", 600e9), ("80GiB", "bytes", 80 * 2**30),
    ("5us", "time", 5e-6), ("30ms", "time", 0.03), ("312TFLOPS", "flops", 312e12), ("1.5e9", "bandwidth", 1.5e9),
    (7, "bytes", 7.0), ("0", "time", 0.0),
])
def test_human_units(text, kind, expected):
    assert parse_quantity(text, kind) == pytest.approx(expected, rel=1e-12)


# -- validation ------------------------------------------------------------------------------------


def _set(path, value):
    """A mutation of small_spec(): set the value at ``path`` (list of keys / indices)."""
    def mutate(spec):
        target = spec
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def _delete(path):
    def mutate(spec):
        target = spec
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return mutate


BAD_SPECS = [
    # (mutation, field path named in the error, words the message must contain)
    (_set(["nodes", 2, "nics", 0, "bandwidth"], -5), "nodes[2].nics[0].bandwidth",
     "expected a positive number (bytes/s or a string like '200Gb/s'), found -5"),
    (_set(["nodes", 0, "intra_link", "bandwidth"], 0), "nodes[0].intra_link.bandwidth", "found 0"),
    (_set(["nodes", 1, "nics", 0, "latency"], "-3us"), "nodes[1].nics[0].latency", "non-negative"),
    (_delete(["nodes", 0, "device"]), "nodes[0].device", "missing required field"),
    (_set(["nodes", 0, "nics", 0, "type"], "myrinet"), "nodes[0].nics[0].type", "unknown NIC type 'myrinet'"),
    (_set(["link_overrides"], [{"devices": [0, 6], "class": "ethernet", "bandwidth": "1GB/s", "latency": "1us"}]),
     "link_overrides[0].devices[1]", "device index in 0..5"),
    (_set(["link_overrides"], [{"nodes": ["ghost", 1], "class": "ethernet", "bandwidth": "1GB/s", "latency": "1us"}]),
     "link_overrides[0].nodes[0]", "node index in 0..2"),
    (_set(["matrix"], {"latency": [[0] * 6] * 6, "bandwidth": [[1e9] * 6] * 5}), "matrix.bandwidth", "expected 6 rows"),
    (_set(["matrix"], {"latency": [[0, -1e-6] + [0] * 4] + [[0] * 6] * 5, "bandwidth": [[1e9] * 6] * 6}),
     "matrix.latency[0][1]", "non-negative"),
    (_set(["nodes", 0, "device"], "tpu-v9"), "nodes[0].device", "unknown device kind 'tpu-v9'"),
    (_set(["nodes", 0, "bandwith"], "1GB/s"), "nodes[0].bandwith", "unknown field"),
    (_set(["nodes", 0, "intra_link", "bandwidth"], "200Gb"), "nodes[0].intra_link.bandwidth", "'200Gb'"),
    (_set(["nodes", 1, "region"], "eu"), "inter_region", "regions 'default' and 'eu'"),
    (_set(["inter_region"], [{"regions": ["default", "mars"], "bandwidth": "1Gb/s", "latency": "1s"}]),
     "inter_region[0].regions[1]", "no node is in region 'mars'"),
    (_set(["nodes", 0, "devices"], 0), "nodes[0].devices", "positive integer"),
    (_set(["nodes", 1, "name"], "twin"), "nodes[1].name", None),  # paired with node 0 below
    (_set(["nodes", 0, "intra_link", "class"], "nvlink5"), "nodes[0].intra_link.class", "unknown link class"),
    (_set(["device_kinds"], {"npu": {"peak_flops": {"fp32": "-1TFLOPS"}, "memory": "16GiB"}}),
     "device_kinds.npu.peak_flops.fp32", "positive number"),
    (_set(["nodes"], []), "nodes", "at least one node"),
    (_set(["nodes", 2, "nics", 1, "type"], "infiniband"), "nodes[2].nics[1].type", "listed twice"),
    (_set(["device_kinds"], {"cpu2": {"peak_flops": {"fp32": 1e9}, "memory": "1GiB", "efficiency": {"matmul": 0}}}),
     "device_kinds.cpu2.efficiency.matmul", "positive number"),
    (_set(["device_kinds"], {"cpu2": {"peak_flops": {"fp32": 1e9}, "memory": "1GiB",
                                      "efficiency": {"gelu": {"forward": 0.5, "backwards": 0.4}}}}),
     "device_kinds.cpu2.efficiency.gelu.backwards", "unknown field"),
    (_set(["device_kinds"], {"cpu2": {"peak_flops": {"fp32": 1e9}, "memory": "1GiB", "op_overhead": "-2us"}}),
     "device_kinds.cpu2.op_overhead", "non-negative"),
    (_set(["device_kinds"], {"cpu2": {"peak_flops": {"fp32": 1e9}, "memory": "1GiB", "comm_overlap": 1.5}}),
     "device_kinds.cpu2.comm_overlap", "from 0 to 1"),
    (_set(["nodes", 0, "intra_link", "collectives"], {"allreduce": {"latency": "1us", "bandwidth": "1GB/s"}}),
     "nodes[0].intra_link.collectives.allreduce", "unknown collective"),
    (_set(["nodes", 0, "intra_link", "collectives"], {"all_reduce": {"latency": "1us"}}),
     "nodes[0].intra_link.collectives.all_reduce.bandwidth", "missing required field"),
    (_set(["nodes", 1, "cpu_cores"], 0), "nodes[1].cpu_cores", "positive integer"),
]


@pytest.mark.parametrize("mutate, path, words", BAD_SPECS, ids=[p for _, p, _ in BAD_SPECS])
def test_bad_specs_name_the_field(mutate, path, words):
    spec = small_spec()
    mutate(spec)
    if path == "nodes[1].name":
        spec["nodes"][0]["name"] = "twin"
        words = "duplicate node name 'twin'"
    with pytest.raises(ClusterSpecError) as caught:
        Cluster.from_dict(spec)
    assert caught.value.path == path
    assert str(caught.value).startswith(f"{path}: ")
    assert words in str(caught.value)


def test_the_base_spec_of_the_bad_specs_is_valid():
    cluster = Cluster.from_dict(small_spec())
    assert cluster.world_size == 6 and [n.name for n in cluster.nodes] == ["node0", "node1", "node2"]


# -- links, NICs, domains -------------------------------------------------------------------------


def test_dgx_link_classes():
    cluster = Cluster.load("dgx-a100:2")
    assert cluster.link(0, 7).link_class == "nvswitch"
    assert cluster.link(3, 12).link_class == "infiniband"
    assert cluster.link(5, 5).link_class == "self" and math.isinf(cluster.link(5, 5).bandwidth_Bps)
    assert cluster.node_of(12) == 1 and cluster.node_of(cluster.devices[3]) == 0
    assert cluster.nic_type(0) == "infiniband" and cluster.nic_type("node1") == "infiniband"
    assert cluster.domains("nvswitch") == [list(range(8)), list(range(8, 16))] == cluster.fast_domains()
    assert cluster.domains("infiniband") == [list(range(16))]
    with pytest.raises(IndexError, match="0..15"):
        cluster.link(0, 16)


def test_infiniband_and_ethernet_nodes_fall_back_to_ethernet():
    cluster = Cluster.load(EXAMPLES / "hetero-ib-ethernet.yaml")
    ib_a, ib_b, eth_a, eth_b = 0, 8, 32, 40  # first devices of ib-0, ib-1, eth-0, eth-1
    assert cluster.link(ib_a, ib_b).link_class == "infiniband"
    assert cluster.link(ib_a, ib_b).bandwidth_Bps == 25e9
    fallback = cluster.link(ib_a, eth_a)
    assert fallback.link_class == "ethernet" and fallback.bandwidth_Bps == 2 * 12.5e9 / 8
    assert cluster.link(eth_a, eth_b) == fallback
    assert cluster.nic_type("ib-0") == "infiniband" and cluster.nic_type("eth-3") == "ethernet"
    assert cluster.domains("infiniband")[0] == list(range(32))


def test_nodes_without_a_listed_common_nic_use_host_ethernet():
    spec = small_spec()
    spec["nodes"][0]["nics"] = [{"type": "roce", "count": 1, "bandwidth": "100Gb/s", "latency": "8us"}]
    cluster = Cluster.from_dict(spec)
    assert cluster.link(0, 4).link_class == "ethernet"
    assert cluster.link(0, 4).bandwidth_Bps == DEFAULT_HOST_ETHERNET_BANDWIDTH_BPS / 2


def test_mixed_generations_share_the_slower_nics():
    cluster = Cluster.load(EXAMPLES / "hetero-a100-v100.yaml")
    a100, v100 = cluster.devices[0], cluster.devices[16]
    assert a100.kind == "a100-80gb" and v100.kind == "v100-32gb"
    assert v100.peak_flops == {"fp32": 15.7e12, "fp16": 125e12} and v100.memory_bytes == 32 * 2**30
    assert cluster.link(16, 17).link_class == "nvlink" and cluster.link(16, 17).bandwidth_Bps == 150e9
    assert cluster.link(0, 16).bandwidth_Bps == 4 * 100e9 / 8 / 8  # four EDR NICs shared by eight V100s


def test_regions_are_joined_by_the_wan():
    cluster = Cluster.load(EXAMPLES / "two-regions.yaml")
    inside, across = cluster.link(0, 31), cluster.link(0, 32)
    assert inside.link_class == "infiniband"
    assert across.link_class == "wan"
    assert across.latency_s == pytest.approx(5e-6 + 30e-3) and across.bandwidth_Bps == 10e9 / 8
    assert cluster.domains("infiniband") == [list(range(32)), list(range(32, 64))]
    assert cluster.domains("wan") == [list(range(64))]


def test_pair_matrix_overrides_the_topology():
    cluster = Cluster.load(EXAMPLES / "pair-matrix.yaml")
    assert cluster.link(0, 1).bandwidth_Bps == 22e9 and cluster.link(0, 1).link_class == "pcie"
    assert cluster.link(0, 3).latency_s == pytest.approx(47e-6) and cluster.link(0, 3).link_class == "ethernet"
    assert cluster.link(2, 3).bandwidth_Bps == 21e9 and cluster.link(3, 2).bandwidth_Bps == 21e9
    assert cluster.fast_domains() == [[0, 1], [2, 3]]


def test_overrides_take_precedence():
    spec = small_spec()
    spec["link_overrides"] = [
        {"nodes": ["node0", "node1"], "class": "roce", "bandwidth": "40GB/s", "latency": "3us"},
        {"devices": [0, 2], "class": "ethernet", "bandwidth": "1GB/s", "latency": "90us"},
    ]
    cluster = Cluster.from_dict(spec)
    assert cluster.link(1, 3).link_class == "roce" and cluster.link(3, 1).bandwidth_Bps == 40e9
    assert cluster.link(2, 0).link_class == "ethernet" and cluster.link(0, 2).latency_s == 90e-6
    assert cluster.link(0, 4).link_class == "ethernet"  # untouched node pair
    assert Cluster.from_dict(cluster.to_dict()) == cluster
    # 0-2 is slow, so 2 cannot join 0's group; every pair inside a group is roce or faster
    assert cluster.domains("roce") == [[0, 1, 3], [2], [4, 5]]


def test_devices_are_plain_data():
    cluster = Cluster.local(2)
    assert cluster.devices == [Device(0, 0, "cpu", dict(cluster.devices[0].peak_flops), cluster.devices[0].memory_bytes,
                                      cluster.devices[0].memory_bandwidth_Bps, 0),
                               cluster.devices[1]]
    cluster.devices.clear()  # a copy: the cluster is unchanged
    assert cluster.world_size == 2


def test_names_made_by_count_must_not_clash():
    spec = small_spec()
    spec["nodes"][0].update(name="gpu", count=2)
    spec["nodes"][1]["name"] = "gpu-1"
    with pytest.raises(ClusterSpecError) as caught:
        Cluster.from_dict(spec)
    assert caught.value.path == "nodes[1].name" and "duplicate node name 'gpu-1'" in str(caught.value)


def test_measured_device_and_link_figures_load_and_round_trip():
    spec = small_spec()
    spec["device_kinds"] = {"cpu-measured": {
        "peak_flops": {"fp32": "100GFLOPS"}, "memory": "8GiB", "memory_bandwidth": "10GB/s",
        "op_overhead": {"forward": "3us", "backward": "5us"},
        "efficiency": {"matmul": {"forward": 0.7, "backward": 0.6}, "gelu": 0.5}, "comm_overlap": 0.3}}
    spec["nodes"][0]["device"] = "cpu-measured"
    spec["nodes"][0]["intra_link"]["collectives"] = {"all_reduce": {"latency": "300us", "bandwidth": "0.5GB/s"}}
    cluster = Cluster.from_dict(spec)
    device = cluster.devices[0]
    assert device.op_overhead_s == (3e-6, 5e-6) and device.comm_overlap == 0.3
    assert device.efficiency_of("linear", "matmul") == (0.7, 0.6)
    assert device.efficiency_of("gelu", "elementwise") == (0.5, 0.5)
    assert device.efficiency_of("add", "elementwise") == (1.0, 1.0)  # unlisted: the roofline
    assert cluster.devices[-1].efficiency == {}  # other kinds list nothing
    link = cluster.link(0, 1)
    assert link.for_collective("all_reduce").latency_s == pytest.approx(300e-6)
    assert link.for_collective("all_reduce").bandwidth_Bps == pytest.approx(0.5e9)
    assert link.for_collective("all_gather") is link
    assert Cluster.from_dict(cluster.to_dict()) == cluster


def test_efficiency_measured_at_several_sizes_is_read_at_the_op_size():
    spec = small_spec()
    spec["device_kinds"] = {"cpu-measured": {
        "peak_flops": {"fp32": "100GFLOPS"}, "memory": "8GiB",
        "efficiency": {"matmul": {"forward": 0.7, "backward": 0.6,
                                  "by_flops": [[1e9, 0.8, 0.7], [1e7, 0.4, 0.3]]}}}}
    spec["nodes"][0]["device"] = "cpu-measured"
    cluster = Cluster.from_dict(spec)
    device = cluster.devices[0]
    assert device.efficiency_of("linear", "matmul") == (0.7, 0.6)  # no size given: the overall figure
    assert device.efficiency_of("matmul", flops=1e7) == (0.4, 0.3)
    assert device.efficiency_of("matmul", flops=1e8) == pytest.approx((0.6, 0.5))  # halfway in log FLOPs
    assert device.efficiency_of("matmul", flops=1e5) == (0.4, 0.3)  # beyond the measured range: the ends
    assert device.efficiency_of("matmul", flops=1e12) == (0.8, 0.7)
    assert Cluster.from_dict(cluster.to_dict()) == cluster
    spec["device_kinds"]["cpu-measured"]["efficiency"]["matmul"]["by_flops"] = [[1e9, 0.8]]
    with pytest.raises(ClusterSpecError, match=r"by_flops\[0\]: expected \[flops, forward, backward\]"):
        Cluster.from_dict(spec)


def test_ranks_beyond_the_host_cores_take_turns_on_them():
    """A node whose CPU ranks outnumber its ``cpu_cores`` computes at cores / ranks of the kind's speed (peak
    FLOP/s and memory bandwidth times it, dispatch overhead divided by it); with cores enough, or none said, at
    the kind's own; the field round-trips."""
    spec = small_spec()
    spec["device_kinds"] = {"cpu-measured": {"peak_flops": {"fp32": "100GFLOPS"}, "memory": "8GiB",
                                             "memory_bandwidth": "10GB/s", "op_overhead": "3us"}}
    spec["nodes"] = spec["nodes"][:2]
    for node, devices, cores in zip(spec["nodes"], (4, 2), (2, 2)):
        node.update(device="cpu-measured", devices=devices, cpu_cores=cores)
    cluster = Cluster.from_dict(spec)
    shared, alone = cluster.devices[0], cluster.devices[4]
    assert [n.compute_share for n in cluster.nodes] == [0.5, 1.0]
    assert shared.peak_flops["fp32"] == pytest.approx(50e9) and shared.memory_bandwidth_Bps == pytest.approx(5e9)
    assert shared.op_overhead_s == pytest.approx((6e-6, 6e-6))
    assert alone.peak_flops["fp32"] == pytest.approx(100e9) and alone.op_overhead_s == pytest.approx((3e-6, 3e-6))
    assert cluster.nodes[0].device_kind.peak_flops["fp32"] == pytest.approx(100e9)  # the kind keeps its own
    assert Cluster.from_dict(cluster.to_dict()) == cluster and cluster.to_dict()["nodes"][0]["cpu_cores"] == 2
    del spec["nodes"][0]["cpu_cores"]
    unsaid = Cluster.from_dict(spec)
    assert unsaid.devices[0].peak_flops == alone.peak_flops and "cpu_cores" not in unsaid.to_dict()["nodes"][0]
