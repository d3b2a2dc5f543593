"""Property test: in-place writes made functional in the export's graph compute what eager computes.

Random sequences of writes (``add_``, ``mul_``, ``fill_``, ``copy_``) into a fresh tensor or through
slice/select views of it, interleaved with reads of views made before or after the writes, are exported;
the graph :func:`frontend.local_writes.functional_copy` makes is run and compared with the module itself.
A sequence it leaves to torch's functionalization (a view read after a later write) must say so (None).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from frontend.local_writes import functional_copy, written_args

VIEWS = [(), (("rows", 1, 3),), (("cols", 2, 5),), (("row", 2),), (("col", 0),),
         (("rows", 0, 3), ("col", 1)), (("cols", 1, 6), ("rows", 2, 4))]
"""Views of a 4 x 6 tensor: none, a slice of rows or columns, one row or column, and slices of slices."""

KINDS = ["add", "mul", "fill", "copy", "read", "hold", "write_hold", "read_held"]


def view(t: torch.Tensor, spec: tuple) -> torch.Tensor:
    for step in spec:
        kind, *where = step
        if kind == "rows":
            t = t[where[0]:where[1]]
        elif kind == "cols":
            t = t[:, where[0]:where[1]]
        elif kind == "row":
            t = t[where[0]]
        else:
            t = t[:, where[0]]
    return t


class Writes(nn.Module):
    """Runs ``steps`` on ``h = 2 * x`` and returns the sum of what it read, and ``h`` (an output written in
    place)."""

    def __init__(self, steps: list):
        super().__init__()
        self.steps = steps

    def forward(self, x: torch.Tensor):
        h = x * 2.0
        out = x.new_zeros(())
        held = []
        for kind, spec, scale in self.steps:
            target = view(h, spec)
            if kind == "add":
                target.add_(scale)
            elif kind == "mul":
                out = out + target.mul_(scale).sum()
            elif kind == "fill":
                target.fill_(scale)
            elif kind == "copy":
                target.copy_(torch.sin(target) * scale)
            elif kind == "read":
                out = out + target.sum() * scale
            elif kind == "hold":
                held.append(target)
            elif kind == "write_hold":  # what a write returns is the view it wrote
                held.append(target.mul_(scale))
            elif held:
                out = out + held[-1].sum() * scale
        return out, h


STEPS = st.lists(st.tuples(st.sampled_from(KINDS), st.sampled_from(VIEWS),
                           st.floats(-2.0, 2.0, allow_nan=False).map(lambda v: round(v, 2))), min_size=1, max_size=6)


def reads_a_held_view_after_a_write(steps: list) -> bool:
    """Whether a view kept by ``hold`` or ``write_hold`` is read after a write that follows it (that read sees the write)."""
    held_at, written_since = None, False
    for kind, _, _ in steps:
        if kind in ("hold", "write_hold"):
            held_at, written_since = True, False
        elif kind in ("add", "mul", "fill", "copy") and held_at:
            written_since = True
        elif kind == "read_held" and held_at and written_since:
            return True
    return False


@settings(max_examples=40, deadline=None)
@given(STEPS)
def test_local_writes_compute_what_eager_computes(steps):
    model = Writes(steps)
    x = torch.randn(4, 6)
    program = torch.export.export(model, (x,), strict=False)
    written = [node for node in program.graph.nodes if written_args(node)]
    rewritten = functional_copy(program.graph, written)
    if rewritten is None:
        assert reads_a_held_view_after_a_write(steps), "a local sequence of writes was left to torch"
        return
    assert not any(written_args(node) for node in rewritten.nodes)
    program.graph_module.graph = rewritten
    expected = model(x)
    got = program.graph_module(x)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
