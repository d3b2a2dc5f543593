"""Issue 16, item 1: custom ops (``torch.library`` ops outside ATen) that ``torch.export`` leaves in the graph.

A custom op with a fake kernel is captured as one op (typed by its fake kernel), runs replicated through the op
itself (virtual mesh and emitted program alike) and equals eager; one with a decomposition is decomposed at
capture (``decompose_custom_ops``, default True) and keeps data parallelism; one with neither is one error
naming the op, its module and what to register. transformers' MoE models in their default experts
implementation (``grouped_mm``, which under export calls the custom op ``transformers.grouped_mm_fallback``)
compile under dp2, fsdp2 and tp2 (experts' matrices split: sbpc has SBP rules for that op) and equal eager,
the auxiliary load-balancing loss included. Expert parallelism (experts split over an axis, tokens
dispatched by all-to-all) is tested in ``test_moe.py``.
"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from compiler import Cluster, compile
from frontend.torch_capture import CaptureError
from ir.ops import registry
from ir.parser import parse
from tests.fixtures.custom_ops import custom_op_inputs, custom_op_model
from tests.compiler.test_moe import moe_model_and_reference
from tests.capture_cache import compile_cached
from tests.models import assert_close_to_eager
from tests.zoo import ZOO

def custom_nodes(plan) -> list[str]:
    return [n.op for n in plan.graph.nodes if n.op.startswith("sbpc_test.")]


def test_custom_op_with_a_fake_kernel_runs_replicated_and_equals_eager(monkeypatch):
    monkeypatch.setattr(registry, "_WARNED", set())
    model, inputs = custom_op_model("scaled_tanh"), custom_op_inputs()
    with pytest.warns(UserWarning, match=r"custom op sbpc_test\.scaled_tanh\.default .* runs replicated"):
        plan = compile(model, inputs, cluster=Cluster.local(2), strategy="dp")
    assert custom_nodes(plan) == ["sbpc_test.scaled_tanh.default"]
    node = next(n for n in plan.graph.nodes if n.op == "sbpc_test.scaled_tanh.default")
    assert [str(s) for s in node.outputs[0].sbp] == ["B"]
    assert_close_to_eager(plan.run_virtual(*inputs), model, inputs)


@pytest.mark.parametrize("op", ["gated", "swiglu"])
def test_custom_op_with_a_decomposition_is_decomposed_and_stays_batch_split(op):
    """``gated`` has a CompositeImplicitAutograd kernel, ``swiglu`` a registered Python decomposition."""
    model, inputs = custom_op_model(op), custom_op_inputs()
    plan = compile(model, inputs, cluster=Cluster.local(2), strategy="dp")
    assert custom_nodes(plan) == []
    assert plan.parallelism()["dp"].split_share == pytest.approx(1.0)
    assert_close_to_eager(plan.run_virtual(*inputs), model, inputs)


@pytest.mark.parametrize("decompose", [False, ["sbpc_test.gated.default"]])
def test_decomposing_custom_ops_is_a_compile_option(decompose):
    model, inputs = custom_op_model("swiglu"), custom_op_inputs()
    plan = compile(model, inputs, cluster=Cluster.local(2), strategy="dp", decompose_custom_ops=decompose)
    assert custom_nodes(plan) == ["sbpc_test.swiglu.default"]  # kept: not selected
    assert plan.parallelism()["dp"].split_share < 0.6
    assert_close_to_eager(plan.run_virtual(*inputs), model, inputs)


def test_custom_op_without_fake_kernel_or_decomposition_is_one_error_naming_op_and_module():
    with pytest.raises(CaptureError) as err:
        compile(custom_op_model("untyped"), custom_op_inputs(), cluster=Cluster.local(2), strategy="dp")
    message = str(err.value)
    assert "custom op sbpc_test.untyped.default" in message
    assert "in module act (CustomActivation)" in message
    assert 'torch.library.register_fake("sbpc_test::untyped")' in message


def test_ir_text_prints_and_parses_custom_op_names():
    model, inputs = custom_op_model("scaled_tanh"), custom_op_inputs()
    plan = compile(model, inputs, cluster=Cluster.local(2), strategy="dp")
    text = str(plan.graph)
    assert "sbpc_test.scaled_tanh.default(" in text
    assert str(parse(text)) == text


def test_unknown_custom_op_in_ir_text_is_one_error_saying_what_to_import():
    from ir.ops.custom import UnknownOpError, resolve_op
    with pytest.raises(UnknownOpError, match=r"nolib\.frobnicate\.default names no registered op.*import the library"):
        resolve_op("nolib.frobnicate.default")


def test_emitted_program_imports_the_module_that_registers_its_custom_op(tmp_path):
    model, inputs = custom_op_model("scaled_tanh"), custom_op_inputs()
    plan = compile(model, inputs, cluster=Cluster.local(2), strategy="dp", optimizer=(torch.optim.SGD, {"lr": 0.1}))
    main = plan.emit(tmp_path)
    source = main.read_text()
    binding = "sbpc_test_scaled_tanh = load_custom_op('sbpc_test.scaled_tanh.default', 'tests.fixtures.custom_ops')"
    assert binding in source and "sbpc_test_scaled_tanh(" in source.split(binding)[1]
    main.write_text(source.replace("'tests.fixtures.custom_ops'", "'tests.fixtures.no_such_module'"))
    proc = subprocess.run([sys.executable, str(main)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert re.fullmatch(r"error: this program calls the custom op sbpc_test\.scaled_tanh\.default, which the Python "
                        r"module tests\.fixtures\.no_such_module registers, but tests\.fixtures\.no_such_module "
                        r"cannot be imported here \(No module named '[\w.]+'\); install it \(the version the plan was "
                        r"compiled with\) on every node", line), line  # the missing name depends on the import path


@pytest.mark.slow
@pytest.mark.parametrize("name, strategy", [("mixtral", "dp2"), ("mixtral", "fsdp2"), ("mixtral", "tp2"),
                                            ("qwen3_moe", "dp2"), ("qwen3_moe", "fsdp2")])
def test_transformers_moe_in_its_default_experts_implementation_equals_eager(name, strategy):
    """tp2: Megatron attention, experts' matrices split (``transformers.grouped_mm_fallback`` has SBP rules)."""
    model, inputs, reference = moe_model_and_reference(name)
    assert model.lm.config._experts_implementation == "grouped_mm"
    spec = {"dp2": "dp", "fsdp2": "fsdp", "tp2": ZOO[name].tp_strategy(2)}[strategy]
    plan = compile_cached(model, inputs, 2, spec)
    grouped = [n for n in plan.graph.nodes if n.op == "transformers.grouped_mm_fallback.default"]
    assert len(grouped) == 4  # gate_up and down of 2 layers
    if strategy == "tp2":
        assert all(any(str(s) != "B" for v in n.outputs for s in v.sbp) for n in grouped)
        assert plan.parallelism()["tp"].split_share > 0.99
    result = plan.run_virtual(*inputs)
    assert any("router" in g or ".gate." in g for g in result.grads)
    assert_close_to_eager(result, model, inputs, reference=reference)


def test_a_grouped_matmul_on_split_experts_multiplies_only_its_experts_rows():
    """The local kernel of a grouped matmul on split experts outside a recognised MoE layer (``passes/experts.py``
    writes transformers' grouped experts as all-to-all dispatch instead): summed over the shards, the full
    grouped matmul."""
    import transformers.integrations.moe  # noqa: F401  (registers the op)
    from ir.kernels import grouped_mm_of_experts
    g = torch.Generator().manual_seed(0)
    rows, weight = torch.randn(10, 4, generator=g), torch.randn(4, 4, 3, generator=g)
    offs = torch.tensor([3, 3, 7, 10], dtype=torch.int32)
    full = torch.ops.transformers.grouped_mm_fallback(rows, weight, offs)
    shards = [grouped_mm_of_experts(rows, weight[first:first + 2], offs, first) for first in (0, 2)]
    assert torch.equal(shards[0][3:], torch.zeros(7, 3)) and torch.equal(shards[1][:3], torch.zeros(3, 3))
    torch.testing.assert_close(shards[0] + shards[1], full)
