"""Attention (opset 23+) and the training losses NegativeLogLikelihoodLoss and
SoftmaxCrossEntropyLoss."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from frontend.onnx.dtypes import torch_dtype
from frontend.onnx.registry import NodeContext, Value, converter

_NEG_INF = float("-inf")


def _to_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[batch, seq, heads * size] -> [batch, heads, seq, size]."""
    batch, seq, hidden = x.shape
    return x.reshape(batch, seq, heads, hidden // heads).transpose(1, 2)


def _positional_mask(q_len: int, kv_len: int, offset: int | torch.Tensor, left: int, right: int,
                     causal: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive [q, kv] bias: 0 where query i may see key j, -inf elsewhere.

    A per-batch ``offset`` tensor (external KV cache) gives a [batch, 1, q, kv] bias.
    """
    if isinstance(offset, torch.Tensor):
        offset = offset.reshape(-1, 1, 1, 1)
    positions = torch.arange(max(q_len, kv_len), device=device)
    distance = (positions[:q_len].reshape(q_len, 1) + offset) - positions[:kv_len]
    allowed = torch.ones(distance.shape, dtype=torch.bool, device=device)
    if causal:
        allowed &= distance >= 0
    if left >= 0:
        allowed &= distance <= left
    if right >= 0:
        allowed &= -distance <= right
    return torch.where(allowed, 0.0, _NEG_INF).to(dtype)


def onnx_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   attn_mask: torch.Tensor | None, past_key: torch.Tensor | None,
                   past_value: torch.Tensor | None, scale: float | None, is_causal: int,
                   q_num_heads: int | None, kv_num_heads: int | None, softcap: float,
                   qk_matmul_output_mode: int, softmax_dtype: torch.dtype | None,
                   left_window: int = -1, right_window: int = -1,
                   nonpad_kv_seqlen: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX Attention: scaled dot-product attention with masks, KV cache, GQA and softcap.

    Returns (Y, present_key, present_value, qk_matmul_output) as the ONNX reference does.
    """
    three_d = q.dim() == 3
    if three_d:
        q, k, v = _to_heads(q, q_num_heads), _to_heads(k, kv_num_heads), _to_heads(v, kv_num_heads)
    scale = q.shape[3] ** -0.5 if scale is None else scale
    root = torch.tensor(scale ** 0.5, dtype=torch.float64, device=q.device).to(q.dtype)
    present_key = k if past_key is None else torch.cat([past_key, k], dim=2)
    present_value = v if past_value is None else torch.cat([past_value, v], dim=2)
    q_len, kv_len = q.shape[2], present_key.shape[2]

    bias = torch.zeros(q_len, kv_len, dtype=q.dtype, device=q.device)
    if attn_mask is not None:
        missing = kv_len - attn_mask.shape[-1]
        if missing > 0:  # a shorter mask is padded with "masked"
            attn_mask = F.pad(attn_mask, [0, missing], value=False if attn_mask.dtype == torch.bool
                              else _NEG_INF)
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.where(attn_mask, 0.0, _NEG_INF).to(q.dtype)
        bias = bias + attn_mask
    offset: int | torch.Tensor = 0 if past_key is None else past_key.shape[2]
    if nonpad_kv_seqlen is not None and past_key is None:  # external cache: per-batch
        offset = nonpad_kv_seqlen.to(torch.int64) - q_len
    if is_causal or left_window >= 0 or right_window >= 0:
        bias = bias + _positional_mask(q_len, kv_len, offset, left_window, right_window,
                                       bool(is_causal), q.dtype, q.device)
    if nonpad_kv_seqlen is not None:  # keys past each sequence's length are padding
        valid = (torch.arange(kv_len, device=q.device)
                 < nonpad_kv_seqlen.to(torch.int64).reshape(-1, 1))
        bias = bias + torch.where(valid, 0.0, _NEG_INF).to(q.dtype).reshape(
            valid.shape[0], 1, 1, kv_len)

    heads, kv_heads = q.shape[1], present_key.shape[1]
    keys, values = present_key, present_value
    if heads != kv_heads and heads % kv_heads == 0:  # grouped-query attention
        keys = torch.repeat_interleave(keys, heads // kv_heads, dim=1)
        values = torch.repeat_interleave(values, heads // kv_heads, dim=1)
    scores = torch.matmul(q * root, keys.transpose(2, 3) * root)
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    biased = scores + bias
    qk_output = biased if qk_matmul_output_mode == 2 else scores
    if softmax_dtype is not None:
        biased = biased.to(softmax_dtype)
    probabilities = torch.softmax(biased, dim=-1)
    # rows with every key masked attend to nothing (0), not NaN
    fully_masked = torch.isneginf(torch.amax(bias, dim=-1, keepdim=True))
    probabilities = torch.where(fully_masked, torch.zeros_like(probabilities), probabilities)
    if qk_matmul_output_mode == 3:
        qk_output = probabilities
    output = torch.matmul(probabilities.to(q.dtype), values)
    if three_d:
        output = output.transpose(1, 2).reshape(output.shape[0], output.shape[2], -1)
    return output, present_key, present_value, qk_output.to(q.dtype)


@converter("Attention")
def convert_attention(ctx: NodeContext) -> list[Value]:
    """Attention with every optional input and output."""
    precision = ctx.attr("softmax_precision", None)
    softmax_dtype = None if precision is None else torch_dtype(
        precision, node=ctx.name, op_type=ctx.op_type, opset=ctx.opset)
    args = [ctx.input(0), ctx.input(1), ctx.input(2), ctx.optional_input(3),
            ctx.optional_input(4), ctx.optional_input(5)]
    return ctx.call_multi(
        onnx_attention, *args, ctx.attr("scale", None), ctx.attr("is_causal"),
        ctx.attr("q_num_heads", None), ctx.attr("kv_num_heads", None), ctx.attr("softcap"),
        ctx.attr("qk_matmul_output_mode"), softmax_dtype, ctx.attr("left_window_size", -1),
        ctx.attr("right_window_size", -1), ctx.optional_input(6), num_results=4)


# ----- losses -----------------------------------------------------------------------------
def nll_loss(log_probs: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
             reduction: str, ignore_index: int | None) -> torch.Tensor:
    """NegativeLogLikelihoodLoss over class axis 1 (F.nll_loss has the same semantics)."""
    ignore = -100 if ignore_index is None else ignore_index
    loss = F.nll_loss(log_probs, target.to(torch.int64), weight, ignore_index=ignore,
                      reduction=reduction)
    return loss.to(log_probs.dtype)


@converter("NegativeLogLikelihoodLoss")
def convert_nll_loss(ctx: NodeContext) -> Value:
    """NegativeLogLikelihoodLoss with weights, reduction and ignore_index."""
    return ctx.call(nll_loss, ctx.input(0), ctx.input(1), ctx.optional_input(2),
                    ctx.attr("reduction"), ctx.attr("ignore_index", None))


def softmax_cross_entropy(scores: torch.Tensor, labels: torch.Tensor,
                          weight: torch.Tensor | None, reduction: str,
                          ignore_index: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """SoftmaxCrossEntropyLoss: (loss, log_prob) over class axis 1."""
    log_prob = torch.log_softmax(scores, dim=1)
    return nll_loss(log_prob, labels, weight, reduction, ignore_index), log_prob


@converter("SoftmaxCrossEntropyLoss")
def convert_softmax_cross_entropy(ctx: NodeContext) -> Any:
    """SoftmaxCrossEntropyLoss (and its optional log_prob output)."""
    return ctx.call_multi(softmax_cross_entropy, ctx.input(0), ctx.input(1),
                          ctx.optional_input(2), ctx.attr("reduction"),
                          ctx.attr("ignore_index", None), num_results=2)
