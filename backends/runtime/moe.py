"""Expert parallelism: tokens sent to the ranks that hold their experts, and back, by all-to-all.

The experts of a mixture-of-experts layer are split over one mesh axis (rank ``d`` of ``n`` holds
experts ``[d * E / n, (d + 1) * E / n)``) and so are its tokens. Each (token, expert) pair of a rank's
tokens is a row; ``moe_dispatch`` sorts the rank's rows by expert (stably) and sends each rank the rows
of its experts with one ``all_to_all_single``, after one small ``all_to_all_single`` of the row counts per
(rank, expert) (the split sizes, which depend on the routing). A rank receives, from every source in
turn, that source's rows of each of its experts; it reorders them expert by expert, so its local experts
run as one grouped computation (``kernels.expert_mm``). ``moe_combine`` sends each output row back to the rank
its token lives on (the reverse all-to-all), puts the rows in pair order and sums each token's ``k``
rows weighted by the router. Backward is the same two exchanges reversed (autograd of
:class:`RowExchange`). The virtual mesh runs the same functions with the exchange done in one process
(:func:`exchange_in_process`).

With ``moe_overlap_chunks`` (FSMoE's idea) ``moe_overlapped`` runs a layer in chunks of the rank's tokens: the
split sizes of every chunk go in one small all-to-all, then every chunk's rows leave at once
(``all_to_all_single(async_op=True)``); the experts run on chunk ``i`` as soon as its rows have arrived, while
the later chunks are still in flight, and chunk ``i``'s outputs start back while chunk ``i + 1`` computes. In
backward each exchange is again started by one autograd node and waited for by another (:class:`StartExchange`,
:class:`WaitExchange`), so the reverse exchange of one chunk runs while autograd computes another chunk's
gradients. On gloo (CPU) an async collective runs on the process group's own worker thread, so the overlap is
real there too: the exchange proceeds while the calling thread multiplies; on nccl it runs on its own stream.
"""
import torch
import torch.distributed as dist

from .core import GROUPS


def route_by_expert(top_k_index, experts):
    """This rank's pairs (rows ``t * k + j`` of ``top_k_index`` flattened) sorted by expert, stably: the order
    they are sent in; and the number of pairs per expert (``experts`` counts)."""
    expert = top_k_index.reshape(-1)
    order = torch.sort(expert, stable=True).indices
    return order, torch.bincount(expert, minlength=experts)


def expert_major(received):
    """The order that takes rows received source by source (each source's rows expert by expert, counts
    ``received[source, expert]``) to expert by expert (each expert's rows source by source)."""
    sources, local = received.shape
    flat = received.reshape(-1)
    starts = (torch.cumsum(flat, 0) - flat).view(sources, local).t().reshape(-1)
    lengths = received.t().reshape(-1)
    placed = torch.cumsum(lengths, 0) - lengths
    total = int(flat.sum())
    return torch.repeat_interleave(starts - placed, lengths, output_size=total) + torch.arange(total, device=flat.device)


