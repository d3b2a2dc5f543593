"""Context-parallel attention: queries on sequence shards, key/value blocks passed around a ring.

Every rank of the ``cp`` axis holds one block of the sequence of its queries, keys and values: under the
load-balanced split two chunks of ``2n``, chunks ``c`` and ``2n - 1 - c`` (:func:`balanced_part`), so that
under a causal mask every rank attends as many keys. ``ring_attention`` runs ``n`` steps: at step ``s`` a
rank attends its queries to the key/value block of rank ``c - s``, while the block of the next step is
already on its way (one ``batch_isend_irecv`` to the next rank and from the previous one, waited for after
the block's computation). Each step computes only the rows and columns of the block its mask keeps (from
the positions the two blocks hold: under a causal mask and the balanced split, half of every block but the
rank's own), and partial results are merged with the online softmax (each block's output weighted by its
share of the log-sum-exp). Backward runs the same ring: each rank recomputes its queries' probabilities
against each block from the saved log-sum-exp, and the key/value gradients travel with their block until
they return to its owner.
"""
import torch
import torch.distributed as dist

from .core import GROUPS, balanced_part


def attention_block(q, k, v, keep, scale):
    """Attention of ``q`` to one key/value block: the block's output and log-sum-exp per query.

    ``keep``: a bool mask broadcasting to ``[..., Lq, Lk]`` (True: attend), or None for all keys; a
    float ``keep`` is added to the scores (an additive mask). Queries with no key in the block get a
    zero output and a log-sum-exp of ``-inf``."""
    scores = masked_scores(q, k, keep, scale)
    seen = (scores > float("-inf")).any(-1, keepdim=True)
    scores = torch.where(seen, scores, torch.zeros_like(scores))  # no -inf - -inf in rows that see nothing
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    out = torch.matmul(torch.exp(scores - lse), v) * seen
    return out, torch.where(seen, lse, torch.full_like(lse, float("-inf")))


