"""Which values get a gradient (``ir.gradients.values_with_grad``): what backward computes, and so what the cost
model prices a backward for."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from frontend.torch_capture import capture
from ir.gradients import gradient_flow, values_with_grad
from passes.planner.evaluate import ModelView


class DetachedMax(nn.Module):
    """A log-sum-exp with its row max detached, as a stable softmax writes it."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 8)

    def forward(self, x):
        y = self.proj(x)
        shifted = y - y.amax(-1, keepdim=True).detach()
        return shifted.exp().sum(-1).log().mean()


class Classifier(nn.Module):
    """A linear head under cross entropy, whose vocabulary-parallel form detaches the logits' row max."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 16)

    def forward(self, x, target):
        return F.cross_entropy(self.head(x), target)


class Residual(nn.Module):
    """A pre-norm residual block on a projected input ``h``, read by the norm and by the residual addition."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        h = self.embed(x)
        return (h + self.proj(self.norm(h))).sum()


def _outputs_of(graph, op):
    return [o for n in graph.nodes if n.op == op for o in n.outputs]


def test_value_read_only_through_detach_gets_no_gradient():
    graph = capture(DetachedMax(), (torch.randn(3, 4),), train=True).graph
    grad = values_with_grad(graph)
    (row_max,) = _outputs_of(graph, "aten.amax.default")
    (exp,) = _outputs_of(graph, "aten.exp.default")
    assert id(row_max) not in grad  # the loss reads it only detached: autograd never runs amax's backward
    assert id(exp) in grad


def test_vocab_parallel_cross_entropy_prices_no_backward_for_its_row_max():
    graph = capture(Classifier(), (torch.randn(3, 4), torch.tensor([1, 5, 9])), train=True).graph
    decomposed, _ = ModelView(graph).variant(vocab_parallel=True)
    grad = values_with_grad(decomposed)
    (row_max,) = _outputs_of(decomposed, "aten.amax.default")
    (shifted,) = [o for o in _outputs_of(decomposed, "aten.sub.Tensor") if o.name.startswith("shifted")]
    assert id(row_max) not in grad and id(shifted) in grad


def test_a_value_read_twice_has_one_gradient_summed_into_the_other():
    graph = capture(Residual(), (torch.randn(3, 4),), train=True).graph
    flow = gradient_flow(graph)
    (norm,) = [n for n in graph.nodes if n.op == "aten.layer_norm.default"]
    (residual,) = [n for n in graph.nodes if n.op == "aten.add.Tensor"]
    assert flow.has_grad(norm) and flow.input_grads(norm)[0]
    # backward reaches the addition first (it is the later reader); the norm's gradient of h is added to it
    assert flow.accumulating_inputs(norm)[0] and not any(flow.accumulating_inputs(residual))
    # the norm's weight and bias are read once: their gradients are not summed
    assert not any(flow.accumulating_inputs(norm)[1:])
