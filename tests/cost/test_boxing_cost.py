"""Boxing costs (cost/boxing.py): bytes at the real element size, seconds on a cluster, and which one the
boxing and propagation passes use."""
from __future__ import annotations

import pytest
import torch

from cluster import Cluster
from cost.boxing import (STEP_EPSILON_S, ClusterBoxingCost, axis_bytes, bytes_cost, collective_seconds,
                         mesh_boxing_cost)
from cost.collectives import collective_time
from cost.estimate import Estimator, _Groups
from cost.ops import Precision
from cost.segments import Profile
from ir.parser import parse
from ir.sbp import B, P, Split
from ir.types import Mesh, TensorType
from passes.boxing import boxing_cost, boxing_path, boxing_pass
from passes.manager import PassContext
from tests.ir.opinfos import MESHES
from tests.passes.test_boxing import check_conversion, nd_layouts

DGX2 = Cluster.load("dgx-a100:2")
DP2_TP8 = Mesh.make(["dp", "tp"], [2, 8])


def test_bytes_are_counted_at_the_element_size_of_the_dtype():
    mesh = Mesh.make(["dp", "tp"], [2, 4])
    layout = (Split(0), B)
    sizes = {dtype: axis_bytes(TensorType.of((8, 16), dtype), layout, mesh, 1)
             for dtype in (torch.float32, torch.int64, torch.bfloat16)}
    assert sizes[torch.float32] == 8 * 16 * 4 / 2  # split in two by dp, as the tp group sees it
    assert sizes[torch.int64] == 2 * sizes[torch.float32] and sizes[torch.bfloat16] == sizes[torch.float32] / 2
    assert bytes_cost("comm.all_gather", sizes[torch.int64], mesh, 1) > \
        bytes_cost("comm.all_gather", sizes[torch.float32], mesh, 1)


def test_the_cluster_cost_is_the_collective_time_on_every_group_with_the_backward_adjoint():
    forward, both = mesh_boxing_cost(DGX2, DP2_TP8, False), mesh_boxing_cost(DGX2, DP2_TP8, True)
    nbytes = 2**20
    gather = collective_time("all_gather", nbytes, tuple(range(8)), DGX2)
    scatter = collective_time("reduce_scatter", nbytes, tuple(range(8)), DGX2)
    assert forward("comm.all_gather", nbytes, DP2_TP8, 1) == pytest.approx(gather + STEP_EPSILON_S, rel=1e-12)
    assert both("comm.all_gather", nbytes, DP2_TP8, 1) == pytest.approx(gather + scatter + STEP_EPSILON_S, rel=1e-12)
    across_nodes = collective_time("all_reduce", nbytes, (0, 8), DGX2)
    assert forward("comm.all_reduce", nbytes, DP2_TP8, 0) == pytest.approx(across_nodes + STEP_EPSILON_S, rel=1e-12)
    assert forward("comm.slice", nbytes, DP2_TP8, 1) == STEP_EPSILON_S  # local: only the per-step tie-breaker
    # the two dp groups span both nodes alike, the tp groups of the two nodes too: one group priced per axis
    assert [len(g) for g in forward.groups] == [1, 1]


def test_an_all_reduce_costs_at_most_a_reduce_scatter_and_an_all_gather():
    """The collective model prices all three as NCCL's rings (the all-reduce's tree only across nodes), so
    the all-reduce never costs more than the pair it is made of, and boxing runs it as one collective."""
    group = tuple(range(4))
    for nbytes in (1024, 2**20, 2**30):
        halves = collective_time("reduce_scatter", nbytes, group, DGX2) + collective_time("all_gather", nbytes, group,
                                                                                          DGX2)
        assert collective_seconds("comm.all_reduce", nbytes, group, DGX2) <= halves * (1 + 1e-12)
    cost = mesh_boxing_cost(DGX2, Mesh.make(["tp"], [4]), True)
    _, steps = boxing_path(TensorType.of((16, 64), torch.float32), (P,), (B,), Mesh.make(["tp"], [4]), cost)
    assert [op for _, op, _, _ in steps] == ["comm.all_reduce"]  # one collective, not a scatter-gather pair


