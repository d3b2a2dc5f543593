"""The measure of lost parallelism: per mesh axis, the share of forward FLOPs on split data, and the
ops that run replicated (``plan.parallelism()``, printed by ``plan.explain()``)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.capture_cache import compile_cached
from tests.compiler.test_tensor_parallel import GPT_MEGATRON, tp
from tests.models import gpt_inputs, gpt_model


def test_gpt_under_dp_runs_all_its_flops_split():
    plan = compile_cached(gpt_model(), gpt_inputs(), cluster=4, strategy="dp")
    report = plan.parallelism()
    assert list(report.axes) == ["dp"] and report["dp"].size == 4
    assert report["dp"].split_share == 1.0 and report["dp"].replicated_ops == []
    assert report["dp"].split_flops == report.total_flops > 0
    assert "dp (4 devices): 100.0% of FLOPs split, 0.0% replicated" in plan.explain()


def test_tensor_parallel_gpt_replicates_the_head_unless_vocabulary_parallel():
    """Megatron attention and MLP split over tp; the LM head (a quarter of this small GPT's FLOPs)
    and the loss run whole on both devices, until the vocabulary is split too."""
    strategy = {"mesh": {"tp": 2}, "params": tp(GPT_MEGATRON)}
    plan = compile_cached(gpt_model(), gpt_inputs(), cluster=2, strategy=strategy)
    report = plan.parallelism()["tp"]
    head = report.replicated_ops[0]
    assert (head.op, head.module) == ("aten.linear.default", "lm_head")
    assert head.share == pytest.approx(report.replicated_share - sum(r.share for r in report.replicated_ops[1:]))
    modules = {r.module for r in report.replicated_ops}
    assert not any(".attn" in m or ".mlp" in m for m in modules)
    assert 0.6 < report.split_share < 0.8
    vocab = compile_cached(gpt_model(), gpt_inputs(), cluster=2,
                    strategy={**strategy, "vocab_parallel": True}).parallelism()["tp"]
    assert vocab.split_share > 0.99 and "lm_head" not in {r.module for r in vocab.replicated_ops}


class PooledHead(nn.Module):
    """A per-sample encoder (split over the batch), then a head on a softmax over the batch's pooled
    summary: a softmax over a tensor's only dim cannot be split, so it and the layer reading it run
    whole on every data-parallel device."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(16, 64)
        self.summary = nn.Linear(64, 64)
        self.out = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.encoder(x))
        context = self.summary(torch.softmax(h.mean(0), dim=0))
        return F.cross_entropy(self.out(h + context), y)


def test_a_batch_summary_makes_its_consumers_replicated():
    from cost.ops import SOFTMAX_FLOPS_PER_ELEMENT
    torch.manual_seed(0)
    batch = 8
    x, y = torch.randn(batch, 16), torch.randint(0, 4, (batch,))
    plan = compile_cached(PooledHead(), (x, y), cluster=2, strategy="dp")
    report = plan.parallelism()
    dp = report["dp"]
    replicated = {(r.op, r.module): r.flops for r in dp.replicated_ops}
    summary, softmax = 2 * 64 * 64, SOFTMAX_FLOPS_PER_ELEMENT * 64  # one row: 2 x in x out
    assert replicated == {("aten.linear.default", "summary"): summary, ("aten.softmax.int", ""): softmax}
    assert dp.replicated_flops == summary + softmax
    assert dp.split_flops == report.total_flops - dp.replicated_flops > 2 * batch * 16 * 64  # the encoder ...
    assert dp.split_share == pytest.approx(1 - (summary + softmax) / report.total_flops)
    assert dp.replicated_ops[0].share == pytest.approx(summary / report.total_flops)
    assert "replicated: %linear_1 aten.linear.default in summary" in plan.explain()


def test_pipeline_stages_are_measured_on_their_other_axes():
    strategy = {"mesh": {"pp": 2, "tp": 2}, "params": tp(GPT_MEGATRON), "microbatches": 2}
    report = compile_cached(gpt_model(), gpt_inputs(), cluster=4, strategy=strategy).parallelism()
    assert list(report.axes) == ["tp"]
    assert report["tp"].replicated_ops[0].module == "lm_head"
    with pytest.raises(KeyError, match="no mesh axis 'pp'"):
        report["pp"]
