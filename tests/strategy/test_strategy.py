"""The typed strategy (strategy/): one type, one normalisation, the dict form and its conventions."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from ir.sbp import B, P, Split
from strategy import (AUTO, KEYS, Layout, MeshSpec, Options, Pipeline, PrecisionSpec, Strategy, StrategyError, normalize)

ROOT = Path(__file__).resolve().parents[2]

EVERY_KEY = {
    "mesh": {"pp": 2, "dp": 2, "tp": 2},
    "params": {"blocks.*.attn.qkv.weight": {"tp": "S(0)"}, "lm_head.weight": "auto"},
    "activations": {"blocks.*.mlp.fc": {"tp": "S(2)"}},
    "sequence_parallel": True,
    "vocab_parallel": False,
    "fsdp": "dp",
    "grad_bucket_bytes": 1 << 20,
    "cp_attention": "a2a",
    "solved_layouts": True,
    "moe_overlap_chunks": 2,
    "regather_activations": True,
    "stage_layers": [[0, 1], [2, 3]],
    "stage_devices": [[0, 1, 2, 3], [4, 5, 6, 7]],
    "microbatches": 4,
    "schedule": "gpipe",
    "skip_ratio": 0.25,
    "recompute": ["blocks.*.mlp"],
    "precision": {"param": "fp32", "compute": "bf16", "reduce": "bf16"},
}


def test_every_key_reads_into_its_typed_field_and_back():
    strategy = Strategy.from_dict(EVERY_KEY)
    assert set(EVERY_KEY) == set(KEYS) - {"stages", "virtual_stages"}
    assert strategy.mesh == MeshSpec(("pp", "dp", "tp"), (2, 2, 2))
    assert strategy.params[0] == Layout("blocks.*.attn.qkv.weight", (("tp", Split(0)),))
    assert strategy.params[1].sbp == AUTO and strategy.params[1].on("tp") == AUTO
    assert strategy.options == Options(True, False, "dp", 1 << 20, "a2a", True, 2, True)
    assert strategy.pipeline == Pipeline(None, ((0, 1), (2, 3)), ((0, 1, 2, 3), (4, 5, 6, 7)), 4, "gpipe", None, 0.25)
    assert strategy.recompute == ("blocks.*.mlp",)
    assert strategy.precision == PrecisionSpec("fp32", "bf16", "bf16") and strategy.precision.shorthand is None
    assert strategy.to_dict() == EVERY_KEY and list(strategy.to_dict()) == [k for k in KEYS if k in EVERY_KEY]
    assert Strategy.from_dict(strategy.to_dict()) == strategy
    assert strategy.tensor_axis == "tp" and strategy.sequence_parallel and not strategy.vocab_parallel
    assert strategy.fsdp_axis == "dp" and strategy.positions == 2 and strategy.is_pipelined
    assert strategy.regather_activations


def test_strategies_are_frozen_values():
    strategy = Strategy.from_dict({"mesh": {"dp": 2}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        strategy.mesh = MeshSpec.of({"dp": 4})  # type: ignore[misc]
    assert strategy == Strategy.from_dict({"mesh": {"dp": 2}}) and hash(strategy) == hash(Strategy(MeshSpec.of({"dp": 2})))


def test_every_field_has_a_default_and_a_docstring():
    """Each field says what "not given" means, in the source next to it."""
    source = (ROOT / "strategy" / "types.py").read_text()
    for record in (Strategy, Options, Pipeline):
        for field in dataclasses.fields(record):
            assert field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
            assert re.search(rf"\n    {field.name}: [^\n]*\n    \"\"\"", source), f"{record.__name__}.{field.name}"


@pytest.mark.parametrize("given, world_size, expected", [
    (None, 4, {"mesh": {"dp": 4}}),
    ("none", 4, {"mesh": {"dp": 4}}),
    ("dp", 4, {"mesh": {"dp": 4}}),
    ("fsdp", 2, {"mesh": {"dp": 2}, "fsdp": "dp"}),
    ({"fsdp": True}, 2, {"mesh": {"dp": 2}, "fsdp": "dp"}),
    ({"params": {"w": "S(0)"}}, 2, {"mesh": {"dp": 2}, "params": {"w": {"dp": "S(0)"}}}),
    ({"mesh": {"tp": 2}, "params": {"w": "S(1)"}, "activations": {"m": "P"}}, 2,
     {"mesh": {"tp": 2}, "params": {"w": {"tp": "S(1)"}}, "activations": {"m": {"tp": "P(sum)"}}}),
    ({"microbatches": 4}, 2, {"mesh": {"pp": 1, "dp": 2}, "microbatches": 4}),
    ({"mesh": {"dp": "auto", "tp": 2}, "microbatches": 4}, 8, {"mesh": {"dp": "auto", "tp": 2}, "microbatches": 4}),
    ({"stage_layers": ((0, 1), (2, 3)), "mesh": {"pp": 2}, "skip_ratio": 0}, 2,
     {"mesh": {"pp": 2}, "stage_layers": [[0, 1], [2, 3]], "skip_ratio": 0.0}),
    ("auto", 8, "auto"),
])
def test_one_normalisation_reads_every_convention(given, world_size, expected):
    """Shorthands, ``"fsdp": True``, bare SBPs on a 1-D mesh, gradient accumulation as a one-stage pipeline."""
    assert normalize(given, world_size).to_dict() == expected


def test_without_a_world_size_a_plan_stays_as_written():
    assert normalize("dp").to_dict() == "dp" and normalize(None).shorthand == "dp"
    assert normalize({}).to_dict() == {} and normalize({"recompute": True}).to_dict() == {"recompute": True}


@pytest.mark.parametrize("given", [
    "auto", {"mesh": "auto"}, {"mesh": {"dp": "auto"}}, {"params": {"w": "auto"}}, {"params": {"w": {"dp": "auto"}}},
    {"sequence_parallel": "auto"}, {"fsdp": "auto"}, {"stages": "auto"}, {"microbatches": "auto"},
    {"schedule": "auto"}, {"skip_ratio": "auto"}, {"recompute": "auto"},
])
def test_auto_is_representable_anywhere_and_left_to_the_planner(given):
    strategy = normalize(given)
    assert strategy.wants_search
    fixed = strategy.fixed_parts().to_dict()
    assert AUTO not in fixed.values() and AUTO not in fixed.get("params", {}).values()
    assert normalize(strategy.to_dict()) == strategy


def test_fixed_parts_keep_what_the_user_chose():
    strategy = normalize({"mesh": {"dp": "auto", "tp": 2}, "params": {"a": "auto", "b": {"tp": "S(0)"}},
                          "sequence_parallel": True, "recompute": "auto", "schedule": "1f1b"})
    assert strategy.fixed_parts().to_dict() == {"mesh": {"dp": "auto", "tp": 2}, "params": {"b": {"tp": "S(0)"}},
                                                "sequence_parallel": True, "schedule": "1f1b"}
    assert not normalize({"mesh": {"dp": 2}}).wants_search


def test_pipeline_defaults_come_from_the_record():
    plain = Pipeline()
    assert (plain.schedule_name, plain.virtual_stage_count, plain.microbatch_count(4)) == ("1f1b", 1, 4)
    interleaved = Pipeline(schedule="interleaved", microbatches=8)
    assert (interleaved.virtual_stage_count, interleaved.microbatch_count(4)) == (2, 8)
    assert Pipeline(stages=("blocks.2",)).cut_count == 2 and Pipeline().cut_count is None


@pytest.mark.parametrize("given, world_size, message", [
    ({"microbatch": 4}, None, "strategy['microbatch']: unknown strategy key 'microbatch' (did you mean "
                              "'microbatches'?); the keys are: mesh, params, activations"),
    ("tp", None, "unknown strategy 'tp'; a one-word strategy is one of: dp, fsdp, auto"),
    ({"schedule": "gpip"}, None, "strategy['schedule']: unknown schedule 'gpip' (did you mean 'gpipe'?); expected "
                                 "one of: gpipe, 1f1b, interleaved, zb-h1, zbv, dualpipev, auto"),
    ({"params": {"w": {"tp": "S(0"}}}, None, "strategy['params']['w']['tp']: expected an SBP value"),
    ({"mesh": {"dp": 2}, "fsdp": "tp"}, None, "strategy['fsdp']: axis 'tp' is not in the mesh; the mesh axes are dp"),
    ({"mesh": {"dp": 3}}, 2, "strategy['mesh']: the mesh dp=3 has 3 devices, but the world has 2"),
    ({"mesh": {"dp": 2}, "sequence_parallel": True}, 2, "sequence_parallel splits over a tensor-parallel mesh axis"),
    ({"mesh": {"dp": 2}, "stages": ["blocks.1"]}, 2, "the plan has 2 pipeline stages, but the mesh has no pp axis"),
    (42, None, "a strategy is a dict or one of dp, fsdp, auto; found int"),
])
def test_bad_strategies_are_one_line_naming_the_key_and_the_choices(given, world_size, message):
    with pytest.raises(StrategyError) as caught:
        normalize(given, world_size)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_strategy_built_in_code_gets_the_same_checks():
    built = Strategy(MeshSpec.of({"dp": 2}), pipeline=Pipeline(microbatches=0))
    with pytest.raises(StrategyError, match="microbatches is a whole number of at least 1"):
        normalize(built)
    assert normalize(Strategy(MeshSpec.of({"dp": 2}), params=(Layout("w", (("dp", B),)),))).params[0].on("dp") == B
    assert Layout("w", (("tp", P),)).per_axis() == {"tp": P}


NO_DICT_LOOKUP = re.compile(r"strategy\w*(\.get\(|\[\s*[\"'])")


@pytest.mark.parametrize("package", ["passes", "backends", "compiler", "cost"])
def test_passes_backends_and_the_compiler_read_typed_fields(package):
    """No string lookup into a strategy dict (``strategy.get("mesh")``, ``strategy["fsdp"]``) outside the
    strategy package and the plan language: everything reads the typed fields."""
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in sorted((ROOT / package).rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1) if NO_DICT_LOOKUP.search(line)]
    assert not found, "\n".join(found)
