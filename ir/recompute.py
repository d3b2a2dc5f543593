"""The ``recompute`` node attribute (set by ``passes/recompute.py``) and the regions it forms.

A node with ``attrs["recompute"] = "blocks.3"`` belongs to the recomputed region ``blocks.3``:
backends run each maximal run of consecutive such nodes as one checkpointed function whose
activations are recomputed in backward.
"""
from __future__ import annotations

from ir.core import Node

RECOMPUTE_ATTR = "recompute"


def recompute_regions(nodes: list[Node]) -> list[tuple[str | None, list[Node]]]:
    """``nodes`` as maximal runs of consecutive nodes with the same region (None: not recomputed)."""
    runs: list[tuple[str | None, list[Node]]] = []
    for node in nodes:
        region = node.attrs.get(RECOMPUTE_ATTR)
        if runs and runs[-1][0] == region:
            runs[-1][1].append(node)
        else:
            runs.append((region, [node]))
    return runs
