"""Local kernels: what one rank computes when its shard needs more than the plain ATen op.

This module imports only torch: emitted programs carry the kernels they call (see ``backends/runtime``).
"""
import torch


def masked_embedding(weight, indices, start, padding_idx=-1):
    """Lookup in a vocabulary shard holding rows [start, start + rows); other rows give zeros.

    Summed over the shards (a ``P(sum)`` value) this equals the full lookup. ``padding_idx`` is
    the global row whose gradient stays zero, as in ``nn.Embedding``.
    """
    rows = weight.shape[0]
    local = indices - start
    inside = (local >= 0) & (local < rows)
    safe = torch.where(inside, local, torch.zeros_like(local))
    out = torch.ops.aten.embedding.default(weight, safe)
    if padding_idx is not None and padding_idx >= 0:
        frozen = torch.ops.aten.embedding.default(weight.detach(), safe)
        out = torch.where((indices == padding_idx).unsqueeze(-1), frozen, out)
    return out * inside.unsqueeze(-1).to(out.dtype)


def grouped_mm_of_experts(input, weight, offs, first):
    """transformers' grouped matmul (``grouped_mm_fallback``) on a shard of the experts: ``weight`` holds the
    (K, N) matrices of experts [first, first + E) of all experts; the rows of ``input`` are sorted by expert
    and ``offs`` holds every expert's cumulative row count. Rows routed to other experts give zeros, so the
    shards' results summed (a ``P(sum)`` value) are the full grouped matmul, and each shard multiplies only
    the rows of its own experts."""
    ends = offs.tolist()
    start = ends[first - 1] if first > 0 else 0
    pieces = [input.new_zeros(start, weight.shape[2])]
    for expert in range(weight.shape[0]):
        end = ends[first + expert]
        pieces.append(input[start:end] @ weight[expert])
        start = end
    pieces.append(input.new_zeros(input.shape[0] - start, weight.shape[2]))
    return torch.cat(pieces)


def expert_mm(rows, weight, route):
    """The grouped matmul of a rank's experts (expert parallelism, ``moe.expert_mm``): ``rows`` sorted by
    expert, ``route.sum(0)`` of them for each of the ``weight.shape[0]`` experts, each block of rows times
    its expert's ``(K, N)`` matrix of ``weight``."""
    blocks = rows.split(route.sum(0).tolist())
    return torch.cat([block @ weight[e] for e, block in enumerate(blocks)])


def masked_gather(x, dim, index, start):
    """``gather`` from a shard holding [start, start + size) of ``dim``; indices outside give 0."""
    size = x.shape[dim]
    local = index - start
    inside = (local >= 0) & (local < size)
    out = torch.gather(x, dim, torch.where(inside, local, torch.zeros_like(local)))
    return out * inside.to(out.dtype)


def sum_over(x, dims, keepdim, count, dtype=None, accumulate=None):
    """The local part of a mean over split dims: the local sum divided by the global count.

    Sum and division run in ``accumulate`` (float32 for a bf16 or f16 mean, see ``ir/precision.py``),
    and the share is rounded once to the mean's dtype (``dtype``, else the input's)."""
    out_dtype = dtype or x.dtype
    out = torch.sum(x, dims, keepdim=keepdim, dtype=accumulate or out_dtype)
    return (out / count).to(out_dtype)


def keep_if(x, keep):
    """``x`` on ranks where ``keep`` is 1, zeros elsewhere (broadcast to partial: B -> P)."""
    return x if keep else x * 0


def mean_loss_share(op, count, accumulate, *args, **kwargs):
    """A shard's share of a mean-reduced loss: ``aten.<op>`` summed over the shard (the arguments ask
    for ``reduction=sum``), divided by the global element ``count`` in ``accumulate`` (float32 for a bf16
    or f16 loss) and rounded once to the loss's dtype; summed over the shards, the mean."""
    total = getattr(torch.ops.aten, op).default(*args, **kwargs)
    return (total.to(accumulate) / count).to(total.dtype)


def attention_rows(rows, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
    """``scaled_dot_product_attention`` of a shard of query rows against every key: ``rows`` the shard's
    positions in the sequence as ``(start, length)`` ranges (two under a load-balanced cp split); a causal
    mask keeps key positions up to each row's own."""
    if is_causal:
        positions = positions_of(rows, query.device)
        keep = positions[:, None] >= torch.arange(key.shape[-2], device=query.device)[None, :]
        if attn_mask is None or attn_mask.dtype == torch.bool:
            attn_mask = keep if attn_mask is None else attn_mask & keep
        else:
            attn_mask = attn_mask.masked_fill(~keep, float("-inf"))
    return torch.ops.aten.scaled_dot_product_attention.default(query, key, value, attn_mask, dropout_p, False,
                                                               scale=scale, enable_gqa=enable_gqa)


def positions_of(ranges, device=None):
    """The positions of ``(start, length)`` ranges, one after another."""
    return torch.cat([torch.arange(start, start + length, device=device) for start, length in ranges])


def arange_shard(start, ranges, **kwargs):
    """This rank's part of ``arange`` from ``start``: the numbers at its ``(start, length)`` ranges of positions
    (two under a load-balanced cp split)."""
    return torch.cat([torch.arange(start + a, start + a + n, **kwargs) for a, n in ranges])
