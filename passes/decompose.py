"""Rewrites that expose parallelism: mean losses as sum / count, vocabulary-parallel cross entropy,
batch norm from sums.

A mean over a batch split across ranks is not a local mean: the loss becomes a partial sum divided
by the global count of counted targets (which ``ignore_index`` makes data dependent). With the
vocabulary split (Megatron-LM), cross entropy is written with ops whose rules keep the logits
sharded: the max and the sum of exponentials are reduced across ranks, the logits never gathered.
Training-mode batch norm is written as per-channel sums over the batch (SyncBatchNorm's
statistics): on a batch shard they are partial sums, so only the per-channel statistics are
all-reduced and the convolutions around it stay split over the batch.
"""
from __future__ import annotations

import math

import sympy

from ir.core import Graph, Node, Value
from ir.ops.schema import arg, parameter_names
from ir.types import TensorType
from passes.manager import PassContext, register_pass

CE = "aten.cross_entropy_loss.default"
MEAN, SUM = 1, 2


def _ce_args(node: Node) -> dict:
    """Cross entropy's arguments by name (the logits as ``input``), schema defaults filled in."""
    a = {name: arg(node, name) for name in parameter_names(node.op)}
    a["input"] = a.pop("self")
    return a


@register_pass("decompose", produces=("decomposed",))
def decompose_pass(graph: Graph, ctx: PassContext, *, vocab_parallel: bool | None = None) -> None:
    """Split mean cross entropy into sum / count; expand it for vocabulary parallelism if asked.

    ``vocab_parallel``: write cross entropy for a vocabulary split (None: as the strategy says).
    """
    vocab = ctx.strategy.vocab_parallel if vocab_parallel is None else vocab_parallel
    for node in list(graph.nodes):
        a = _batch_norm_args(node)
        if a is not None:
            _batch_norm_from_sums(graph, node, a)
    for node in list(graph.nodes):
        if node.op != CE:
            continue
        a = _ce_args(node)
        if a["weight"] is not None or a["label_smoothing"] or a["input"].type.ndim != 2:
            continue
        if a["reduction"] == MEAN:
            _mean_to_sum(graph, node, a)
    if vocab:
        for node in list(graph.nodes):
            a = _ce_args(node) if node.op == CE else None
            if a and a["reduction"] == SUM and a["weight"] is None and not a["label_smoothing"] \
                    and a["input"].type.ndim == 2:
                _vocab_parallel_ce(graph, node, a)


def _op(graph: Graph, before: Node, op: str, args: list, out: TensorType, name: str, kwargs=None) -> Value:
    attrs = {"module": before.attrs["module"]} if "module" in before.attrs else {}
    return graph.create_node(op, args, kwargs or {}, [out], [name], attrs, before=before).outputs[0]


def _mean_to_sum(graph: Graph, node: Node, a: dict) -> None:
    scalar = TensorType((), "f32")
    logits, target = a["input"], a["target"]
    total = _op(graph, node, CE, [logits, target, None, SUM, a["ignore_index"], 0.0], node.outputs[0].type, "ce_sum")
    counted = _op(graph, node, "aten.ne.Scalar", [target, a["ignore_index"]], TensorType(target.type.shape, "bool"),
                  "counted")
    count = _op(graph, node, "aten.sum.default", [counted], scalar, "count", {"dtype": _f32()})
    loss = _op(graph, node, "aten.div.Tensor", [total, count], node.outputs[0].type, "loss")
    graph.replace_all_uses(node.outputs[0], loss)
    graph.remove_node(node)


def _f32():
    import torch
    return torch.float32


def _vocab_parallel_ce(graph: Graph, node: Node, a: dict) -> None:
    logits, target = a["input"], a["target"]
    n, v = logits.type.shape
    col = TensorType((n, sympy.Integer(1)), logits.type.dtype)
    row = TensorType((n,), logits.type.dtype)
    mx = _op(graph, node, "aten.amax.default", [logits, [1], True], col, "logit_max")
    mx = _op(graph, node, "aten.detach.default", [mx], col, "logit_max_detached")
    shifted = _op(graph, node, "aten.sub.Tensor", [logits, mx], logits.type, "shifted")
    exp = _op(graph, node, "aten.exp.default", [shifted], logits.type, "exp")
    sum_exp = _op(graph, node, "aten.sum.dim_IntList", [exp, [1]], row, "sum_exp")
    log_sum = _op(graph, node, "aten.log.default", [sum_exp], row, "log_sum_exp")
    safe = _op(graph, node, "aten.clamp_min.default", [target, 0], target.type, "safe_target")
    index = _op(graph, node, "aten.unsqueeze.default", [safe, 1], TensorType((n, sympy.Integer(1)), target.type.dtype),
                "target_index")
    picked = _op(graph, node, "aten.gather.default", [shifted, 1, index], col, "target_logit")
    picked = _op(graph, node, "aten.squeeze.dim", [picked, 1], row, "target_logit_row")
    per_token = _op(graph, node, "aten.sub.Tensor", [log_sum, picked], row, "token_loss")
    counted = _op(graph, node, "aten.ne.Scalar", [target, a["ignore_index"]], TensorType((n,), "bool"), "counted_vocab")
    kept = _op(graph, node, "aten.mul.Tensor", [per_token, counted], row, "kept_loss")
    total = _op(graph, node, "aten.sum.default", [kept], node.outputs[0].type, "ce_total")
    graph.replace_all_uses(node.outputs[0], total)
    graph.remove_node(node)


