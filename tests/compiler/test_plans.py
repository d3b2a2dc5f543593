"""Plans from the DSL through ``compile()``: ``compiler/plans.py`` and issue 6's acceptance.

Every documented example compiles, runs equal to eager, and prints a plan that compiles back
to the same IR; random GPT plans round-trip the same way; malformed plans raise one
:class:`PlanError` at the right line and column, from ``compile()`` and from the CLI.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler.cli import main as sbpc
from compiler.plans import ARGUMENT_SOURCE, TEXT_SOURCE, model_facts, read_strategy, resolve
from examples.gpt import CausalSelfAttention, MLP
from frontend.dsl import PlanError, annotate, format_plan, load_plan, parse_plan, sbp_plan
from frontend.torch_capture import capture
from passes.skippipe import SkipPlan, parse_skip_plan
from tests.frontend.test_dsl import MALFORMED, assert_points_at
from tests.capture_cache import compile_cached
from tests.models import assert_close_to_eager, gpt_inputs, gpt_model

ROOT = Path(__file__).resolve().parents[2]
PLANS = ROOT / "examples" / "plans"

# The GPT (n_layer=2) that the error tests compile, with a batch that any mesh here splits.
GPT = gpt_model(n_layer=2)
GPT_INPUTS = gpt_inputs(batch=8, seq=8)
GPT_FACTORY = f"{ROOT / 'examples' / 'gpt.py'}:make_model"


def compiled(text_or_strategy, world_size: int, model=GPT, inputs=GPT_INPUTS):
    """``compile()`` on ``world_size`` local ranks (each model captured once: plans are the subject here)."""
    return compile_cached(model, inputs, world_size, text_or_strategy)


def assert_round_trips(plan, model, inputs, world_size: int) -> str:
    """The plan prints as DSL that compiles back to the identical IR; returns that text."""
    text = plan.to_dsl()
    assert format_plan(parse_plan(text)) == text
    again = compiled(text, world_size, model, inputs)
    assert again.ir == plan.ir
    return text


@pytest.fixture(scope="module")
def gpt_graph():
    """The captured graph of :data:`GPT`, with its tied aliases as compile() records them."""
    captured = capture(GPT, GPT_INPUTS, None, train=True)
    captured.graph.attrs["aliases"] = dict(captured.aliases)
    return captured.graph


# ---------------------------------------------------------------------------------------------
# resolve(): the forms strategy= takes


def test_every_form_of_a_plan_resolves_to_the_same_strategy(gpt_graph, tmp_path) -> None:
    path = PLANS / "megatron_tp.sbp"
    expected = load_plan(path)
    copy_without_suffix = tmp_path / "megatron_plan"
    copy_without_suffix.write_text(path.read_text())
    forms = [expected, path, str(path), path.read_text(), str(copy_without_suffix)]
    for form in forms:
        assert resolve(form, GPT, gpt_graph) == expected, form


def test_shorthands_and_python_conventions(gpt_graph) -> None:
    assert resolve("dp", GPT, gpt_graph).to_dict() == "dp"
    assert resolve(None, GPT, gpt_graph).to_dict() == "dp"
    assert resolve(" auto ", GPT, gpt_graph).to_dict() == "auto"
    assert resolve("fsdp", GPT, gpt_graph, world_size=2).to_dict() == {"mesh": {"dp": 2}, "fsdp": "dp"}
    # strategy.normalize reads fsdp=True as the dp axis and a bare SBP as the 1-D mesh's axis.
    python_style = {"fsdp": True, "params": {"blocks.*.mlp.fc.weight": "S(0)"},
                    "mesh": {"dp": 2}}
    assert resolve(python_style, GPT, gpt_graph).to_dict() == {
        "mesh": {"dp": 2}, "params": {"blocks.*.mlp.fc.weight": {"dp": "S(0)"}}, "fsdp": "dp"}


def test_world_size_gives_the_default_mesh_first(gpt_graph) -> None:
    resolved = resolve({"microbatches": 1, "params": {"ln_f.weight": {"dp": "B"}}}, GPT,
                       gpt_graph, world_size=4).to_dict()
    assert list(resolved) == ["mesh", "params", "microbatches"]
    assert resolved["mesh"] == {"dp": 4}
    assert resolve("dp", GPT, gpt_graph, world_size=4).to_dict() == {"mesh": {"dp": 4}}


def test_model_facts_come_from_the_graph(gpt_graph) -> None:
    facts = model_facts(gpt_graph)
    for name in ("blocks", "blocks.1", "blocks.1.attn", "blocks.1.attn.qkv", "lm_head", "ln_f"):
        assert name in facts.module_names
    assert facts.param_shapes["blocks.0.attn.qkv.weight"] == (192, 64)
    assert facts.param_shapes["lm_head.weight"] == facts.param_shapes["tok_emb.weight"]


def test_resolve_does_not_touch_the_graph(gpt_graph) -> None:
    before = str(gpt_graph)
    with pytest.raises(PlanError):
        resolve("mesh tp=2\nparam blocks.*.attn.qkv.weight: tp=S(0)\nparam nope: tp=B", GPT,
                gpt_graph)
    resolve(PLANS / "megatron_tp.sbp", GPT, gpt_graph)
    assert str(gpt_graph) == before


# ---------------------------------------------------------------------------------------------
# The documented examples: compile, equal eager, round trip


def skip_path_reference(model, inputs: tuple, paths: list[list[int]]):
    """Eager SkipPipe: microbatch m runs only the blocks of ``paths[m]``, in that order.

    For the SkipPipe example, stage s is block s (stage 0 also holds the embeddings, the last
    stage the final norm, the head and the loss). The loss is the mean of the microbatch losses.
    """
    idx, targets = inputs
    model.zero_grad()
    losses = []
    for path, ids, wanted in zip(paths, idx.chunk(len(paths)), targets.chunk(len(paths))):
        x = model.tok_emb(ids) + model.pos_emb(torch.arange(ids.shape[1]))
        for stage in path:
            x = model.blocks[stage](x)
        logits = model.lm_head(model.ln_f(x))
        losses.append(F.cross_entropy(logits.flatten(0, 1), wanted.flatten()))
    loss = torch.stack(losses).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def skip_plan_of(plan) -> SkipPlan:
    """The microbatch paths the pipeline pass recorded in the graph's attributes."""
    for value in plan.graph.attrs.values():
        if isinstance(value, SkipPlan):
            return value
        if isinstance(value, str) and value.startswith("skip-plan "):
            return parse_skip_plan(value)
    raise AssertionError("a plan with skip_ratio > 0 records no SkipPipe paths in graph.attrs "
                         f"(keys: {sorted(plan.graph.attrs)})")


