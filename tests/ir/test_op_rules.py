"""Every op rule is sound: each N-D signature it offers, run rank by rank, equals the unsharded op.

For every sample of :mod:`tests.ir.opinfos`, every mesh of :data:`~tests.ir.opinfos.MESHES` and every
signature of ``nd_signatures(node, mesh)``: the full inputs are cut into per-rank locals per the input
layouts (random partial values for ``P``), each rank runs the rule's ``local_call``, the local outputs
are assembled per the output layouts and compared with the op on the full inputs. For float outputs
the gradients are checked too: a fixed random cotangent dotted with the assembled outputs is
differentiated, and every input's local gradients, assembled per the dual layout (``S`` stays ``S``,
``B`` becomes ``P(sum)``, ``P(sum)`` becomes ``B``), must equal the eager gradient. Inputs held as
``P(max)`` have no dual layout; their gradients are not checked.

Every combination runs once with fixed values (one test per op); a hypothesis test then draws
combinations with other input values and other partial splits.
"""
from __future__ import annotations

from functools import lru_cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.virtual import assemble, evaluate, resolve_callable
from ir.ops import known_ops, local_call, nd_signatures, rule_for
from ir.ops.registry import LocalContext, coord_symbol, local_shape, splits_divide
from ir.sbp import Broadcast, Partial, Split, format_nd_sbp, nd_dual, parse_nd_sbp
from ir.types import Mesh
from tests.ir.opinfos import (MESHES, SAMPLES, BuiltSample, assert_broadcast_agrees, assert_same, coverage_gaps,
                              distribute, random_like)

RULED_OPS = [op for op in known_ops() if not op.startswith(("comm.", "moe."))]
"""Ops checked here rank by rank. Not the collectives, nor expert parallelism's ``moe.*`` ops: their ranks exchange
rows (all-to-all) and hold routed rows in uneven, data-dependent pieces; tests/compiler/test_moe.py checks them
end to end against eager (every plan's loss and gradients, and the exchange itself)."""


@lru_cache(maxsize=None)
def built(op: str, index: int, seed: int = 0) -> BuiltSample:
    """A sample's graph and inputs (cached: the graphs are only read)."""
    return SAMPLES[op][index].build(seed)


def all_combos() -> list[tuple[str, int, str, int]]:
    """Every (op, sample index, mesh key, signature index) to check."""
    combos = []
    for op in sorted(SAMPLES):
        for i in range(len(SAMPLES[op])):
            node = built(op, i).node
            for key, mesh in MESHES.items():
                combos += [(op, i, key, j) for j in range(len(nd_signatures(node, mesh)))]
    return combos


COMBOS = all_combos()


# -- running a signature ----------------------------------------------------------------------------------

def run_ranks(node, mesh: Mesh, sig: tuple, local_inputs: list) -> list[list]:
    """Each output's local tensors, one per rank, from the rule's local call."""
    ins, outs = sig
    call = local_call(node, LocalContext(mesh, "world", list(ins), list(outs)))
    fn = resolve_callable(call.fn)
    env = {id(v): locals_ for v, locals_ in zip(node.input_values(), local_inputs)}
    results = []
    for r in range(mesh.size):
        scope = {coord_symbol(a): c for a, c in zip(mesh.axes, mesh.coords(r))}
        res = fn(*evaluate(call.args, env, r, scope), **evaluate(call.kwargs, env, r, scope))
        results.append(list(res) if isinstance(res, (list, tuple)) else [res])
    return [[res[i] for res in results] for i in range(len(node.outputs))]


def assemble_checked(locals_: list, sbp: tuple, mesh: Mesh, what: str, exact_values: bool = True) -> torch.Tensor:
    """The logical tensor of ``locals_`` in ``sbp``, after checking every local's shape and B copies."""
    if exact_values:
        assert_broadcast_agrees(locals_, sbp, mesh, what)
    return assemble(locals_, sbp, mesh)


