"""Tests for the plan language (frontend/dsl/: the grammar, parser, printer, model checks and annotations)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from examples.gpt import make_model
from frontend.dsl import (
    GRAMMAR_FILE,
    PlanError,
    annotate,
    collect_annotations,
    format_plan,
    load_plan,
    merge_strategies,
    parse_plan,
    parse_plan_with_positions,
    sbp_plan,
    validate_plan,
)
from frontend.dsl.parser import terminal_regex
from strategy import AXIS_PATTERN, CP_ATTENTIONS, GLOB_PATTERN, SCHEDULES, SHORTHANDS, Strategy, normalize

PLANS_DIR = Path(__file__).resolve().parents[2] / "examples" / "plans"

# Each example plan with the GPT size and world size it is written for.
EXAMPLE_PLANS = {
    "data_parallel.sbp": (2, 4),
    "megatron_tp.sbp": (2, 2),
    "three_d.sbp": (4, 8),
    "heterogeneous.sbp": (4, 4),
    "skippipe.sbp": (4, 4),
}


def gpt_facts(n_layer: int) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """Module names and parameter shapes of the GPT example (tied weights under both names)."""
    model = make_model(n_layer=n_layer)
    modules = [name for name, _ in model.named_modules() if name]
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    return modules, shapes


GPT_MODULES, GPT_PARAMS = gpt_facts(4)


def parse_error(text: str, source: str = "plan.sbp") -> PlanError:
    with pytest.raises(PlanError) as caught:
        parse_plan(text, source)
    return caught.value


def validation_error(text: str, world_size: int, n_layer: int = 4) -> PlanError:
    strategy, positions = parse_plan_with_positions(text, "plan.sbp")
    modules, shapes = gpt_facts(n_layer)
    with pytest.raises(PlanError) as caught:
        validate_plan(strategy, module_names=modules, param_shapes=shapes, world_size=world_size,
                      positions=positions)
    return caught.value


def assert_points_at(error: PlanError, text: str, line: int, column: int) -> None:
    """The error names line:column and shows that source line with a caret under the column."""
    rendered = str(error).splitlines()
    assert (error.line, error.column) == (line, column), str(error)
    assert rendered[0].startswith(f"{error.source}:{line}:{column}: error: ")
    assert rendered[1] == "    " + text.splitlines()[line - 1]
    assert rendered[2] == "    " + " " * (column - 1) + "^"


# ---------------------------------------------------------------------------------------------
# Example plans


@pytest.mark.parametrize("name", sorted(EXAMPLE_PLANS))
def test_example_plan_parses_round_trips_and_fits_the_gpt(name: str) -> None:
    strategy = load_plan(PLANS_DIR / name)
    assert isinstance(strategy, Strategy) and strategy.to_dict()
    assert parse_plan(format_plan(strategy)) == strategy
    n_layer, world_size = EXAMPLE_PLANS[name]
    modules, shapes = gpt_facts(n_layer)
    validate_plan(strategy, module_names=modules, param_shapes=shapes, world_size=world_size)


def test_the_strategy_package_reads_names_as_the_grammar_does() -> None:
    """The dict checks accept exactly the axis names and globs the plan grammar parses."""
    assert AXIS_PATTERN.pattern == terminal_regex("AXIS").pattern
    assert GLOB_PATTERN.pattern == terminal_regex("GLOB").pattern


def test_every_example_file_is_listed() -> None:
    assert {p.name for p in PLANS_DIR.glob("*.sbp")} == set(EXAMPLE_PLANS)


def test_docs_show_the_real_grammar_and_examples() -> None:
    root = PLANS_DIR.parents[1]
    docs = (root / "docs" / "dsl.md").read_text()
    assert GRAMMAR_FILE.read_text() in docs
    for name in EXAMPLE_PLANS:
        assert (PLANS_DIR / name).read_text() in docs, name


def test_megatron_example_is_column_then_row_parallel() -> None:
    strategy = load_plan(PLANS_DIR / "megatron_tp.sbp").to_dict()
    assert strategy["mesh"] == {"tp": 2}
    params = strategy["params"]
    for column_parallel in ("attn.qkv", "mlp.fc"):
        assert params[f"blocks.*.{column_parallel}.weight"] == {"tp": "S(0)"}
    for row_parallel in ("attn.proj", "mlp.proj"):
        assert params[f"blocks.*.{row_parallel}.weight"] == {"tp": "S(1)"}


def test_statements_map_to_every_strategy_key() -> None:
    text = """
    # every key at least once
    mesh pp=2, dp=auto, tp=2
    param blocks.*.attn.qkv.weight: tp=S( 0 ), dp=P
    param lm_head.weight: auto
    activation blocks.*.mlp.fc: tp=S(2)
    sequence_parallel
    vocab_parallel off
    fsdp dp
    stage 0: layers 0..1 on devices 0..3, 7
    stage 1: layers 2..3 on device 4
    microbatches auto
    schedule interleaved
    virtual_stages 2
    skip_ratio 0
    recompute blocks.*, lm_head
    precision param=fp32, compute=bf16
    """
    assert parse_plan(text).to_dict() == {
        "mesh": {"pp": 2, "dp": "auto", "tp": 2},
        "params": {"blocks.*.attn.qkv.weight": {"tp": "S(0)", "dp": "P(sum)"},
                   "lm_head.weight": "auto"},
        "activations": {"blocks.*.mlp.fc": {"tp": "S(2)"}},
        "sequence_parallel": True,
        "vocab_parallel": False,
        "fsdp": "dp",
        "stage_layers": [[0, 1], [2, 3]],
        "stage_devices": [[0, 1, 2, 3, 7], [4]],
        "microbatches": "auto",
        "schedule": "interleaved",
        "virtual_stages": 2,
        "skip_ratio": 0.0,
        "recompute": ["blocks.*", "lm_head"],
        "precision": "bf16-mixed",
    }
    assert parse_plan(text).mesh.axes == ("pp", "dp", "tp")


@pytest.mark.parametrize("text, expected", [
    ("strategy dp", "dp"),
    ("# just a shorthand\nstrategy fsdp\n", "fsdp"),
    ("strategy auto", "auto"),
    ("", {}),
    ("mesh auto\nstages auto\nrecompute auto\nsequence_parallel auto",
     {"mesh": "auto", "stages": "auto", "recompute": "auto", "sequence_parallel": "auto"}),
    ("recompute all\nvocab_parallel on", {"recompute": True, "vocab_parallel": True}),
    ("recompute none", {"recompute": False}),
    ("stages at blocks.1\nstage 0: on devices 0, 1\nstage 1: on devices 2, 3",
     {"stages": ["blocks.1"], "stage_devices": [[0, 1], [2, 3]]}),
    ("stage 0: on device 0\nstage 1: from blocks.2 on device 1",
     {"stages": ["blocks.2"], "stage_devices": [[0], [1]]}),
    ("schedule gpipe\nskip_ratio 2.5e-1\nmicrobatches 16",
     {"schedule": "gpipe", "skip_ratio": 0.25, "microbatches": 16}),
    ("activation 0.fc: tp=S(2)\r\nrecompute 1\r\n",
     {"activations": {"0.fc": {"tp": "S(2)"}}, "recompute": ["1"]}),
])
def test_small_plans(text: str, expected: object) -> None:
    assert parse_plan(text).to_dict() == expected


def test_format_plan_is_canonical_text() -> None:
    strategy = {"mesh": {"dp": 2, "tp": 2}, "params": {"lm_head.weight": {"tp": "P", "dp": "B"}},
                "stage_devices": [[0, 1, 2, 3, 6], [4, 5]], "schedule": "interleaved",
                "virtual_stages": 2, "recompute": True}
    assert format_plan(strategy) == (
        "mesh dp=2, tp=2\n"
        "param lm_head.weight: tp=P(sum), dp=B\n"
        "stage 0: on devices 0..3, 6\n"
        "stage 1: on devices 4, 5\n"
        "schedule interleaved virtual_stages=2\n"
        "recompute all\n"
    )
    assert parse_plan(format_plan(strategy)) == normalize(strategy)
    assert normalize(strategy).to_dict()["params"]["lm_head.weight"]["tp"] == "P(sum)"
    assert format_plan("fsdp") == "strategy fsdp\n"


@pytest.mark.parametrize("strategy, message", [
    ({"microbatch": 4}, "unknown strategy key 'microbatch' (did you mean 'microbatches'?)"),
    ({"microbatches": 0}, "strategy['microbatches']: microbatches is a whole number of at least 1"),
    ({"params": {"x": {"tp": "S(0"}}}, "strategy['params']['x']['tp']: expected an SBP value"),
    ({"mesh": {"dp": 2}, "fsdp": "tp"}, "axis 'tp' is not in the mesh"),
    ({"stages": ["blocks.1"], "stage_layers": [[0, 1], [2, 3]]}, "not both"),
    ({"recompute": []}, "non-empty list"),
    ({"skip_ratio": True}, "skip_ratio is a fraction in [0, 1)"),
    ("tp", "unknown strategy 'tp'"),
])
def test_format_plan_rejects_invalid_dicts(strategy: object, message: str) -> None:
    with pytest.raises(PlanError) as caught:
        format_plan(strategy)
    assert message in str(caught.value)
    assert caught.value.line is None


# ---------------------------------------------------------------------------------------------
# Malformed plans: (text, line, column, message substring)

MALFORMED = [
    ("mesh dp=x", 1, 9, 'expected one of: a number (e.g. 8), "auto"; found \'x\''),
    ("mseh dp=2", 1, 1, "unknown statement 'mseh' (did you mean 'mesh'?)"),
    ("mesh dp=2\nmesh tp=2", 2, 1, "the mesh is given twice (first on line 1)"),
    ("mesh dp=2, dp=4", 1, 12, "mesh axis 'dp' is given twice"),
    ("mesh dp=2 tp=2", 1, 11, "found 'tp'"),
    ("mesh", 1, 5, "found end of line"),
    ("mesh dp=0", 1, 9, "needs a size of at least 1"),
    ("param x: tp=S(x)", 1, 13, "expected an SBP value such as S(0), B, P(sum) or P(max)"),
    ("param x: tp=S(-1)", 1, 13, "S(d) splits tensor dim d, which is 0 or more"),
    ("param x tp=S(0)", 1, 9, 'expected ":"; found \'tp\''),
    ("param x: tp=S(0), tp=B", 1, 19, "axis 'tp' of param x is given twice"),
    ("param x: tp=S(0)\n\nparam x: dp=B", 3, 7, "param x is given twice (first on line 1)"),
    ("mesh dp=2\n# tensor parallel next\nparam x: xp=S(0)", 3, 10, "axis 'xp' is not in the mesh"),
    ("mesh dp=2\nfsdp tp", 2, 6, "axis 'tp' is not in the mesh"),
    ("schedule foo", 1, 10, "unknown schedule 'foo'; expected one of: gpipe, 1f1b"),
    ("schedule gpip", 1, 10, "did you mean 'gpipe'?"),
    ("schedule zb_h1", 1, 10, "did you mean 'zb-h1'?"),
    ("schedule zbv virtual_stages=3", 1, 14, "the schedule is zbv"),
    ("microbatches -3", 1, 14, "microbatches is a whole number of at least 1 (or auto), found -3"),
    ("microbatches 4.5", 1, 15, "expected end of line; found '.5'"),
    ("skip_ratio 1", 1, 12, "skip_ratio is a fraction in [0, 1)"),
    ("skip_ratio -0.5", 1, 12, "found -0.5"),
    ("virtual_stages 2", 1, 1, "virtual_stages only applies to the interleaved schedule"),
    ("schedule 1f1b virtual_stages=2", 1, 15, "the schedule is 1f1b"),
    ("sequence_parallel onx", 1, 19, '"auto", "off", "on"; found \'onx\''),
    ("vocab_parallel on off", 1, 19, "expected end of line; found 'off'"),
    ("strategy ddp", 1, 10, "unknown strategy 'ddp' (did you mean 'dp'?)"),
    ("strategy dp\nmesh dp=2", 2, 1, "`strategy dp` stands for a whole plan"),
    ("stage 0: on device 0\nstage 0: on device 1", 2, 1, "stage 0 is given twice"),
    ("stage 1: on device 0", 1, 1, "stage 1 is given but stage 0 is missing"),
    ("stage 0:", 1, 9, 'expected one of: "from", "layers", "on"; found end of line'),
    ("stage 0 on device 1", 1, 9, 'expected ":"'),
    ("stage 0: from tok_emb", 1, 15, "stage 0 begins with the first module"),
    ("stage 0: on devices 3..1", 1, 21, "device range 3..1 runs backwards"),
    ("stage 0: on devices 1, 1", 1, 24, "stage 0 lists device 1 twice"),
    ("stage 0: layers 0..1 layers 2..3", 1, 22, "stage 0 says `layers` twice"),
    ("stage 0: layers 1..2", 1, 17, "stage 0 should start at layer 0"),
    ("stage 0: layers 0..1\nstage 1: on device 0", 2, 1, "stage 1 has no `layers a..b`"),
    ("stage 0: layers 0..1\nstage 1: layers 3..2", 2, 17, "stage 1 should start at layer 2"),
    ("stages at blocks.1\nstage 0: on device 0", 2, 10, "stages gives 2, stage_devices gives 1"),
    ("stages at blocks.*", 1, 11, "no wildcards"),
    ("stages at blocks.1, blocks.1", 1, 21, "stage cut 'blocks.1' is given twice"),
    ("stages blocks.1", 1, 8, 'expected one of: "at", "auto"'),
    ("stages at blocks.1\nstage 0: on device 0\nstage 1: from blocks.2 on device 1", 3, 15,
     "already given by `stages` on line 1"),
    ("recompute blocks.*,", 1, 20,
     "expected a name or glob (e.g. blocks.*.mlp.fc); found end of line"),
    ("activation blocks.0.mlp: tp=S(2) extra", 1, 34, "found 'extra'"),
    ("mesh dp=2\n  microbatches 8 # fine\n\tschedule 1f1b\n  fsdp\n", 4, 7, "found end of line"),
    ("123 go", 1, 1, "expected a statement (strategy, mesh, param"),
]


def test_malformed_table_is_large() -> None:
    assert len(MALFORMED) >= 25


@pytest.mark.parametrize("text, line, column, message", MALFORMED)
def test_malformed_plan_errors_point_at_the_problem(text: str, line: int, column: int,
                                                    message: str) -> None:
    error = parse_error(text)
    assert message in error.message, str(error)
    assert error.source == "plan.sbp"
    assert_points_at(error, text, line, column)


def test_plan_error_reads_like_a_compiler_error() -> None:
    syntax = parse_error("# 2x2\nmesh dp=x")
    assert str(syntax) == (
        "plan.sbp:2:9: error: expected one of: a number (e.g. 8), \"auto\"; found 'x'\n"
        "    mesh dp=x\n"
        "            ^"
    )
    semantic = parse_error("mesh dp=2\nmesh tp=2")
    assert str(semantic) == (
        "plan.sbp:2:1: error: the mesh is given twice (first on line 1); keep one of them\n"
        "    mesh tp=2\n"
        "    ^"
    )
    assert isinstance(semantic, ValueError)


def test_load_plan_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.sbp"
    path.write_text("mesh dp=2\nmicrobatches many\n")
    with pytest.raises(PlanError) as caught:
        load_plan(path)
    assert caught.value.source == str(path)
    assert str(caught.value).startswith(f"{path}:2:14: error:")


# ---------------------------------------------------------------------------------------------
# Round trip of random strategies over the GPT example's names

AXES = ("pp", "dp", "cp", "tp")
SBP_TEXTS = ("B", "P(sum)", "P(max)", "S(0)", "S(1)", "S(2)", "auto")
PARAM_GLOBS = sorted(set(GPT_PARAMS) | {re.sub(r"\.\d+\.", ".*.", n) for n in GPT_PARAMS} | {"*"})
MODULE_GLOBS = sorted(set(GPT_MODULES) | {"blocks.*", "blocks.[0-1]", "blocks.?.mlp"})


def placements(globs: list[str], axes: list[str]) -> st.SearchStrategy:
    per_axis = st.dictionaries(st.sampled_from(axes), st.sampled_from(SBP_TEXTS), min_size=1)
    return st.dictionaries(st.sampled_from(globs), st.just("auto") | per_axis,
                           min_size=1, max_size=4)


def auto_or(values: st.SearchStrategy) -> st.SearchStrategy:
    return st.just("auto") | values


@st.composite
def stage_plan(draw: st.DrawFn) -> dict:
    """Stage cuts (names, layer ranges or auto) and, maybe, devices per stage."""
    kind = draw(st.sampled_from(["names", "layers", "auto", "devices only"]))
    result: dict = {}
    if kind == "names":
        names = [n for n in GPT_MODULES if not set("*?[") & set(n)]
        result["stages"] = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3,
                                         unique=True))
        count = len(result["stages"]) + 1
    elif kind == "layers":
        cuts = sorted(draw(st.sets(st.integers(1, 3), max_size=3)))
        bounds = [0, *cuts, 4]
        result["stage_layers"] = [[a, b - 1] for a, b in zip(bounds, bounds[1:])]
        count = len(result["stage_layers"])
    else:
        if kind == "auto":
            result["stages"] = "auto"
        count = draw(st.integers(1, 4))
    if kind == "devices only" or draw(st.booleans()):
        devices = st.lists(st.integers(0, 15), min_size=1, max_size=5, unique=True)
        result["stage_devices"] = draw(st.lists(devices, min_size=count, max_size=count))
    return result


@st.composite
def strategy_dicts(draw: st.DrawFn) -> dict | str:
    if draw(st.integers(0, 19)) == 0:
        return draw(st.sampled_from(SHORTHANDS))
    strategy: dict = {}
    mesh_kind = draw(st.sampled_from(["dict", "dict", "auto", "absent"]))
    axes = ["dp", "tp"]
    if mesh_kind == "dict":
        axes = draw(st.lists(st.sampled_from(AXES), min_size=1, max_size=3, unique=True))
        strategy["mesh"] = {a: draw(auto_or(st.sampled_from([1, 2, 4, 8]))) for a in axes}
    elif mesh_kind == "auto":
        strategy["mesh"] = "auto"
    optional = {
        "params": placements(PARAM_GLOBS, axes),
        "activations": placements(MODULE_GLOBS, axes),
        "sequence_parallel": auto_or(st.booleans()),
        "vocab_parallel": auto_or(st.booleans()),
        "solved_layouts": auto_or(st.booleans()),
        "fsdp": auto_or(st.sampled_from(axes)),
        "microbatches": auto_or(st.integers(1, 64)),
        "skip_ratio": auto_or(st.floats(0, 1, exclude_max=True)),
        "recompute": st.booleans() | st.just("auto")
        | st.lists(st.sampled_from(MODULE_GLOBS), min_size=1, max_size=3),
        "cp_attention": auto_or(st.sampled_from(CP_ATTENTIONS)),
    }
    for key, values in optional.items():
        if draw(st.booleans()):
            strategy[key] = draw(values)
    if draw(st.booleans()):
        strategy.update(draw(stage_plan()))
    if draw(st.booleans()):
        strategy["schedule"] = draw(st.sampled_from(SCHEDULES))
        if strategy["schedule"] in ("interleaved", "auto") and draw(st.booleans()):
            strategy["virtual_stages"] = draw(auto_or(st.integers(1, 8)))
    return strategy


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(strategy_dicts())
def test_format_then_parse_gives_back_the_strategy(strategy: dict | str) -> None:
    normalize(strategy)  # the generator only makes valid strategies
    text = format_plan(strategy)
    parsed = parse_plan(text)
    assert parsed.to_dict() == strategy
    if isinstance(strategy, dict) and isinstance(strategy.get("mesh"), dict):
        assert list(parsed.mesh.axes) == list(strategy["mesh"])
    assert format_plan(parsed) == text


# ---------------------------------------------------------------------------------------------
# Validation against the model


def test_unknown_parameter_glob_suggests_the_closest_names() -> None:
    text = "mesh tp=2\nparam blocks.*.attn.qvk.weight: tp=S(0)"
    error = validation_error(text, world_size=2)
    assert "'blocks.*.attn.qvk.weight' matches no parameter" in error.message
    assert "did you mean 'blocks.*.attn.qkv.weight'" in error.message
    assert_points_at(error, text, 2, 7)


def test_unknown_module_name_suggests_the_closest_names() -> None:
    text = "stages at blocks.1, block.2"
    error = validation_error(text, world_size=4)
    assert "unknown module 'block.2' (did you mean 'blocks.2'" in error.message
    assert_points_at(error, text, 1, 21)
    recompute = validation_error("recompute blocks.*.mlpp", world_size=4)
    assert "matches no module" in recompute.message and "blocks.*.mlp" in recompute.message


def test_split_that_does_not_divide_gives_both_sizes() -> None:
    text = "mesh tp=5\nparam blocks.*.mlp.fc.weight: tp=S(0)"
    error = validation_error(text, world_size=5)
    assert "dim 0 of blocks.0.mlp.fc.weight (size 256)" in error.message
    assert "axis tp (size 5)" in error.message
    assert_points_at(error, text, 2, 34)


def test_split_of_a_missing_dim_is_reported() -> None:
    error = validation_error("mesh tp=2\nparam ln_f.bias: tp=S(1)", world_size=2)
    assert "ln_f.bias has only 1 dims" in error.message


def test_mesh_size_must_match_the_world_size() -> None:
    text = "mesh dp=2, tp=2"
    error = validation_error(text, world_size=8)
    assert "the mesh dp=2 x tp=2 has 4 devices, but the world has 8" in error.message
    assert_points_at(error, text, 1, 1)


def test_stage_devices_outside_the_world() -> None:
    text = ("mesh pp=2, dp=2\nstage 0: layers 0..1 on devices 0, 1\n"
            "stage 1: layers 2..3 on devices 2, 9")
    error = validation_error(text, world_size=4)
    assert "stage 1 is placed on device 9, but the world has 4 devices" in error.message
    assert_points_at(error, text, 3, 36)


def test_two_stages_on_one_device_need_the_interleaved_schedule() -> None:
    text = "mesh pp=2, dp=2\nstage 0: on devices 0, 1\nstage 1: on devices 1, 2"
    error = validation_error(text, world_size=4)
    assert "device 1 holds both stage 0 and stage 1" in error.message
    assert_points_at(error, text, 3, 21)
    strategy = parse_plan(text + "\nschedule interleaved")
    validate_plan(strategy, module_names=GPT_MODULES, param_shapes=GPT_PARAMS, world_size=4)


def test_v_shaped_schedules_take_two_stages_per_position() -> None:
    text = "mesh pp=2\nstages at blocks.1, blocks.2, blocks.3\nschedule zb-h1"
    assert "the plan has 4 stages, but the pp axis has size 2" in validation_error(text, world_size=2).message
    for schedule in ("zbv", "dualpipev"):
        strategy = parse_plan(text.replace("zb-h1", schedule))
        assert strategy.pipeline.schedule == schedule and format_plan(strategy).endswith(f"schedule {schedule}\n")
        validate_plan(strategy, module_names=GPT_MODULES, param_shapes=GPT_PARAMS, world_size=2)
    shared = "mesh pp=2\nstage 0: on device 0\nstage 1: on device 1\nstage 2: on device 1\nstage 3: on device 0"
    validate_plan(parse_plan(shared + "\nschedule zbv"), module_names=GPT_MODULES, param_shapes=GPT_PARAMS,
                  world_size=2)


def test_stage_count_and_layers_must_fit() -> None:
    pp = validation_error("mesh pp=2\nstages at blocks.1, blocks.2", world_size=2)
    assert "the plan has 3 stages, but the pp axis has size 2" in pp.message
    layers = validation_error("mesh pp=2\nstage 0: layers 0..1\nstage 1: layers 2..2",
                              world_size=2)
    assert "the model has 4 layers (blocks.0..blocks.3)" in layers.message
    assert layers.line == 3


def test_validation_without_positions_names_the_dict_path() -> None:
    with pytest.raises(PlanError) as caught:
        validate_plan({"activations": {"blocks.0.mlp.fcc": {"tp": "S(2)"}}},
                      module_names=GPT_MODULES, param_shapes=GPT_PARAMS, world_size=1)
    assert str(caught.value).startswith(
        "<strategy>: error: strategy['activations']['blocks.0.mlp.fcc']: unknown module")


def test_shorthand_strategies_validate() -> None:
    for shorthand in SHORTHANDS:
        validate_plan(shorthand, module_names=GPT_MODULES, param_shapes=GPT_PARAMS, world_size=3)


# ---------------------------------------------------------------------------------------------
# Annotations on modules


@sbp_plan("""
param fc.weight: tp=S(0)
param proj.weight: tp=S(1)
activation fc: tp=S(2)
recompute all
""")
class TinyMLP(torch.nn.Module):
    """fc then proj, annotated as Megatron column/row parallel."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 8)
        self.proj = torch.nn.Linear(8, 4)


