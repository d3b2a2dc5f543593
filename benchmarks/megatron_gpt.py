"""A Megatron-LM-style GPT for the published-runs validation, built on the meta device.

What differs from ``examples/gpt.py`` is only what the published runs ran and the cost model can see:

- attention as Megatron ran it before FlashAttention (``attention="unfused"``: Q·Kᵀ, an additive causal
  mask, softmax, dropout and the product with V, each its own kernel, in a ``core`` submodule so that
  selective recomputation can name it, as Megatron's ``CoreAttention``), or one fused flash kernel
  (``attention="flash"``, what Transformer Engine runs on H100);
- dropout after attention and after the MLP (``hidden_dropout``), and in attention (``attention_dropout``);
- bf16 weights and activations, with the loss computed on float32 logits, as Megatron's vocabulary-parallel
  cross entropy upcasts them (``calculate_logits_max``, megatron/core/tensor_parallel/cross_entropy.py; its
  2021 ``post_language_model_processing`` called it on ``output.float()``);
- the vocabulary and sequence of the run.

Module names follow the bundled GPT (``blocks.*.attn.qkv`` ...), so the Megatron layouts of
``examples/plans/megatron_tp.sbp`` apply unchanged.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import gpt  # noqa: E402
from gpt import GPT, GPTConfig  # noqa: E402


@dataclass
class MegatronConfig(GPTConfig):
    """:class:`GPTConfig` plus how attention and dropout run."""

    attention: str = "unfused"
    """``unfused`` (Megatron's kernels before FlashAttention) or ``flash`` (one fused kernel)."""
    dropout: float = 0.1


class CoreAttention(nn.Module):
    """Softmax attention of per-head q, k, v ``[batch, heads, seq, head_dim]`` (Megatron's ``CoreAttention``)."""

    def __init__(self, cfg: MegatronConfig):
        super().__init__()
        self.flash = cfg.attention == "flash"
        self.dropout = cfg.dropout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.flash:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                  dropout_p=self.dropout if self.training else 0.0)
        T = q.size(-2)
        q = q * q.size(-1) ** -0.5
        scores = q @ k.transpose(-2, -1)
        mask = torch.full((T, T), float("-inf"), device=q.device, dtype=q.dtype).triu(1)
        probs = F.dropout(torch.softmax(scores + mask, dim=-1), self.dropout, self.training)
        return probs @ v


class Attention(nn.Module):
    """Per-head fused QKV projection (as the bundled GPT), core attention, output projection, dropout."""

    def __init__(self, cfg: MegatronConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.core = CoreAttention(cfg)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, self.n_head, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=3))
        y = self.core(q, k, v).transpose(1, 2).reshape(B, T, C)
        return F.dropout(self.proj(y), self.dropout, self.training)


class MLP(nn.Module):
    """fc (4x wider), GELU, projection back, dropout."""

    def __init__(self, cfg: MegatronConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.proj(F.gelu(self.fc(x))), self.dropout, self.training)


class Block(gpt.Block):
    """The bundled GPT's pre-norm block with Megatron's attention and MLP in place of its own (the module
    names, and so the plans' globs, stay those of the bundled GPT)."""

    def __init__(self, cfg: MegatronConfig):
        super().__init__(cfg)
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)


class MegatronGPT(GPT):
    """The bundled GPT's embeddings, final norm and tied head around Megatron-style blocks."""

    def __init__(self, cfg: MegatronConfig):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        logits = super().forward(idx)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def meta_model(cfg: MegatronConfig) -> MegatronGPT:
    """The model in bf16 with every parameter on the meta device, in train mode (dropout on)."""
    with torch.device("meta"):
        return MegatronGPT(cfg).to(torch.bfloat16).train()


MEGATRON_LAYOUT = {"blocks.*.attn.qkv.weight": {"tp": "S(0)"}, "blocks.*.attn.qkv.bias": {"tp": "S(0)"},
                   "blocks.*.attn.proj.weight": {"tp": "S(1)"}, "blocks.*.mlp.fc.weight": {"tp": "S(0)"},
                   "blocks.*.mlp.fc.bias": {"tp": "S(0)"}, "blocks.*.mlp.proj.weight": {"tp": "S(1)"},
                   "tok_emb.weight": {"tp": "S(0)"}}
"""Megatron's tensor-parallel layout: column-parallel qkv and fc, row-parallel projections, a
vocabulary-parallel embedding (its tied head then computes vocabulary-split logits)."""
