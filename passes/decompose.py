"""Rewrites that expose parallelism: mean losses as sum / count, vocabulary-parallel cross entropy,
batch norm from sums.

A mean over a batch split across ranks is not a local mean: the loss becomes a partial sum divided
by the global count of counted targets (which ``ignore_index`` makes data dependent). With the
vocabulary split (Megatron-LM), cross entropy is written with ops whose rules keep the logits
sharded: the max and the sum of exponentials are reduced across ranks, the logits never gathered.
Training-mode batch norm is written as per-channel sums over the batch (SyncBatchNorm's
statistics): on a batch shard they are partial sums, so only the per-channel statistics are
all-reduced and the convolutions around it stay split over the batch.

Each rewrite replaces one fused kernel by several ops, so it also says in which dtype they compute:
sums, counts and statistics in the dtype the fused kernel accumulates in (float32 for bf16 and f16
inputs, :func:`ir.precision.accumulation_dtype`), elementwise ops in their inputs' dtype, and each
result rounded once to the dtype capture declared for it (the verifier's meta execution checks every
declared type).
"""
from __future__ import annotations

import math

import sympy

from ir.core import Graph, Node, Value
from ir.ops.schema import arg, parameter_names
from ir.precision import accumulation_dtype, promoted
from ir.types import DTYPES_BY_NAME, TensorType
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
            _mean_to_sum(graph, node, a, vocab)
        elif a["reduction"] == SUM and vocab:
            total = _vocab_parallel_ce(graph, node, a)
            _replace(graph, node, _cast(graph, node, total, node.outputs[0].type.dtype, "ce_total"))


def _op(graph: Graph, before: Node, op: str, args: list, out: TensorType, name: str, kwargs=None) -> Value:
    attrs = {"module": before.attrs["module"]} if "module" in before.attrs else {}
    return graph.create_node(op, args, kwargs or {}, [out], [name], attrs, before=before).outputs[0]


def _cast(graph: Graph, before: Node, v: Value, dtype: str, name: str) -> Value:
    """``v`` in ``dtype`` (a rounding ``_to_copy`` named ``name``), or ``v`` itself when it has that dtype."""
    if v.type.dtype == dtype:
        return v
    return _op(graph, before, "aten._to_copy.default", [v], TensorType(v.type.shape, dtype), name,
               {"dtype": DTYPES_BY_NAME[dtype]})


def _replace(graph: Graph, node: Node, value: Value) -> None:
    graph.replace_all_uses(node.outputs[0], value)
    graph.remove_node(node)


def _mean_to_sum(graph: Graph, node: Node, a: dict, vocab: bool) -> None:
    """``sum / count`` in the accumulation dtype (the NLL kernel's), rounded once to the loss's dtype."""
    out = node.outputs[0].type
    acc = accumulation_dtype(CE, a["input"].type.dtype)
    logits, target = a["input"], a["target"]
    if vocab:
        total = _vocab_parallel_ce(graph, node, a)
    else:
        total = _op(graph, node, CE, [logits, target, None, SUM, a["ignore_index"], 0.0], out, "ce_sum")
        total = _cast(graph, node, total, acc, "ce_sum_acc")
    counted = _op(graph, node, "aten.ne.Scalar", [target, a["ignore_index"]], TensorType(target.type.shape, "bool"),
                  "counted")
    count = _op(graph, node, "aten.sum.default", [counted], TensorType((), acc), "count",
                {"dtype": DTYPES_BY_NAME[acc]})
    if acc == out.dtype:
        _replace(graph, node, _op(graph, node, "aten.div.Tensor", [total, count], out, "loss"))
        return
    mean = _op(graph, node, "aten.div.Tensor", [total, count], TensorType((), acc), "loss_acc")
    _replace(graph, node, _cast(graph, node, mean, out.dtype, "loss"))


