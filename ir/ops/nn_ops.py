"""Matrix products, embeddings, norms, attention, losses and convolutions."""
from __future__ import annotations

import re

from ir.core import Node, Value
from ir.ops.registry import (LocalCall, LocalContext, Signature, all_b, register,
                             shard_ranges, shard_start, default_local)
from ir.ops.elementwise import aligned_dim
from ir.ops.reductions import along_dim
from ir.ops.schema import arg, dim_arg, with_arg
from ir.precision import torch_accumulation_dtype
from ir.sbp import B, P, Split


@register("aten.linear.default", doc="y = x W^T + b; column split (W S(0)) or row split (W S(1))")
def linear(node: Node) -> list[Signature]:
    x = node.input_values()[0]
    last = x.type.ndim - 1
    bias = arg(node, "bias") is not None

    def sig(xs, ws, bs, out):
        return Signature((xs, ws, bs) if bias else (xs, ws), (out,))

    sigs = [all_b(node), sig(B, Split(0), Split(0), Split(last)), sig(Split(last), Split(1), P, P),
            sig(P, B, P, P), sig(B, P, P, P)]
    sigs += [sig(Split(i), B, B, Split(i)) for i in range(last)]
    return sigs


@register("aten.addmm.default", doc="bias + m1 @ m2 (transformers' Conv1D)")
def addmm(node: Node) -> list[Signature]:
    bias = node.input_values()[0]
    out = node.outputs[0].type.shape

    def bias_along(out_dim: int):
        """The bias is added by broadcasting: it splits where it spans the split output dim."""
        j = aligned_dim(bias.type.shape, out, out_dim)
        return Split(j) if j is not None else B

    return [all_b(node),
            Signature((bias_along(0), Split(0), B), (Split(0),)),
            Signature((bias_along(1), B, Split(1)), (Split(1),)),
            Signature((P, Split(1), Split(0)), (P,)),
            Signature((P, P, B), (P,)), Signature((P, B, P), (P,))]


@register("aten.mm.default", doc="a @ b")
def mm(node: Node) -> list[Signature]:
    return [all_b(node), Signature((Split(0), B), (Split(0),)), Signature((B, Split(1)), (Split(1),)),
            Signature((Split(1), Split(0)), (P,)), Signature((P, B), (P,)), Signature((B, P), (P,))]


@register("aten.bmm.default", "aten.matmul.default", doc="batched a @ b with broadcast batch dims")
def matmul(node: Node) -> list[Signature]:
    a, b = node.input_values()
    out = node.outputs[0].type
    if a.type.ndim < 2 or b.type.ndim < 2:
        return [all_b(node)]
    sigs = [all_b(node), Signature((P, B), (P,)), Signature((B, P), (P,)),
            Signature((Split(a.type.ndim - 1), Split(b.type.ndim - 2)), (P,)),
            Signature((Split(a.type.ndim - 2), B), (Split(out.ndim - 2),)),
            Signature((B, Split(b.type.ndim - 1)), (Split(out.ndim - 1),))]
    for d in range(out.ndim - 2):
        ja, jb = d - (out.ndim - a.type.ndim), d - (out.ndim - b.type.ndim)
        sa = Split(ja) if ja >= 0 and a.type.shape[ja] == out.shape[d] else B
        sb = Split(jb) if jb >= 0 and b.type.shape[jb] == out.shape[d] else B
        sigs.append(Signature((sa, sb), (Split(d),)))
    return sigs


def _grouped_mm_local(node: Node, ctx: LocalContext) -> LocalCall:
    x, w, offs = node.input_values()
    if not any(isinstance(s, Split) and s.dim == 0 for s in ctx.in_sbps[1]):
        return default_local(node, ctx)
    return LocalCall("kernels.grouped_mm_of_experts", [x, w, offs, shard_start(w.type, ctx.in_sbps[1], ctx.mesh, 0)])


@register("transformers.grouped_mm_fallback.default", local=_grouped_mm_local,
          doc="transformers' grouped matmul of MoE experts: rows (S, K) sorted by expert, each times its expert's "
              "(K, N) matrix of weight (E, K, N), offs (E,) the cumulative rows per expert; experts split "
              "(expert parallelism: each shard multiplies its experts' rows, partial sums), or experts' "
              "matrices split over N (column-parallel) or K (row-parallel, partial sums)")
def grouped_mm(node: Node) -> list[Signature]:
    """The rows' grouping by expert (``offs``) is over all rows, so the rows themselves never split."""
    return [all_b(node), Signature((B, Split(0), B), (P,)), Signature((B, Split(2), B), (Split(1),)),
            Signature((Split(1), Split(1), B), (P,)), Signature((P, B, B), (P,)), Signature((B, P, B), (P,))]


