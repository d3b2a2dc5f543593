"""Emitted programs are lean: ``main.py`` holds the plan's own code, ``runtime.py`` beside it only the runtime
that code reaches; pyflakes finds nothing in either file of any plan kind, values are named after their
modules, and the header carries the plan as DSL text.

That the programs train like eager PyTorch is checked under torchrun in ``tests/compiler/test_torchrun.py``
and ``tests/backends/test_pipeline_torchrun.py``; here one program also runs in this process.
"""
from __future__ import annotations

import ast
import importlib.util
import socket
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from pyflakes import api as pyflakes

from backends import runtime
from tests.backends.test_pipeline_virtual import MEGATRON
from tests.launch import import_program
from tests.compiler.test_frozen import frozen_mlp, gpt_with_frozen_embedding, mlp_inputs
from tests.models import bn_cnn_model, cnn_inputs, gpt_inputs, gpt_model
from tests.capture_cache import compile_cached

TP = {"mesh": {"dp": 2, "tp": 2}, "params": MEGATRON}
PLANS = {  # name: (model, inputs, ranks, strategy)
    "dp": (gpt_model, gpt_inputs, 2, "dp"),
    "fsdp": (gpt_model, gpt_inputs, 4, "fsdp"),
    "dp_tp": (gpt_model, gpt_inputs, 4, TP),
    "dp_tp_sp_vocab": (gpt_model, gpt_inputs, 4, {**TP, "sequence_parallel": True, "vocab_parallel": True}),
    "dp_tp_sp_regather": (gpt_model, gpt_inputs, 4, {**TP, "sequence_parallel": True, "regather_activations": True}),
    "pipeline_1f1b": (gpt_model, gpt_inputs, 2, {"mesh": {"pp": 2}, "microbatches": 4, "schedule": "1f1b"}),
    "pipeline_interleaved": (lambda: gpt_model(n_layer=4), gpt_inputs, 4,
                             {"mesh": {"pp": 2, "tp": 2}, "params": MEGATRON, "microbatches": 4,
                              "schedule": "interleaved", "virtual_stages": 2}),
    "recompute": (gpt_model, gpt_inputs, 4, {**TP, "recompute": ["blocks.*.mlp"]}),
    "fsdp_recompute": (gpt_model, gpt_inputs, 2, {"mesh": {"dp": 2}, "fsdp": "dp", "recompute": True}),
    "batch_norm": (bn_cnn_model, cnn_inputs, 2, "dp"),
    "frozen": (frozen_mlp, mlp_inputs, 2, "dp"),
    "frozen_pipeline": (gpt_with_frozen_embedding, gpt_inputs, 2, {"mesh": {"pp": 2}, "microbatches": 2}),
    "pipeline_zbv": (lambda: gpt_model(n_layer=4), gpt_inputs, 2, {"mesh": {"pp": 2}, "microbatches": 4,
                                                                   "schedule": "zbv"}),
    "dp_cp_ring": (gpt_model, gpt_inputs, 4, {"mesh": {"dp": 2, "cp": 2}, "cp_attention": "ring"}),
    "cp_allgather": (gpt_model, gpt_inputs, 2, {"mesh": {"cp": 2}, "cp_attention": "allgather"}),
    "fp16_mixed": (gpt_model, gpt_inputs, 2, {"mesh": {"dp": 2}, "precision": "fp16-mixed"}),
    "pipeline_fp16_mixed": (gpt_model, gpt_inputs, 2, {"mesh": {"pp": 2}, "microbatches": 2,
                                                       "precision": "fp16-mixed"}),
}
PIPELINE_RUNTIME = {"PipelineStep", "STAGE_TENSORS", "SCHEDULE", "TiedGradientSync", "BucketedGradientSync",
                    "split_microbatches", "infer_path"}


class Program(NamedTuple):
    """The text of an emitted program's two files."""

    main: str
    runtime: str


def read_program(main: Path) -> Program:
    return Program(main.read_text(), (main.parent / "runtime.py").read_text())


@pytest.fixture(scope="module")
def programs(tmp_path_factory) -> dict[str, Program]:
    """Every plan kind's program, emitted once."""
    out = {}
    for name, (make, inputs, ranks, strategy) in PLANS.items():
        plan = compile_cached(make(), inputs(), ranks, strategy)
        out[name] = read_program(plan.emit(tmp_path_factory.mktemp(name)))
    return out