def check_signature(sample: BuiltSample, mesh: Mesh, sig: tuple, seed: int) -> None:
    """The signature ``sig`` of the sample's node on ``mesh`` computes the op, forward and backward."""
    node, spec = sample.node, sample.sample
    ins, outs = sig
    where = f"{spec} on mesh {mesh.shape} with {list(map(format_nd_sbp, ins))} -> {list(map(format_nd_sbp, outs))}"
    types = [v.type for v in node.input_values()] + [v.type for v in node.outputs]
    for t, s in zip(types, ins + outs):
        assert splits_divide(t, s, mesh), f"{where}: offers {format_nd_sbp(s)} for {t}, which does not divide"
    gen = torch.Generator().manual_seed(seed)
    wants_grad = [spec.differentiable and t.is_floating_point() and ts.grad
                  for t, ts in zip(sample.inputs, sample.specs)]
    full = [t.clone().requires_grad_(g) for t, g in zip(sample.inputs, wants_grad)]
    local_inputs = [[x.requires_grad_(g) for x in distribute(t, s, mesh, gen)]
                    for t, s, g in zip(sample.inputs, ins, wants_grad)]
    local_outputs = run_ranks(node, mesh, sig, local_inputs)
    expected = resolve_callable(node.op)(*replace(node.args, node, full), **replace(node.kwargs, node, full))
    expected = list(expected) if isinstance(expected, (list, tuple)) else [expected]
    actual = []
    for i, (o, s) in enumerate(zip(node.outputs, outs)):
        want = tuple(int(d) for d in local_shape(o.type, s, mesh))
        for r, t in enumerate(local_outputs[i]):
            assert tuple(t.shape) == want, f"{where}: rank {r} output {i} has shape {tuple(t.shape)}, expected {want}"
        actual.append(assemble_checked(local_outputs[i], s, mesh, f"{where}: output {i}", spec.exact_values))
        assert_same(actual[i], expected[i], f"{where}: output {i}", spec.exact_values)
    if any(wants_grad):
        check_gradients(sample, mesh, sig, full, local_inputs, actual, expected, gen, where)


def replace(obj, node, full: list):
    """``obj`` (node args) with the node's input values replaced by the full tensors."""
    by_id = {id(v): t for v, t in zip(node.input_values(), full)}
    return evaluate(obj, {k: [t] for k, t in by_id.items()}, 0, {})


def check_gradients(sample, mesh, sig, full, local_inputs, actual, expected, gen, where) -> None:
    """The gradient of every float input, assembled from the ranks per its dual layout, equals eager."""
    ins, _ = sig
    pairs = [(a, e) for a, e in zip(actual, expected) if e.is_floating_point() and e.requires_grad]
    if not pairs:
        return
    for a, e in pairs:
        assert a.requires_grad, f"{where}: the sharded output does not depend on the inputs, the eager one does"
    cotangents = [random_like(e, gen, -128, 128) for _, e in pairs]
    eager_loss = sum((e * c).sum() for (_, e), c in zip(pairs, cotangents))
    sharded_loss = sum((a * c).sum() for (a, _), c in zip(pairs, cotangents))
    leaves = [i for i, t in enumerate(full) if t.requires_grad]
    eager = torch.autograd.grad(eager_loss, [full[i] for i in leaves], allow_unused=True)
    flat_locals = [x for i in leaves for x in local_inputs[i]]
    local_grads = torch.autograd.grad(sharded_loss, flat_locals, allow_unused=True)
    for k, i in enumerate(leaves):
        if any(isinstance(s, Partial) and s.op == "max" for s in ins[i]):
            continue
        grads = local_grads[k * mesh.size:(k + 1) * mesh.size]
        grads = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, local_inputs[i])]
        want = eager[k] if eager[k] is not None else torch.zeros_like(full[i])
        got = assemble_checked(grads, nd_dual(ins[i]), mesh, f"{where}: gradient of input {i}")
        assert_same(got, want, f"{where}: gradient of input {i}")


# -- tests -------------------------------------------------------------------------------------------



def test_every_ruled_op_has_samples():
    missing = [op for op in RULED_OPS if not SAMPLES.get(op)]
    assert not missing, f"ops with rules but no samples in tests/ir/opinfos.py: {missing}"
    unknown = [op for op in SAMPLES if op not in RULED_OPS]
    assert not unknown, f"samples of ops without rules: {unknown}"