def _vocab_parallel_ce(graph: Graph, node: Node, a: dict) -> Value:
    """Summed cross entropy from ops that keep the vocabulary split: the max, the shifted logits and their
    exponentials in the logits' dtype (elementwise), the sum of exponentials and the per-token losses in
    the accumulation dtype (log_softmax's and NLL's); returns the sum, in the accumulation dtype."""
    logits, target = a["input"], a["target"]
    n, v = logits.type.shape
    acc = accumulation_dtype(CE, logits.type.dtype)
    col = TensorType((n, sympy.Integer(1)), logits.type.dtype)
    row = TensorType((n,), logits.type.dtype)
    row_acc = TensorType((n,), acc)
    mx = _op(graph, node, "aten.amax.default", [logits, [1], True], col, "logit_max")
    mx = _op(graph, node, "aten.detach.default", [mx], col, "logit_max_detached")
    shifted = _op(graph, node, "aten.sub.Tensor", [logits, mx], logits.type, "shifted")
    exp = _op(graph, node, "aten.exp.default", [shifted], logits.type, "exp")
    sum_exp = _op(graph, node, "aten.sum.dim_IntList", [exp, [1]], row_acc, "sum_exp",
                  {} if acc == logits.type.dtype else {"dtype": DTYPES_BY_NAME[acc]})
    log_sum = _op(graph, node, "aten.log.default", [sum_exp], row_acc, "log_sum_exp")
    safe = _op(graph, node, "aten.clamp_min.default", [target, 0], target.type, "safe_target")
    index = _op(graph, node, "aten.unsqueeze.default", [safe, 1], TensorType((n, sympy.Integer(1)), target.type.dtype),
                "target_index")
    picked = _op(graph, node, "aten.gather.default", [shifted, 1, index], col, "target_logit")
    picked = _op(graph, node, "aten.squeeze.dim", [picked, 1], row, "target_logit_row")
    per_token = _op(graph, node, "aten.sub.Tensor", [log_sum, picked], row_acc, "token_loss")
    counted = _op(graph, node, "aten.ne.Scalar", [target, a["ignore_index"]], TensorType((n,), "bool"), "counted_vocab")
    kept = _op(graph, node, "aten.mul.Tensor", [per_token, counted], row_acc, "kept_loss")
    return _op(graph, node, "aten.sum.default", [kept], TensorType((), acc), "ce_total_acc" if acc != logits.type.dtype
               else "ce_total")


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
    acc = accumulation_dtype(node.op, a["input"].type.dtype)
    tensors = [a[k] for k in ("weight", "bias", "running_mean", "running_var") if isinstance(a[k], Value)]
    if any(promoted(acc, t.type.dtype) != acc for t in tensors):
        return None  # a parameter wider than the statistics (f64 weights of an f32 input): kept whole
    return a


