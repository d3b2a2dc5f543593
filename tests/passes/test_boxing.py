"""Boxing is sound: every conversion chain keeps the logical tensor, and picks the expected collectives.

For every pair of N-D layouts (sources include ``P(sum)`` and ``P(max)``) on 1-D meshes of 2, 3 and 4
devices and on a 2x2 mesh, ``boxing_path`` either finds a chain, which applied to sharded locals
with the virtual backend's ``collective`` leaves the assembled tensor unchanged after every step,
or raises :class:`BoxingError`. It raises exactly when a layout splits a static dim unevenly (the
message names the tensor type, the layout, the dim and the mesh) or when the target holds
``P(max)``: no collective makes max-partial values, so only an op that outputs ``P(max)`` (amax) can
feed a ``P(max)`` input. The autograd of each single collective is checked against its adjoint.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.virtual import assemble, collective
from cost.boxing import BoxingCost, bytes_cost
from ir.ops.comm import COMM_OPS
from ir.ops.registry import splits_divide
from ir.sbp import PMAX, all_sbp_values, format_nd_sbp, parse_nd_sbp
from ir.types import Mesh, TensorType
from passes.boxing import BoxingError, boxing_path, uneven_split
from tests.ir.opinfos import MESHES, assert_broadcast_agrees, assert_same, distribute, random_like


def nd_layouts(ndim: int, mesh: Mesh, partial_ops: tuple = ("sum", "max")) -> list[tuple]:
    """Every N-D SBP of a tensor with ``ndim`` dims on ``mesh``."""
    return list(itertools.product(all_sbp_values(ndim, partial_ops), repeat=mesh.ndim))


def conversion_must_exist(t: TensorType, src: tuple, dst: tuple, mesh: Mesh) -> bool:
    """The documented contract: possible unless a layout splits unevenly or the target holds P(max)."""
    if src == dst:
        return True
    return splits_divide(t, src, mesh) and splits_divide(t, dst, mesh) and PMAX not in dst


def check_conversion(shape: tuple, src: tuple, dst: tuple, mesh: Mesh, seed: int, cost: BoxingCost = bytes_cost
                     ) -> list:
    """Run ``boxing_path`` (under ``cost``) and the chain it returns; the logical tensor survives every step."""
    t = TensorType.of(shape, torch.float32)
    where = f"{format_nd_sbp(src)} -> {format_nd_sbp(dst)} for {t} on mesh {mesh.shape}"
    if not conversion_must_exist(t, src, dst, mesh):
        with pytest.raises(BoxingError) as err:
            boxing_path(t, src, dst, mesh, cost)
        assert str(t) in str(err.value) and all(a in str(err.value) for a in mesh.axes), (
            f"{where}: the error should name the tensor type and the mesh, found {err.value}")
        return []
    _, steps = boxing_path(t, src, dst, mesh, cost)
    if not splits_divide(t, src, mesh):
        assert src == dst and steps == [], f"{where}: a layout that cannot hold the tensor converts"
        return steps  # nothing to convert, nothing to hold
    gen = torch.Generator().manual_seed(seed)
    full = random_like(torch.zeros(shape), gen, -128, 128)
    locals_, current = distribute(full, src, mesh, gen), src
    for axis, op, kwargs, new in steps:
        changed = [i for i, (a, b) in enumerate(zip(current, new)) if a != b]
        assert changed == [axis], f"{where}: step {op} on axis {axis} changes {format_nd_sbp(current)} to {format_nd_sbp(new)}"
        assert splits_divide(t, new, mesh), f"{where}: passes through {format_nd_sbp(new)}, which does not divide"
        locals_ = collective(op, locals_, mesh, axis, kwargs)
        assert_broadcast_agrees(locals_, new, mesh, f"{where}: after {op}")
        assert_same(assemble(locals_, new, mesh), full, f"{where}: after {op} on axis {axis}")
        current = new
    assert current == dst, f"{where}: the chain ends in {format_nd_sbp(current)}"
    return steps


@pytest.mark.parametrize("key", sorted(MESHES))
def test_every_pair_of_layouts_converts(key: str):
    """All pairs, on a shape every layout divides and on one where some layouts do not."""
    mesh = MESHES[key]
    for shape in [(12, 4), (3, 4)]:
        for src in nd_layouts(len(shape), mesh):
            for dst in nd_layouts(len(shape), mesh, ("sum",)):
                check_conversion(shape, src, dst, mesh, seed=0)


DIM_SIZES = st.sampled_from([1, 2, 3, 4, 6, 8, 12])


@st.composite
def conversions(draw):
    """A random shape, mesh, source layout (with P(max)) and target layout (without)."""
    shape = tuple(draw(st.lists(DIM_SIZES, min_size=1, max_size=3)))
    mesh = MESHES[draw(st.sampled_from(sorted(MESHES)))]
    src = draw(st.sampled_from(nd_layouts(len(shape), mesh)))
    dst = draw(st.sampled_from(nd_layouts(len(shape), mesh, ("sum",))))
    return shape, src, dst, mesh


@settings(max_examples=500, deadline=None)
@given(case=conversions(), seed=st.integers(0, 2**31 - 1))
def test_random_conversions_keep_the_tensor(case, seed):
    shape, src, dst, mesh = case
    check_conversion(shape, src, dst, mesh, seed)


def test_uneven_split_is_refused_with_a_clear_message():
    t, mesh = TensorType.of((3, 4), torch.float32), Mesh.make(["dp"], [2])
    with pytest.raises(BoxingError) as err:
        boxing_path(t, parse_nd_sbp("B"), parse_nd_sbp("S(0)"), mesh)
    message = str(err.value)
    for part in ["f32[3, 4]", "(S(0))", "dp=2", "dim 0 has size 3", "multiple of 2"]:
        assert part in message, f"expected {part!r} in the message: {message}"
    assert uneven_split(t, parse_nd_sbp("S(1)"), mesh) is None


def test_nested_uneven_split_names_both_axes():
    t, mesh = TensorType.of((6, 4), torch.float32), Mesh.make(["dp", "tp"], [2, 2])
    with pytest.raises(BoxingError, match=r"size 6.*4 ranks.*dp=2, tp=2"):
        boxing_path(t, parse_nd_sbp("(B, B)"), parse_nd_sbp("(S(0), S(0))"), mesh)


def test_no_conversion_into_max_partial():
    t, mesh = TensorType.of((4, 4), torch.float32), Mesh.make(["a"], [2])
    with pytest.raises(BoxingError, match="P\\(max\\)"):
        boxing_path(t, parse_nd_sbp("B"), parse_nd_sbp("P(max)"), mesh)
    assert boxing_path(t, parse_nd_sbp("P(max)"), parse_nd_sbp("P(max)"), mesh) == (0.0, [])


# -- which collectives -------------------------------------------------------------------------------

def op_count_cost(op: str, local_bytes: float, mesh: Mesh, axis: int) -> float:
    """Every collective costs the same: the chain with the fewest collectives wins."""
    return 1.0


EXPECTED_CHAINS = [
    # 1-D mesh: one collective per conversion, two where no single one exists.
    ("a=2", "S(0)", "B", None, ["a:all_gather(dim=0)"]),
    ("a=2", "P(sum)", "B", None, ["a:all_reduce(op=sum)"]),
    ("a=2", "P(max)", "B", None, ["a:all_reduce(op=max)"]),
    ("a=2", "P(sum)", "S(1)", None, ["a:reduce_scatter(dim=1)"]),
    ("a=2", "S(0)", "S(1)", None, ["a:all_to_all(src_dim=0, dst_dim=1)"]),
    ("a=2", "B", "S(0)", None, ["a:slice(dim=0)"]),
    ("a=2", "B", "P(sum)", None, ["a:mask()"]),
    ("a=4", "S(1)", "P(sum)", None, ["a:all_gather(dim=1)", "a:mask()"]),
    ("a=4", "P(max)", "S(0)", None, ["a:all_reduce(op=max)", "a:slice(dim=0)"]),
    ("a=3", "P(max)", "P(sum)", None, ["a:all_reduce(op=max)", "a:mask()"]),
    # 2x2 mesh: a split of one dim on both axes is undone inner axis first.
    ("a=2,b=2", "(S(0), S(0))", "(B, B)", None, ["b:all_gather(dim=0)", "a:all_gather(dim=0)"]),
    ("a=2,b=2", "(B, B)", "(S(0), S(0))", None, ["a:slice(dim=0)", "b:slice(dim=0)"]),
    ("a=2,b=2", "(S(0), B)", "(B, S(0))", None, ["a:all_gather(dim=0)", "b:slice(dim=0)"]),
    ("a=2,b=2", "(B, S(0))", "(S(0), B)", None, ["b:all_gather(dim=0)", "a:slice(dim=0)"]),
    ("a=2,b=2", "(P(sum), P(sum))", "(S(0), S(0))", None, ["a:reduce_scatter(dim=0)", "b:reduce_scatter(dim=0)"]),
    ("a=2,b=2", "(P(sum), S(0))", "(B, B)", None, ["a:all_reduce(op=sum)", "b:all_gather(dim=0)"]),
    ("a=2,b=2", "(S(0), S(1))", "(S(1), S(0))", None,
     ["a:all_gather(dim=0)", "b:all_to_all(src_dim=1, dst_dim=0)", "a:slice(dim=1)"]),
    ("a=2,b=2", "(S(0), S(0))", "(S(1), S(1))", None,
     ["b:all_gather(dim=0)", "a:all_to_all(src_dim=0, dst_dim=1)", "b:slice(dim=1)"]),
    # (P, P) -> (B, B): by bytes, reduce-scatter / all-reduce of the half / all-gather (1.5x the
    # tensor per rank) beats two all-reduces (2x); counting collectives, two all-reduces win.
    ("a=2,b=2", "(P(sum), P(sum))", "(B, B)", None,
     ["a:reduce_scatter(dim=0)", "b:all_reduce(op=sum)", "a:all_gather(dim=0)"]),
    ("a=2,b=2", "(P(sum), P(sum))", "(B, B)", op_count_cost, ["a:all_reduce(op=sum)", "b:all_reduce(op=sum)"]),
    ("a=2,b=2", "(P(sum), B)", "(B, P(sum))", op_count_cost, ["a:all_reduce(op=sum)", "b:mask()"]),
]


def describe_chain(steps: list, mesh: Mesh) -> list[str]:
    """``axis:op(kwargs)`` per step."""
    return [f"{mesh.axes[axis]}:{op.split('.')[1]}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
            for axis, op, kwargs, _ in steps]


def mesh_from_text(text: str) -> Mesh:
    axes = [part.split("=") for part in text.split(",")]
    return Mesh.make([a for a, _ in axes], [int(n) for _, n in axes])


@pytest.mark.parametrize("mesh_text, src, dst, cost, expected", EXPECTED_CHAINS,
                         ids=[f"{m}:{s}->{d}{'' if c is None else '(by count)'}" for m, s, d, c, _ in EXPECTED_CHAINS])
def test_expected_collectives(mesh_text, src, dst, cost, expected):
    mesh = mesh_from_text(mesh_text)
    t = TensorType.of((8, 8), torch.float32)
    kwargs = {} if cost is None else {"cost": cost}
    _, steps = boxing_path(t, parse_nd_sbp(src), parse_nd_sbp(dst), mesh, **kwargs)
    assert describe_chain(steps, mesh) == expected
    check_conversion((8, 8), parse_nd_sbp(src), parse_nd_sbp(dst), mesh, seed=0)


# -- gradients of single collectives -------------------------------------------------------------------

def adjoint(op: str, kwargs: dict, xs: list, cotangents: list, mesh: Mesh, axis: int) -> list:
    """What each rank's input gradient must be: the adjoint collective applied to the cotangents."""
    if op == "comm.all_reduce" and kwargs.get("op") == "max":
        total = collective("comm.all_reduce", cotangents, mesh, axis, {})
        peak = collective("comm.all_reduce", xs, mesh, axis, {"op": "max"})
        return [g * (x == m) for g, x, m in zip(total, xs, peak)]
    if op == "comm.all_reduce":
        return collective("comm.all_reduce", cotangents, mesh, axis, {})
    if op == "comm.all_gather":
        return collective("comm.reduce_scatter", cotangents, mesh, axis, {"dim": kwargs["dim"]})
    if op == "comm.reduce_scatter":
        return collective("comm.all_gather", cotangents, mesh, axis, {"dim": kwargs["dim"]})
    if op == "comm.all_to_all":
        return collective("comm.all_to_all", cotangents, mesh, axis,
                          {"src_dim": kwargs["dst_dim"], "dst_dim": kwargs["src_dim"]})
    if op == "comm.slice":
        return [zero_padded(g, kwargs["dim"], mesh.coords(r)[axis], mesh.shape[axis])
                for r, g in enumerate(cotangents)]
    if op == "comm.mask":
        return collective("comm.mask", cotangents, mesh, axis, {})
    raise AssertionError(f"no adjoint known for {op}")