def assert_equals_skip_reference(plan, model, inputs) -> None:
    result = plan.run_virtual(*inputs)
    loss, grads = skip_path_reference(model, inputs, skip_plan_of(plan).paths)
    torch.testing.assert_close(result.loss, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(result.grads[name], grad, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


# (file, n_layer, world size): the sizes each example is written for. A batch of 8 splits into
# every example's microbatches and data-parallel replicas; a sequence of 4 over any tp.
DOCUMENTED = [
    pytest.param("data_parallel.sbp", 2, 4, id="data_parallel"),
    pytest.param("megatron_tp.sbp", 2, 2, id="megatron_tp"),
    pytest.param("three_d.sbp", 4, 8, id="three_d", marks=pytest.mark.slow),
    pytest.param("heterogeneous.sbp", 4, 4, id="heterogeneous", marks=pytest.mark.slow),
    pytest.param("skippipe.sbp", 4, 4, id="skippipe", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name, n_layer, world_size", DOCUMENTED)
def test_documented_example_compiles_equals_eager_and_round_trips(
        name: str, n_layer: int, world_size: int) -> None:
    model, inputs = gpt_model(n_layer=n_layer), gpt_inputs(batch=8, seq=4)
    plan = compiled(PLANS / name, world_size, model, inputs)
    if (load_plan(PLANS / name).pipeline.skip_ratio or 0) > 0:
        assert_equals_skip_reference(plan, model, inputs)
    else:
        assert_close_to_eager(plan.run_virtual(*inputs), model, inputs)
    text = assert_round_trips(plan, model, inputs, world_size)
    assert parse_plan(text).mesh == plan.strategy.mesh


def test_documented_examples_are_the_five_of_the_issue() -> None:
    assert sorted(p.values[0] for p in DOCUMENTED) == sorted(p.name for p in PLANS.glob("*.sbp"))
    docs = (ROOT / "docs" / "dsl.md").read_text()
    for title in ("Data parallel", "Megatron tensor parallel", "3-D parallel",
                  "Heterogeneous placement", "SkipPipe"):
        assert re.search(rf"^### \d\. {re.escape(title)}", docs, re.MULTILINE), title


# ---------------------------------------------------------------------------------------------
# Plans written on the model: annotate() and @sbp_plan, merged with strategy=

MEGATRON_ATTENTION = ("param qkv.weight: tp=S(0)\nparam qkv.bias: tp=S(0)\n"
                      "param proj.weight: tp=S(1)")
MEGATRON_MLP = "param fc.weight: tp=S(0)\nparam fc.bias: tp=S(0)\nparam proj.weight: tp=S(1)"


@sbp_plan(MEGATRON_ATTENTION)
class MegatronAttention(CausalSelfAttention):
    """The GPT attention, annotated column-then-row parallel."""


@sbp_plan(MEGATRON_MLP)
class MegatronMLP(MLP):
    """The GPT MLP, annotated column-then-row parallel."""


def annotated_gpt() -> torch.nn.Module:
    """The GPT (n_layer=2) whose attention and MLP classes carry the Megatron plan."""
    model = gpt_model(n_layer=2)
    for block in model.blocks:
        block.attn.__class__ = MegatronAttention  # same module, annotated subclass
        block.mlp.__class__ = MegatronMLP
    return model


def test_annotations_compile_like_the_same_statements_in_a_plan() -> None:
    model = annotated_gpt()
    plan = compiled("mesh tp=2", 2, model)
    assert_close_to_eager(plan.run_virtual(*GPT_INPUTS), model, GPT_INPUTS)
    written_out = "mesh tp=2\n" + "".join(
        f"param blocks.{i}.{module}.{line.removeprefix('param ')}\n"
        for i in range(2) for module, text in (("attn", MEGATRON_ATTENTION), ("mlp", MEGATRON_MLP))
        for line in text.splitlines())
    assert compiled(written_out, 2).ir == plan.ir
    # The printed plan holds the annotations, so it compiles the plain model to the same IR.
    assert compiled(plan.to_dsl(), 2).ir == plan.ir


def test_annotate_on_an_instance_merges_with_the_plan() -> None:
    model = gpt_model(n_layer=2)
    annotate(model, "mesh tp=2")
    annotate(model.blocks[1].mlp, "param fc.weight: tp=S(0)")
    plan = compiled({}, 2, model)
    assert plan.strategy.to_dict()["params"] == {"blocks.1.mlp.fc.weight": {"tp": "S(0)"}}
    assert_close_to_eager(plan.run_virtual(*GPT_INPUTS), model, GPT_INPUTS)


def test_contradiction_with_an_annotation_names_both_places() -> None:
    text = "mesh tp=2\nparam blocks.0.attn.qkv.weight: tp=S(1)"
    with pytest.raises(PlanError) as caught:
        compiled(text, 2, annotated_gpt())
    error = caught.value
    assert "conflicting SBP of param blocks.0.attn.qkv.weight on axis tp" in error.message
    assert f"'S(1)' in {TEXT_SOURCE}:2" in error.message
    assert re.search(r"'S\(0\)' in @sbp_plan on class MegatronAttention \(.*test_plans\.py:\d+\) "
                     r"on blocks\.0\.attn", error.message)
    assert_points_at(error, text, 2, 33)  # the axis whose SBP conflicts


def test_annotation_naming_no_module_is_reported_where_it_was_written() -> None:
    model = gpt_model(n_layer=2)
    annotate(model.blocks[0], "recompute mpl")
    with pytest.raises(PlanError) as caught:
        compiled("mesh dp=2", 2, model)
    assert caught.value.source == "annotate() on blocks.0"
    assert "unknown module 'blocks.0.mpl' (did you mean 'blocks.0.mlp'" in caught.value.message


# ---------------------------------------------------------------------------------------------
# Property: random GPT plans print to DSL and compile back to the same plan

PROPERTY_GPT = gpt_model(n_layer=1)
PROPERTY_INPUTS = gpt_inputs(batch=4, seq=4)
MEGATRON_LAYOUTS = {"attn.qkv": "S(0)", "mlp.fc": "S(0)", "attn.proj": "S(1)", "mlp.proj": "S(1)"}


@st.composite
def gpt_plans(draw: st.DrawFn) -> tuple[dict, int]:
    """A strategy dict for the GPT example on 1, 2 or 4 ranks, and that world size."""
    world_size = draw(st.sampled_from([1, 2, 4]))
    axes = draw(st.permutations(["dp", "tp"]))[:draw(st.integers(1, 2))]
    first = draw(st.sampled_from([d for d in (1, 2, 4) if world_size % d == 0]))
    sizes = [world_size] if len(axes) == 1 else [first, world_size // first]
    strategy: dict = {"mesh": dict(zip(axes, sizes))}
    if "tp" in axes:
        params = {}
        for layer, split in MEGATRON_LAYOUTS.items():
            layout = draw(st.sampled_from([split, "B", None]))
            if layout is not None:
                params[f"blocks.*.{layer}.weight"] = {"tp": layout}
        if params:
            strategy["params"] = params
        for flag in ("sequence_parallel", "vocab_parallel"):
            if draw(st.booleans()):
                strategy[flag] = draw(st.booleans())
    if "dp" in axes and draw(st.booleans()):
        strategy["fsdp"] = "dp"
    return strategy, world_size


@pytest.mark.slow
@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(gpt_plans())
def test_random_gpt_plans_print_and_compile_back(drawn: tuple[dict, int]) -> None:
    strategy, world_size = drawn
    plan = compiled(strategy, world_size, PROPERTY_GPT, PROPERTY_INPUTS)
    text = assert_round_trips(plan, PROPERTY_GPT, PROPERTY_INPUTS, world_size)
    parsed = parse_plan(text)
    assert parsed == plan.strategy
    assert {k: v for k, v in parsed.to_dict().items() if k in strategy} == strategy


# ---------------------------------------------------------------------------------------------
# Malformed plans: one PlanError at line:column, from resolve(), compile() and the CLI


@pytest.mark.parametrize("text, line, column, message", MALFORMED)
def test_syntax_table_reaches_resolve_unchanged(gpt_graph, text: str, line: int, column: int,
                                                message: str) -> None:
    with pytest.raises(PlanError) as caught:
        resolve(text, GPT, gpt_graph)
    assert message in caught.value.message
    assert caught.value.source == TEXT_SOURCE
    assert_points_at(caught.value, text, line, column)


# (plan text, world size, line, column, message): plans that parse but do not fit the GPT
# (n_layer=2; hidden 64, MLP 256, vocabulary 512) or the world.
MISFITS = [
    ("mesh tp=2\nparam blocks.*.attn.qvk.weight: tp=S(0)", 2, 2, 7,
     "'blocks.*.attn.qvk.weight' matches no parameter (did you mean 'blocks.*.attn.qkv.weight'"),
    ("mesh tp=2\nactivation blocks.*.mlp.fcc: tp=S(2)", 2, 2, 12,
     "'blocks.*.mlp.fcc' matches no module (did you mean 'blocks.*.mlp.fc'"),
    ("mesh dp=2\n\n# comment\nrecompute blocks.0.atn", 2, 4, 11,
     "unknown module 'blocks.0.atn' (did you mean 'blocks.0.attn'"),
    ("mesh pp=2\nstages at block.1", 2, 2, 11,
     "unknown module 'block.1' (did you mean 'blocks.1'"),
    ("mesh pp=2\nstages at blocks.1.ln_1.weight", 2, 2, 11,
     "unknown module 'blocks.1.ln_1.weight' (did you mean 'blocks.1.ln_1'"),
    ("mesh dp=2\nrecompute blocks.*.mlp.fc.weight", 2, 2, 11,
     "'blocks.*.mlp.fc.weight' matches no module (did you mean 'blocks.*.mlp.fc'"),
    ("mesh tp=3\nparam blocks.*.mlp.proj.weight: tp=S(1)", 3, 2, 36,
     "splits dim 1 of blocks.0.mlp.proj.weight (size 256) over axis tp (size 3), which does "
     "not divide it"),
    ("mesh dp=1, tp=3\nparam blocks.0.attn.proj.weight: dp=B, tp=S(0)", 3, 2, 43,
     "(size 64) over axis tp (size 3)"),
    ("mesh tp=2\nparam ln_f.bias: tp=S(1)", 2, 2, 21, "ln_f.bias has only 1 dims"),
    ("mesh tp=2\nparam lm_head.weight: tp=P(sum)", 2, 2, 26,
     "a parameter is stored split, S(d), or whole, B"),
    ("mesh dp=2\nsequence_parallel", 2, 2, 1,
     "sequence_parallel splits over a tensor-parallel mesh axis, but the mesh has only dp"),
    ("mesh pp=2, dp=1\nvocab_parallel on", 2, 2, 1, "vocab_parallel splits over a tensor-parallel"),
    ("mesh pp=3\nstages at blocks.1", 3, 2, 1,
     "the plan has 2 stages, but the pp axis has size 3"),
    ("mesh pp=2\nstage 0: layers 0..0\nstage 1: layers 1..2", 2, 3, 17,
     "the model has 2 layers (blocks.0..blocks.1)"),
    ("mesh pp=2, dp=2\nstage 0: on devices 0, 1\nstage 1: on devices 1, 2", 4, 3, 21,
     "device 1 holds both stage 0 and stage 1; only the schedules with several stages per position"),
    ("mesh pp=2\nstage 0: on device 0\nstage 1: on device 0\nmicrobatches 2", 2, 3, 20,
     "device 0 holds both stage 0 and stage 1"),
    ("mesh dp=2\nstages at blocks.1", 2, 2, 1,
     "the plan has 2 pipeline stages, but the mesh has no pp axis to run them on; add pp=2"),
    ("mesh pp=3\nstages at blocks.1, blocks.0", 3, 2, 21,
     "stage cut 'blocks.0' comes before 'blocks.1' in the model"),
    ("mesh pp=2, dp=2\nstage 0: on devices 0..2\nstage 1: on device 3", 4, 2, 10,
     "stage 0 is placed on 3 devices, but every stage runs on the mesh of the axes other than "
     "pp (dp=2), which has 2"),
]

# Misfits only the world size shows: compile() passes it to resolve() once compiler/api.py does.
WORLD_MISFITS = [
    ("mesh dp=2, tp=2", 8, 1, 1, "the mesh dp=2 x tp=2 has 4 devices, but the world has 8"),
    ("mesh pp=2\nstage 0: on devices 0, 1\nstage 1: on device 2", 2, 3, 20,
     "stage 1 is placed on device 2, but the world has 2 devices (0..1), so no device would "
     "hold it"),
    ("mesh pp=2, dp=2\nstage 0: layers 0..0 on devices 0, 1\nstage 1: layers 1..1 on devices 4, 5",
     4, 3, 33, "stage 1 is placed on device 4, but the world has 4 devices"),
]


def test_malformed_tables_are_large_enough() -> None:
    assert len(MALFORMED) + len(MISFITS) + len(WORLD_MISFITS) >= 25
    assert len(MISFITS) + len(WORLD_MISFITS) >= 15


@pytest.mark.parametrize("text, world_size, line, column, message", MISFITS + WORLD_MISFITS)
def test_misfit_plans_fail_in_resolve(gpt_graph, text: str, world_size: int, line: int,
                                      column: int, message: str) -> None:
    with pytest.raises(PlanError) as caught:
        resolve(text, GPT, gpt_graph, world_size=world_size)
    assert message in caught.value.message, str(caught.value)
    assert_points_at(caught.value, text, line, column)


@pytest.mark.parametrize("text, world_size, line, column, message", MISFITS + WORLD_MISFITS)
def test_compile_raises_the_plan_error_and_nothing_else(text: str, world_size: int, line: int,
                                                        column: int, message: str) -> None:
    with pytest.raises(PlanError) as caught:
        compiled(text, world_size)
    assert message in caught.value.message, str(caught.value)
    assert_points_at(caught.value, text, line, column)


def test_compile_reports_a_broken_plan_file_by_name(tmp_path: Path) -> None:
    path = tmp_path / "broken.sbp"
    path.write_text("mesh tp=2\nparam blocks.*.attn.qkv.weight: tp=S(0\n")
    with pytest.raises(PlanError) as caught:
        compiled(path, 2)
    assert str(caught.value).startswith(f"{path}:2:")
    with pytest.raises(PlanError, match="plan file .*missing.sbp does not exist"):
        compiled(str(tmp_path / "missing.sbp"), 2)


@pytest.mark.parametrize("strategy, message", [
    ("ddp", "unknown strategy 'ddp' (did you mean 'dp'?)"),
    (42, "strategy= takes a dict"),
    ({"mesh": {"dp": 2}, "microbatch": 2}, "unknown strategy key 'microbatch'"),
    ({"mesh": {"tp": 2}, "params": {"blocks.*.mlp.fc.weight": {"tp": "S(0"}}},
     "strategy['params']['blocks.*.mlp.fc.weight']['tp']: expected an SBP value"),
])
def test_bad_strategy_arguments_are_plan_errors(strategy, message: str) -> None:
    with pytest.raises(PlanError) as caught:
        compiled(strategy, 2)
    assert message in str(caught.value)
    assert caught.value.source == ARGUMENT_SOURCE


def test_cli_prints_a_plan_error_without_a_traceback(tmp_path: Path, capsys) -> None:
    path = tmp_path / "plan.sbp"
    path.write_text("mesh tp=2\nparam blocks.*.mlp.fc.weight: tp=S(0)\n"
                    "param blocks.*.mlp.fcc.bias: tp=S(0)\n")
    status = sbpc(["compile", GPT_FACTORY, "--cluster", "local:2", "--batch", "2",
                   "--seq", "8", "--plan", str(path)])
    err = capsys.readouterr().err
    assert status == 2
    assert f"{path}:3:7: error: 'blocks.*.mlp.fcc.bias' matches no parameter" in err
    assert "    param blocks.*.mlp.fcc.bias: tp=S(0)\n          ^" in err
    assert "Traceback" not in err


def test_cli_print_plan_gives_a_plan_that_compiles_back(tmp_path: Path, capsys) -> None:
    args = ["compile", GPT_FACTORY, "--cluster", "local:2", "--batch", "2",
            "--seq", "8", "--dump-ir", str(tmp_path / "first.ir")]
    assert sbpc([*args, "--plan", str(PLANS / "megatron_tp.sbp"), "--print-plan"]) == 0
    printed = capsys.readouterr().out
    assert parse_plan(printed) == read_strategy(PLANS / "megatron_tp.sbp").strategy
    (tmp_path / "printed.sbp").write_text(printed)
    args[-1] = str(tmp_path / "second.ir")
    assert sbpc([*args, "--plan", str(tmp_path / "printed.sbp")]) == 0
    assert (tmp_path / "first.ir").read_text() == (tmp_path / "second.ir").read_text()
