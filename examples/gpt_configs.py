"""GPT-3-style configurations (1.3B, 2.7B, 6.7B, 13B; sequence 2048) of the bundled GPT, for planning.

Build them on the meta device, which allocates no weights, and plan them on any machine::

    import torch
    from gpt_configs import meta_model, example_batch
    model = meta_model("13B")                    # parameters on the meta device
    plan = compile(model, example_batch(64), cluster="dgx-a100:2", strategy="auto")
    print(plan.explain()); print(plan.simulate().summary())

Sizes follow Brown et al. (2020), table 2.1, with the vocabulary padded to 50304 (a multiple of 128).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt import GPT, GPTConfig  # noqa: E402

SEQUENCE = 2048
VOCAB = 50304

CONFIGS: dict[str, GPTConfig] = {
    "1.3B": GPTConfig(vocab_size=VOCAB, block_size=SEQUENCE, n_layer=24, n_head=16, n_embd=2048),
    "2.7B": GPTConfig(vocab_size=VOCAB, block_size=SEQUENCE, n_layer=32, n_head=32, n_embd=2560),
    "6.7B": GPTConfig(vocab_size=VOCAB, block_size=SEQUENCE, n_layer=32, n_head=32, n_embd=4096),
    "13B": GPTConfig(vocab_size=VOCAB, block_size=SEQUENCE, n_layer=40, n_head=40, n_embd=5120),
}


def config(name: str, n_layer: int | None = None) -> GPTConfig:
    """The named configuration, optionally with another depth."""
    if name not in CONFIGS:
        raise KeyError(f"unknown GPT configuration {name!r}; expected one of {', '.join(CONFIGS)}")
    base = CONFIGS[name]
    return GPTConfig(base.vocab_size, base.block_size, n_layer or base.n_layer, base.n_head, base.n_embd)


def meta_model(name: str, n_layer: int | None = None) -> GPT:
    """The model with every parameter on the meta device (no memory allocated)."""
    with torch.device("meta"):
        return GPT(config(name, n_layer))


def parameter_count(name: str) -> int:
    """Parameters of the configuration (the tied embedding counted once)."""
    return sum(p.numel() for p in meta_model(name).parameters())


def example_batch(batch: int, sequence: int = SEQUENCE, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and targets (small real int64 tensors: 16 KiB per sequence)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (batch, sequence), generator=g)
    return idx, torch.randint(0, VOCAB, (batch, sequence), generator=g)