def masked_scores(q, k, keep, scale):
    """``q k^T * scale`` with ``keep`` applied: ``-inf`` where a bool mask is False, a float mask added."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if keep is not None and keep.dtype == torch.bool:
        return scores.masked_fill(~keep, float("-inf"))
    return scores if keep is None else scores + keep


def merge_blocks(out, lse, block_out, block_lse):
    """The online-softmax merge of two partial attentions over disjoint key sets."""
    if out is None:
        return block_out, block_lse
    total = torch.logaddexp(lse, block_lse)
    safe = torch.where(torch.isinf(total), torch.zeros_like(total), total)
    return torch.exp(lse - safe) * out + torch.exp(block_lse - safe) * block_out, total


def ring_positions(rank, ways, length, balanced):
    """The sequence positions of the block of rank ``rank`` of a ring of ``ways`` blocks of ``length``."""
    whole = torch.arange(length * ways)
    return balanced_part(whole, 0, ways, rank) if balanced else whole.narrow(0, rank * length, length)


def block_plan(mask, q_pos, kv_pos, causal, device):
    """Which part of the (query block, key block) pair at positions ``q_pos`` and ``kv_pos`` to compute:
    ``(rows, cols, keep)`` -- the slices of query rows and key columns holding every kept pair, and the keep
    mask on them (a bool mask, True: attend, or a float one to add; None: every pair) -- or None when the
    masks hide the whole block.

    ``mask`` (the plan's own, or None) holds this rank's query rows and every key column of the sequence."""
    keep = (q_pos[:, None] >= kv_pos[None, :]).to(device) if causal else None
    if mask is not None:
        own = mask.index_select(-1, kv_pos.to(mask.device)) if mask.shape[-1] > 1 else mask
        if keep is None:
            keep = own
        elif own.dtype == torch.bool:
            keep = keep & own
        else:
            keep = own.masked_fill(~keep, float("-inf"))
    if keep is None:
        return slice(None), slice(None), None
    seen = keep if keep.dtype == torch.bool else keep > float("-inf")
    seen = seen.reshape(-1, *seen.shape[-2:]).any(0)
    rows, cols = _span(seen.any(-1)), _span(seen.any(-2))
    if rows is None:
        return None  # a block the masks hide wholly (under the causal mask: later positions)
    keep = keep[..., rows if keep.shape[-2] > 1 else slice(None), cols if keep.shape[-1] > 1 else slice(None)]
    return rows, cols, None if keep.dtype == torch.bool and bool(keep.all()) else keep


def _span(seen):
    """The slice from the first to the last True of a 1-D bool tensor (all of a broadcast one), None if none."""
    where = seen.nonzero()
    if len(where) == 0:
        return None
    return slice(None) if len(seen) == 1 else slice(int(where[0]), int(where[-1]) + 1)


def ring_block(q, k, v, mask, q_pos, kv_pos, causal, scale):
    """The output and log-sum-exp of every query row of ``q`` against one key/value block, computing only the
    part :func:`block_plan` keeps (rows outside it: zero output, log-sum-exp ``-inf``); None when nothing is."""
    plan = block_plan(mask, q_pos, kv_pos, causal, q.device)
    if plan is None:
        return None
    rows, cols, keep = plan
    out, lse = attention_block(q[..., rows, :], k[..., cols, :], v[..., cols, :], keep, scale)
    return _all_rows(out, rows, q.shape[-2], 0.0), _all_rows(lse, rows, q.shape[-2], float("-inf"))


def _all_rows(part, rows, length, fill):
    """``part`` (the rows ``rows`` of a ``length``-row result) with ``fill`` in the other rows."""
    start, stop, _ = rows.indices(length)
    if start == 0 and stop == length:
        return part
    before = part.new_full((*part.shape[:-2], start, part.shape[-1]), fill)
    after = part.new_full((*part.shape[:-2], length - stop, part.shape[-1]), fill)
    return torch.cat([before, part, after], dim=-2)


def _exchange(send, peer_to, peer_from, group):
    """Start sending ``send`` (tensors) to ``peer_to`` and receiving as many from ``peer_from``."""
    recv = [torch.empty_like(t) for t in send]
    ops = [dist.P2POp(dist.isend, t, peer_to, group) for t in send]
    ops += [dist.P2POp(dist.irecv, t, peer_from, group) for t in recv]
    return recv, dist.batch_isend_irecv(ops)


def _wait(requests):
    for request in requests:
        request.wait()


class RingAttention(torch.autograd.Function):
    """Ring attention on the sequence shards of one mesh axis (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, axis, causal, scale, balanced):
        group, ranks, me = GROUPS[axis]
        n, length = len(ranks), q.shape[-2]
        nxt, prev = ranks[(me + 1) % n], ranks[(me - 1) % n]
        out = lse = None
        q_pos = ring_positions(me, n, length, balanced)
        block = (k.contiguous(), v.contiguous())
        for step in range(n):
            source = (me - step) % n
            pending = _exchange(block, nxt, prev, group) if step < n - 1 else None
            part = ring_block(q, block[0], block[1], mask, q_pos, ring_positions(source, n, length, balanced),
                              causal, scale)
            if part is not None:
                out, lse = merge_blocks(out, lse, *part)
            if pending is not None:
                block, requests = pending
                _wait(requests)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.args = (axis, causal, scale, balanced)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, mask = ctx.saved_tensors
        axis, causal, scale, balanced = ctx.args
        group, ranks, me = GROUPS[axis]
        n, length = len(ranks), q.shape[-2]
        q_pos = ring_positions(me, n, length, balanced)
        nxt, prev = ranks[(me + 1) % n], ranks[(me - 1) % n]
        grad_out = grad_out.contiguous()
        delta = (grad_out * out).sum(-1, keepdim=True)
        safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        grad_q = torch.zeros_like(q)
        block = (k.contiguous(), v.contiguous())
        carried = None  # the key/value gradients of the block this rank held last step, to pass on
        for step in range(n):
            source = (me - step) % n
            sends = list(block) if step < n - 1 else []
            sends += list(carried) if carried is not None else []
            pending = _exchange(sends, nxt, prev, group) if sends else None
            grad_k, grad_v = torch.zeros_like(block[0]), torch.zeros_like(block[1])
            plan = block_plan(mask, q_pos, ring_positions(source, n, length, balanced), causal, q.device)
            if plan is not None:  # the part of the block forward computed
                rows, cols, keep = plan
                queries, grads = q[..., rows, :], grad_out[..., rows, :]
                keys, values = block[0][..., cols, :], block[1][..., cols, :]
                probs = torch.exp(masked_scores(queries, keys, keep, scale) - safe_lse[..., rows, :])
                grad_v[..., cols, :] += torch.matmul(probs.transpose(-2, -1), grads)
                grad_scores = probs * (torch.matmul(grads, values.transpose(-2, -1)) - delta[..., rows, :]) * scale
                grad_q[..., rows, :] += torch.matmul(grad_scores, keys)
                grad_k[..., cols, :] += torch.matmul(grad_scores.transpose(-2, -1), queries)
            if pending is not None:
                received, requests = pending
                _wait(requests)
                if step < n - 1:
                    block, received = tuple(received[:2]), received[2:]
                if received:  # what earlier ranks added to the gradients of the block now held
                    grad_k, grad_v = grad_k + received[0], grad_v + received[1]
            carried = (grad_k, grad_v)
        if n > 1:  # after n steps the gradients of this rank's own block come back from the previous rank
            carried, requests = _exchange(list(carried), nxt, prev, group)
            _wait(requests)
        grad_k, grad_v = carried
        return grad_q, grad_k, grad_v, None, None, None, None, None


def ring_attention(q, k, v, mask, axis, causal, scale, balanced=False):
    """Attention of this rank's query block to every key/value block of the ``axis`` ring (``scale``
    None: ``1 / sqrt(head_dim)``, as ``scaled_dot_product_attention``; ``balanced``: the blocks are
    load-balanced sequence splits)."""
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    return RingAttention.apply(q, k, v, mask, axis, causal, scale, balanced)
