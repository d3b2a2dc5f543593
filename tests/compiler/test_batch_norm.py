"""Training-mode batch norm keeps data parallelism: batch statistics are per-channel sums over each rank's
batch shard, all-reduced (SyncBatchNorm's numbers), so convolutions stay split over the batch; loss,
gradients and the updated running statistics equal eager."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from ir.sbp import Split
from tests.capture_cache import compile_cached
from tests.models import assert_close_to_eager, cnn_inputs, hf_resnet_model, resnet_style_model

WEIGHTED_OPS = ("aten.conv2d.default", "aten.convolution.default", "aten.linear.default")


def assert_buffers_follow_eager(result, model: nn.Module) -> None:
    """The virtual run reports every buffer eager training changed, with eager's new value (call after
    eager ran the same batch on ``model``)."""
    expected = dict(model.named_buffers())
    assert set(result.buffers) == set(expected), set(result.buffers) ^ set(expected)
    for name, value in result.buffers.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def weighted_nodes(plan) -> list:
    return [n for n in plan.graph.nodes if n.op in WEIGHTED_OPS]


@pytest.mark.parametrize("make", [resnet_style_model, hf_resnet_model], ids=["resnet_style", "transformers_resnet"])
def test_dp4_keeps_every_convolution_split_and_equals_eager(make):
    model = make()
    before = copy.deepcopy(model.state_dict())
    inputs = cnn_inputs(batch=8)
    plan = compile_cached(model, inputs, cluster=4, strategy="dp")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "compile changed the model"
    weighted = weighted_nodes(plan)
    assert len(weighted) >= 6
    assert [n.name for n in weighted if n.outputs[0].sbp != (Split(0),)] == []
    assert plan.parallelism()["dp"].split_share >= 0.95, str(plan.parallelism())
    channels = {int(n.outputs[0].type.shape[1]) for n in weighted if n.op != "aten.linear.default"}
    for node in plan.graph.nodes:
        if node.op.startswith("comm."):  # only per-channel statistics (and the loss's target count) move
            assert int(node.outputs[0].type.numel()) in channels | {1}, f"%{node.name}: {node.outputs[0].type}"
    result = plan.run_virtual(*inputs)
    assert all(torch.equal(w, before[k]) for k, w in plan.weights.items()), "a virtual step changed the plan"
    assert_close_to_eager(result, model, inputs)  # runs eager training mode: buffers move
    assert_buffers_follow_eager(result, model)


class Normed(nn.Module):
    """A linear layer over the last dim, then the norm under test; returns a scalar loss."""

    def __init__(self, norm: nn.Module, width: int):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin(x)).pow(2).mean()


NORMS = {
    "1d_on_2d": (lambda: nn.BatchNorm1d(4), (8, 4)),
    "1d_on_3d": (lambda: nn.BatchNorm1d(4), (8, 4, 5)),
    "3d": (lambda: nn.BatchNorm3d(4), (8, 4, 2, 3, 3)),
    "no_affine": (lambda: nn.BatchNorm2d(4, affine=False), (8, 4, 3, 3)),
    "no_running_stats": (lambda: nn.BatchNorm2d(4, track_running_stats=False), (8, 4, 3, 3)),
    "cumulative_average": (lambda: nn.BatchNorm2d(4, momentum=None), (8, 4, 3, 3)),
}


@pytest.mark.parametrize("name", list(NORMS))
def test_batch_norm_variants_under_dp2_equal_eager(name):
    make_norm, shape = NORMS[name]
    torch.manual_seed(0)
    model = Normed(make_norm(), shape[-1])
    if model.norm.track_running_stats:
        with torch.no_grad():
            model.norm.running_mean.uniform_(-1, 1)
            model.norm.running_var.uniform_(0.5, 2)
            model.norm.num_batches_tracked.fill_(3)
    x = torch.randn(shape)
    plan = compile_cached(model, (x,), cluster=2, strategy="dp")
    assert all(n.outputs[0].sbp == (Split(0),) for n in weighted_nodes(plan))
    assert not any("norm" in n.op for n in plan.graph.nodes), "batch statistics are written as sums"
    result = plan.run_virtual(x)
    assert_close_to_eager(result, model, (x,))
    assert_buffers_follow_eager(result, model)


def test_channel_split_batch_norm_keeps_its_channels_split():
    """Tensor parallel: convolutions split over output channels hand BatchNorm channel shards; its
    statistics stay per shard, nothing is gathered."""
    model = resnet_style_model()
    inputs = cnn_inputs(batch=4)
    strategy = {"mesh": {"tp": 2}, "params": {"stem.0.weight": "S(0)", "blocks.*.conv*.weight": "S(0)"}}
    plan = compile_cached(model, inputs, cluster=2, strategy=strategy)
    stem = next(n for n in plan.graph.nodes if n.op == "aten.conv2d.default")
    assert stem.outputs[0].sbp == (Split(1),)
    sums = [n for n in plan.graph.nodes if n.op == "aten.sum.dim_IntList" and n.attrs.get("module") == "stem.1"]
    assert sums and all(n.outputs[0].sbp == (Split(1),) for n in sums)
    result = plan.run_virtual(*inputs)
    assert_close_to_eager(result, model, inputs)
    assert_buffers_follow_eager(result, model)


def test_pipeline_updates_running_statistics_on_their_stage():
    """pp2 x dp2 with one microbatch: the stage that holds a BatchNorm moves its running statistics by
    the whole batch's statistics, as eager does (more microbatches are refused: see test_pipeline_virtual)."""
    model = resnet_style_model()
    inputs = cnn_inputs(batch=8)
    strategy = {"mesh": {"pp": 2, "dp": 2}, "stages": ["blocks.1"], "microbatches": 1}
    plan = compile_cached(model, inputs, cluster=4, strategy=strategy)
    result = plan.run_virtual(*inputs)
    assert_close_to_eager(result, model, inputs)
    assert int(dict(model.named_buffers())["stem.1.num_batches_tracked"]) == 6  # 5 warm-up steps, then this one
    assert_buffers_follow_eager(result, model)
