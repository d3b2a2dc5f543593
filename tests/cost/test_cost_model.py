"""Tests for cost/collectives.py, cost/ops.py and cost/memory.py: collectives over real links, op
FLOPs/bytes, memory formulas."""
from __future__ import annotations

from pathlib import Path

import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from cluster import Cluster
from cost.collectives import (best_algorithm, collective_cost, collective_time, collective_traffic, curve_seconds,
                              p2p_time)
from cost.memory import MemoryEstimate, in_flight_microbatches, megatron_activation_bytes, param_memory
from cost.ops import (op_backward_bytes, op_backward_flops, op_bytes, op_category, op_flops, op_time,
                      weight_gradient_share)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "clusters"
GiB = 2**30
MiB = 2**20
NCCL_CALL = 6.6e-6                 # dgx-a100: NCCL's base latency per collective call (cluster/builtins.py)
NVSWITCH_STEP = 2.6e-6             # per-step latency on NVSwitch
IB_NIC, IB_HOP = 24e9, 4e-6         # ~24 GB/s per HDR NIC, one per GPU; NCCL's LL128 network hop
# nccl-tests all_reduce bus bandwidth of 8 A100s by size (CALIBRATION.md 5b), what the built-in carries
A100_BUSBW = {1 * MiB: 36.22e9, 16 * MiB: 109.22e9, 64 * MiB: 166.63e9, 256 * MiB: 213.87e9, 1 * GiB: 228.10e9,
              8 * GiB: 231.58e9}


@pytest.fixture(scope="module")
def dgx2() -> Cluster:
    return Cluster.load("dgx-a100:2")


# -- collectives ------------------------------------------------------------------------------------


@pytest.mark.parametrize("nbytes", sorted(A100_BUSBW))
def test_an_all_reduce_on_one_dgx_costs_what_nccl_tests_measured(dgx2, nbytes):
    """The calibration point itself: 8 ranks at a measured size give the measured bus bandwidth."""
    seconds = collective_time("all_reduce", nbytes, list(range(8)), dgx2, "ring")
    assert 2 * 7 / 8 * nbytes / seconds == pytest.approx(A100_BUSBW[nbytes], rel=1e-9)
    traffic = collective_traffic("all_reduce", nbytes, list(range(8)), dgx2, "ring")
    assert traffic == {"nvswitch": pytest.approx(2 * 7 * nbytes)}  # 8 links x 2(p-1)/p x n


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(1.0, 1e10), st.floats(1e-6, 1.0)), min_size=2, max_size=8,
                unique_by=lambda point: point[0]),
       st.floats(0.0, 1.0))
def test_a_busbw_curve_costs_each_measured_size_its_time_and_sizes_between_them_between(raw, where):
    """Whatever the measured points, a measured size costs its measured time and a size between two measured
    ones costs between their times (bandwidths interpolated between very different points once priced sizes
    under both neighbours)."""
    points = sorted(raw)
    seconds = [size / busbw for size, busbw in points]
    for (size, busbw), t in zip(points, seconds):
        assert curve_seconds(tuple(points), size) == pytest.approx(t, rel=1e-9)
    k = min(int(where * (len(points) - 1)), len(points) - 2)
    (x0, _), (x1, _) = points[k], points[k + 1]
    inside = curve_seconds(tuple(points), x0 + where * (x1 - x0))
    assert min(seconds[k], seconds[k + 1]) * (1 - 1e-9) <= inside <= max(seconds[k], seconds[k + 1]) * (1 + 1e-9)


def test_mid_size_messages_reach_well_under_the_plateau(dgx2):
    """NCCL's protocols and channels change with the size: a 16 MB all-reduce runs at under half the
    busbw of a 1 GB one (a latency + size / bandwidth model would put it within a few percent)."""
    def busbw(n):
        return 2 * 7 / 8 * n / collective_time("all_reduce", n, list(range(8)), dgx2)
    assert busbw(16 * MiB) < 0.5 * busbw(1 * GiB)


