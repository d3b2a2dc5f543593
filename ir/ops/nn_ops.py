"""Matrix products, embeddings, norms, attention, losses and convolutions."""
from __future__ import annotations

import re

from ir.core import Node, Value
from ir.ops.registry import (LocalCall, LocalContext, RULES, Signature, all_b, register,
                             shard_start, default_local)
from ir.ops.elementwise import aligned_dim
from ir.sbp import B, P, Split


def _has_bias(node: Node, position: int) -> bool:
    return len(node.input_values()) > position


@register("aten.linear.default", doc="y = x W^T + b; column split (W S(0)) or row split (W S(1))")
def linear(node: Node) -> list[Signature]:
    x = node.input_values()[0]
    last = x.type.ndim - 1
    bias = _has_bias(node, 2)

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


@register("aten.embedding.default", doc="rows of a table; vocabulary split gives partial sums")
def embedding(node: Node) -> list[Signature]:
    w, idx = node.input_values()
    out_last = idx.type.ndim
    sigs = [all_b(node), Signature((Split(1), B), (Split(out_last),)), Signature((Split(0), B), (P,))]
    sigs += [Signature((B, Split(i)), (Split(i),)) for i in range(idx.type.ndim)]
    return sigs


def _embedding_local(node: Node, ctx: LocalContext) -> LocalCall:
    w, idx = node.input_values()
    if not any(isinstance(s, Split) and s.dim == 0 for s in ctx.in_sbps[0]):
        return default_local(node, ctx)
    padding_idx = node.args[2] if len(node.args) > 2 else node.kwargs.get("padding_idx", -1)
    return LocalCall("kernels.masked_embedding", [w, idx, shard_start(w.type, ctx.in_sbps[0], ctx.mesh, 0),
                                                  padding_idx])


RULES["aten.embedding.default"].local = _embedding_local


@register("aten.gather.default", doc="gather along dim; a split of that dim gives partial sums")
def gather(node: Node) -> list[Signature]:
    x, index = node.input_values()
    dim = int(node.args[1]) % x.type.ndim
    # Splitting the index along ``dim`` splits the output alike (each entry reads the whole x).
    sigs = [all_b(node), Signature((Split(dim), B), (P,)), Signature((B, Split(dim)), (Split(dim),))]
    sigs += [Signature((Split(i), Split(i)), (Split(i),)) for i in range(x.type.ndim)
             if i != dim and x.type.shape[i] == index.type.shape[i]]
    return sigs


def _gather_local(node: Node, ctx: LocalContext) -> LocalCall:
    x, index = node.input_values()
    dim = int(node.args[1]) % x.type.ndim
    if not any(isinstance(s, Split) and s.dim == dim for s in ctx.in_sbps[0]):
        return default_local(node, ctx)
    return LocalCall("kernels.masked_gather", [x, dim, index, shard_start(x.type, ctx.in_sbps[0], ctx.mesh, dim)])


RULES["aten.gather.default"].local = _gather_local


@register("aten.layer_norm.default", "aten.rms_norm.default",
          doc="normalise trailing dims; leading dims (batch, sequence) may be split")
def layer_norm(node: Node) -> list[Signature]:
    x = node.input_values()[0]
    n_norm = len(node.args[1])
    n_params = len(node.input_values()) - 1
    return [all_b(node)] + [Signature((Split(i),) + (B,) * n_params, (Split(i),))
                            for i in range(x.type.ndim - n_norm)]


@register("aten.softmax.int", "aten._softmax.default", "aten.log_softmax.int", "aten._log_softmax.default",
          doc="softmax over one dim; other dims may be split")
def softmax(node: Node) -> list[Signature]:
    x = node.input_values()[0]
    dim = int(node.args[1]) % x.type.ndim
    return [all_b(node)] + [Signature((Split(i),), (Split(i),)) for i in range(x.type.ndim) if i != dim]


@register("aten.scaled_dot_product_attention.default",
          doc="attention: split over batch or heads; queries over sequence when not causal")