def zero_padded(shard: torch.Tensor, dim: int, index: int, n: int) -> torch.Tensor:
    """``shard`` at block ``index`` of ``n`` along ``dim``, zeros elsewhere."""
    blocks = [shard if k == index else torch.zeros_like(shard) for k in range(n)]
    return torch.cat(blocks, dim)


SINGLE_COLLECTIVES = [
    ("comm.all_reduce", {"op": "sum"}), ("comm.all_reduce", {"op": "max"}), ("comm.all_gather", {"dim": 0}),
    ("comm.all_gather", {"dim": 1}), ("comm.reduce_scatter", {"dim": 1}), ("comm.all_to_all", {"src_dim": 0, "dst_dim": 1}),
    ("comm.all_to_all", {"src_dim": 1, "dst_dim": 0}), ("comm.slice", {"dim": 0}), ("comm.mask", {}),
]


def test_every_collective_has_a_gradient_case():
    assert {op for op, _ in SINGLE_COLLECTIVES} == set(COMM_OPS)


@pytest.mark.parametrize("key", sorted(MESHES))
@pytest.mark.parametrize("op, kwargs", SINGLE_COLLECTIVES, ids=[f"{op}{kw}" for op, kw in SINGLE_COLLECTIVES])
def test_collective_gradient_is_the_adjoint(key, op, kwargs):
    mesh = MESHES[key]
    gen = torch.Generator().manual_seed(7)
    for axis in range(mesh.ndim):
        n = mesh.shape[axis]
        # Local shapes that every collective accepts (chunkable along dims 0 and 1 by n), and values
        # distinct across all ranks, so that a max has one winner.
        numel = 4 * n * 3 * n
        values = (torch.randperm(mesh.size * numel, generator=gen) - numel) / 16
        xs = [v.reshape(4 * n, 3 * n).requires_grad_() for v in values.chunk(mesh.size)]
        outs = collective(op, xs, mesh, axis, kwargs)
        cotangents = [random_like(o, gen, -128, 128) for o in outs]
        grads = torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs, cotangents)), xs, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, xs)]
        want = adjoint(op, kwargs, [x.detach() for x in xs], cotangents, mesh, axis)
        for r, (g, w) in enumerate(zip(grads, want)):
            assert_same(g, w, f"{op}{kwargs} on mesh {mesh.shape} axis {axis}: gradient on rank {r}")