class TinyNet(torch.nn.Module):
    """Two annotated MLPs and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.mlps = torch.nn.ModuleList([TinyMLP(), TinyMLP()])
        self.head = torch.nn.Linear(4, 2)


def test_collect_annotations_prefixes_names_with_the_module_path() -> None:
    net = TinyNet()
    annotate(net.mlps[1], "param fc.bias: tp=S(0)")
    annotate(net, "mesh tp=2\nmicrobatches 4")
    collected = collect_annotations(net)
    assert [(path, strategy.to_dict()) for path, _where, strategy in collected] == [
        ("", {"mesh": {"tp": 2}, "microbatches": 4}),
        ("mlps.0", {"params": {"mlps.0.fc.weight": {"tp": "S(0)"},
                               "mlps.0.proj.weight": {"tp": "S(1)"}},
                    "activations": {"mlps.0.fc": {"tp": "S(2)"}}, "recompute": ["mlps.0"]}),
        ("mlps.1", {"params": {"mlps.1.fc.weight": {"tp": "S(0)"},
                               "mlps.1.proj.weight": {"tp": "S(1)"}},
                    "activations": {"mlps.1.fc": {"tp": "S(2)"}}, "recompute": ["mlps.1"]}),
        ("mlps.1", {"params": {"mlps.1.fc.bias": {"tp": "S(0)"}}}),
    ]
    wheres = [where for _path, where, _strategy in collected]
    assert wheres[0] == "annotate() on the root module"
    assert re.fullmatch(r"@sbp_plan on class TinyMLP \(.*test_dsl\.py:\d+\)", wheres[1])
    assert wheres[3] == "annotate() on mlps.1"


def test_annotations_merge_into_the_plan() -> None:
    net = TinyNet()
    annotate(net, "mesh tp=auto")
    base = parse_plan("mesh tp=2\nparam head.weight: tp=S(0)\nrecompute head", "plan.sbp")
    merged = merge_strategies(base, "plan.sbp", collect_annotations(net))
    plain = merged.to_dict()
    assert plain["mesh"] == {"tp": 2}
    assert plain["params"]["head.weight"] == {"tp": "S(0)"}
    assert plain["params"]["mlps.1.proj.weight"] == {"tp": "S(1)"}
    assert plain["recompute"] == ["head", "mlps.0", "mlps.1"]
    assert parse_plan(format_plan(merged)) == merged


def test_merge_conflict_names_both_places() -> None:
    net = TinyNet()
    base = parse_plan("param mlps.0.fc.weight: tp=S(1)", "plan.sbp")
    with pytest.raises(PlanError) as caught:
        merge_strategies(base, "plan.sbp", collect_annotations(net))
    message = caught.value.message
    assert "conflicting SBP of param mlps.0.fc.weight on axis tp" in message
    assert "'S(1)' in plan.sbp" in message
    assert re.search(r"'S\(0\)' in @sbp_plan on class TinyMLP \(.*test_dsl\.py:\d+\) on mlps\.0",
                     message)


def test_merge_conflict_between_two_annotations() -> None:
    net = TinyNet()
    annotate(net, "mesh tp=2")
    annotate(net.mlps[0], "mesh tp=4")
    with pytest.raises(PlanError) as caught:
        merge_strategies({}, "plan.sbp", collect_annotations(net))
    assert ("conflicting meshes: mesh tp=2 in annotate() on the root module, but mesh tp=4 in "
            "annotate() on mlps.0") in caught.value.message


def test_merged_plan_is_checked_as_a_whole() -> None:
    net = TinyNet()
    with pytest.raises(PlanError) as caught:
        merge_strategies(parse_plan("mesh dp=2"), "plan.sbp", collect_annotations(net))
    assert "axis 'tp' is not in the mesh" in caught.value.message


def test_recompute_none_conflicts_with_annotated_modules() -> None:
    with pytest.raises(PlanError) as caught:
        merge_strategies({"recompute": False}, "plan.sbp", collect_annotations(TinyNet()))
    assert "conflicting recompute: False in plan.sbp, but ['mlps.0']" in caught.value.message


def test_shorthand_plans_and_annotations() -> None:
    annotations = collect_annotations(TinyNet())
    assert merge_strategies("dp", "plan.sbp", []).to_dict() == "dp"
    assert merge_strategies("auto", "plan.sbp", annotations).to_dict()["recompute"] == ["mlps.0", "mlps.1"]
    with pytest.raises(PlanError, match="shorthand `strategy dp`"):
        merge_strategies("dp", "plan.sbp", annotations)


def test_annotation_errors_raise_where_they_are_written() -> None:
    with pytest.raises(PlanError) as caught:
        annotate(torch.nn.Linear(2, 2), "param weight: tp=S(0) oops")
    assert caught.value.source.startswith("annotate() on Linear (")
    assert (caught.value.line, caught.value.column) == (1, 23)
    with pytest.raises(PlanError, match="stands for a whole plan"):
        sbp_plan("strategy dp")(type("Tiny", (torch.nn.Module,), {}))
    with pytest.raises(TypeError):
        annotate(object(), "recompute all")


def test_recompute_none_on_a_submodule_is_rejected() -> None:
    net = TinyNet()
    annotate(net.head, "recompute none")
    with pytest.raises(PlanError, match="cannot be limited to that module"):
        collect_annotations(net)


def test_moe_overlap_chunks_round_trips_and_rejects_a_count_below_one() -> None:
    """``moe_overlap_chunks K``: the strategy option (issue 16, FSMoE-style overlap), printed back as written."""
    strategy = parse_plan("mesh dp=2, ep=2\nmoe_overlap_chunks 4\n")
    assert strategy.to_dict() == {"mesh": {"dp": 2, "ep": 2}, "moe_overlap_chunks": 4}
    assert strategy.moe_overlap_chunks == 4 and parse_plan("mesh ep=2").moe_overlap_chunks == 1
    assert format_plan(strategy) == "mesh dp=2, ep=2\nmoe_overlap_chunks 4\n"
    assert Strategy.from_dict(strategy.to_dict()) == strategy
    error = parse_error("moe_overlap_chunks 0\n")
    assert "moe_overlap_chunks is a whole number of chunks, at least 1, found 0" in str(error)
    assert_points_at(error, "moe_overlap_chunks 0\n", 1, 20)