@pytest.mark.parametrize("op", sorted(SAMPLES))
def test_rules_are_well_formed(op: str):
    """One SBP per input and output, splits of existing dims, all-B offered; no bool held partial."""
    for i, spec in enumerate(SAMPLES[op]):
        node = built(op, i).node
        values = node.input_values()
        sigs = rule_for(op).signatures(node)
        assert any(all(s == Broadcast() for s in sig.inputs + sig.outputs) for sig in sigs), f"{spec}: no all-B"
        for sig in sigs:
            assert len(sig.inputs) == len(values) and len(sig.outputs) == len(node.outputs), (
                f"{spec}: signature {sig} has the wrong arity for {len(values)} inputs, {len(node.outputs)} outputs")
            for v, s in zip(values + node.outputs, sig.inputs + sig.outputs):
                assert not isinstance(s, Split) or 0 <= s.dim < v.type.ndim, f"{spec}: {s} of {v.type} in {sig}"
        for key, mesh in MESHES.items():
            for ins, outs in nd_signatures(node, mesh):
                for v, nd in zip(values + node.outputs, ins + outs):
                    assert not (v.type.dtype == "bool" and any(isinstance(s, Partial) for s in nd)), (
                        f"{spec} on mesh {key}: offers {format_nd_sbp(nd)} for {v.type}")


@pytest.mark.parametrize("op", sorted(o for o in SAMPLES if any(s.rejects for s in SAMPLES[o])))
def test_rejected_signatures_are_not_offered(op: str):
    for i, spec in enumerate(SAMPLES[op]):
        node = built(op, i).node
        for reject in spec.rejects:
            wanted_in = tuple(parse_nd_sbp(t) for t in reject.inputs)
            wanted_out = None if reject.outputs is None else tuple(parse_nd_sbp(t) for t in reject.outputs)
            for ins, outs in nd_signatures(node, MESHES[reject.mesh]):
                assert not (ins == wanted_in and wanted_out in (None, outs)), (
                    f"{spec} on mesh {reject.mesh}: offers {list(map(format_nd_sbp, ins))} -> "
                    f"{list(map(format_nd_sbp, outs))}, which it must not ({spec.note})")


@pytest.mark.parametrize("op", sorted(SAMPLES))
def test_every_signature_computes_the_op(op: str):
    """Every (sample, mesh, signature) of this op, with fixed input values."""
    for i in range(len(SAMPLES[op])):
        sample = built(op, i)
        for key, mesh in MESHES.items():
            for sig in nd_signatures(sample.node, mesh):
                check_signature(sample, mesh, sig, seed=0)


@settings(max_examples=600, deadline=None)
@given(combo=st.sampled_from(COMBOS), seed=st.integers(1, 2**31 - 1))
def test_signatures_hold_for_any_values(combo, seed):
    """Random combinations, with other input values and other partial splits."""
    op, index, key, j = combo
    sample = SAMPLES[op][index].build(seed)
    mesh = MESHES[key]
    check_signature(sample, mesh, nd_signatures(sample.node, mesh)[j], seed)


def test_shared_signatures_equal_a_fresh_expansion():
    """nd_signatures shares one expansion among nodes that look alike to the rules (the same op in
    every layer); for every node of real graphs, that equals expanding the node's own rules."""
    from compiler import Cluster, compile
    from ir.ops.registry import _expand_nd_signatures
    from tests.models import bn_cnn_model, cnn_inputs, gpt_inputs, gpt_model
    plans = [compile(gpt_model(n_layer=3), gpt_inputs(), cluster=Cluster.local(4),
                     strategy={"mesh": {"dp": 2, "tp": 2}, "params": {"blocks.*.mlp.fc.weight": {"tp": "S(0)"}}}),
             compile(bn_cnn_model(), cnn_inputs(), cluster=Cluster.local(2), strategy="dp")]
    for plan in plans:
        mesh = next(iter(plan.graph.meshes.values()))
        for node in plan.graph.nodes:
            if not node.op.startswith("comm."):
                assert nd_signatures(node, mesh) == _expand_nd_signatures(node, mesh), node.name


def test_samples_exercise_every_argument():
    """Each argument of each op is given a non-default value by some sample (bools both ways, dims
    negative and positive, defaulted dims also by keyword), so no rule reads an argument untested."""
    gaps = {op: coverage_gaps(op, SAMPLES[op]) for op in sorted(SAMPLES)}
    gaps = {op: g for op, g in gaps.items() if g}
    assert not gaps, "samples in tests/ir/opinfos.py leave arguments unexercised:\n" + "\n".join(
        f"  {op}: {'; '.join(g)}" for op, g in gaps.items())