def test_compiled_conversions_are_chosen_at_the_example_sizes():
    """The boxing pass prices a conversion at the example input's sizes, as the planner and the simulator do.
    On a cluster where an all-reduce is cheapest for the GPT's activations (tens of KB) but a reduce-scatter and
    all-gather pair would win for gigabyte tensors, a Megatron plan all-reduces; it gathered when the symbolic
    batch and sequence were priced as the stand-in magnitudes used to compare symbolic sizes (about 1000 each)."""
    from pathlib import Path

    from cluster import Cluster
    from compiler.api import compile
    from frontend.dsl import load_plan
    from tests.models import gpt_inputs, gpt_model

    node = {"device": "cpu", "devices": 2, "intra_link": {
        "class": "loopback", "bandwidth": "1GB/s", "latency": "10us", "collectives": {
            "all_reduce": {"latency": "10us", "bandwidth": "0.1GB/s"},
            "reduce_scatter": {"latency": "1ms", "bandwidth": "100GB/s"},
            "all_gather": {"latency": "1ms", "bandwidth": "100GB/s"}}}}
    cluster = Cluster.from_dict({"name": "crossing", "nodes": [node]})
    megatron = load_plan(str(Path(__file__).resolve().parents[2] / "examples" / "plans" / "megatron_tp.sbp")).to_dict()
    plan = compile(gpt_model(), gpt_inputs(batch=8, seq=16), cluster=cluster, strategy=megatron)
    tp_collectives = {n.op for n in plan.graph.nodes if n.op.startswith("comm.") and n.kwargs.get("axis") == "tp"}
    assert "comm.all_reduce" in tp_collectives
    assert not tp_collectives & {"comm.reduce_scatter", "comm.all_gather"}