def inverse(order):
    """The permutation undoing ``order`` (``x[order][inverse(order)] == x``)."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def weighted_sum_of_pairs(pair_rows, top_k_weights):
    """Every token's output: its ``k`` pairs' expert outputs (rows in pair order) times their router
    weights, summed (as transformers' experts do: products first, then the sum over ``k``)."""
    tokens, k = top_k_weights.shape
    weighted = pair_rows * top_k_weights.reshape(-1).unsqueeze(-1)
    return weighted.view(tokens, k, pair_rows.shape[-1]).sum(dim=1)


def exchange_in_process(parts):
    """One all-to-all done in this process: ``parts[s][d]`` is what source ``s`` sends to ``d``; destination
    ``d`` gets the concatenation over sources (differentiable, so autograd is the reverse exchange)."""
    return [torch.cat([sent[d] for sent in parts]) for d in range(len(parts))]


def dispatch_sends(hidden, top_k_index, experts, ranks):
    """What one source sends: its rows sorted by expert (so destination by destination, each destination's
    ``counts.sum(1)`` rows), and its counts per (destination, local expert)."""
    order, counts = route_by_expert(top_k_index, experts)
    return hidden[order // top_k_index.shape[-1]], counts.view(ranks, experts // ranks)


def dispatch_in_process(hiddens, indexes, experts):
    """Every destination's rows (expert by expert) and received counts ``(sources, local experts)``, for
    the sources' tokens and top-k expert indices (the virtual mesh's group, or one rank's token blocks)."""
    sends = [dispatch_sends(h, i, experts, len(hiddens)) for h, i in zip(hiddens, indexes)]
    arrived = exchange_in_process([rows.split(counts.sum(1).tolist()) for rows, counts in sends])
    received = [torch.stack([counts[d] for _, counts in sends]) for d in range(len(hiddens))]
    return [rows[expert_major(r)] for rows, r in zip(arrived, received)], received


def combine_in_process(rows, receiveds, indexes, weights, experts):
    """Every source's output tokens from the destinations' expert outputs (rows expert by expert)."""
    back = [list(r[inverse(expert_major(got))].split(got.sum(1).tolist())) for r, got in zip(rows, receiveds)]
    arrived = exchange_in_process(back)
    return [weighted_sum_of_pairs(pairs[inverse(route_by_expert(i, experts)[0])], w)
            for pairs, i, w in zip(arrived, indexes, weights)]


def moe_replicated_dispatch(hidden, top_k_index, experts, ranks):
    """Dispatch on a rank holding every token and every expert: its tokens in ``ranks`` blocks as sources,
    all destinations' rows kept (the op's value, computed locally)."""
    rows, received = dispatch_in_process(hidden.chunk(ranks), top_k_index.chunk(ranks), experts)
    return torch.cat(rows), torch.cat(received, dim=1)


def moe_replicated_combine(rows, top_k_index, top_k_weights, route, experts):
    """Combine on a rank holding every token and every expert (see :func:`moe_replicated_dispatch`)."""
    ranks = route.shape[0]
    received = list(route.chunk(ranks, dim=1))
    outs = combine_in_process(list(rows.split([int(r.sum()) for r in received])), received,
                              top_k_index.chunk(ranks), top_k_weights.chunk(ranks), experts)
    return torch.cat(outs)


class RowExchange(torch.autograd.Function):
    """``all_to_all_single`` of rows with given split sizes on a mesh axis; backward sends the gradients back
    the way the rows came."""

    @staticmethod
    def forward(ctx, rows, send, receive, axis):
        ctx.send, ctx.receive, ctx.axis = send, receive, axis
        out = rows.new_empty(sum(receive), *rows.shape[1:])
        dist.all_to_all_single(out, rows.contiguous(), receive, send, group=GROUPS[axis][0])
        return out

    @staticmethod
    def backward(ctx, grad):
        back = grad.new_empty(sum(ctx.send), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), ctx.send, ctx.receive, group=GROUPS[ctx.axis][0])
        return back, None, None, None


def moe_dispatch(hidden, top_k_index, experts, axis):
    """Send this rank's rows to the ranks of their experts on ``axis``: the split sizes first (one small
    all-to-all of counts per (rank, expert)), then the rows. Returns the rows received, expert by expert,
    and the counts received per (source, local expert)."""
    group, ranks, _ = GROUPS[axis]
    sent, counts = dispatch_sends(hidden, top_k_index, experts, len(ranks))
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)
    rows = RowExchange.apply(sent, counts.sum(1).tolist(), received.sum(1).tolist(), axis)
    return rows[expert_major(received)], received


def moe_combine(rows, top_k_index, top_k_weights, received, experts, axis):
    """Send the expert outputs back to their tokens' ranks on ``axis`` (the reverse all-to-all) and sum each
    token's ``k`` rows weighted by the router."""
    order, counts = route_by_expert(top_k_index, experts)
    sent = received.sum(1).tolist()
    back = RowExchange.apply(rows[inverse(expert_major(received))], sent,
                             counts.view(len(sent), -1).sum(1).tolist(), axis)
    return weighted_sum_of_pairs(back[inverse(order)], top_k_weights)


