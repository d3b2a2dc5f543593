"""Frozen parameters (``requires_grad=False``): no gradient, no gradient sync, no optimizer state.

Checked on a model with one frozen ``nn.Linear`` and on transformers' Whisper, which freezes its
sinusoidal ``encoder.embed_positions``: the IR marks them, the virtual mesh equals eager (frozen
parameters have no gradient), and emitted programs leave them bit-identical.
"""
import functools
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ir.parser import IRSyntaxError, parse
from tests.compiler.test_tensor_parallel import tp
from tests.launch import (assert_state_close, run_programs, selected_tests, train_eager, training_program,
                          training_result)
from tests.capture_cache import compile_cached
from tests.models import assert_close_to_eager, gpt_inputs, gpt_model

SGD = (torch.optim.SGD, {"lr": 0.1})
ADAMW = (torch.optim.AdamW, {"lr": 1e-3, "eps": 1e-6})


class FrozenLinearMLP(nn.Module):
    """A frozen input projection (a fixed feature extractor), then two trainable layers."""

    def __init__(self):
        super().__init__()
        self.frozen_in = nn.Linear(8, 32)
        self.fc = nn.Linear(32, 32)
        self.out = nn.Linear(32, 4)
        self.frozen_in.requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(F.relu(self.frozen_in(x))))
        return F.cross_entropy(self.out(h), y)


def frozen_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return FrozenLinearMLP()


def mlp_inputs(seed: int = 1, batch: int = 8) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 8, generator=g), torch.randint(0, 4, (batch,), generator=g)


MLP_TP = {"frozen_in.weight": "S(0)", "frozen_in.bias": "S(0)", "fc.weight": "S(0)", "fc.bias": "S(0)",
          "out.weight": "S(1)"}


class WhisperLoss(nn.Module):
    """transformers' WhisperForConditionalGeneration: ``forward(input_features, labels)`` returns the loss."""

    def __init__(self, whisper: nn.Module):
        super().__init__()
        self.whisper = whisper

    def forward(self, input_features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.whisper(input_features=input_features, labels=labels).loss


def whisper_model(seed: int = 0) -> nn.Module:
    """A tiny Whisper (1 encoder and 1 decoder layer, width 16); its encoder.embed_positions is frozen."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    torch.manual_seed(seed)
    cfg = WhisperConfig(vocab_size=64, num_mel_bins=8, encoder_layers=1, decoder_layers=1, d_model=16,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                        decoder_ffn_dim=32, max_source_positions=8, max_target_positions=16, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, dropout=0.0,
                        attention_dropout=0.0, activation_dropout=0.0, use_cache=False)
    return WhisperLoss(WhisperForConditionalGeneration(cfg))


def whisper_inputs(seed: int = 1, batch: int = 4) -> tuple:
    """Log-mel features (8 bins x 16 frames: 8 encoder positions after the stride-2 conv) and labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 8, 16, generator=g), torch.randint(3, 64, (batch, 6), generator=g)


WHISPER_FROZEN = "whisper.model.encoder.embed_positions.weight"
WHISPER_TP = {
    "whisper.model.*.layers.*.*_attn.[qkv]_proj.weight": "S(0)", "whisper.model.*.layers.*.*_attn.[qv]_proj.bias": "S(0)",
    "whisper.model.*.layers.*.*_attn.out_proj.weight": "S(1)",
    "whisper.model.*.layers.*.fc1.weight": "S(0)", "whisper.model.*.layers.*.fc1.bias": "S(0)",
    "whisper.model.*.layers.*.fc2.weight": "S(1)",
}
MODELS = {"frozen_linear": (frozen_mlp, mlp_inputs, MLP_TP), "whisper": (whisper_model, whisper_inputs, WHISPER_TP)}
STRATEGIES = {"dp2": lambda globs: "dp", "tp2": lambda globs: {"mesh": {"tp": 2}, "params": tp(globs)},
              "fsdp2": lambda globs: "fsdp"}


@functools.cache
def shared_model(model_name: str) -> nn.Module:
    """One instance per model for the plans of this module, so that each is captured once (``compile_cached``);
    nothing here changes its weights (references are fresh instances)."""
    return MODELS[model_name][0]()


def compile_frozen(model_name: str, strategy_name: str, inputs: tuple, optimizer):
    """The plan of ``model_name`` under ``strategy_name`` on 2 ranks, from the model's one capture."""
    globs = MODELS[model_name][2]
    return compile_cached(shared_model(model_name), inputs, 2, STRATEGIES[strategy_name](globs), optimizer=optimizer)