def _batch_norm_from_sums(graph: Graph, node: Node, a: dict) -> None:
    """Batch norm as sums over every dim but the channels (dim 1), as eager computes it: the mean,
    then the sum of squared deviations from it (two passes), variance biased for normalising and
    unbiased (count - 1) for the running variance, which moves by ``momentum`` as in eager.

    All of it runs in the accumulation dtype (float32 for a bf16 or f16 input, as the fused kernel
    computes internally); each output is rounded once to the dtype capture declared for it."""
    x = a["input"]
    shape = x.type.shape
    acc = accumulation_dtype(node.op, x.type.dtype)
    reduced = [0] + list(range(2, len(shape)))
    count = math.prod(shape[d] for d in reduced)
    kept = TensorType((sympy.Integer(1), shape[1]) + (sympy.Integer(1),) * (len(shape) - 2), acc)
    channels = TensorType((shape[1],), acc)

    def op(name: str, args: list, out: TensorType, value_name: str) -> Value:
        return _op(graph, node, name, args, out, value_name)

    def rounded(value_name: str, dtype: str, build) -> Value:
        """``build(name)`` (a value in ``acc``), cast to ``dtype``; the final value is named ``value_name``."""
        if dtype == acc:
            return build(value_name)
        return _cast(graph, node, build(f"{value_name}_acc"), dtype, value_name)

    def reshaped(t: Value, shape_: tuple, name: str) -> Value:
        return op("aten.reshape.default", [t, list(shape_)], TensorType(shape_, t.type.dtype), name)

    x_acc = _cast(graph, node, x, acc, "bn_input_acc")
    total = op("aten.sum.dim_IntList", [x_acc, reduced, True], kept, "bn_sum")
    total.producer.attrs[BATCH_STATISTICS_ATTR] = True  # a pipeline cannot cut this batch into microbatches
    mean = op("aten.div.Scalar", [total, count], kept, "bn_mean")
    full = TensorType(shape, acc)
    centred = op("aten.sub.Tensor", [x_acc, mean], full, "bn_centred")
    squares = op("aten.pow.Tensor_Scalar", [centred, 2], full, "bn_squares")
    square_sum = op("aten.sum.dim_IntList", [squares, reduced, True], kept, "bn_square_sum")
    var = op("aten.div.Scalar", [square_sum, count], kept, "bn_var")
    rstd = op("aten.rsqrt.default", [op("aten.add.Tensor", [var, float(a["eps"])], kept, "bn_var_eps")], kept,
              "bn_rstd")
    outs = node.outputs

    affine = [(fn, a[key], f"bn_{key}", label) for fn, key, label in
              (("aten.mul.Tensor", "weight", "bn_scaled"), ("aten.add.Tensor", "bias", "bn_shifted"))
              if a[key] is not None]
    names = ["bn_normalized"] + [label for *_, label in affine]

    def normalized(name: str) -> Value:
        """(x - mean) * rstd, times the weight, plus the bias (where given); the last value is ``name``."""
        out_names = names[:-1] + [name]
        y = op("aten.mul.Tensor", [centred, rstd], full, out_names[0])
        for (fn, param, param_name, _), out_name in zip(affine, out_names[1:]):
            y = op(fn, [y, reshaped(param, kept.shape, param_name)], full, out_name)
        return y

    new = {0: lambda: rounded(names[-1], outs[0].type.dtype, normalized),
           1: lambda: rounded("bn_saved_mean", outs[1].type.dtype, lambda n: reshaped(mean, channels.shape, n)),
           2: lambda: rounded("bn_saved_rstd", outs[2].type.dtype, lambda n: reshaped(rstd, channels.shape, n))}
    if a["running_mean"] is not None:
        momentum = float(a["momentum"])

        def moved(running: Value, statistic: Value, name: str) -> Value:
            def build(value_name: str) -> Value:
                old = _cast(graph, node, running, acc, f"{name}_old_acc")
                kept_part = op("aten.mul.Tensor", [old, 1.0 - momentum], channels, f"{name}_kept")
                new_part = op("aten.mul.Tensor", [statistic, momentum], channels, f"{name}_step")
                return op("aten.add.Tensor", [new_part, kept_part], channels, value_name)
            return rounded(name, running.type.dtype, build)

        new[3] = lambda: moved(a["running_mean"], reshaped(mean, channels.shape, "bn_batch_mean"), "bn_running_mean")
        new[4] = lambda: moved(a["running_var"], op("aten.div.Scalar", [
            reshaped(square_sum, channels.shape, "bn_batch_square_sum"), count - 1],
            channels, "bn_batch_var"), "bn_running_var")
    for i, o in enumerate(outs):
        if _read(graph, o):
            graph.replace_all_uses(o, new[i]())
    graph.remove_node(node)


def _read(graph: Graph, v: Value) -> bool:
    """Whether anything reads ``v``: a node, the outputs, or a buffer update."""
    return bool(v.uses) or any(v is o for o in graph.outputs) or any(v is u for u in graph.buffer_updates.values())
