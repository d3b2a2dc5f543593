"""The emitted runtime's FSDP gathers (backends/runtime/fsdp.py) in one process: after the first step, one
all-gather per layer segment in forward and in backward (forward's last segment kept, not gathered again), one
reduce-scatter per forward segment, launched one segment ahead; gradients equal the unsharded computation.

The collectives are replaced by counting single-rank stand-ins (a world of one rank: a shard is the whole
tensor), so the test sees exactly which collectives the runtime issues and in what order; the real
multi-process programs are covered by the torchrun tests of sharded plans.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backends.runtime import core, fsdp


class Done:
    """A finished collective's handle."""

    def wait(self):
        return True


@pytest.fixture
def collectives(monkeypatch):
    """One rank on mesh axis ``dp``; the collectives it calls, in order, with the dtype they move."""
    calls = []

    def all_gather(parts, x, group=None, async_op=False):
        calls.append(("all_gather", x.dtype, async_op))
        parts[0].copy_(x)
        return Done() if async_op else None

    def reduce_scatter(out, inputs, group=None):
        calls.append(("reduce_scatter", out.dtype, False))
        out.copy_(inputs[0])

    monkeypatch.setattr(fsdp.dist, "all_gather", all_gather)
    monkeypatch.setattr(fsdp.dist, "reduce_scatter", reduce_scatter)
    monkeypatch.setitem(core.GROUPS, "dp", (None, [0], 0))
    monkeypatch.setattr(fsdp, "PREFETCH", fsdp.GatherPrefetch())
    return calls


def params() -> dict:
    torch.manual_seed(0)
    shapes = {"emb.weight": (16, 8), "blocks.0.ln.weight": (8,), "blocks.0.fc.weight": (8, 8),
              "blocks.0.fc.bias": (8,), "blocks.1.ln.weight": (8,), "blocks.1.fc.weight": (8, 8),
              "blocks.1.fc.bias": (8,), "head.weight": (16, 8)}
    return {name: torch.randn(shape).requires_grad_() for name, shape in shapes.items()}


def model(p: dict, x: torch.Tensor, gather, dtype=None) -> torch.Tensor:
    """A 2-block network reading each parameter through ``gather`` (compute in ``dtype`` for the matrices)."""
    h = F.embedding(x, gather(p["emb.weight"]))
    for i in range(2):
        h = F.layer_norm(h, (8,), gather(p[f"blocks.{i}.ln.weight"]))
        w, b = (gather(p[f"blocks.{i}.fc.{k}"], dtype) for k in ("weight", "bias"))
        h = h + torch.tanh(F.linear(h.to(w.dtype), w, b)).float()
    return F.linear(h, gather(p["head.weight"])).logsumexp(-1).sum()


@fsdp.regathering_params
def sharded_forward(p, x, dtype=None):
    return model(p, x, lambda t, cast=None: fsdp.comm_gather_param(t, axis="dp", dim=0, dtype=cast,
                                                                    grad_dtype=cast and torch.float32), dtype)


def test_gathers_go_by_layer_segment_after_the_first_step(collectives):
    p, x = params(), torch.randint(0, 16, (4, 5))
    reference = {n: g for n, g in zip(p, torch.autograd.grad(model(p, x, lambda t, cast=None: t), list(p.values())))}
    per_step = []
    for _ in range(3):
        for t in p.values():
            t.grad = None
        collectives.clear()
        sharded_forward(p, x).backward()
        per_step.append(list(collectives))
        for name, t in p.items():
            torch.testing.assert_close(t.grad, reference[name], rtol=0, atol=0, msg=name)
    gathers, reductions = (sum(c[0] == kind for c in per_step[0]) for kind in ("all_gather", "reduce_scatter"))
    assert (gathers, reductions) == (8 + 5, 8)  # learning: each parameter alone (backward needs 5: norms, matrices, head)
    # then, forward: emb | blocks.0 | blocks.1 | head, each launched when the one before is taken, and backward's
    # blocks.1 when head is taken; backward: head's gradients reduced, blocks.0 launched when blocks.1 is taken,
    # blocks.1's, blocks.0's and emb's gradients reduced (head is not gathered again: forward's last segment stays)
    assert [c[0] for c in per_step[1]] == ["all_gather"] * 5 + ["reduce_scatter", "all_gather"] + ["reduce_scatter"] * 3
    assert all(asynchronous for kind, _, asynchronous in per_step[1] if kind == "all_gather")
    assert per_step[2] == per_step[1]


def test_a_bf16_cast_happens_on_the_shard_and_the_gradient_stays_fp32(collectives):
    p, x = params(), torch.randint(0, 16, (4, 5))
    reference = torch.autograd.grad(model(p, x, lambda t, cast=None: t.to(cast) if cast else t, torch.bfloat16),
                                    list(p.values()))
    for step in range(2):
        for t in p.values():
            t.grad = None
        collectives.clear()
        sharded_forward(p, x, torch.bfloat16).backward()
        for (name, t), expected in zip(p.items(), reference):
            assert t.grad.dtype == torch.float32
            torch.testing.assert_close(t.grad, expected, rtol=0, atol=0, msg=name)
    # step 2: the blocks' segments mix fp32 norms and bf16 matrices, gathered as bytes in one collective each
    assert [(kind, dtype) for kind, dtype, _ in collectives if kind == "all_gather"] == \
        [("all_gather", torch.float32), ("all_gather", torch.uint8), ("all_gather", torch.uint8),
         ("all_gather", torch.float32), ("all_gather", torch.uint8), ("all_gather", torch.uint8)]
