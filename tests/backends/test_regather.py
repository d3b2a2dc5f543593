"""The emitted runtime's regathered activations (backends/runtime/regather.py) in one process: an activation
gathered with ``comm_gather_activation`` is not what autograd keeps (the gathered tensor is freed after forward);
backward gathers it once more, once however many ops saved it, and the gradients are unchanged.

As in ``test_fsdp_prefetch.py``, the collectives are counting single-rank stand-ins (a world of one rank on the
``tp`` axis); the real multi-process programs are covered by the torchrun tests of sharded plans
(``tests/compiler/test_torchrun.py``, ``dp2_tp2_sp_regather``).
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from backends.runtime import collectives, core, fsdp, regather


class Waited:
    """A finished collective's handle that records when it is waited for."""

    def __init__(self, calls: list):
        self.calls = calls

    def wait(self):
        self.calls.append("wait")
        return True


@pytest.fixture
def gathers(monkeypatch):
    """One rank on mesh axis ``tp``; the collectives it calls, in order (all-gathers: whether asynchronous, and
    when an asynchronous one is waited for)."""
    calls = []

    def all_gather(parts, x, group=None, async_op=False):
        calls.append(("async " if async_op else "") + "all_gather")
        parts[0].copy_(x)
        return Waited(calls) if async_op else None

    def all_reduce(x, op=None, group=None):  # the reduce-scatter of a gradient, on CPU
        calls.append("all_reduce")

    for module in (collectives, regather):
        monkeypatch.setattr(module.dist, "all_gather", all_gather)
    monkeypatch.setattr(collectives.dist, "all_reduce", all_reduce)
    monkeypatch.setitem(core.GROUPS, "tp", (None, [0], 0))
    return calls


def weights() -> dict:
    torch.manual_seed(0)
    return {"q": torch.randn(8, 8, requires_grad=True), "k": torch.randn(8, 8, requires_grad=True),
            "ln": torch.randn(8, requires_grad=True)}


def block(w: dict, x: torch.Tensor, gather) -> torch.Tensor:
    """Two matmuls read one gathered norm output (as q and k projections do), a norm reads another."""
    h = gather(F.layer_norm(x, (8,), w["ln"]))
    y = F.linear(h, w["q"]) * torch.tanh(F.linear(h, w["k"]))
    return F.layer_norm(gather(y), (8,)).square().sum()


def gathering_into(made: list):
    """``comm_gather_activation`` on axis ``tp``, dim 1, keeping a weak reference to each result in ``made``."""
    def gather(t):
        full = regather.comm_gather_activation(t, "tp", 1)
        made.append(weakref.ref(full))
        return full
    return gather


def test_a_gathered_activation_is_kept_as_its_shard_and_gathered_once_more_in_backward(gathers):
    w, x = weights(), torch.randn(2, 5, 8)
    expected = torch.autograd.grad(block(w, x, lambda t: t), list(w.values()))
    made = []
    gather = gathering_into(made)

    loss = regather.regathering(block)(w, x, gather)
    gc.collect()
    assert [ref() for ref in made] == [None, None]  # autograd kept neither gathered tensor
    assert gathers == ["all_gather", "all_gather"]
    got = torch.autograd.grad(loss, list(w.values()))
    for name, a, b in zip(w, got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # backward: the norm's input (gathered last in forward) launched again when backward starts, waited for by
    # the norm's backward, which launches the gather of the matmuls' input (once for both) ahead of the norm's
    # gradient reduction (the reduce-scatter, an all-reduce on CPU) and everything after it up to the matmuls'
    assert gathers[2:] == ["async all_gather", "wait", "async all_gather", "all_reduce", "wait", "all_reduce"]


def test_without_regathering_autograd_keeps_the_gathered_tensor(gathers):
    w, x = weights(), torch.randn(2, 5, 8)
    made = []

    def gather(t):
        full = collectives.comm_all_gather(t, "tp", 1)
        made.append(weakref.ref(full))
        return full

    loss = block(w, x, gather)
    gc.collect()
    assert all(ref() is not None for ref in made)
    torch.autograd.grad(loss, list(w.values()))
    assert gathers == ["all_gather", "all_gather", "all_reduce", "all_reduce"]  # no second gather


def test_parameters_and_activations_are_regathered_together(gathers, monkeypatch):
    """FSDP's parameter gathers and kept activations share the saved-tensor hooks: under ``regathering_params``
    (what a forward that does both is decorated with) the activations are still freed after forward, and two
    steps' gradients equal the unsharded computation."""
    def reduce_scatter(out, inputs, group=None):
        gathers.append("reduce_scatter")
        out.copy_(inputs[0])

    monkeypatch.setattr(fsdp.dist, "reduce_scatter", reduce_scatter)
    monkeypatch.setitem(core.GROUPS, "dp", (None, [0], 0))
    monkeypatch.setattr(fsdp, "PREFETCH", fsdp.GatherPrefetch())
    w, x = weights(), torch.randn(2, 5, 8)
    expected = torch.autograd.grad(block(w, x, lambda t: t), list(w.values()))
    made = []
    gather = gathering_into(made)

    @fsdp.regathering_params
    def sharded(p, x):
        return block({name: fsdp.comm_gather_param(t, axis="dp", dim=0) for name, t in p.items()}, x, gather)

    for _ in range(2):
        made.clear()
        loss = sharded(w, x)
        gc.collect()
        assert len(made) == 2 and all(ref() is None for ref in made)
        for name, a, b in zip(w, torch.autograd.grad(loss, list(w.values())), expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
