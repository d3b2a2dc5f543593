"""Context-parallel attention: queries on sequence shards, key/value blocks passed around a ring.

Every rank of the ``cp`` axis holds one contiguous block of the sequence (rank ``c`` the positions
``[c * L, (c + 1) * L)``) of its queries, keys and values. ``ring_attention`` runs ``n`` steps: at
step ``s`` a rank attends its queries to the key/value block of rank ``c - s``, while the block of
the next step is already on its way (one ``batch_isend_irecv`` to the next rank and from the
previous one, waited for after the block's computation). Partial results are merged with the online
softmax (each block's output weighted by its share of the log-sum-exp). Under a causal mask the
blocks of later ranks are skipped. Backward runs the same ring: each rank recomputes its queries'
probabilities against each block from the saved log-sum-exp, and the key/value gradients travel
with their block until they return to its owner.
"""
import torch
import torch.distributed as dist

from .core import GROUPS


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


def block_keep(mask, length, ranks, q_rank, kv_rank, causal, device):
    """The keep-mask of one (query block, key block) pair of a ring of ``ranks`` blocks of ``length``
    positions; None when every key counts, False when none does.

    ``mask`` (the plan's own, or None) holds this rank's query rows and every key column; its columns
    of key block ``kv_rank`` are taken. ``causal``: query position ``q_rank * length + i`` sees key
    positions up to itself."""
    keep = None
    if causal:
        if kv_rank > q_rank:
            return False
        if kv_rank == q_rank:
            keep = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    if mask is not None:
        own = mask.narrow(-1, kv_rank * length, length) if mask.shape[-1] == length * ranks else mask
        if keep is None:
            keep = own
        elif own.dtype == torch.bool:
            keep = keep & own
        else:
            keep = own.masked_fill(~keep, float("-inf"))
    if keep is not None and keep.dtype == torch.bool and not bool(keep.any()):
        return False  # a block the mask hides wholly (e.g. later positions under a causal mask)
    return keep


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
    def forward(ctx, q, k, v, mask, axis, causal, scale):
        group, ranks, me = GROUPS[axis]
        n, length = len(ranks), q.shape[-2]
        nxt, prev = ranks[(me + 1) % n], ranks[(me - 1) % n]
        out = lse = None
        block = (k.contiguous(), v.contiguous())
        for step in range(n):
            source = (me - step) % n
            pending = _exchange(block, nxt, prev, group) if step < n - 1 else None
            keep = block_keep(mask, length, n, me, source, causal, q.device)
            if keep is not False:
                out, lse = merge_blocks(out, lse, *attention_block(q, block[0], block[1], keep, scale))
            if pending is not None:
                block, requests = pending
                _wait(requests)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.args = (axis, causal, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, mask = ctx.saved_tensors
        axis, causal, scale = ctx.args
        group, ranks, me = GROUPS[axis]
        n, length = len(ranks), q.shape[-2]
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
            keep = block_keep(mask, length, n, me, source, causal, q.device)
            if keep is not False:
                probs = torch.exp(masked_scores(q, block[0], keep, scale) - safe_lse)
                grad_v = grad_v + torch.matmul(probs.transpose(-2, -1), grad_out)
                grad_scores = probs * (torch.matmul(grad_out, block[1].transpose(-2, -1)) - delta) * scale
                grad_q = grad_q + torch.matmul(grad_scores, block[0])
                grad_k = grad_k + torch.matmul(grad_scores.transpose(-2, -1), q)
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
        return grad_q, grad_k, grad_v, None, None, None, None


def ring_attention(q, k, v, mask, axis, causal, scale):
    """Attention of this rank's query block to every key/value block of the ``axis`` ring (``scale``
    None: ``1 / sqrt(head_dim)``, as ``scaled_dot_product_attention``)."""
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    return RingAttention.apply(q, k, v, mask, axis, causal, scale)
