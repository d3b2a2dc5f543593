"""In-place writes: captured graphs are functional, and every virtual rank owns its tensors.

Before, an in-place op on the result of a collective ran once per rank on the one tensor the virtual
mesh handed to every rank (DeepSeek-V3's router divided its weights twice on 2 ranks), and in-place
ops had no layout rules at all.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from backends.virtual import run_virtual
from compiler import Cluster, compile
from frontend.torch_capture import CaptureError, capture
from ir.parser import parse
from tests.models import LabelledLoss, assert_close_to_eager, cnn_inputs, cnn_model, lm_inputs


def in_place_ops(graph) -> list[str]:
    """The ops of a graph that write an argument (their schema says ``Tensor(a!)``)."""
    from ir.verifier import resolve_op
    out = []
    for node in graph.nodes:
        if node.op.startswith("aten."):
            schema = resolve_op(node.op)._schema
            if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
                out.append(node.op)
    return out


class ScaledAfterReduce(nn.Module):
    """Normalises by a statistic over the batch, divided in place: under dp the statistic is all-reduced
    first, so the in-place division follows a collective."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        scale = h.abs().sum(0, keepdim=True)
        scale /= 4.0
        h = h / (scale + 1.0)
        h[:, :2] = 0.0  # a write through a view of h
        return F.cross_entropy(self.out(torch.relu_(h)), y)


def test_in_place_after_collective_equals_eager_under_dp2():
    torch.manual_seed(0)
    model = ScaledAfterReduce()
    inputs = (torch.randn(8, 6), torch.randint(0, 3, (8,)))
    plan = compile(model, inputs, cluster=Cluster.local(2), strategy="dp")
    assert in_place_ops(plan.graph) == []
    assert any(n.op == "comm.all_reduce" for n in plan.graph.nodes)
    assert_close_to_eager(plan.run_virtual(*inputs), model, inputs)


def deepseek_v3_model(seed: int = 0) -> nn.Module:
    """transformers' DeepseekV3ForCausalLM, tiny: one MoE layer whose router divides its top-k weights in
    place (``topk_weights /= denominator``); router weights drawn at random (they start at zero)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    torch.manual_seed(seed)
    cfg = DeepseekV3Config(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                           num_hidden_layers=1, first_k_dense_replace=0, num_attention_heads=4,
                           num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                           n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                           qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=32, use_cache=False,
                           bos_token_id=0, eos_token_id=0, pad_token_id=0, experts_implementation="batched_mm")
    model = LabelledLoss(DeepseekV3ForCausalLM(cfg))
    with torch.no_grad():
        model.lm.model.layers[0].mlp.gate.weight.normal_(0, 0.5)
    return model


@pytest.mark.slow
def test_deepseek_v3_router_in_place_division_under_dp2():
    model = deepseek_v3_model()
    inputs = lm_inputs(batch=4, seq=8)
    plan = compile(model, inputs, cluster=Cluster.local(2), strategy="dp")
    assert in_place_ops(plan.graph) == []
    assert_close_to_eager(plan.run_virtual(*inputs), model, inputs)


IN_PLACE_AFTER_ALL_REDUCE = """\
mesh world = [dp=2] devices [0, 1]
graph T {
  input %x: f32[4, 3] (S(0)) @world
  input %y: f32[3] (B) @world
  %s: f32[3] (P(sum)) @world = aten.sum.dim_IntList(%x, [0])
  %s_all_reduce: f32[3] (B) @world = comm.all_reduce(%s, axis="dp", op="sum")
  %d: f32[3] (B) @world = aten.div_.Scalar(%s_all_reduce, 2.0)
  %z: f32[3] (B) @world = aten.mul_.Scalar(%y, 3.0)
  output %d, %z
}
"""


def test_every_virtual_rank_owns_its_tensors():
    """A hand-written graph keeps in-place ops: each runs once per rank, on that rank's own tensor (the
    result of a collective; a broadcast input), and never on the caller's tensor."""
    graph = parse(IN_PLACE_AFTER_ALL_REDUCE)
    x, y = torch.randn(4, 3), torch.randn(3)
    y_before = y.clone()
    with pytest.warns(UserWarning, match="no SBP rules"):
        d, z = run_virtual(graph, {}, (x, y), mode="infer").outputs
    torch.testing.assert_close(d, x.sum(0) / 2)
    torch.testing.assert_close(z, y_before * 3)
    assert torch.equal(y, y_before)


def test_graph_without_writes_keeps_its_ops():
    """Functionalization runs only where something is written (it would turn flatten into a view)."""
    captured = capture(cnn_model(), cnn_inputs())
    assert any(n.op == "aten.flatten.using_ints" for n in captured.graph.nodes)
    assert not captured.graph.buffer_updates


def test_writes_become_explicit_buffer_updates():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("steps", torch.zeros((), dtype=torch.long))
            self.register_buffer("ema", torch.zeros(4))

        def forward(self, x):
            self.steps += 1
            h = self.fc(x)
            self.ema.mul_(0.5).add_(h.detach().mean(0) * 0.5)
            return (h * self.ema).sum()

    model = Counter()
    x = torch.randn(4, 4)
    plan = compile(model, (x,), cluster=Cluster.local(2), strategy="dp")
    assert in_place_ops(plan.graph) == []
    text = plan.ir
    assert "update %steps <- %" in text and "update %ema <- %" in text
    assert str(parse(text)) == text
    result = plan.run_virtual(x)
    assert_close_to_eager(result, model, (x,))
    assert set(result.buffers) == {"steps", "ema"}
    torch.testing.assert_close(result.buffers["ema"], model.ema)
    assert int(result.buffers["steps"]) == int(model.steps) == 1