BATCH_NORMS = ("aten._native_batch_norm_legit_functional.default", "aten._native_batch_norm_legit.no_stats",
               "aten.batch_norm.default")
"""Capture makes ``_native_batch_norm_legit_functional`` of a training BatchNorm with running statistics
(outputs: y, saved mean, saved inverse std, new running mean and variance), ``batch_norm`` /
``_native_batch_norm_legit.no_stats`` of one without."""


BATCH_STATISTICS_ATTR = "batch_statistics"
"""Node attribute (printed in the IR) on the sum that starts a training batch norm's statistics."""


def _batch_norm_args(node: Node) -> dict | None:
    """The arguments of a batch norm that normalises with batch statistics; None for any other node."""
    if node.op not in BATCH_NORMS:
        return None
    names = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
    a = {name: arg(node, name) if name in parameter_names(node.op) else None for name in names}
    if not a["training"] or a["input"].type.ndim < 2:
        return None
    if node.op == "aten.batch_norm.default" and a["running_mean"] is not None:
        return None  # it would update the running statistics in place: hand-written IR only, kept whole
    tensors = [a[k] for k in ("weight", "bias", "running_mean", "running_var") if isinstance(a[k], Value)]
    if any(t.type.dtype != a["input"].type.dtype for t in tensors):
        return None  # mixed precision: the fused op keeps its own accumulation types
    return a


def _batch_norm_from_sums(graph: Graph, node: Node, a: dict) -> None:
    """Batch norm as sums over every dim but the channels (dim 1), as eager computes it: the mean,
    then the sum of squared deviations from it (two passes), variance biased for normalising and
    unbiased (count - 1) for the running variance, which moves by ``momentum`` as in eager."""
    x = a["input"]
    shape = x.type.shape
    reduced = [0] + list(range(2, len(shape)))
    count = math.prod(shape[d] for d in reduced)
    kept = TensorType((sympy.Integer(1), shape[1]) + (sympy.Integer(1),) * (len(shape) - 2), x.type.dtype)
    channels = TensorType((shape[1],), x.type.dtype)

    def op(name: str, args: list, out: TensorType, value_name: str) -> Value:
        return _op(graph, node, name, args, out, value_name)

    total = op("aten.sum.dim_IntList", [x, reduced, True], kept, "bn_sum")
    total.producer.attrs[BATCH_STATISTICS_ATTR] = True  # a pipeline cannot cut this batch into microbatches
    mean = op("aten.div.Scalar", [total, count], kept, "bn_mean")
    centred = op("aten.sub.Tensor", [x, mean], x.type, "bn_centred")
    squares = op("aten.pow.Tensor_Scalar", [centred, 2], x.type, "bn_squares")
    square_sum = op("aten.sum.dim_IntList", [squares, reduced, True], kept, "bn_square_sum")
    var = op("aten.div.Scalar", [square_sum, count], kept, "bn_var")
    rstd = op("aten.rsqrt.default", [op("aten.add.Tensor", [var, float(a["eps"])], kept, "bn_var_eps")], kept,
              "bn_rstd")
    y = op("aten.mul.Tensor", [centred, rstd], x.type, "bn_normalized")
    if a["weight"] is not None:
        weight = op("aten.reshape.default", [a["weight"], list(kept.shape)], kept, "bn_weight")
        y = op("aten.mul.Tensor", [y, weight], x.type, "bn_scaled")
    if a["bias"] is not None:
        bias = op("aten.reshape.default", [a["bias"], list(kept.shape)], kept, "bn_bias")
        y = op("aten.add.Tensor", [y, bias], x.type, "bn_shifted")
    outs = node.outputs
    new = {0: lambda: y,
           1: lambda: op("aten.reshape.default", [mean, [shape[1]]], channels, "bn_saved_mean"),
           2: lambda: op("aten.reshape.default", [rstd, [shape[1]]], channels, "bn_saved_rstd")}
    if a["running_mean"] is not None:
        momentum = float(a["momentum"])

        def moved(running: Value, statistic: Value, name: str) -> Value:
            kept_part = op("aten.mul.Tensor", [running, 1.0 - momentum], channels, f"{name}_kept")
            new_part = op("aten.mul.Tensor", [statistic, momentum], channels, f"{name}_step")
            return op("aten.add.Tensor", [new_part, kept_part], channels, name)

        new[3] = lambda: moved(a["running_mean"], op("aten.reshape.default", [mean, [shape[1]]], channels,
                                                     "bn_batch_mean"), "bn_running_mean")
        new[4] = lambda: moved(a["running_var"], op("aten.div.Scalar", [
            op("aten.reshape.default", [square_sum, [shape[1]]], channels, "bn_batch_square_sum"), count - 1],
            channels, "bn_batch_var"), "bn_running_var")
    for i, o in enumerate(outs):
        if _read(graph, o):
            graph.replace_all_uses(o, new[i]())
    graph.remove_node(node)


def _read(graph: Graph, v: Value) -> bool:
    """Whether anything reads ``v``: a node, the outputs, or a buffer update."""
    return bool(v.uses) or any(v is o for o in graph.outputs) or any(v is u for u in graph.buffer_updates.values())