class Findings:
    """A pyflakes reporter that keeps every message."""

    def __init__(self):
        self.messages: list[str] = []

    def unexpectedError(self, filename, message):
        self.messages.append(f"{filename}: {message}")

    def syntaxError(self, filename, message, lineno, offset, text):
        self.messages.append(f"{filename}:{lineno}: {message}")

    def flake(self, message):
        self.messages.append(str(message))


def pyflakes_findings(source: str, filename: str) -> list[str]:
    findings = Findings()
    pyflakes.check(source, filename, findings)
    return findings.messages


def unread_definitions(source: str, read_elsewhere: set[str] = frozenset()) -> list[str]:
    """Top-level names of a file that nothing else in it reads (``main`` is read by its entry line), but for
    ``read_elsewhere`` (the runtime names that main.py imports)."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    bound_by, reads = {}, set()
    for stmt in tree.body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)) or (isinstance(stmt, ast.Expr) and stmt is tree.body[0]):
            continue
        start = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])]) - 1
        bound, read = runtime.global_reads("".join(lines[start:stmt.end_lineno]))
        for name in bound:
            bound_by[name] = stmt
        reads |= read
    return sorted(set(bound_by) - reads - set(read_elsewhere))


def imports(source: str) -> tuple[set[str], set[str]]:
    """The top-level packages a file imports, and the names it imports from ``runtime``."""
    tree = ast.parse(source)
    packages = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    packages |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    from_runtime = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and node.module == "runtime" for alias in node.names}
    return packages, from_runtime


@pytest.mark.parametrize("name", list(PLANS))
def test_pyflakes_finds_nothing_in_any_plan_kind(programs, name):
    assert pyflakes_findings(programs[name].main, f"{name}/main.py") == []
    assert pyflakes_findings(programs[name].runtime, f"{name}/runtime.py") == []


@pytest.mark.parametrize("name", list(PLANS))
def test_every_top_level_definition_is_used_and_only_torch_is_imported(programs, name):
    """No dead code at the top level: each function, class and constant of runtime.py is read by runtime.py
    or imported by main.py, each of main.py read by main.py; main.py imports torch, the standard library
    and runtime.py, runtime.py only torch and the standard library."""
    program = programs[name]
    packages, from_runtime = imports(program.main)
    assert packages - set(sys.stdlib_module_names) <= {"torch", "runtime"} and "runtime" in packages
    assert from_runtime <= defined_names(program.runtime)
    assert unread_definitions(program.main) == []
    assert unread_definitions(program.runtime, from_runtime) == []
    assert imports(program.runtime)[0] - set(sys.stdlib_module_names) == {"torch"}


def test_plain_programs_carry_no_pipeline_runtime_and_pipelines_no_plain_loop(programs):
    for name in ("dp", "fsdp", "dp_tp", "recompute", "batch_norm", "frozen"):
        assert not PIPELINE_RUNTIME & defined_names(programs[name].runtime), name
        assert "\"--infer-stages\"" not in programs[name].runtime, name  # a pipeline's flag
    for name in ("pipeline_1f1b", "pipeline_interleaved", "frozen_pipeline", "pipeline_zbv"):
        assert "PipelineStep" in defined_names(programs[name].runtime)
        assert "OverlappedGradientSync" not in defined_names(programs[name].runtime)
        assert "\nSTAGES = Stages(\n    forward={0: stage_0, 1: stage_1" in programs[name].main
    assert "TiedGradientSync" in defined_names(programs["pipeline_1f1b"].runtime)  # the tied embedding and head
    assert "TiedGradientSync" not in defined_names(programs["frozen_pipeline"].runtime)  # frozen: nothing to sum


def test_main_py_holds_the_plans_own_code_and_imports_the_runtime_by_name(programs):
    """main.py: the docstring, its imports, forward, the entry line; runtime.py: the plan's tables and the
    runtime (no generated function, no entry line)."""
    dp = programs["dp"]
    assert "\nfrom runtime import DEVICE, OverlappedGradientSync, aten, comm_all_reduce, main\n" in dp.main
    body = ast.parse(dp.main).body
    assert [type(s).__name__ for s in body] == ["Expr", "Import", "ImportFrom", "FunctionDef", "If"]
    assert '"--infer-stages"' in programs["pipeline_1f1b"].runtime
    assert "PARAMS = {" in dp.runtime and "\ndef forward(" not in dp.runtime and "__main__" not in dp.runtime


def test_features_come_with_the_plans_that_use_them(programs):
    """FSDP's and activations' regathering, gradient buckets, recomputation, local kernels and loss scaling appear only where
    used."""
    names = {name: defined_names(program.runtime) for name, program in programs.items()}
    assert "comm_gather_param" in names["fsdp"] and "comm_gather_param" not in names["dp"]
    assert "@regathering_params\ndef forward(" in programs["fsdp"].main
    assert "@regathering\ndef forward(" in programs["dp_tp_sp_regather"].main  # activations kept as shards
    assert "comm_gather_activation" in names["dp_tp_sp_regather"]
    # the gathered tensor is written into its reader's call, never a local that would keep it alive to the end
    regathering = programs["dp_tp_sp_regather"].main
    assert "= comm_gather_activation(" not in regathering and "linear.default(comm_gather_activation(" in regathering
    assert not any("comm_gather_activation" in names[name] for name in names if name != "dp_tp_sp_regather")
    assert "OverlappedGradientSync" in names["dp"] and "OverlappedGradientSync" not in names["fsdp"]
    assert programs["dp"].main.endswith("main(forward, gradient_syncs=[OverlappedGradientSync], description=__doc__)\n")
    assert programs["fsdp"].main.endswith("    main(forward, description=__doc__)\n")
    assert "from torch.utils.checkpoint import checkpoint" in programs["recompute"].main
    assert "checkpoint" not in names["dp"] and "import checkpoint" not in programs["dp"].main
    kernels = set(runtime.pieces()["kernels"].definitions)
    assert kernels & names["dp_tp_sp_vocab"] == {"masked_embedding", "masked_gather"}  # the vocabulary-split loss
    assert not kernels & names["dp"]
    assert "AllGather" not in names["dp"] and "AllReduce" in names["dp"]
    split = {"SplitBackwardStep", "backward_input", "WeightWork"}  # the zero-bubble schedules' split backward
    assert split <= names["pipeline_zbv"]
    assert programs["pipeline_zbv"].main.endswith("step_type=SplitBackwardStep, description=__doc__)\n")
    assert not split & (names["pipeline_1f1b"] | names["pipeline_interleaved"])
    ring = {"ring_attention", "RingAttention", "attention_block", "merge_blocks"}  # context parallelism's ring
    assert ring <= names["dp_cp_ring"] and not ring & (names["cp_allgather"] | names["dp"] | names["dp_tp"])
    assert {"attention_rows", "arange_shard"} <= names["cp_allgather"]  # causal rows of a shard, its positions
    for name in ("fp16_mixed", "pipeline_fp16_mixed"):  # fp16 compute: dynamic loss scaling, its flags
        assert "DynamicLossScaler" in names[name] and '"--loss-scale"' in programs[name].runtime
        assert programs[name].main.endswith("loss_scaler=DynamicLossScaler, description=__doc__)\n")
    assert not any("DynamicLossScaler" in names[name] for name in names if "fp16" not in name)


def test_gpt_dp_program_is_lean(programs):
    """The bundled GPT (2 layers) under dp: main.py is the plan's own code — its docstring with the plan as DSL
    text, its imports, one line per IR node in forward, the entry line — 80 lines. Its runtime.py holds the
    plan's tables and the runtime it reaches: 997 lines, of which ~360 are sharded checkpoints, resume and the
    lost-peer report, ~120 token files, ~55 progress lines, ~50 training controls. (One file, before the
    runtime was split: 954 lines; split, 420; with all of issue 14's runtime, 1,060.)"""
    assert len(programs["dp"].main.splitlines()) < 300, len(programs["dp"].main.splitlines())
    assert len(programs["dp"].runtime.splitlines()) < 1050, len(programs["dp"].runtime.splitlines())


def test_values_are_named_after_their_modules(programs):
    dp, fsdp, tp = programs["dp"].main, programs["fsdp"].main, programs["dp_tp_sp_vocab"].main
    assert "    blocks_0_attn_qkv = aten.linear.default(blocks_0_ln_1, p['blocks.0.attn.qkv.weight']" in dp
    assert "    blocks_1_mlp_proj = aten.linear.default(gelu_1, " in dp
    assert "    blocks_0_attn_qkv_weight = comm_gather_param(p['blocks.0.attn.qkv.weight'], axis='dp', dim=0)" in fsdp
    assert "    add_reduce_scatter = comm_reduce_scatter(add, axis='tp', dim=1)" in tp
    assert "aten.layer_norm.default(add_reduce_scatter, " in tp
    for program in programs.values():
        assert " v_" not in program.main


def test_header_carries_the_plan_as_dsl_text(programs):
    dp, tp = programs["dp"], programs["dp_tp_sp_vocab"]
    assert "\nPlan:\n    mesh dp=2\nPasses: " in dp.main
    assert ("\nPlan:\n    mesh dp=2, tp=2\n    param blocks.*.attn.qkv.weight: tp=S(0)\n" in tp.main
            and "\n    sequence_parallel\n    vocab_parallel\nPasses: " in tp.main)
    assert "Strategy: {" not in dp.main
    assert "PLAN_TEXT = (  # the plan as DSL text, recorded in checkpoints\n    'mesh dp=2\\n'\n)" in dp.runtime
    assert "    'mesh dp=2, tp=2\\n'\n    'param blocks.*.attn.qkv.weight: tp=S(0)\\n'\n" in tp.runtime


class Clashing(nn.Module):
    """Submodules named like runtime functions, the program's arguments and a symbolic dim."""

    def __init__(self):
        super().__init__()
        self.shard, self.main, self.torch = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.batch, self.p, self.dims = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.batch(self.torch(self.main(self.shard(x))))
        return F.cross_entropy(self.dims(torch.relu(self.p(h))), y)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_module_names_that_clash_with_runtime_names_get_fresh_names(tmp_path, monkeypatch):
    """The program stays valid and computes eager's loss when modules are named ``shard``, ``main``,
    ``torch``, ``p``, ``dims`` or like a symbolic dim (``batch``): run in this process on one rank."""
    model, x, y = Clashing(), torch.randn(6, 8), torch.randint(0, 4, (6,))
    plan = compile_cached(model, (x, y), 1, "dp")
    path = plan.emit(tmp_path)
    source = read_program(path)
    assert pyflakes_findings(source.main, "main.py") == [] and pyflakes_findings(source.runtime, "runtime.py") == []
    assert "    shard_1 = aten.linear.default(" in source.main and "    torch_1 = aten.linear.default(" in source.main
    program, runtime_module = import_program(path)
    for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                            SBPC_FORCE_GLOO="1").items():
        monkeypatch.setenv(name, value)
    runtime_module.init_distributed(60)
    try:
        weights = torch.load(tmp_path / "weights.pt", weights_only=True)
        params = {n: runtime_module.shard(weights[n], layout) for n, layout in runtime_module.PARAMS.items()}
        batch = (x, y)
        loss, _ = program.forward(params, {}, runtime_module.local_inputs(batch), runtime_module.bind_dims(batch),
                                  runtime_module.COORD)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(loss, model(x, y), rtol=1e-5, atol=1e-6)


