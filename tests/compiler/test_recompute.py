"""Activation recomputation: the recompute pass marks regions, emitted programs checkpoint them.

Equivalence with eager for recomputed programs under torchrun is in ``test_torchrun.py`` and
``tests/backends/test_pipeline_torchrun.py``; here: the marking, its errors, and that an emitted
program really drops the recomputed activations (bytes autograd keeps) while computing the same
gradients.
"""
from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist

from frontend.dsl import PlanError
from passes.manager import PassContext
from passes.recompute import recompute_pass
from strategy import StrategyError
from tests.capture_cache import compile_cached
from tests.launch import import_program
from tests.models import gpt_inputs, gpt_model


def _regions(plan) -> dict[str, int]:
    out: dict[str, int] = {}
    for node in plan.graph.nodes:
        region = node.attrs.get("recompute")
        if region:
            out[region] = out.get(region, 0) + 1
    return out


def test_whole_blocks_and_selected_submodules_are_marked():
    model, inputs = gpt_model(n_layer=3), gpt_inputs()
    plan = compile_cached(model, inputs, cluster=2, strategy={"mesh": {"dp": 2}, "recompute": True})
    assert sorted(_regions(plan)) == ["blocks.0", "blocks.1", "blocks.2"]
    assert 'recompute = "blocks.1"' in str(plan.ir)  # visible in the dump
    mlp = compile_cached(model, inputs, cluster=2, strategy={"mesh": {"dp": 2}, "recompute": ["blocks.*.mlp"]})
    assert sorted(_regions(mlp)) == ["blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp"]
    none = compile_cached(model, inputs, cluster=2, strategy={"mesh": {"dp": 2}})
    assert _regions(none) == {}


def test_a_glob_matching_nothing_is_one_clear_error():
    with pytest.raises(PlanError, match=r"strategy\['recompute'\]\[0\]: 'layers.\*' matches no module"):
        compile_cached(gpt_model(n_layer=2), gpt_inputs(), cluster=2,
                strategy={"mesh": {"dp": 2}, "recompute": ["layers.*"]})
    graph = compile_cached(gpt_model(n_layer=2), gpt_inputs(), cluster=2, strategy="dp").graph
    with pytest.raises(StrategyError, match="matches no module.*top-level modules are .*blocks"):
        recompute_pass(graph, PassContext(strategy={"recompute": ["layers.*"]}, world_size=2, train=True))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kept_bytes_and_grads(program_dir, monkeypatch) -> tuple[int, dict]:
    """Import an emitted one-rank program, run forward and backward in this process; the bytes autograd
    keeps for backward outside checkpointed regions, and the gradients."""
    program, runtime = import_program(program_dir / "main.py")
    for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                            SBPC_FORCE_GLOO="1").items():
        monkeypatch.setenv(name, value)
    runtime.init_distributed(60)
    try:
        weights = torch.load(program_dir / "weights.pt", weights_only=True)
        params = {n: runtime.shard(weights[n], layout).requires_grad_(True) for n, layout in runtime.PARAMS.items()}
        buffers = {n: weights[n] for n in runtime.BUFFERS}
        batch = runtime.synthetic_batch(0, 0)
        kept = []

        def pack(t):
            kept.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = program.forward(params, buffers, runtime.local_inputs(batch), runtime.bind_dims(batch),
                                      runtime.COORD)
        loss.backward()
        return sum(kept), {n: p.grad for n, p in params.items()}
    finally:
        dist.destroy_process_group()


def test_emitted_program_keeps_less_and_computes_the_same_gradients(tmp_path, monkeypatch):
    model, inputs = gpt_model(n_layer=4), gpt_inputs(batch=8, seq=16)
    kept, grads = {}, {}
    for name, extra in (("plain", {}), ("recompute", {"recompute": True})):
        plan = compile_cached(model, inputs, cluster=1, strategy={"mesh": {"dp": 1}, **extra})
        program_dir = plan.emit(tmp_path / name).parent
        kept[name], grads[name] = _kept_bytes_and_grads(program_dir, monkeypatch)
    assert "checkpoint(recompute_blocks_0" in (tmp_path / "recompute" / "main.py").read_text()
    assert kept["recompute"] < 0.35 * kept["plain"]  # four blocks keep only their inputs
    for key, grad in grads["plain"].items():
        torch.testing.assert_close(grads["recompute"][key], grad, rtol=1e-5, atol=1e-6, msg=key)