def _embedding_local(node: Node, ctx: LocalContext) -> LocalCall:
    w, idx = node.input_values()
    if not any(isinstance(s, Split) and s.dim == 0 for s in ctx.in_sbps[0]):
        return default_local(node, ctx)
    return LocalCall("kernels.masked_embedding", [w, idx, shard_start(w.type, ctx.in_sbps[0], ctx.mesh, 0),
                                                  arg(node, "padding_idx")])


@register("aten.embedding.default", local=_embedding_local,
          doc="rows of a table; vocabulary split gives partial sums")
def embedding(node: Node) -> list[Signature]:
    """``scale_grad_by_freq`` divides a row's gradient by its count among all indices: a shard of the
    indices counts only its own, and the vocabulary-split kernel does not scale; both are left out."""
    w, idx = node.input_values()
    out_last = idx.type.ndim
    sigs = [all_b(node), Signature((Split(1), B), (Split(out_last),))]
    if not arg(node, "scale_grad_by_freq"):
        sigs.append(Signature((Split(0), B), (P,)))
        sigs += [Signature((B, Split(i)), (Split(i),)) for i in range(idx.type.ndim)]
    return sigs


def _gather_local(node: Node, ctx: LocalContext) -> LocalCall:
    x, index = node.input_values()
    dim = dim_arg(node, "dim", x.type.ndim)
    if not any(isinstance(s, Split) and s.dim == dim for s in ctx.in_sbps[0]):
        return default_local(node, ctx)
    return LocalCall("kernels.masked_gather", [x, dim, index, shard_start(x.type, ctx.in_sbps[0], ctx.mesh, dim)])


@register("aten.gather.default", local=_gather_local, doc="gather along dim; a split of that dim gives partial sums")
def gather(node: Node) -> list[Signature]:
    x, index = node.input_values()
    dim = dim_arg(node, "dim", x.type.ndim)
    # Splitting the index along ``dim`` splits the output alike (each entry reads the whole x).
    sigs = [all_b(node), Signature((Split(dim), B), (P,)), Signature((B, Split(dim)), (Split(dim),))]
    sigs += [Signature((Split(i), Split(i)), (Split(i),)) for i in range(x.type.ndim)
             if i != dim and x.type.shape[i] == index.type.shape[i]]
    return sigs


@register("aten.index_select.default", doc="entries of one dim picked by a 1-D index; other dims may be split")
def index_select(node: Node) -> list[Signature]:
    """Splitting the index splits the picked dim of the output; ``self`` is linear (partial to partial)."""
    x, index = node.input_values()
    dim = dim_arg(node, "dim", x.type.ndim)
    sigs = [all_b(node), Signature((P, B), (P,))]
    sigs += [Signature((Split(i), B), (Split(i),)) for i in range(x.type.ndim) if i != dim]
    if index.type.ndim == 1 and x.type.ndim > 0:
        sigs.append(Signature((B, Split(0)), (Split(dim),)))
    return sigs


ELEMENTWISE_LOSSES = ["aten.mse_loss.default", "aten.l1_loss.default", "aten.smooth_l1_loss.default",
                      "aten.huber_loss.default", "aten.binary_cross_entropy.default",
                      "aten.binary_cross_entropy_with_logits.default"]
NO_REDUCTION, MEAN, SUM = 0, 1, 2


def _broadcasts_to(shape: tuple, target: tuple) -> bool:
    lead = len(target) - len(shape)
    return lead >= 0 and all(d == 1 or d == target[lead + i] for i, d in enumerate(shape))


def _elementwise_loss_local(node: Node, ctx: LocalContext) -> LocalCall:
    """A mean over a split input: each shard sums its losses and divides by the global element count."""
    x = arg(node, "self")
    if int(arg(node, "reduction")) != MEAN or not any(isinstance(s, Split) for s in ctx.in_sbps[0]):
        return default_local(node, ctx)
    count = 1
    for d in x.type.shape:
        count = count * d
    args, kwargs = with_arg(node, "reduction", SUM)
    accumulate = torch_accumulation_dtype(node.op, node.outputs[0].type.torch_dtype)
    return LocalCall("kernels.mean_loss_share", [node.op.split(".")[1], count, accumulate, *args], kwargs)


@register(*ELEMENTWISE_LOSSES, local=_elementwise_loss_local,
          doc="a loss per element: split like self; reduced, a split gives partial sums")