def sdpa(node: Node) -> list[Signature]:
    """Inputs are [..., L, E]: every leading dim (batch, heads) may be split; L too unless causal."""
    ins = node.input_values()
    q = ins[0]
    ndim = q.type.ndim
    mask = ins[3] if len(ins) > 3 else None
    out_shape = q.type.shape[:-1] + (ins[2].type.shape[-1],)
    causal = bool(node.args[5]) if len(node.args) > 5 else bool(node.kwargs.get("is_causal", False))

    def sig(dim: int, k_split: bool = True) -> Signature:
        qs, ks = Split(dim), (Split(dim) if k_split else B)
        mask_sbp = ()
        if mask is not None:
            j = dim - (ndim - mask.type.ndim)
            mask_sbp = (Split(j) if j >= 0 and mask.type.shape[j] == out_shape[dim] else B,)
        return Signature((qs, ks, ks) + mask_sbp, (Split(dim),))

    sigs = [all_b(node)] + [sig(d) for d in range(ndim - 2)]
    if not causal:
        # Each rank attends its queries to all keys; a causal mask would be aligned to the shard.
        sigs.append(sig(ndim - 2, k_split=False))
    return sigs


@register("aten.cross_entropy_loss.default", doc="per-sample loss split over the batch and extra dims")
def cross_entropy(node: Node) -> list[Signature]:
    """Input [N, C, d1, ...], target [N, d1, ...] (class indices) or the input's shape (probabilities)."""
    ins = node.input_values()
    x, target = ins[0], ins[1]
    reduction = int(node.args[3]) if len(node.args) > 3 else int(node.kwargs.get("reduction", 1))
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


def conv_options(node: Node) -> tuple[bool, int]:
    """Whether a convolution is transposed, and its groups (``convolution`` has both in other places)."""
    if node.op == "aten.convolution.default":
        return bool(node.args[6]), int(node.args[8])
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    return False, int(groups or 1)


@register("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default", "aten.convolution.default",
          doc="split over batch, output channels, or input channels (partial sums)")
def conv(node: Node) -> list[Signature]:
    """x [N, C_in, ...] (or unbatched [C_in, ...]); weight [C_out, C_in/g, ...], transposed [C_in, C_out/g, ...]."""
    ins = node.input_values()
    x, w = ins[0], ins[1]
    has_bias = len(ins) > 2
    transposed, groups = conv_options(node)
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


@register("aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default",
          "aten._native_batch_norm_legit_functional.default", "aten._native_batch_norm_legit.no_stats",
          doc="batch norm: channels may be split; the batch too when using running statistics (``decompose`` "
              "writes batch statistics as sums, which keep the batch split)")
def batch_norm(node: Node) -> list[Signature]:
    """Outputs after the first (saved statistics, new running statistics) are per channel."""
    ins = node.input_values()
    n_out = len(node.outputs)
    if _batch_statistics(node) and _writes_running_statistics(node):
        # only hand-written IR: an in-place update of a sliced buffer would miss the other slices
        return [all_b(node)]
    rest = tuple(Split(0) for _ in ins[1:])
    sigs = [all_b(node), Signature((Split(1),) + rest, (Split(1),) + (Split(0),) * (n_out - 1))]
    if not _batch_statistics(node):
        sigs.append(Signature((Split(0),) + (B,) * len(rest), (Split(0),) + (B,) * (n_out - 1)))
    return sigs


TRAINING_ARGUMENT = {"aten.batch_norm.default": 5, "aten._native_batch_norm_legit_functional.default": 5,
                     "aten._native_batch_norm_legit.no_stats": 3}
"""Where each batch norm takes its ``training`` flag (``_no_training`` has none)."""


def _writes_running_statistics(node: Node) -> bool:
    """``batch_norm`` with running mean and variance updates them in place (its functional forms return them)."""
    return node.op == "aten.batch_norm.default" and isinstance(node.args[3], Value) and isinstance(node.args[4], Value)


def _batch_statistics(node: Node) -> bool:
    """Whether the normalisation statistics come from the batch (training) rather than running stats."""
    position = TRAINING_ARGUMENT.get(node.op)
    return position is not None and bool(node.args[position])
