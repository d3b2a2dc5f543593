"""Split backward (backends/runtime/split_backward.py): B then W give exactly the gradients of one backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backends.runtime.split_backward import backward_input


def _block(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """Norm, linear, attention-like mixing, linear and a residual: weights meet activations in several ops."""
    w1, b1, w2, norm = weights
    h = F.linear(F.layer_norm(x, (x.shape[-1],), norm), w1, b1).relu()
    mixed = torch.softmax(h @ h.transpose(-1, -2), -1) @ h
    return x + F.linear(mixed, w2)


def _stage(tied: bool, two_outputs: bool, input_grad: bool):
    """Three blocks (the third reuses the first's weights when ``tied``) and their seeds."""
    g = torch.Generator().manual_seed(0)
    layers = [[torch.randn(16, 8, generator=g, requires_grad=True), torch.randn(16, generator=g, requires_grad=True),
               torch.randn(8, 16, generator=g, requires_grad=True), torch.randn(8, generator=g, requires_grad=True)]
              for _ in range(3)]
    if tied:
        layers[2] = layers[0]
    x = torch.randn(2, 5, 8, generator=g, requires_grad=input_grad)
    h, between = x, []
    for weights in layers:
        h = _block(h, weights)
        between.append(h)
    outputs = [between[1], h * layers[2][3]] if two_outputs else [h]
    seeds = [torch.randn(o.shape, generator=g) for o in outputs]
    params = list({id(w): w for weights in layers for w in weights}.values())
    return x, outputs, seeds, params


@pytest.mark.parametrize("tied, two_outputs, input_grad", [
    (False, False, True), (True, False, True), (False, True, True), (True, True, True), (False, False, False),
], ids=["plain", "weights-used-twice", "two-outputs", "both", "first-stage-no-input"])
def test_b_then_w_equal_one_backward(tied, two_outputs, input_grad):
    x, outputs, seeds, params = _stage(tied, two_outputs, input_grad)
    torch.autograd.backward(outputs, seeds)
    expected_input = x.grad
    expected = [p.grad.clone() for p in params]

    x, outputs, seeds, params = _stage(tied, two_outputs, input_grad)
    (input_grad_found,), work = backward_input(outputs, seeds, [x])
    assert all(p.grad is None for p in params), "B must leave the weight gradients to W"
    if input_grad:
        torch.testing.assert_close(input_grad_found, expected_input, rtol=1e-5, atol=1e-6)
    else:
        assert input_grad_found is None
    work.run()
    for p, grad in zip(params, expected):
        torch.testing.assert_close(p.grad, grad, rtol=1e-5, atol=1e-6)


def test_w_accumulates_over_microbatches_like_backward():
    x, outputs, seeds, params = _stage(False, False, True)
    _, first = backward_input(outputs, seeds, [x])
    x2 = x.detach().requires_grad_()
    again = [_block(x2, params[:4])]
    _, second = backward_input(again, [torch.ones_like(again[0])], [x2])
    first.run()
    second.run()
    x, outputs, seeds, fresh = _stage(False, False, True)
    torch.autograd.backward(outputs, seeds)
    torch.autograd.backward(_block(x.detach(), fresh[:4]), torch.ones(2, 5, 8))
    for p, q in zip(params, fresh):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def test_the_loss_needs_no_seed():
    x, outputs, _, params = _stage(False, False, True)
    loss = outputs[0].square().mean()
    (found,), work = backward_input([loss], [None], [x])
    work.run()
    x2, outputs2, _, params2 = _stage(False, False, True)
    outputs2[0].square().mean().backward()
    torch.testing.assert_close(found, x2.grad)
    for p, q in zip(params, params2):
        torch.testing.assert_close(p.grad, q.grad)
