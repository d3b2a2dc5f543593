"""Capture: torch.export and symbolic_trace into the IR, symbolic dims, loss detection, tied weights."""
import pytest
import torch
import torch.nn as nn

from compiler import Cluster, compile
from frontend.torch_capture import CaptureError, capture
from tests.models import gpt_inputs, gpt_model, lm_inputs, llama_model


def test_batch_and_sequence_are_symbolic():
    captured = capture(gpt_model(), gpt_inputs())
    idx, targets = captured.graph.inputs
    assert [str(d) for d in idx.type.shape] == ["batch", "seq"]
    assert [str(d) for d in targets.type.shape] == ["batch", "seq"]


def test_transformers_model_exports():
    captured = capture(llama_model(), lm_inputs())
    assert captured.graph.loss is not None
    assert any(n.op == "aten.scaled_dot_product_attention.default" for n in captured.graph.nodes)


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x, y=None, scale: float = 1.0):
        out = self.b(torch.relu(self.a(x))) * scale
        return {"logits": out, "loss": ((out - y) ** 2).mean()} if y is not None else out


def test_fx_method_uses_symbolic_trace_and_keeps_module_paths():
    x, y = torch.randn(4, 8), torch.randn(4, 2)
    captured = capture(Plain(), (x,), {"y": y}, method="fx")
    modules = {n.attrs.get("module") for n in captured.graph.nodes}
    assert {"a", "b"} <= modules


def test_loss_found_in_dict_and_by_loss_fn():
    model, x, y = Plain(), torch.randn(4, 8), torch.randn(4, 2)
    plan = compile(model, (x,), {"y": y}, cluster=Cluster.local(2))
    ref = model(x, y=y)["loss"]
    torch.testing.assert_close(plan.run_virtual(x, y).loss, ref)
    plan = compile(model, (x,), cluster=Cluster.local(2), loss_fn=lambda out: out.pow(2).mean())
    torch.testing.assert_close(plan.run_virtual(x).loss, model(x).pow(2).mean())


def test_output_without_loss_explains_what_to_do():
    with pytest.raises(CaptureError, match="loss_fn=.*mode='infer'"):
        capture(Plain(), (torch.randn(4, 8),))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.emb(ids)).logsumexp(-1).mean()


def test_tied_parameters_get_summed_gradient():
    model, ids = Tied(), torch.randint(0, 16, (4, 3))
    plan = compile(model, (ids,), cluster=Cluster.local(2))
    assert [p.target for p in plan.graph.params] == ["emb.weight"]
    model(ids).backward()
    torch.testing.assert_close(plan.run_virtual(ids).grads["emb.weight"], model.emb.weight.grad)


def test_uncapturable_model_names_source_line():
    from tests.fixtures.bad_models import example_inputs, make_model
    with pytest.raises(CaptureError) as err:
        capture(make_model(), example_inputs())
    assert "bad_models.py:15" in str(err.value) and "torch.where" in str(err.value)


def test_unknown_op_warns_and_runs_broadcast():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 6)

        def forward(self, x):
            return torch.special.i0(self.lin(x)).sum()

    model, x = Odd(), torch.randn(4, 6)
    with pytest.warns(UserWarning, match="aten.special_i0.default has no SBP rules"):
        plan = compile(model, (x,), cluster=Cluster.local(2))
    model(x).backward()
    torch.testing.assert_close(plan.run_virtual(x).grads["lin.weight"], model.lin.weight.grad, rtol=1e-5, atol=1e-6)


def test_capturing_leaves_the_model_buffers_alone():
    """Checking the traced program runs the model in training mode; BatchNorm's running statistics and
    batch counter must still be those the user had."""
    from tests.models import bn_cnn_model, cnn_inputs
    model = bn_cnn_model()
    before = {name: b.clone() for name, b in model.named_buffers()}
    captured = capture(model, cnn_inputs(), train=True)
    assert any(n.op == "aten._native_batch_norm_legit_functional.default" for n in captured.graph.nodes)
    assert {b.target for b in captured.graph.buffer_updates} == set(before)
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), name
    assert all(torch.equal(captured.weights[name], before[name]) for name in before)


def test_a_cast_to_what_a_tensor_already_is_makes_no_node():
    """``x.to(torch.float32)`` of a float32 tensor returns ``x`` itself (eager copies nothing), so the captured graph
    holds no node for it and the cost model prices no copy; a cast that changes the dtype stays."""
    class Casts(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc(x).to(torch.float32).float()
            return (h.to(torch.float64).sum() + h.sum()).to(torch.float32)

    x = torch.randn(3, 4)
    captured = capture(Casts(), (x,), method="export")
    casts = [n for n in captured.graph.nodes if n.op.startswith("aten.to.") or n.op == "aten._to_copy.default"]
    assert [c.outputs[0].type.dtype for c in casts] == ["f64", "f32"]
