"""Rewrites that expose parallelism: mean losses as sum / count, vocabulary-parallel cross entropy.

A mean over a batch split across ranks is not a local mean: the loss becomes a partial sum divided
by the global count of counted targets (which ``ignore_index`` makes data dependent). With the
vocabulary split (Megatron-LM), cross entropy is written with ops whose rules keep the logits
sharded: the max and the sum of exponentials are reduced across ranks, the logits never gathered.
"""
from __future__ import annotations

import sympy

from ir.core import Graph, Node, Value
from ir.types import TensorType
from passes.manager import PassContext, register_pass

CE = "aten.cross_entropy_loss.default"
MEAN, SUM = 1, 2


def _ce_args(node: Node) -> dict:
    names = ["input", "target", "weight", "reduction", "ignore_index", "label_smoothing"]
    defaults = [None, None, None, MEAN, -100, 0.0]
    vals = dict(zip(names, defaults))
    vals.update(dict(zip(names, node.args)))
    vals.update(node.kwargs)
    return vals


@register_pass("decompose")
def decompose_pass(graph: Graph, ctx: PassContext) -> None:
    """Split mean cross entropy into sum / count; expand it for vocabulary parallelism if asked."""
    vocab = bool(ctx.strategy.get("vocab_parallel"))
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