@pytest.mark.parametrize("ranks", [2, 4])
def test_smaller_groups_move_the_same_bytes_per_hop_at_the_same_rate(dgx2, ranks):
    """Fewer ranks: fewer latency steps, the bus factor of their size, the curve's data rate."""
    n = 100e6
    eight = collective_time("all_reduce", n, list(range(8)), dgx2)
    moving = eight - NCCL_CALL - 14 * NVSWITCH_STEP
    expected = NCCL_CALL + 2 * (ranks - 1) * NVSWITCH_STEP + moving * (2 * (ranks - 1) / ranks) / (2 * 7 / 8)
    assert collective_time("all_reduce", n, list(range(ranks)), dgx2) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("kind", ["all_gather", "reduce_scatter"])
def test_an_all_reduce_costs_its_reduce_scatter_and_all_gather_in_one_call(dgx2, kind):
    """Ring all-reduce = reduce-scatter + all-gather in steps and bytes, less one call's base latency (the
    model prices all three as rings, as NCCL runs them, so no all-reduce needs bounding by a split)."""
    n = 64 * MiB
    halves = collective_time("reduce_scatter", n, list(range(8)), dgx2) + \
        collective_time("all_gather", n, list(range(8)), dgx2)
    assert collective_time("all_reduce", n, list(range(8)), dgx2) == pytest.approx(halves - NCCL_CALL, rel=1e-9)
    assert collective_time(kind, n, list(range(8)), dgx2) == pytest.approx(halves / 2, rel=1e-9)


def test_a_ring_across_nodes_runs_a_channel_per_nic(dgx2):
    """Two full DGX nodes: NCCL's rings cross between the nodes on all 8 NICs at once, so the ring's
    bus bandwidth is 8 x 24 GB/s (AddyLaddy measured 192 GB/s, nccl#812); one device per node has one NIC."""
    n, p = 1 * GiB, 16
    cost = collective_cost("all_reduce", n, list(range(16)), dgx2, "ring")
    latency = NCCL_CALL + (2 * (p - 1) - 2) * NVSWITCH_STEP + 2 * IB_HOP
    assert cost.time_s == pytest.approx(latency + 2 * (p - 1) / p * n / (8 * IB_NIC), rel=1e-9)
    assert cost.traffic["infiniband"] == pytest.approx(2 * 2 * (p - 1) / p * n)  # two ring hops cross nodes
    rail = collective_time("all_reduce", n, [0, 8], dgx2, "ring")
    assert rail == pytest.approx(NCCL_CALL + 2 * IB_HOP + n / IB_NIC, rel=1e-9)


def test_ring_order_groups_devices_by_node(dgx2):
    interleaved = [0, 8, 1, 9, 2, 10, 3, 11]
    grouped = [0, 1, 2, 3, 8, 9, 10, 11]
    assert collective_traffic("all_gather", 2**20, interleaved, dgx2, "ring") == \
        collective_traffic("all_gather", 2**20, grouped, dgx2, "ring")
    assert collective_time("all_gather", 2**20, interleaved, dgx2) == collective_time("all_gather", 2**20, grouped, dgx2)


def test_the_tree_shortens_latency_across_many_nodes():
    """NCCL's tree: 2 (chain + log2 N) latencies instead of the ring's 2(p-1); the same bus bandwidth at
    half the algorithm bandwidth, so large messages stay on the ring."""
    cluster = Cluster.load("dgx-a100:32")
    rails = list(range(0, 256, 8))  # one device on each of 32 nodes
    assert best_algorithm("all_reduce", 1024, rails, cluster) == "tree"
    tree = collective_time("all_reduce", 1024, rails, cluster, "tree")
    assert tree == pytest.approx(NCCL_CALL + 2 * 5 * IB_HOP + 2 * 1024 / IB_NIC, rel=1e-9)
    assert best_algorithm("all_reduce", 1 * GiB, rails, cluster) == "ring"
    one_node = list(range(8))
    assert best_algorithm("all_reduce", 1024, one_node, cluster) == "ring"  # NCCL's tree runs between nodes
    auto = collective_time("all_reduce", 2**20, rails, cluster)
    assert auto == min(collective_time("all_reduce", 2**20, rails, cluster, a) for a in ("ring", "tree"))


