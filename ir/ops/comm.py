"""Collective ops that convert a value between layouts on one mesh axis (boxing).

Each ``comm.*`` node reads one value and writes it in a new SBP that differs on one mesh axis
(``axis=<name>``). Their backward is the adjoint collective, performed by the backends:

====================  =============================  ==========================
op                    layout change                  adjoint (backward)
====================  =============================  ==========================
comm.all_reduce       P(sum) -> B, P(max) -> B       all_reduce (sum)
comm.all_gather       S(d) -> B                      reduce_scatter(d)
comm.reduce_scatter   P -> S(d)                      all_gather(d)
comm.all_to_all       S(i) -> S(j)                   all_to_all S(j) -> S(i)
comm.slice            B -> S(d)  (local)             zero-padded shard (local)
comm.mask             B -> P(sum) (local)            mask (local)
====================  =============================  ==========================
"""
from __future__ import annotations

from ir.core import Node
from ir.ops.registry import Signature, register
from ir.sbp import Broadcast, P, Partial, Sbp, Split

COMM_OPS = ("comm.all_reduce", "comm.all_gather", "comm.reduce_scatter", "comm.all_to_all",
            "comm.slice", "comm.mask")
LOCAL_COMM_OPS = ("comm.slice", "comm.mask")
ADJOINTS = {"comm.all_reduce": "comm.all_reduce", "comm.all_gather": "comm.reduce_scatter",
            "comm.reduce_scatter": "comm.all_gather", "comm.all_to_all": "comm.all_to_all"}
"""The collective backward runs for each communicating ``comm`` op (the table above)."""
REGATHER_KWARG = "regather"
"""``regather=True`` on a ``comm.all_gather`` of an activation: the ops that save its result for their backward
keep this rank's shard instead, and backward gathers it again where they need it (the strategy's
``regather_activations``, marked by the ``regather`` pass). Values are unchanged; activation memory shrinks, and
backward runs one more all-gather."""
GRADIENT_REDUCING = ("comm.all_reduce", "comm.all_gather")
"""The ops whose adjoint sums partial gradients across ranks; ``grad_dtype=`` (a ``torch.dtype``) names
the dtype that sum runs in (the plan's precision ``reduce``; absent: the gradient's own dtype)."""


def sums_partials(node: Node) -> bool:
    """Whether ``node`` sums partial float values across ranks in forward: an all-reduce of a ``P(sum)`` value
    (tensor parallelism's row-parallel outputs) or a reduce-scatter (sequence parallelism's); its kwarg
    ``reduce_dtype=`` (a ``torch.dtype``, the plan's precision ``forward_reduce``) names the dtype that sum
    runs in (absent: the value's own)."""
    summing = node.op == "comm.reduce_scatter" or node.op == "comm.all_reduce" and node.kwargs.get("op", "sum") == "sum"
    return summing and node.input_values()[0].type.torch_dtype.is_floating_point


def transition(src: Sbp, dst: Sbp) -> tuple[str, dict] | None:
    """The one-collective conversion from ``src`` to ``dst`` on one axis, or None."""
    if isinstance(src, Split) and isinstance(dst, Broadcast):
        return "comm.all_gather", {"dim": src.dim}
    if isinstance(src, Split) and isinstance(dst, Split) and src.dim != dst.dim:
        return "comm.all_to_all", {"src_dim": src.dim, "dst_dim": dst.dim}
    if isinstance(src, Partial) and isinstance(dst, Broadcast):
        return "comm.all_reduce", {"op": src.op}
    if isinstance(src, Partial) and src.op == "sum" and isinstance(dst, Split):
        return "comm.reduce_scatter", {"dim": dst.dim}
    if isinstance(src, Broadcast) and isinstance(dst, Split):
        return "comm.slice", {"dim": dst.dim}
    if isinstance(src, Broadcast) and dst == P:
        return "comm.mask", {}
    return None


def _comm_signature(node: Node) -> list[Signature]:
    raise ValueError(f"{node.op} is inserted by the boxing pass; it is never chosen by propagation")


register(*COMM_OPS, doc="boxing collectives")(_comm_signature)
