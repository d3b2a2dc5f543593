"""The pass protocol (passes/manager.py): options, requirements, pipelines as text, failures named,
and the state passes hand on printed in the IR."""
from __future__ import annotations

import io
from pathlib import Path

import pytest

from cluster import Cluster
from compiler.api import compile
from compiler.cli import main as sbpc
from frontend.torch_capture import capture
from ir.parser import parse
from ir.sbp import IN_SBP_ATTR, PINNED_ATTR, B, Split
from passes.manager import PASSES, PassCall, PassContext, PassFailed, parse_pipeline, register_pass, run_passes
from tests.models import gpt_inputs, gpt_model

ROOT = Path(__file__).resolve().parents[2]
GPT = f"{ROOT}/examples/gpt.py:make_model"
MODEL, INPUTS = gpt_model(n_layer=1), gpt_inputs(batch=4, seq=8)


def captured():
    """A fresh captured graph of the one-block GPT."""
    return capture(MODEL, INPUTS, train=True).graph


def test_every_pass_declares_what_it_needs_and_makes():
    declared = {name: (spec.requires, spec.produces) for name, spec in PASSES.items()}
    assert declared.items() >= {
        "decompose": ((), ("decomposed",)),
        "layouts": ((), ("laid_out",)),
        "propagate": (("decomposed", "laid_out"), ("propagated",)),
        "boxing": (("propagated",), ("boxed",)),
        "grad_sync": (("boxed",), ("grad_buckets",)),
        "pipeline": (("boxed",), ("stages",)),
        "schedule": (("stages",), ("scheduled",)),
        "recompute": (("boxed",), ("recompute_marked",)),
    }.items()
    assert set(PASSES["grad_sync"].options) == {"bucket_bytes"} and PASSES["grad_sync"].options["bucket_bytes"].default is None


def test_a_pipeline_reads_like_an_mlir_pass_pipeline():
    calls = parse_pipeline("decompose{vocab_parallel=false}, layouts,propagate,boxing,grad_sync{bucket_bytes=1048576}")
    assert calls == [PassCall("decompose", {"vocab_parallel": False}), PassCall("layouts"), PassCall("propagate"),
                     PassCall("boxing"), PassCall("grad_sync", {"bucket_bytes": 1048576})]
    assert ",".join(map(str, calls)) == \
        "decompose{vocab_parallel=false},layouts,propagate,boxing,grad_sync{bucket_bytes=1048576}"
    assert parse_pipeline("grad_sync{bucket_bytes=none}") == [PassCall("grad_sync", {"bucket_bytes": None})]


@pytest.mark.parametrize("text, message", [
    ("decompose,layots", "unknown pass 'layots' (did you mean 'layouts'?); known passes: boxing, context_parallel, decompose, "),
    ("grad_sync{bucket=4}", "pass 'grad_sync' has no option 'bucket' (did you mean 'bucket_bytes'?); its options: bucket_bytes"),
    ("layouts{x=1}", "pass 'layouts' has no option 'x'; its options: none"),
    ("grad_sync{bucket_bytes=many}", "option bucket_bytes of pass 'grad_sync' takes an int (or none), found 'many'"),
    ("grad_sync{bucket_bytes}", "pass 'grad_sync': options are written key=value, found 'bucket_bytes'"),
    ("decompose;layouts", "cannot read the pass pipeline at column 1"),
])
def test_a_bad_pipeline_is_one_error_with_the_choices(text, message):
    with pytest.raises(PassFailed) as caught:
        parse_pipeline(text)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_missing_requirement_is_named_before_anything_runs():
    graph = captured()
    before = str(graph)
    with pytest.raises(PassFailed) as caught:
        run_passes(graph, "layouts,propagate,boxing", PassContext("dp", 2))
    assert str(caught.value) == (
        "pass 'propagate' needs decomposed (mean losses as sum / count, vocabulary-parallel cross entropy and "
        "batch norm from sums), which no pass before it produces (passes before it: layouts); run decompose first")
    assert str(graph) == before
    with pytest.raises(PassFailed, match="pass 'schedule' needs stages .* run pipeline first"):
        run_passes(captured(), "decompose,layouts,propagate,boxing,schedule", PassContext("dp", 2))


@pytest.mark.parametrize("error", [AttributeError("'NoneType' object has no attribute 'sbp'"),
                                   IndexError("list index out of range"), AssertionError("an invariant broke"),
                                   ZeroDivisionError("division by zero")])