def test_infiniband_to_ethernet_traffic_uses_ethernet():
    cluster = Cluster.load(EXAMPLES / "hetero-ib-ethernet.yaml")
    mixed = [0, 1, 32, 33]  # two devices of ib-0 and two of eth-0
    traffic = collective_traffic("all_gather", 2**24, mixed, cluster, "ring")
    assert set(traffic) == {"nvswitch", "ethernet"}
    ib_only = collective_time("all_gather", 2**24, [0, 1, 8, 9], cluster, "ring")
    assert collective_time("all_gather", 2**24, mixed, cluster, "ring") > 5 * ib_only


def test_crossing_regions_pays_the_wan():
    cluster = Cluster.load(EXAMPLES / "two-regions.yaml")
    across = collective_cost("all_reduce", 1024, [0, 32], cluster)
    assert across.time_s >= 30e-3 and set(across.traffic) == {"wan"}
    assert collective_time("all_reduce", 1024, [0, 8], cluster) < 1e-3


def test_point_to_point(dgx2):
    assert p2p_time(2**20, 0, 9, dgx2) == pytest.approx(IB_HOP + 2**20 / IB_NIC)
    assert collective_time("send_recv", 2**20, [0, 9], dgx2) == p2p_time(2**20, 0, 9, dgx2)
    assert collective_traffic("send_recv", 2**20, [3, 4], dgx2) == {"nvswitch": 2**20}
    with pytest.raises(ValueError, match=r"\[src, dst\]"):
        collective_time("send_recv", 8, [0, 1, 2], dgx2)


def test_local_all_to_all_and_broadcast_formulas():
    cluster = Cluster.local(4)
    link = cluster.link(0, 1)
    n, p = 2**22, 4
    assert collective_time("all_to_all", n, [0, 1, 2, 3], cluster, "ring") == \
        pytest.approx((p - 1) * (link.latency_s + n / p / link.bandwidth_Bps))
    traffic = collective_traffic("all_to_all", n, [0, 1, 2, 3], cluster, "ring")
    assert traffic == {"loopback": pytest.approx((p - 1) * n)}
    assert collective_time("broadcast", n, [0, 1, 2, 3], cluster, "ring") == \
        pytest.approx((p - 1) * link.latency_s + n / link.bandwidth_Bps)


def _measured_local(n: int, measured: dict) -> Cluster:
    spec = Cluster.local(n).to_dict()
    spec["nodes"][0]["intra_link"]["collectives"] = measured
    return Cluster.from_dict(spec)


def test_collectives_use_their_measured_link_figures():
    """Calibrated gloo collectives: each kind is priced by its own measured latency and bandwidth."""
    cluster = _measured_local(4, {"all_reduce": {"latency": 4e-4, "bandwidth": 7e8},
                                  "send_recv": {"latency": 1e-4, "bandwidth": 3e9}})
    n, p = 2**22, 4
    assert collective_time("all_reduce", n, [0, 1, 2, 3], cluster, "ring") == \
        pytest.approx(2 * (p - 1) * (4e-4 + n / p / 7e8))
    assert p2p_time(n, 0, 1, cluster) == pytest.approx(1e-4 + n / 3e9)
    plain = Cluster.local(4)  # kinds without measurements keep the link's own figures
    assert collective_time("all_gather", n, [0, 1, 2, 3], cluster, "ring") == \
        collective_time("all_gather", n, [0, 1, 2, 3], plain, "ring")
    assert collective_traffic("all_reduce", n, [0, 1], cluster) == collective_traffic("all_reduce", n, [0, 1], plain)