def test_slowest_group_counts_on_a_heterogeneous_cluster():
    cluster = Cluster.load("examples/clusters/hetero-a100-v100.yaml")
    mesh = Mesh.make(["dp", "tp"], [cluster.world_size // 8, 8])
    cost = mesh_boxing_cost(cluster, mesh, False)
    per_group = [collective_time("all_gather", 2**24, g, cluster) for g in cost.groups[1]]
    assert len(per_group) > 1 and len(set(per_group)) > 1  # A100 and V100 nodes differ
    assert cost("comm.all_gather", 2**24, mesh, 1) == pytest.approx(max(per_group) + STEP_EPSILON_S, rel=1e-12)


@pytest.mark.parametrize("key", sorted(MESHES))
def test_chains_chosen_by_time_keep_the_tensor(key: str):
    """The cluster cost picks other chains than bytes do, from the same conversions: all stay sound."""
    mesh = MESHES[key]
    cost = mesh_boxing_cost(Cluster.local(4), Mesh.make(mesh.axes, mesh.shape), True)
    for src in nd_layouts(2, mesh):
        for dst in nd_layouts(2, mesh, ("sum",)):
            check_conversion((12, 4), src, dst, mesh, seed=0, cost=cost)


GRAPH = """mesh world = [dp=2, tp=8] devices [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
graph G {
  input %x: f32[16, 16] (B, S(0)) @world
  %y: f32[16, 16] (S(0), B) @world = aten.relu.default(%x) {in_sbp = [(S(0), B)]}
  output %y
}
"""


def _boxed(cluster: Cluster | None) -> list[str]:
    graph = parse(GRAPH)  # %y waits for its input as (S(0), B), as propagation leaves it
    boxing_pass(graph, PassContext({}, 16, train=False, cluster=cluster))
    return [f"{n.op}({n.kwargs['axis']})" for n in graph.nodes if n.op.startswith("comm.")]


def test_the_boxing_pass_chooses_chains_by_the_clusters_cost():
    """(B, S(0)) -> (S(0), B) on dp=2 x tp=8: bytes favour an all-to-all first (fewer bytes, three
    collectives); on a cluster the time of each step's latency makes all-gather then slice cheaper."""
    assert _boxed(None) == ["comm.all_to_all(tp)", "comm.slice(dp)", "comm.all_gather(tp)"]
    assert _boxed(DGX2) == ["comm.all_gather(tp)", "comm.slice(dp)"]


def test_pass_context_picks_the_cost():
    mesh = DP2_TP8
    assert boxing_cost(PassContext({}, 16), mesh, True) is bytes_cost
    on_cluster = boxing_cost(PassContext({}, 16, cluster=DGX2), mesh, True)
    assert isinstance(on_cluster, ClusterBoxingCost) and on_cluster.backward
    assert not boxing_cost(PassContext({}, 16, train=False, cluster=DGX2), mesh, True).backward
    given = ClusterBoxingCost(DGX2, ((tuple(range(0, 16, 8)),), (tuple(range(8)),)))
    assert boxing_cost(PassContext({}, 16, options={"boxing_cost": given}, cluster=DGX2), mesh, True) is given


def test_groups_alike_in_links_but_not_in_devices_are_priced_apart():
    """Nodes with the same links whose devices pay different call overheads are not one kind of group: the
    estimator's slowest group (priced once per kind of group) is the slowest of every group."""
    node = {"devices": 4, "intra_link": {"class": "nvswitch", "bandwidth": "300GB/s", "latency": "2us"},
            "nics": [{"type": "infiniband", "count": 4, "bandwidth": "200Gb/s", "latency": "5us"}]}
    kinds = {name: {"peak_flops": {"fp32": "19.5TFLOPS"}, "memory": "80GiB", "memory_bandwidth": "2TB/s",
                    "collective_overhead": overhead} for name, overhead in (("quick", "5us"), ("slow", "60us"))}
    cluster = Cluster.from_dict({"name": "overheads", "device_kinds": kinds,
                                 "nodes": [{**node, "name": "quick", "device": "quick", "count": 2},
                                           {**node, "name": "slow", "device": "slow", "count": 2}]})
    nothing = Profile([], Mesh.make(["dp"], [1]), 1, 1, 1, True, Precision.of("fp32"))
    estimator = Estimator(nothing, cluster)
    groups = _Groups(tuple(range(n * 4, n * 4 + 4)) for n in range(4))
    for kind in ("all_reduce", "all_gather", "all_to_all"):
        every = [collective_time(kind, 2**12, g, cluster) for g in groups]
        assert len(set(every)) == 2
        assert estimator._slowest_group(kind, 2**12, groups) == max(every)