def test_any_exception_of_a_pass_names_the_pass_and_those_before(error, monkeypatch):
    def broken(graph, ctx):
        raise error
    monkeypatch.setitem(PASSES, "broken", PASSES["layouts"].__class__("broken", broken, {}, (), ()))
    with pytest.raises(PassFailed) as caught:
        run_passes(captured(), "decompose,layouts,broken", PassContext("dp", 2))
    assert str(caught.value) == (f"pass 'broken' failed (after passes: decompose, layouts): "
                                 f"{type(error).__name__}: {error}")
    assert caught.value.__cause__ is error


def test_register_pass_refuses_unknown_properties():
    with pytest.raises(ValueError, match="pass 'x' names IR property 'sharded'; known properties: decomposed"):
        register_pass("x", requires=("sharded",))


def test_compile_takes_the_pipeline_as_text():
    text = "decompose,layouts,propagate,boxing,grad_sync{bucket_bytes=65536}"
    plan = compile(MODEL, INPUTS, cluster=Cluster.local(2), strategy="dp", passes=text)
    same = compile(MODEL, INPUTS, cluster=Cluster.local(2), strategy={"grad_bucket_bytes": 65536})
    assert plan.passes == text.split(",")
    buckets = [[p.name for p in b["params"]] for b in plan.graph.attrs["grad_buckets"]]
    assert len(buckets) > 1 and buckets == [[p.name for p in b["params"]] for b in same.graph.attrs["grad_buckets"]]
    with pytest.raises(PassFailed, match="unknown pass 'boxng'"):
        compile(MODEL, INPUTS, cluster=Cluster.local(2), strategy="dp", passes="decompose,layouts,propagate,boxng")


def test_dump_after_propagate_shows_what_boxing_will_reconcile():
    """The input layouts propagation chose (in_sbp) and the pinned parameter layouts are printed and
    parse back; boxing inserts exactly the conversions in_sbp asks for."""
    dump = io.StringIO()
    plan = compile(MODEL, INPUTS, cluster=Cluster.local(2), dump_after="propagate", dump_to=dump,
                   strategy={"mesh": {"tp": 2}, "params": {"blocks.*.mlp.fc.weight": {"tp": "S(0)"}}})
    text = dump.getvalue().split("\n", 1)[1]
    graph = parse(text)
    assert str(graph) == text
    assert graph.attrs[PINNED_ATTR] == {"blocks.0.mlp.fc.weight": (Split(0),)}
    waiting = [n for n in graph.nodes if IN_SBP_ATTR in n.attrs
               and any(v.sbp != want for v, want in zip(n.input_values(), n.attrs[IN_SBP_ATTR]))]
    assert waiting and "{in_sbp = [(" in text
    final = {n.name for n in plan.graph.nodes}
    for node in waiting:  # each mismatched input of each such node now arrives through a collective
        inputs = next(n for n in plan.graph.nodes if n.name == node.name).input_values()
        assert all(v.sbp == want for v, want in zip(inputs, node.attrs[IN_SBP_ATTR]))
        assert node.name in final
    assert not any(IN_SBP_ATTR in n.attrs for n in plan.graph.nodes)


def test_fsdp_pins_the_gathered_layout():
    graph = captured()
    run_passes(graph, "decompose,layouts", PassContext("fsdp", 2))
    weight = graph.value("blocks.0.mlp.fc.weight")
    assert weight.sbp == (Split(0),) and graph.attrs[PINNED_ATTR][weight.name] == (B,)
    pinned = next(line for line in str(graph).splitlines() if line.startswith("attr pinned = {"))
    assert '"blocks.0.mlp.fc.weight" = (B)' in pinned


def test_the_cli_takes_passes_and_reports_a_bad_one(capsys, tmp_path):
    assert sbpc(["compile", GPT, "--cluster", "local:2", "--seq", "8", "--batch", "2", "--dump-after", "propagate",
                 "--passes", "decompose,layouts,propagate,boxing,grad_sync{bucket_bytes=1048576}",
                 "--dump-ir", str(tmp_path / "g.ir")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("// IR after pass propagate\n") and "in_sbp = [" in out
    assert sbpc(["compile", GPT, "--cluster", "local:2", "--seq", "8", "--batch", "2", "--passes",
                 "decompose,layouts,grad_sync{bucket_bytes=1}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: pass 'grad_sync' needs boxed (every node's inputs converted to the layouts its signature "
                   "needs (no in_sbp left)), which no pass before it produces (passes before it: decompose, layouts); "
                   "run boxing first")