def test_trivial_collectives_are_free(dgx2):
    assert collective_time("all_reduce", 2**20, [5], dgx2) == 0.0
    assert collective_time("all_gather", 0, [0, 9], dgx2) == 0.0
    assert collective_traffic("all_reduce", 2**20, [5], dgx2) == {}


@pytest.mark.parametrize("args, words", [
    (("all_reduce_v", 8, [0, 1], "auto"), "collective kind"),
    (("all_reduce", 8, [0, 1], "butterfly"), "algorithm"),
    (("all_reduce", 8, [0, 0], "auto"), "distinct devices"),
    (("all_to_all", 8, [0, 1, 8, 9], "tree"), "not for all_to_all"),
    (("all_reduce", 8, [0, 1, 2], "tree"), "two or more nodes"),
    (("all_reduce", -1, [0, 1], "auto"), "non-negative"),
])
def test_collective_errors_explain(dgx2, args, words):
    kind, nbytes, devices, algorithm = args
    with pytest.raises(ValueError, match=words):
        collective_time(kind, nbytes, devices, dgx2, algorithm)


# -- op FLOPs and bytes ---------------------------------------------------------------------------

batch, seq, heads, head_dim = sympy.symbols("batch seq heads head_dim", positive=True)


def test_linear_flops_are_symbolic():
    flops = op_flops("aten.linear.default", [(batch, seq, 768), (3072, 768), (3072,)], [(batch, seq, 3072)])
    assert sympy.simplify(flops - 2 * batch * seq * 768 * 3072) == 0
    assert op_flops("aten.linear.default", [(batch, seq, 768), (3072, 768)], []) == flops  # output inferred
    backward = op_backward_flops("aten.linear.default", [(batch, seq, 768), (3072, 768)], [])
    assert sympy.simplify(backward - 2 * flops) == 0


def test_a_matmul_runs_only_the_backward_products_its_factors_need():
    """A first layer's input (the data) gets no gradient: only the weight's product runs, all of it weight gradient;
    a frozen weight's layer runs only the input's; addmm's factors follow its added term."""
    shapes, out = [(batch, seq, 768), (3072, 768), (3072,)], [(batch, seq, 3072)]
    flops, nbytes = op_flops("aten.linear.default", shapes, out), op_bytes("aten.linear.default", shapes, out)
    data_in = (False, True, True)
    assert sympy.simplify(op_backward_flops("aten.linear.default", shapes, out, grad_inputs=data_in) - flops) == 0
    assert sympy.simplify(op_backward_bytes("aten.linear.default", shapes, out, grad_inputs=data_in) - nbytes) == 0
    params = (False, True, True)
    assert weight_gradient_share("aten.linear.default", params) == 0.5
    assert weight_gradient_share("aten.linear.default", params, data_in) == 1.0
    assert weight_gradient_share("aten.linear.default", params, (True, False, False)) == 0.0
    addmm = [(3072,), (batch * seq, 768), (768, 3072)]
    assert sympy.simplify(op_backward_flops("aten.addmm.default", addmm, [(batch * seq, 3072)],
                                            grad_inputs=(True, False, True)) - flops) == 0


def test_sdpa_flops():
    q = (batch, heads, seq, head_dim)
    flops = op_flops("aten.scaled_dot_product_attention.default", [q, q, q], [q])
    assert sympy.simplify(flops - 4 * batch * heads * seq**2 * head_dim) == 0
    causal = op_flops("aten.scaled_dot_product_attention.default", [q, q, q], [q], {"is_causal": True})
    assert sympy.simplify(causal - flops / 2) == 0  # a fused causal kernel skips the masked half
    backward = op_backward_flops("aten.scaled_dot_product_attention.default", [q, q, q], [q])
    assert sympy.simplify(backward - sympy.Rational(5, 2) * flops) == 0