def elementwise_loss(node: Node) -> list[Signature]:
    """``target`` (and ``weight``, ``pos_weight``) broadcast to ``self``; ``reduction`` none keeps the
    elements, mean and sum reduce all of them."""
    x = arg(node, "self")
    ins = node.input_values()
    if not all(_broadcasts_to(v.type.shape, x.type.shape) for v in ins):
        return [all_b(node)]
    reduced = int(arg(node, "reduction")) != NO_REDUCTION
    sigs = [all_b(node)]
    for d in range(x.type.ndim):
        if x.type.shape[d] != 1:
            in_sbps = tuple(B if aligned_dim(v.type.shape, x.type.shape, d) is None
                            else Split(aligned_dim(v.type.shape, x.type.shape, d)) for v in ins)
            sigs.append(Signature(in_sbps, (P if reduced else Split(d),)))
    return sigs


@register("aten.layer_norm.default", "aten.rms_norm.default",
          doc="normalise trailing dims; leading dims (batch, sequence) may be split")
def layer_norm(node: Node) -> list[Signature]:
    x = node.input_values()[0]
    n_norm = len(arg(node, "normalized_shape"))
    n_params = len(node.input_values()) - 1
    return [all_b(node)] + [Signature((Split(i),) + (B,) * n_params, (Split(i),))
                            for i in range(x.type.ndim - n_norm)]


@register("aten.softmax.int", "aten._softmax.default", "aten.log_softmax.int", "aten._log_softmax.default",
          doc="softmax over one dim; other dims may be split")
def softmax(node: Node) -> list[Signature]:
    return along_dim(node, linear=False)


def _attention_rows_local(node: Node, ctx: LocalContext) -> LocalCall:
    """Query rows split, keys whole: a causal mask is aligned to the rows this rank holds."""
    q = arg(node, "query")
    rows = q.type.ndim - 2
    if not arg(node, "is_causal") or not any(isinstance(s, Split) and s.dim == rows for s in ctx.in_sbps[0]):
        return default_local(node, ctx)
    ranges = shard_ranges(q.type, ctx.in_sbps[0], ctx.mesh, rows, ctx.sequences)
    return LocalCall("kernels.attention_rows", [[list(r) for r in ranges], *node.args], dict(node.kwargs))


def attention_signature(q: Value, v: Value, mask: Value | None, dim: int, kv_split: bool) -> Signature:
    """Attention inputs ``[..., L, E]`` split on ``dim`` (keys and values too when ``kv_split``, else
    whole), the mask split where it spans that dim; the output split alike."""
    ndim = q.type.ndim
    out_shape = q.type.shape[:-1] + (v.type.shape[-1],)
    kv = Split(dim) if kv_split else B
    mask_sbp = ()
    if mask is not None:
        j = dim - (ndim - mask.type.ndim)
        mask_sbp = (Split(j) if j >= 0 and mask.type.shape[j] == out_shape[dim] else B,)
    return Signature((Split(dim), kv, kv) + mask_sbp, (Split(dim),))


@register("aten.scaled_dot_product_attention.default", local=_attention_rows_local,
          doc="attention: split over batch or heads, or queries over the sequence with keys whole")
def sdpa(node: Node) -> list[Signature]:
    """Inputs are [..., L, E]: every leading dim (batch, heads) may be split; L too with the keys and values
    whole (each rank attends its queries to all keys; a causal mask is aligned to the rank's rows)."""
    q, v, mask = arg(node, "query"), arg(node, "value"), arg(node, "attn_mask")
    ndim = q.type.ndim
    return [all_b(node)] + [attention_signature(q, v, mask, d, kv_split=True) for d in range(ndim - 2)] \
        + [attention_signature(q, v, mask, ndim - 2, kv_split=False)]


@register("aten.cross_entropy_loss.default", doc="per-sample loss split over the batch and extra dims")
def cross_entropy(node: Node) -> list[Signature]:
    """Input [N, C, d1, ...], target [N, d1, ...] (class indices) or the input's shape (probabilities)."""
    ins = node.input_values()
    x, target = ins[0], ins[1]
    reduction = int(arg(node, "reduction"))
    if x.type.ndim < 2 or reduction not in (0, 2):
        return [all_b(node)]  # unbatched, or a mean (divided by a weight sum over the whole batch)
    extra = (B,) * (len(ins) - 2)
    sigs = [all_b(node)]
    for i in [0] + list(range(2, x.type.ndim)):
        t_dim = i if target.type.ndim == x.type.ndim or i == 0 else i - 1
        out = Split(0 if i == 0 else i - 1) if reduction == 0 else P
        sigs.append(Signature((Split(i), Split(t_dim)) + extra, (out,)))
    return sigs