class Pending:
    """An exchange started and not yet waited for: its ``Work`` and the tensors it reads and writes (kept alive
    until it finishes), forward and backward."""

    def __init__(self, send, receive, axis):
        self.send, self.receive, self.axis = send, receive, axis
        self.work = self.back_work = None
        self.keep = ()


def _start(rows, send, receive, axis):
    """``all_to_all_single`` of ``rows`` started (``async_op=True``): the buffer it fills, and its Work."""
    out = rows.new_empty(sum(receive), *rows.shape[1:])
    rows = rows.contiguous()
    work = dist.all_to_all_single(out, rows, receive, send, group=GROUPS[axis][0], async_op=True)
    return out, work, rows


class StartExchange(torch.autograd.Function):
    """Starts sending rows (see :class:`WaitExchange`); in backward, waits for the reverse exchange that
    :class:`WaitExchange`'s backward started."""

    @staticmethod
    def forward(ctx, rows, pending):
        ctx.pending = pending
        out, pending.work, sent = _start(rows, pending.send, pending.receive, pending.axis)
        pending.keep = (sent, out)
        return out

    @staticmethod
    def backward(ctx, grad):  # ``grad`` is what WaitExchange's backward is sending back; wait for its arrival
        pending = ctx.pending
        pending.back_work.wait()
        back, pending.keep = pending.keep[1], ()
        return back, None


class WaitExchange(torch.autograd.Function):
    """Waits for the rows :class:`StartExchange` sent; in backward, starts sending the gradients back."""

    @staticmethod
    def forward(ctx, rows, pending):
        ctx.pending = pending
        pending.work.wait()
        pending.keep = ()
        return rows

    @staticmethod
    def backward(ctx, grad):  # the gradients leave now; StartExchange's backward waits for them
        pending = ctx.pending
        back, pending.back_work, sent = _start(grad, pending.receive, pending.send, pending.axis)
        pending.keep = (sent, back)
        return grad, None


def moe_overlapped(hidden, top_k_index, top_k_weights, experts_fn, experts, axis, chunks):
    """A MoE layer on ``axis`` in ``chunks`` chunks of this rank's tokens, each chunk's exchanges overlapping
    another chunk's expert compute: ``experts_fn(rows, received)`` computes one chunk's rows (expert by expert,
    ``received`` its counts per source and local expert). Equal to :func:`moe_dispatch`, the experts and
    :func:`moe_combine` on all tokens at once."""
    group, ranks, _ = GROUPS[axis]
    hiddens, indexes = hidden.tensor_split(chunks), top_k_index.tensor_split(chunks)
    sends = [dispatch_sends(h, i, experts, len(ranks)) for h, i in zip(hiddens, indexes)]
    counts = torch.stack([c for _, c in sends], dim=1)  # (destination, chunk, local expert)
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)  # every chunk's split sizes at once
    dispatched = []
    for (rows, sent), got in zip(sends, received.unbind(1)):  # every chunk's rows leave now
        pending = Pending(sent.sum(1).tolist(), got.sum(1).tolist(), axis)
        dispatched.append((StartExchange.apply(rows, pending), pending, got))
    returning = []
    for (sent, _), (rows, pending, got) in zip(sends, dispatched):
        order = expert_major(got)
        out = experts_fn(WaitExchange.apply(rows, pending)[order], got)  # later chunks still in flight
        back = Pending(pending.receive, pending.send, axis)
        returning.append((StartExchange.apply(out[inverse(order)], back), back))
    outs = [weighted_sum_of_pairs(WaitExchange.apply(rows, back)[inverse(route_by_expert(i, experts)[0])], w)
            for (rows, back), i, w in zip(returning, indexes, top_k_weights.tensor_split(chunks))]
    return torch.cat(outs)