def test_instance_norm_running_statistics_are_one_clear_error():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.InstanceNorm2d(4, track_running_stats=True)

        def forward(self, x):
            return self.norm(x).pow(2).mean()

    with pytest.raises(CaptureError, match=r"aten.instance_norm.default .* \(module norm\) writes running_mean, "
                                           r"running_var in place.*track_running_stats=False"):
        capture(Model(), (torch.randn(2, 4, 3, 3),))


def test_pipeline_refuses_a_buffer_read_on_one_stage_and_updated_on_another():
    class SharedAverage(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(4, 4)
            self.second = nn.Linear(4, 4)
            self.register_buffer("average", torch.zeros(4))

        def forward(self, x):
            h = self.second(self.first(x) + self.average)
            self.average.mul_(0.5).add_(h.detach().mean(0))
            return h.pow(2).mean()

    from passes.manager import PassFailed
    strategy = {"mesh": {"pp": 2}, "stages": ["second"], "microbatches": 2}
    with pytest.raises(PassFailed, match=r"buffer average takes a new value on stage 1 but is also read on "
                                         r"stage\(s\) \[0\]"):
        compile(SharedAverage(), (torch.randn(4, 4),), cluster=Cluster.local(2), strategy=strategy)


class LocalWrites(ScaledAfterReduce):
    """The same layers, writing only into tensors the forward made: a linear layer's result (``add_``), a new
    tensor through slice and select views (T5's ``_shift_right``), top-k weights (a router's ``/=``), a write
    through a view whose returned value is read, and the loss it returns."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h.add_(1.0)
        shifted = x.new_zeros(x.shape)
        shifted[:, 1:] = x[:, :-1].clone()
        shifted[:, 0] = 0.5
        weights, _ = torch.topk(h.softmax(-1), 2)
        weights /= weights.sum(-1, keepdim=True)
        corner = h[:, :2].mul_(2.0).sum(-1, keepdim=True)
        h = torch.relu_(h) + shifted * corner
        loss = F.cross_entropy(self.out(h) * weights[:, :1], y)
        loss += 0.01 * h.pow(2).mean()  # the output itself written (an auxiliary loss added in place)
        return loss


class AfterLinear(nn.Module):
    """One linear layer of ``width`` outputs, then ``writes(h, x, y)``: the writes a test is about, and the loss."""

    def __init__(self, writes, width: int):
        super().__init__()
        self.fc = nn.Linear(6, width)
        self.writes = writes

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.writes(self.fc(x), x, y)


def view_read_after_write(h, x, y):
    """A view made before a write and read after it sees the new value: torch's functionalization recomputes it."""
    first = h[:, :3]
    h.mul_(2.0)
    return F.cross_entropy(first, y) + h.sum()


def written_view_read_after_another_write(h, x, y):
    """What a write through a view returns is that view: a later write into its base changes it too."""
    corner = h[:, :3].mul_(2.0)
    torch.relu_(h)
    return F.cross_entropy(corner, y) + h.sum()


def promoting_write(h, x, y):
    """``h.add_(d)`` with ``d`` in float64 keeps ``h`` float32 where ``add`` would return float64."""
    h.add_(x[:, :3].double() * 0.5)
    return F.cross_entropy(h, y)


def write_through_reshape(h, x, y):
    """A write through a view other than slice/select (``view`` then a slice)."""
    h.view(-1)[:4].fill_(0.25)
    return F.cross_entropy(h, y)


def _count_second_traces():
    """A patch counting torch's functionalization of exported programs (a second trace of the model)."""
    from unittest import mock
    original = torch.export.ExportedProgram.run_decompositions
    calls = []

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)
    return mock.patch.object(torch.export.ExportedProgram, "run_decompositions", counted), calls


def compile_counting_second_traces(model: nn.Module) -> tuple:
    """``model`` compiled for dp on 2 ranks, its inputs, and how often torch functionalized its exported program."""
    torch.manual_seed(0)
    inputs = (torch.randn(8, 6), torch.randint(0, 3, (8,)))
    patch, calls = _count_second_traces()
    with patch:
        plan = compile(model, inputs, cluster=Cluster.local(2), strategy="dp")
    assert in_place_ops(plan.graph) == []
    assert_close_to_eager(plan.run_virtual(*inputs), model, inputs)
    return plan, len(calls)


def test_local_writes_are_made_functional_without_a_second_trace():
    torch.manual_seed(0)
    plan, second_traces = compile_counting_second_traces(LocalWrites())
    assert second_traces == 0
    assert {"aten.slice_scatter.default", "aten.select_scatter.default"} <= {n.op for n in plan.graph.nodes}


@pytest.mark.parametrize("writes, width", [(view_read_after_write, 6), (written_view_read_after_another_write, 6),
                                           (promoting_write, 3), (write_through_reshape, 3)])
def test_writes_that_are_not_local_go_through_torch_functionalization(writes, width):
    torch.manual_seed(0)
    _, second_traces = compile_counting_second_traces(AfterLinear(writes, width))
    assert second_traces == 1


def test_local_rewrite_keeps_every_node_name_of_the_export():
    """The export's graph signature names inputs and outputs by node: the rewritten graph keeps them."""
    from frontend.local_writes import functional_copy, written_args
    model = LocalWrites()
    program = torch.export.export(model, (torch.randn(8, 6), torch.randint(0, 3, (8,))), strict=False)
    written = [n for n in program.graph.nodes if written_args(n)]
    rewritten = functional_copy(program.graph, written)
    names = {n.name for n in rewritten.nodes}
    assert {n.name for n in program.graph.nodes} - {n.name for n in written} <= names
    assert not any(written_args(n) for n in rewritten.nodes)
    assert len(written) == 7  # add_, copy_, fill_, div_, mul_, relu_, the loss's add_