@register("aten.nll_loss_nd.default", "aten.nll_loss.default", doc="like cross entropy")
def nll(node: Node) -> list[Signature]:
    return cross_entropy(node)


@register("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default",
          doc="split over batch, output channels, or input channels (partial sums)")
def conv(node: Node) -> list[Signature]:
    return conv_signatures(node, transposed=False, groups=int(arg(node, "groups")))


@register("aten.convolution.default", doc="split over batch, output channels, or input channels (partial sums)")
def convolution(node: Node) -> list[Signature]:
    return conv_signatures(node, transposed=bool(arg(node, "transposed")), groups=int(arg(node, "groups")))


def conv_signatures(node: Node, transposed: bool, groups: int) -> list[Signature]:
    """x [N, C_in, ...] (or unbatched [C_in, ...]); weight [C_out, C_in/g, ...], transposed [C_in, C_out/g, ...]."""
    x, w = arg(node, "input"), arg(node, "weight")
    has_bias = arg(node, "bias") is not None
    channel = x.type.ndim - w.type.ndim + 1  # 1 for batched inputs, 0 for unbatched ones

    def sig(xs, ws, bs, out):
        return Signature((xs, ws, bs) if has_bias else (xs, ws), (out,))

    # Convolution is linear in the input, and in the weight and bias together.
    sigs = [all_b(node), sig(P, B, P, P), sig(B, P, P, P)]
    if channel == 1:
        sigs.append(sig(Split(0), B, B, Split(0)))
    if groups == 1:
        w_out, w_in = (1, 0) if transposed else (0, 1)
        sigs += [sig(B, Split(w_out), Split(0), Split(channel)), sig(Split(channel), Split(w_in), P, P)]
    return sigs


@register("aten.max_pool2d.default", "aten.max_pool1d.default", "aten.avg_pool2d.default",
          "aten.adaptive_avg_pool2d.default", "aten.max_pool2d_with_indices.default",
          "aten.avg_pool1d.default", "aten.adaptive_avg_pool1d.default",
          doc="pooling: split over batch or channels; averages are linear")
def pool(node: Node) -> list[Signature]:
    """Every dim before the pooled (trailing) ones may be split: batch and channels, or channels alone."""
    x = node.input_values()[0]
    spatial = int(re.search(r"pool(\d)d", node.op).group(1))
    n_out = len(node.outputs)
    sigs = [all_b(node)] + [Signature((Split(i),), (Split(i),) * n_out) for i in range(x.type.ndim - spatial)]
    if "avg" in node.op:
        sigs.append(Signature((P,), (P,)))
    return sigs


@register("aten.batch_norm.default",
          doc="batch norm: channels may be split; the batch too when using running statistics")
def batch_norm(node: Node) -> list[Signature]:
    """Training with running mean and variance updates them in place (hand-written IR only: capture
    functionalizes, and ``decompose`` writes training batch statistics as sums, which keep the batch split)."""
    writes_running = isinstance(arg(node, "running_mean"), Value) and isinstance(arg(node, "running_var"), Value)
    return _batch_norm_signatures(node, bool(arg(node, "training")), writes_running)


@register("aten._native_batch_norm_legit_functional.default", "aten._native_batch_norm_legit.no_stats",
          doc="functional batch norm: channels may be split; the batch too when using running statistics")
def batch_norm_functional(node: Node) -> list[Signature]:
    """Outputs after the first (saved statistics, new running statistics) are per channel."""
    return _batch_norm_signatures(node, bool(arg(node, "training")), writes_running=False)


@register("aten._native_batch_norm_legit_no_training.default",
          doc="batch norm with running statistics: batch or channels may be split")
def batch_norm_inference(node: Node) -> list[Signature]:
    return _batch_norm_signatures(node, batch_statistics=False, writes_running=False)


def _batch_norm_signatures(node: Node, batch_statistics: bool, writes_running: bool) -> list[Signature]:
    """``batch_statistics``: normalise by the batch's statistics (training) rather than running ones;
    ``writes_running``: running mean and variance buffers are updated in place."""
    ins = node.input_values()
    n_out = len(node.outputs)
    if batch_statistics and writes_running:
        # only hand-written IR: an in-place update of a sliced buffer would miss the other slices
        return [all_b(node)]
    rest = tuple(Split(0) for _ in ins[1:])
    sigs = [all_b(node), Signature((Split(1),) + rest, (Split(1),) + (Split(0),) * (n_out - 1))]
    if not batch_statistics:
        sigs.append(Signature((Split(0),) + (B,) * len(rest), (Split(0),) + (B,) * (n_out - 1)))
    return sigs