@pytest.mark.parametrize("op, shapes, attrs, run", [
    ("aten.linear.default", [(4, 5, 16), (32, 16)], {},
     lambda: torch.nn.functional.linear(torch.randn(4, 5, 16), torch.randn(32, 16))),
    ("aten.mm.default", [(6, 7), (7, 9)], {}, lambda: torch.randn(6, 7) @ torch.randn(7, 9)),
    ("aten.bmm.default", [(3, 6, 7), (3, 7, 9)], {}, lambda: torch.bmm(torch.randn(3, 6, 7), torch.randn(3, 7, 9))),
    ("aten.addmm.default", [(9,), (6, 7), (7, 9)], {},
     lambda: torch.addmm(torch.randn(9), torch.randn(6, 7), torch.randn(7, 9))),
    ("aten.conv2d.default", [(2, 3, 8, 8), (16, 3, 3, 3)], {"stride": 2, "padding": 1},
     lambda: torch.nn.functional.conv2d(torch.randn(2, 3, 8, 8), torch.randn(16, 3, 3, 3), stride=2, padding=1)),
])
def test_matmul_like_flops_agree_with_torch_flop_counter(op, shapes, attrs, run):
    with FlopCounterMode(display=False) as counter:
        run()
    assert op_flops(op, shapes, [], attrs) == counter.get_total_flops()


def test_backward_traffic_follows_the_derivative_where_it_is_known():
    x, rows = (batch, seq, 768), (batch * seq, 50257)
    n = batch * seq * 768
    # a nonlinearity reads the output gradient and its input, and writes the input gradient
    assert sympy.simplify(op_backward_bytes("aten.gelu.default", [x], [x]) - 3 * 4 * n) == 0
    # an addition hands its gradient on as is (no kernel); a broadcast bias's gradient is summed down
    assert op_backward_bytes("aten.add.Tensor", [x, x], [x]) == 0
    assert sympy.simplify(op_backward_bytes("aten.add.Tensor", [x, (768,)], [x]) - (4 * n + 4 * 768)) == 0
    # a mask constant added to scores gets no gradient, and the scores' passes as is
    assert op_backward_bytes("aten.add.Tensor", [x, (768,)], [x], grad_inputs=(True, False)) == 0
    # scaling by a number: read and write; a product of two tensors: the other operand read for each gradient
    assert sympy.simplify(op_backward_bytes("aten.mul.Tensor", [x], [x]) - 2 * 4 * n) == 0
    assert sympy.simplify(op_backward_bytes("aten.mul.Tensor", [x, x], [x]) - 2 * 3 * 4 * n) == 0
    # dropout reads its one-byte mask; the copy a `contiguous` makes passes its gradient as is
    assert sympy.simplify(op_backward_bytes("aten.dropout.default", [x], [x], dtype_bytes=2) - (2 + 1 + 2) * n) == 0
    assert op_backward_bytes("aten.clone.default", [x], [x]) == 0
    # a norm: output gradient and input read for the input gradient, and again for its weight's and bias's
    ln = [x, (768,), (768,)]
    assert sympy.simplify(op_backward_bytes("aten.layer_norm.default", ln, [x]) - 5 * 4 * n) == 0
    assert sympy.simplify(op_backward_bytes("aten.layer_norm.default", ln, [x], grad_inputs=(True, False, False))
                          - 3 * 4 * n) == 0
    # a split's backward writes its input's gradient from the pieces'; a reshape's is a view
    halves = [(batch, seq, 384)] * 2
    assert sympy.simplify(op_backward_bytes("aten.split.Tensor", [x], halves) - 2 * 4 * n) == 0
    assert op_backward_bytes("aten.view.default", [x], [(batch * seq, 768)]) == 0
    # a bf16 -> fp32 cast casts its gradient back: read 4 bytes, write 2 per element, as forward moved
    cast = op_backward_bytes("aten._to_copy.default", [rows], [rows], dtype_bytes=(2, 4))
    assert sympy.simplify(cast - 6 * batch * seq * 50257) == 0
    # a gather reads only what its indices select; its backward zeroes the whole input's gradient and scatters
    picked, index = (batch * seq, 1), (batch * seq, 1)
    forward = op_bytes("aten.gather.default", [rows, index], [picked], dtype_bytes=(4, 8, 4))
    assert sympy.simplify(forward - (8 + 4 + 4) * batch * seq) == 0
    backward = op_backward_bytes("aten.gather.default", [rows, index], [picked], dtype_bytes=(4, 8, 4))
    assert sympy.simplify(backward - (4 * batch * seq * 50257 + forward + 4 * batch * seq)) == 0
    # cross entropy over a vocabulary (rows wider than a CUDA block's shared memory): log-softmax reads each row
    # three times and writes it once; backward zeroes, then reads the gradient twice and the output once, writes
    targets, n = (batch * seq,), batch * seq * 50257
    ce = op_bytes("aten.cross_entropy_loss.default", [rows, targets], [()], dtype_bytes=(4, 8, 4))
    assert sympy.simplify(ce - (4 * 4 * n + 8 * batch * seq)) == 0
    ce_backward = op_backward_bytes("aten.cross_entropy_loss.default", [rows, targets], [()], dtype_bytes=(4, 8, 4))
    assert sympy.simplify(ce_backward - (5 * 4 * n + 8 * batch * seq)) == 0
    # ten classes fit shared memory: one read, one write; the persistent backward reads the gradient once less
    few = (batch * seq, 10)
    assert sympy.simplify(op_bytes("aten.cross_entropy_loss.default", [few, targets], [()], dtype_bytes=(4, 8, 4))
                          - (2 * 4 * 10 + 8) * batch * seq) == 0
    assert sympy.simplify(op_backward_bytes("aten.cross_entropy_loss.default", [few, targets], [()],
                                            dtype_bytes=(4, 8, 4)) - (4 * 4 * 10 + 8) * batch * seq) == 0


