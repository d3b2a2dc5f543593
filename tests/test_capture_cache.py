"""The capture cache the tests share (tests/capture_cache.py): a model is captured again unless it is the
same model, and every compile gets weights of its own."""
from unittest import mock

import torch
import torch.nn as nn

from tests import capture_cache
from tests.capture_cache import capture_once, fingerprint
from tests.models import gpt_inputs, gpt_model, llama_model


def key(value) -> str:
    return fingerprint(value, [])


class Scaled(nn.Module):
    """A linear layer whose output is multiplied by a plain attribute (not a parameter or buffer)."""

    def __init__(self, factor: float):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.factor = factor

    def forward(self, x):
        return self.linear(x) * self.factor


def scaled(factor: float) -> nn.Module:
    torch.manual_seed(0)
    return Scaled(factor)


def local_class_model(exponent: int) -> nn.Module:
    """A module of a class made by a function call, its forward closing over ``exponent``."""

    class Power(nn.Module):
        def forward(self, x):
            return x ** exponent

    return Power()


def test_the_same_model_built_twice_has_one_key():
    assert key(gpt_model(n_layer=2)) == key(gpt_model(n_layer=2))
    assert key(llama_model(n_layer=2)) == key(llama_model(n_layer=2))
    assert key(local_class_model(2)) == key(local_class_model(2))


def test_anything_a_capture_depends_on_changes_the_key():
    model = gpt_model(n_layer=2)
    frozen, nudged, evaluating = (gpt_model(n_layer=2) for _ in range(3))
    frozen.tok_emb.weight.requires_grad_(False)
    with torch.no_grad():
        nudged.blocks[1].mlp.fc.weight[0, 0] += 1e-6
    evaluating.eval()
    untied = gpt_model(n_layer=2)
    untied.lm_head.weight = nn.Parameter(untied.tok_emb.weight.detach().clone())  # same values, not tied
    others = [gpt_model(n_layer=3), gpt_model(n_layer=2, seed=1), frozen, nudged, evaluating, untied]
    assert len({key(model), *map(key, others)}) == 1 + len(others)
    assert key(scaled(2.0)) != key(scaled(3.0))
    assert key(local_class_model(2)) != key(local_class_model(3))
    assert key(nn.Linear(4, 4, device="meta")) != key(nn.Linear(4, 5, device="meta"))


def test_a_model_is_captured_once_and_each_capture_gets_its_own_weights():
    inputs = gpt_inputs(batch=2, seq=8)
    options = {"loss_fn": None, "train": True, "method": "auto"}
    with mock.patch.object(capture_cache, "capture_model", wraps=capture_cache.capture_model) as capture:
        first = capture_once(gpt_model(n_layer=1, seed=7), inputs, None, **options)
        second = capture_once(gpt_model(n_layer=1, seed=7), inputs, None, **options)
    assert capture.call_count == 1
    assert first.graph is not second.graph and str(first.graph) == str(second.graph)
    assert first.weights.keys() == second.weights.keys()
    name = next(iter(first.weights))
    expected = second.weights[name].clone()
    first.weights[name].add_(1.0)  # a compile changing its weights leaves the cached ones alone
    assert torch.equal(second.weights[name], expected)
    assert torch.equal(capture_once(gpt_model(n_layer=1, seed=7), inputs, None, **options).weights[name], expected)
    other = capture_once(gpt_model(n_layer=1, seed=8), inputs, None, **options)
    assert not torch.equal(other.weights[name], expected)


class MarksItsFirstCall(nn.Module):
    """Sets an attribute on its first call, as transformers models install their output hooks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        self.called = True
        return self.linear(x).sum()


def test_the_model_a_capture_changed_keeps_its_capture_an_equal_copy_does_not():
    options = {"loss_fn": None, "train": True, "method": "export"}
    x = (torch.randn(2, 4),)
    model = MarksItsFirstCall()
    with mock.patch.object(capture_cache, "capture_model", wraps=capture_cache.capture_model) as capture:
        capture_once(model, x, None, **options)
        assert model.called
        capture_once(model, x, None, **options)  # the same model, changed only by its capture
        assert capture.call_count == 1
        copy = MarksItsFirstCall()
        copy.called = True  # an equal model that was not captured: its own capture
        capture_once(copy, x, None, **options)
        assert capture.call_count == 2
        model.linear.weight.requires_grad_(False)  # changed after its capture: captured again
        capture_once(model, x, None, **options)
        assert capture.call_count == 3
