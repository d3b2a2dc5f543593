"""Activation recomputation: mark the regions of the graph whose activations are recomputed in backward.

The strategy's ``recompute`` is ``True`` (every repeated block, e.g. each ``blocks.<i>`` of a transformer)
or a list of module globs (``["blocks.*"]`` for whole blocks, ``["blocks.*.mlp"]`` for only the MLPs,
``["blocks.0", "blocks.1"]`` for some blocks). Each node whose module path has a prefix matching a glob
gets ``attrs["recompute"]`` = that prefix (the region), shown in the IR dump; ops without a module
(residual adds, collectives inserted by boxing) belong to the region of the op before them.

Backends run each maximal run of consecutive nodes with the same region as one checkpointed function
(the emitted programs use ``torch.utils.checkpoint``): its activations are dropped after forward and
recomputed, collectives included, when backward reaches it. The result is numerically the same (the
virtual mesh runs the nodes as usual); the memory and time it trades are what the simulator prices
for recomputed blocks.
"""
from __future__ import annotations

import fnmatch

from ir.core import Graph
from ir.recompute import RECOMPUTE_ATTR
from passes.manager import PassContext, register_pass
from ir.layers import find_layers
from strategy import StrategyError


@register_pass("recompute", requires=("boxed",), produces=("recompute_marked",))
def recompute_pass(graph: Graph, ctx: PassContext) -> None:
    """Set ``attrs["recompute"]`` on the nodes of every recomputed region (training only)."""
    wanted = ctx.strategy.recompute
    if not wanted or not ctx.train:
        return
    if not mark_recompute(graph, _globs(graph, wanted)):
        modules = sorted({n.attrs["module"].split(".")[0] for n in graph.nodes if n.attrs.get("module")})
        shown = list(wanted) if isinstance(wanted, tuple) else wanted
        raise StrategyError(f"recompute {shown!r} matches no module of the model; top-level modules are "
                            f"{', '.join(modules) or 'none'} (globs match module paths such as 'blocks.*')")


def mark_recompute(graph: Graph, globs: list[str]) -> int:
    """Set ``attrs["recompute"]`` on every node of a module matching one of ``globs`` (the region is the
    shortest matching module prefix); returns how many nodes were marked. Selective recomputation names a
    sub-module (``blocks.*.attn.core``), full recomputation the blocks (``blocks.*``)."""
    region = None
    marked = 0
    for node in graph.nodes:
        module = node.attrs.get("module")
        if module:
            region = _matching_prefix(module, globs)
        if region is not None:
            node.attrs[RECOMPUTE_ATTR] = region
            marked += 1
    return marked


def _globs(graph: Graph, wanted) -> list[str]:
    if wanted is True:
        prefix = find_layers(graph).prefix
        if prefix is None:
            raise StrategyError("recompute=True recomputes the model's repeated blocks, but it has none (no "
                                "module list such as blocks.0, blocks.1, ...); name the modules to recompute "
                                "with a list of globs")
        return [f"{prefix}.*"]
    return list(wanted)


def _matching_prefix(module: str, globs: list[str]) -> str | None:
    """The shortest prefix of ``module`` (by dotted parts) that some glob matches."""
    parts = module.split(".")
    for k in range(1, len(parts) + 1):
        head = ".".join(parts[:k])
        if any(fnmatch.fnmatchcase(head, g) for g in globs):
            return head
    return None