def test_matmul_with_broadcast_batch_uses_the_output_shape():
    flops = op_flops("aten.matmul.default", [(batch, seq, 64), (64, 128)], [(batch, seq, 128)])
    assert sympy.simplify(flops - 2 * batch * seq * 64 * 128) == 0


def test_other_op_formulas():
    x = (batch, seq, 768)
    assert op_flops("aten.embedding.default", [(50257, 768), (batch, seq)], []) == 0
    assert sympy.simplify(op_bytes("aten.embedding.default", [(50257, 768), (batch, seq)], [x], dtype_bytes=2)
                          - (8 * batch * seq + 2 * 2 * batch * seq * 768)) == 0
    assert op_flops("aten.layer_norm.default", [x, (768,), (768,)], [x]) == 5 * batch * seq * 768
    assert op_flops("aten.add.Tensor", [x, x], [x]) == batch * seq * 768
    assert op_flops("aten.gelu.default", [x], []) == batch * seq * 768  # inferred from the input
    assert op_bytes("aten.add.Tensor", [x, x], [x]) == 4 * 3 * batch * seq * 768
    assert op_flops("aten.view.default", [x], [(batch * seq, 768)]) == 0
    assert op_bytes("aten.permute.default", [x], [x]) == 0
    logits = (batch * seq, 50257)
    assert op_flops("aten.cross_entropy_loss.default", [logits, (batch * seq,)], [()]) == \
        5 * batch * seq * 50257 + batch * seq
    assert op_category("aten::mm") == "matmul" and op_category("my_custom_op") == "elementwise"
    assert op_flops("my_custom_op", [x], [x]) == batch * seq * 768  # unknown ops: one FLOP per output element


def test_op_time_is_a_roofline():
    device = Cluster.load("dgx-a100:1").devices[0]
    big_matmul = op_time("aten.mm.default", [(8192, 8192), (8192, 8192)], [(8192, 8192)], {}, device, "bf16", 2)
    assert float(big_matmul) == pytest.approx(2 * 8192**3 / 312e12)  # compute bound
    add = op_time("aten.add.Tensor", [(2**24,), (2**24,)], [(2**24,)], {}, device, "bf16", 2)
    assert float(add) == pytest.approx(3 * 2 * 2**24 / 2.039e12)  # memory bound
    with pytest.raises(ValueError, match="fp8"):
        op_time("aten.mm.default", [(2, 2), (2, 2)], [(2, 2)], {}, device, "fp8")