def defined_names(source: str) -> set[str]:
    """The top-level names a program defines."""
    return runtime.global_reads(source)[0]


# -- the runtime selection ------------------------------------------------------------------------

def test_runtime_modules_are_pyflakes_clean():
    for piece in [*runtime.pieces().values(), runtime._read_piece(runtime.PLAN)]:
        path = Path(importlib.util.find_spec(runtime.SOURCES[piece.name]).origin)
        assert pyflakes_findings(path.read_text(), piece.file) == []


def test_selection_follows_what_the_definitions_read():
    selection = runtime.select({"comm_all_reduce"}, "training", {})
    chosen = runtime.global_reads("\n".join(text for _, _, text in selection.sections))[0]
    assert chosen == {"comm_all_reduce", "AllReduce", "_all_reduce", "GROUPS"}
    assert selection.imports == ["import torch", "import torch.distributed as dist"]
    assert selection.entry_names == ["comm_all_reduce"] and selection.entry_imports == []
    titles = [title for title, _, _ in selection.sections]
    assert titles == ["Process groups and layouts", "Collectives on one mesh axis"]
    plain = runtime.select({"main"}, "training", {}).plan_names
    assert "PARAMS" in plain and not {"GRAD_BUCKETS", "STAGE_TENSORS", "forward"} & plain  # forward: an argument
    assert "STAGE_TENSORS" in runtime.select({"main"}, "pipeline", {}).plan_names


def test_a_name_nothing_defines_is_one_clear_error():
    with pytest.raises(runtime.RuntimeSourceError, match="the generated code reads no_such_kernel, which no "
                                                         "runtime piece defines"):
        runtime.select({"no_such_kernel"}, "training", {})