def frozen_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def gradient_collectives(plan) -> list[str]:
    """Names in the IR dump's gradient buckets and backward collectives (``grad_of`` values)."""
    graph = parse(plan.ir)
    names = [p.name for b in graph.attrs.get("grad_buckets", []) for p in b["params"]]
    return names + [c["grad_of"].name for c in graph.attrs.get("backward_comm", [])]


def frozen_only_values(graph) -> set[str]:
    """Values computed from frozen parameters (at least one) and inputs only: they carry no gradient."""
    frozen = {id(p) for p in graph.params if p.kind == "param" and not p.requires_grad}
    constant = {id(v) for v in graph.inputs} | {id(p) for p in graph.params if p.kind == "buffer"}
    names = set()
    for node in graph.nodes:
        ins = node.input_values()
        if any(id(v) in frozen for v in ins) and all(id(v) in frozen or id(v) in constant for v in ins):
            frozen |= {id(o) for o in node.outputs}
            names |= {o.name for o in node.outputs}
        elif all(id(v) in constant for v in ins):
            constant |= {id(o) for o in node.outputs}
    return names


@pytest.fixture(scope="module")
def compiled():
    """Every (model, strategy) plan, compiled once for the virtual-mesh and IR tests."""
    cache = {}

    def get(model_name: str, strategy_name: str, optimizer=SGD):
        key = (model_name, strategy_name)
        if key not in cache:
            cache[key] = (shared_model(model_name), compile_frozen(model_name, strategy_name, MODELS[model_name][1](),
                                                                   optimizer))
        return cache[key]
    return get


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_virtual_mesh_equals_eager_without_frozen_gradients(compiled, model_name, strategy):
    model, plan = compiled(model_name, strategy)
    x = MODELS[model_name][1]()
    result = plan.run_virtual(*x)
    assert frozen_names(model) and not frozen_names(model) & set(result.grads)
    assert_close_to_eager(result, model, x)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_ir_marks_frozen_params_and_has_no_gradient_collective_for_them(compiled, model_name, strategy):
    model, plan = compiled(model_name, strategy)
    frozen = frozen_names(model)
    marked = {line.split('"')[1] for line in plan.ir.splitlines()
              if line.strip().startswith("param ") and line.endswith("{requires_grad = False}")}
    assert marked == frozen
    graph = parse(plan.ir)
    no_grad = frozen_only_values(graph) | {p.name for p in graph.params if p.target in frozen}
    assert no_grad
    assert not no_grad & set(gradient_collectives(plan))
    assert str(graph) == plan.ir


def test_frozen_activation_gather_has_no_backward_collective(compiled):
    """tp2: the column-parallel frozen layer's output is all-gathered in forward; backward has no
    reduce-scatter for it (nothing differentiates it), only for the trainable layers."""
    _, plan = compiled("frozen_linear", "tp2")
    gathers = [n for n in plan.graph.nodes if n.op == "comm.all_gather"]
    assert [n.input_values()[0].producer.op for n in gathers] == ["aten.relu.default"]
    assert gathers[0].outputs[0].name in frozen_only_values(plan.graph)
    backward = plan.graph.attrs["backward_comm"]
    assert backward and all(c["grad_of"] is not gathers[0].outputs[0] for c in backward)


def test_planner_counts_no_gradient_or_optimizer_state_for_frozen_params(compiled):
    from cost.ops import Precision
    from cost.segments import ir_profile
    _, plan = compiled("frozen_linear", "dp2")
    records = [r for segment in ir_profile(plan.graph, Precision.of("fp32")).segments for r in segment.params]
    frozen = {r.name: r for r in records if not r.trainable}
    assert set(frozen) == {"frozen_in.weight", "frozen_in.bias"}
    assert all(r.grad_axes == () for r in frozen.values())
    assert all(r.grad_axes == ("dp",) for r in records if r.trainable)
    unfrozen = frozen_mlp().requires_grad_(True)
    trained = compile_cached(unfrozen, mlp_inputs(), cluster=2, strategy="dp", optimizer=ADAMW)
    frozen_bytes = 4 * (8 * 32 + 32)
    for device, memory in plan.simulate(optimizer="adamw").estimate.memory.items():
        reference = trained.simulate(optimizer="adamw").estimate.memory[device]
        assert memory.parameters == reference.parameters
        assert reference.gradients - memory.gradients == frozen_bytes
        assert reference.optimizer_state - memory.optimizer_state == 2 * frozen_bytes  # Adam's two moments


def gpt_with_frozen_embedding() -> nn.Module:
    """The bundled GPT with its tied embedding / LM head frozen: a frozen parameter on two stages."""
    model = gpt_model()
    model.tok_emb.weight.requires_grad_(False)
    return model


PIPELINE = {"mesh": {"pp": 2}, "microbatches": 2}