# -- memory ---------------------------------------------------------------------------------------


def test_megatron_activation_formula_values():
    s, b, h, a, t = 2048, 1, 12288, 96, 8  # GPT-3 175B layer
    sbh = s * b * h
    assert 5 * a * s // h == 80 and 24 // t == 3 and 5 * a * s // (h * t) == 10
    assert megatron_activation_bytes(s, b, h, a) == sbh * (34 + 80)
    assert megatron_activation_bytes(s, b, h, a, 1) == megatron_activation_bytes(s, b, h, a, 1, True)
    assert megatron_activation_bytes(s, b, h, a, t) == sbh * (10 + 3 + 10)
    assert megatron_activation_bytes(s, b, h, a, t, sequence_parallel=True) == sbh * (34 + 80) // t
    assert megatron_activation_bytes(s, b, h, a, t, True, "selective") == 34 * sbh // t
    assert megatron_activation_bytes(s, b, h, a, t, False, "selective") == sbh * (10 + 3)
    assert megatron_activation_bytes(s, b, h, a, t, True, "full") == 2 * sbh
    assert megatron_activation_bytes(2048, 1, 1000, 7, 3) == sympy.Rational(2048 * 1000) * \
        (10 + 8 + sympy.Rational(5 * 7 * 2048, 3000))  # exact for sizes that do not divide
    symbolic = megatron_activation_bytes(*sympy.symbols("s b h a"))
    s_, b_, h_, a_ = sympy.symbols("s b h a")
    assert sympy.simplify(symbolic - s_ * b_ * h_ * (34 + 5 * a_ * s_ / h_)) == 0
    with pytest.raises(ValueError, match="recompute"):
        megatron_activation_bytes(s, b, h, a, recompute="some")


@pytest.mark.parametrize("schedule, stage, expected", [("1f1b", 0, 4), ("1f1b", 3, 1), ("gpipe", 2, 8), ("none", 0, 1),
                                                       ("zb-h1", 3, 4)])
def test_in_flight_microbatches(schedule, stage, expected):
    assert in_flight_microbatches(schedule, 4, stage, 8) == expected


def test_memory_estimate():
    adam = MemoryEstimate.estimate(10**9, activation_bytes=0)
    assert (adam.parameters, adam.gradients, adam.optimizer_state) == (4e9, 4e9, 8e9)
    mixed = MemoryEstimate.estimate(10**9, 0, param_dtype_bytes=2)
    assert mixed.total == 16 * 10**9  # 2 + 2 + 8 moments + 4 master copy
    assert MemoryEstimate.estimate(10, 0, optimizer="sgd").optimizer_state == 0
    assert MemoryEstimate.estimate(10, 0, optimizer="sgd_momentum").optimizer_state == 40

    pipeline = dict(schedule="1f1b", num_stages=4, num_microbatches=8)
    first = MemoryEstimate.estimate(0, activation_bytes=100, stage_input_bytes=10, stage_index=0, **pipeline)
    last = MemoryEstimate.estimate(0, activation_bytes=100, stage_input_bytes=10, stage_index=3, **pipeline)
    recomputed = MemoryEstimate.estimate(0, 100, stage_input_bytes=10, stage_index=0, recompute=True, **pipeline)
    assert (first.activations, last.activations, recomputed.activations) == (400, 100, 4 * 10 + 100)

    device = Cluster.load("dgx-a100:1").devices[0]
    assert MemoryEstimate.estimate(10**9, 0).fits(device)
    assert not MemoryEstimate.estimate(10**10, 0).fits(device)


def test_param_memory():
    assert param_memory([(768, 3072), (3072,)], dtype_bytes=2) == 2 * (768 * 3072 + 3072)
    assert param_memory(1000) == 4000
    vocab = sympy.Symbol("vocab")
    assert param_memory([(vocab, 768)]) == 4 * 768 * vocab
