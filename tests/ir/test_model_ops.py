"""Op rules on real graphs: the unbind regression, and transformers models whose every op has rules.

An op without rules still compiles, replicated on every rank: the data parallelism around it is
silently lost. These models once replicated ``tensor_split`` (Mamba), ``topk`` and
``repeat_interleave`` (MoE routers and experts) and ``numpy_T`` (Falcon).
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compiler import Cluster, compile
from ir.ops import RULES
from ir.sbp import Split
from tests.launch import train_eager, train_emitted
from tests.models import assert_close_to_eager

VOCAB = 64


class FusedQkv(nn.Module):
    """``q, k, v = qkv(x).view(b, s, 3, d).unbind(2)``: unbind of a middle dim, as fused attention does;
    a mean squared error loss."""

    def __init__(self, d: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.d = d
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.d).unbind(2)
        h = (q * k + v).reshape(b, s * self.d).view(b, s, self.d)
        return F.mse_loss(self.out(h).squeeze(-1), y)


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 6, 8, generator=g), torch.randn(4, 6, generator=g)) for _ in range(steps)]


def _dp2_plan(model: nn.Module, example: tuple):
    plan = compile(model, example, cluster=Cluster.local(2), strategy="dp", optimizer=(torch.optim.SGD, {"lr": 0.1}))
    unbinds = [n for n in plan.graph.nodes if n.op == "aten.unbind.int"]
    assert unbinds and all(o.sbp == (Split(0),) for n in unbinds for o in n.outputs)
    return plan


def test_unbind_of_a_middle_dim_under_dp2():
    """unbind(x, 2) was labelled unbind(x, 0): the batch split landed on the wrong dim (a wrong loss)."""
    model = FusedQkv()
    batch = _batches(1)[0]
    assert_close_to_eager(_dp2_plan(model, batch).run_virtual(*batch), model, batch)


@pytest.mark.multiproc
def test_unbind_of_a_middle_dim_emitted_under_dp2(tmp_path: Path):
    """The emitted program trains like eager SGD (its mean loss is a sum of shard shares, a local kernel)."""
    model, batches = FusedQkv(), _batches(3)
    reference = copy.deepcopy(model)
    losses, _ = train_emitted(_dp2_plan(model, batches[0]), tmp_path, batches, steps=3)
    expected = train_eager(reference, batches, 3, (torch.optim.SGD, {"lr": 0.1}))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-6)


def _lm(config_cls, model_cls, **config):
    torch.manual_seed(0)
    model = model_cls(config_cls(vocab_size=VOCAB, use_cache=False, bos_token_id=0, eos_token_id=0, **config))
    ids = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "labels": ids.clone()}


def qwen3_moe():
    """Top-k routing and ``batched_mm`` experts (``repeat_interleave`` of the tokens)."""
    import transformers as tf
    return _lm(tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
               moe_intermediate_size=32, decoder_sparse_step=1, max_position_embeddings=64, pad_token_id=0,
               experts_implementation="batched_mm")


def mamba():
    """Selective state space layers: the projections are cut with ``tensor_split``."""
    import transformers as tf
    return _lm(tf.MambaConfig, tf.MambaForCausalLM, hidden_size=32, state_size=4, num_hidden_layers=1, expand=2,
               conv_kernel=4, pad_token_id=0)


def falcon():
    """Falcon: parallel attention, in-place residual adds (made functional at capture), ``weight.T``
    (``numpy_T``)."""
    import transformers as tf
    return _lm(tf.FalconConfig, tf.FalconForCausalLM, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)


@pytest.mark.parametrize("build, ops", [
    (qwen3_moe, ["aten.topk.default", "aten.repeat_interleave.self_int"]),
    (mamba, ["aten.tensor_split.indices"]),
    (falcon, []),
], ids=["qwen3_moe", "mamba", "falcon"])
def test_model_ops_all_have_rules(build, ops):
    """Under dp2 no op of the captured graph lacks rules, and the ops that once did run on split data
    where they read the batch."""
    pytest.importorskip("transformers")
    model, inputs = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = compile(model, (), inputs, cluster=Cluster.local(2), strategy="dp")
    ruleless = sorted({n.op for n in plan.graph.nodes if n.op not in RULES})
    assert not ruleless, f"{type(model).__name__}: ops without SBP rules (replicated): {ruleless}"
    for op in ops:
        nodes = [n for n in plan.graph.nodes if n.op == op]
        assert nodes, f"{type(model).__name__} no longer uses {op}; pick a model that does"
        batch_nodes = [n for n in nodes if not all(v.kind == "param" for v in n.input_values())]
        for n in batch_nodes:
            assert all(isinstance(s, Split) for o in n.outputs for s in o.sbp), (
                f"{op} node %{n.name} in {n.attrs.get('module')} runs replicated: {[o.sbp for o in n.outputs]}")