@pytest.mark.parametrize("make, inputs, strategy", [
    (gpt_with_frozen_embedding, gpt_inputs, PIPELINE),
    (frozen_mlp, mlp_inputs, PIPELINE),
    (whisper_model, whisper_inputs, {"mesh": {"pp": 2}, "microbatches": 1}),
], ids=["gpt_frozen_tied_embedding", "frozen_linear", "whisper"])
def test_pipelined_virtual_mesh_equals_eager(make, inputs, strategy):
    """Copies of a frozen parameter on several stages are not a tied group: nothing sums their gradients."""
    model, x = make(), inputs()
    plan = compile_cached(model, x, cluster=2, strategy=strategy)
    assert not plan.graph.attrs.get("tied_params")
    assert_close_to_eager(plan.run_virtual(*x), model, x)


def test_text_format_round_trips_and_rejects_bad_options(compiled):
    _, plan = compiled("frozen_linear", "dp2")
    graph = parse(plan.ir)
    assert [p.requires_grad for p in graph.params][:2] == [False, False]
    assert str(graph) == plan.ir
    bad = plan.ir.replace("{requires_grad = False}", "{requires_grad = 0}", 1)
    with pytest.raises(IRSyntaxError, match="requires_grad = False"):
        parse(bad)


# -- emitted programs under torchrun ----------------------------------------------------------------

def frozen_pipeline_plan():
    """The 2-stage pipeline of a GPT whose tied embedding is frozen."""
    return compile_cached(gpt_with_frozen_embedding(), gpt_inputs(seed=10), cluster=2, strategy=PIPELINE,
                   optimizer=ADAMW)


@pytest.fixture(scope="module")
def emitted_runs(request, tmp_path_factory) -> dict:
    """The emitted programs this session's tests check, trained 3 AdamW steps under torchrun (sharing one
    launch): key -> (plan, folder, logged losses, saved weights)."""
    plans = {(params["model_name"], params["strategy"]): None
             for params in selected_tests(request, "test_emitted_program_keeps_frozen_weights_bit_identical").values()}
    for model_name, strategy in plans:
        plans[model_name, strategy] = compile_frozen(model_name, strategy, MODELS[model_name][1](seed=10), ADAMW)
    if selected_tests(request, "test_emitted_pipeline_keeps_a_frozen_tied_embedding_on_both_stages"):
        plans["pipeline"] = frozen_pipeline_plan()
    programs, folders = {}, {}
    for key, plan in plans.items():
        folders[key] = tmp_path_factory.mktemp("frozen")
        inputs = gpt_inputs if key == "pipeline" else MODELS[key[0]][1]
        programs[key] = training_program(plan, folders[key], [inputs(seed=10 + i) for i in range(3)], 3)
    results = run_programs(programs)
    return {key: (plans[key], folders[key], *training_result(folders[key], results[key])) for key in plans}


@pytest.mark.multiproc
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_emitted_program_keeps_frozen_weights_bit_identical(emitted_runs, model_name, strategy):
    make, inputs, _ = MODELS[model_name]
    data = [inputs(seed=10 + i) for i in range(3)]
    initial = {n: p.detach().clone() for n, p in make().named_parameters() if not p.requires_grad}
    plan, folder, losses, saved = emitted_runs[model_name, strategy]
    reference = make()
    expected = train_eager(reference, data, 3, ADAMW)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert_state_close(saved, reference)
    for name, value in initial.items():
        assert torch.equal(saved[name], value), name
    first = json.loads((folder / "losses.jsonl").read_text().splitlines()[0])
    trainable_shards = sum(p.trainable for p in plan.graph.params)
    assert first["optimizer_params_per_rank"] == [trainable_shards] * 2
    assert first["optimizer_state_per_rank"] == [trainable_shards] * 2


@pytest.mark.multiproc
def test_emitted_pipeline_keeps_a_frozen_tied_embedding_on_both_stages(emitted_runs):
    data = [gpt_inputs(seed=10 + i) for i in range(3)]
    plan, folder, losses, saved = emitted_runs["pipeline"]
    reference = gpt_with_frozen_embedding()
    expected = train_eager(reference, data, 3, ADAMW)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert_state_close(saved, reference)
    assert torch.equal(saved["tok_emb.weight"], gpt_with_frozen_embedding().tok_emb.weight.detach())
    first = json.loads((folder / "losses.jsonl").read_text().splitlines()[0])
    per_stage = [sum(p.trainable for p in plan.graph.params if p.mesh == f"stage{s}") for s in range(2)]
    assert first["optimizer_params_per_rank"] == per_stage == first["optimizer_state_per_rank"]
