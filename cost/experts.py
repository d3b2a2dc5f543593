"""Expert parallelism in the planner's pricing: a profile of one data-parallel replica, with the experts of its
mixture-of-experts blocks folded over ``ep`` of the data-parallel ranks.

The planner prices one replica (its tensor-parallel layouts) and adds data parallelism analytically
(:mod:`cost.estimate`). Folding experts over ``ep`` ranks of the ``dp`` ones (torchtitan's and Megatron's
"parallel folding": mesh ``dp = dp / ep, ep``) changes, per MoE block:

- the stacked expert weights: each rank stores ``1 / ep`` of them, and their gradients are summed over the
  ``dp / ep`` ranks holding the same experts (the other parameters over all ``dp * ep``);
- the tokens' trip: each rank sends its (token, expert) rows to the ranks of their experts and the results
  back (``moe.dispatch`` / ``moe.combine``: an all-to-all each way after a small one of split sizes, and the
  reverse ones in backward), priced on the links the ``ep`` group crosses;
- the experts' matmuls do not change with balanced routing (a rank multiplies as many rows either way); with
  ``moe_imbalance`` the busiest rank gets that many times its share, so its expert matmuls and its
  all-to-all bytes scale by it;
- with ``moe_overlap_chunks`` (``chunks``) each row exchange runs as that many all-to-alls of a chunk of the
  tokens, overlapping the experts' compute of the other chunks (:func:`cost.segments.chunked_exchange_hidden_flops`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from cost.ops import Precision
from cost.segments import BATCH_SYMBOL, CommItem, Profile, SegmentCost, chunked_exchange_hidden_flops
from ir.core import Graph
from ir.ops.moe import expert_layers, expert_weight
from ir.types import dim_symbol

EXPERT_AXIS = "ep"
_GROUPED = {"grouped_mm_fallback", "_grouped_mm", "grouped_mm", "expert_mm"}


@dataclass(frozen=True)
class ExpertBlocks:
    """What expert parallelism changes in a model's blocks."""

    experts: int
    """Experts per MoE layer (the stacked weights' first dim)."""
    param_tails: tuple[str, ...]
    """The stacked expert weights' names after their block's index (``mlp.experts.gate_up_proj``)."""
    row_bytes: tuple[float, ...]
    """Per MoE layer of a block, the bytes of its (token, expert) rows per sample (at the model's dtype)."""


def expert_blocks(graph: Graph, block_prefix: str, precision: Precision) -> ExpertBlocks | None:
    """The MoE layers of a captured graph's first block (None: no grouped-experts MoE layer)."""
    layers = expert_layers(graph)
    if not layers:
        return None
    dims = {dim_symbol(k): v for k, v in (graph.attrs.get("example_dims") or {}).items() if k != BATCH_SYMBOL}
    dims[dim_symbol(BATCH_SYMBOL)] = 1
    tails, rows = set(), []
    first = None
    for sort, matmuls in layers:
        targets = [expert_weight(m).target or "" for m in matmuls]
        block = _block_of(targets[0], block_prefix)
        first = block if first is None else first
        if block != first:
            continue
        tails |= {t[len(f"{block_prefix}.{block}."):] for t in targets}
        row = matmuls[0].input_values()[0].type
        rows.append(float(row.numel().subs(dims)) * precision.element_bytes(row.dtype))
    experts = int(expert_weight(layers[0][1][0]).type.shape[0])
    return ExpertBlocks(experts, tuple(sorted(tails)), tuple(rows))


def _block_of(target: str, prefix: str) -> str:
    return target[len(prefix) + 1:].split(".", 1)[0] if target.startswith(prefix + ".") else ""


def with_expert_parallelism(profile: Profile, blocks: ExpertBlocks, ep: int, imbalance: float = 1.0,
                            chunks: int = 1) -> Profile:
    """``profile`` (one data-parallel replica) with its MoE blocks' experts folded over ``ep`` ranks (their
    exchanges in ``chunks`` chunks)."""
    segments = [_folded(s, blocks, ep, imbalance, chunks) if 1 <= j <= profile.num_layers else _data_parallel_over_ep(s)
                for j, s in enumerate(profile.segments)]
    return dataclasses.replace(profile, segments=segments,
                               notes=[*profile.notes, f"experts folded over ep={ep} of the data-parallel ranks"])


def _data_parallel_over_ep(segment: SegmentCost) -> SegmentCost:
    """Parameters outside the experts: gradients summed over ``ep`` too (it splits the batch)."""
    params = [dataclasses.replace(p, grad_axes=(*p.grad_axes, EXPERT_AXIS)) if p.trainable else p
              for p in segment.params]
    return dataclasses.replace(segment, params=params)


def _folded(segment: SegmentCost, blocks: ExpertBlocks, ep: int, imbalance: float, chunks: int) -> SegmentCost:
    """A block: expert weights stored ``1 / ep`` (gradients summed over ``dp`` only), the others over ``ep`` too;
    per MoE layer the split sizes, dispatch and combine exchanges (backward: the reverse two)."""
    if not any(p.name.endswith(blocks.param_tails) for p in segment.params):
        return _data_parallel_over_ep(segment)
    params = [dataclasses.replace(p, local_elements=p.local_elements / ep) if p.name.endswith(blocks.param_tails)
              else p for p in _data_parallel_over_ep(segment).params]
    params = [dataclasses.replace(p, grad_axes=tuple(a for a in p.grad_axes if a != EXPERT_AXIS))
              if p.name.endswith(blocks.param_tails) else p for p in params]
    comms = list(segment.comms)
    fwd_flops = _scaled(segment.fwd_flops, segment.fwd_kinds, imbalance)
    bwd_flops = _scaled(segment.bwd_flops, segment.bwd_kinds, imbalance)
    layers = len(blocks.row_bytes)
    fwd_hidden, bwd_hidden = (chunked_exchange_hidden_flops(_grouped(flops, kinds) / layers, chunks) if chunks > 1
                              else None for flops, kinds in ((fwd_flops, segment.fwd_kinds),
                                                              (bwd_flops, segment.bwd_kinds)))
    for row_bytes in blocks.row_bytes:
        rows = np.array([0.0, row_bytes * imbalance])
        counts = np.array([blocks.experts * 8.0 * chunks, 0.0])  # the split sizes: one int64 per (rank, expert, chunk)
        comms += [CommItem("all_to_all", EXPERT_AXIS, counts, False),
                  *[CommItem("all_to_all", EXPERT_AXIS, rows, False, fwd_hidden, chunks)] * 2]
        if segment.bwd_ops:
            comms += [CommItem("all_to_all", EXPERT_AXIS, rows, True, bwd_hidden, chunks)] * 2
    return dataclasses.replace(segment, params=params, comms=comms, fwd_flops=fwd_flops, bwd_flops=bwd_flops)


def _grouped(flops: np.ndarray, kinds: tuple) -> np.ndarray:
    """The FLOPs (constant, per sample) of the grouped (expert) matmuls among a segment's rows."""
    rows = [f for f, kind in zip(flops, kinds) if kind[0] in _GROUPED]
    return np.sum(rows, axis=0) if rows else np.zeros(2)


def _scaled(flops: np.ndarray, kinds: tuple, factor: float) -> np.ndarray:
    """The rows of grouped (expert) matmuls scaled by ``factor``."""
    if not len(kinds):
        return flops
    return flops * np.array([[factor if kind[0] in _GROUPED else 1.0] for kind in kinds])
