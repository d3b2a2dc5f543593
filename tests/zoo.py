"""A zoo of real transformers architectures from tiny configs, for the real-model sweep.

Every entry builds a seeded, dropout-free model whose ``forward(inputs, labels)`` returns the loss
(train mode, ``use_cache=False``), its example inputs, the Megatron tensor-parallel layout of its
attention and MLP parameters where the module names allow one (column-parallel q/k/v/up/gate,
row-parallel o/down), and a module at which a 2-stage pipeline cuts it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from tests.models import VOCAB, LabelledLoss, gpt2_model, llama_model, lm_inputs

HIDDEN = 32
SEQ = 16
BATCH = 8
NO_SPECIAL_TOKENS = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}


@dataclass(frozen=True)
class ZooModel:
    """One architecture of the sweep: how to build it, feed it and parallelise it."""

    name: str
    family: str
    """decoder, encoder-decoder, state-space, moe or vision."""
    build: Callable[[], nn.Module]
    """A fresh, seeded model (the same weights on every call)."""
    inputs: Callable[..., tuple]
    """``inputs(seed=1)``: an example ``(inputs, labels)`` of batch :data:`BATCH`, one per seed."""
    stages: tuple[str, ...]
    """Module names where stages 1.. of a pipeline begin (one cut: 2 stages)."""
    tp_params: dict[str, str] = field(default_factory=dict)
    """Parameter glob -> SBP on the tensor-parallel axis (empty: no Megatron layout for this model)."""
    microbatches: int = 2
    """Microbatches of the pipeline: 1 where a norm's statistics span the batch (training BatchNorm)."""

    def tp_strategy(self, ranks: int = 2) -> dict:
        """A tensor-parallel strategy on ``ranks`` ranks with :attr:`tp_params`."""
        return {"mesh": {"tp": ranks}, "params": {k: {"tp": v} for k, v in self.tp_params.items()}}

    def pp_strategy(self, microbatches: int | None = None) -> dict:
        """A pipeline over ``len(stages) + 1`` ranks, one stage each, cut at :attr:`stages`."""
        return {"mesh": {"pp": len(self.stages) + 1}, "stages": list(self.stages),
                "microbatches": microbatches or self.microbatches}


def _seeded(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return make()
    build.__doc__ = make.__doc__
    return build


def _causal_lm(model_cls: str, config_cls: str, **config) -> Callable[[], nn.Module]:
    """A transformers causal LM wrapped so that ``forward(input_ids, labels)`` returns the loss."""
    def make() -> nn.Module:
        import transformers
        cfg = getattr(transformers, config_cls)(vocab_size=VOCAB, use_cache=False, **NO_SPECIAL_TOKENS, **config)
        return LabelledLoss(getattr(transformers, model_cls)(cfg))
    return _seeded(make)


LLAMA_ATTENTION_TP = {"lm.model.layers.*.self_attn.[qkv]_proj.weight": "S(0)",
                      "lm.model.layers.*.self_attn.o_proj.weight": "S(1)"}
"""Megatron layout of separate q/k/v/o projections."""
LLAMA_TP = {**LLAMA_ATTENTION_TP, "lm.model.layers.*.mlp.gate_proj.weight": "S(0)",
            "lm.model.layers.*.mlp.up_proj.weight": "S(0)", "lm.model.layers.*.mlp.down_proj.weight": "S(1)"}
"""... and of a gated MLP: gate_proj and up_proj column-parallel, down_proj row-parallel."""


ATTENTION = {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32}
DECODER = {"hidden_size": HIDDEN, "intermediate_size": 64, "num_hidden_layers": 2, **ATTENTION}


# GPT-2's Conv1D stores its weight as (in, out): column-parallel splits dim 1 and the bias.
GPT2_TP = {"lm.transformer.h.*.attn.c_attn.weight": "S(1)", "lm.transformer.h.*.attn.c_attn.bias": "S(0)",
           "lm.transformer.h.*.attn.c_proj.weight": "S(0)",
           "lm.transformer.h.*.mlp.c_fc.weight": "S(1)", "lm.transformer.h.*.mlp.c_fc.bias": "S(0)",
           "lm.transformer.h.*.mlp.c_proj.weight": "S(0)"}
PHI3_TP = {"lm.model.layers.*.self_attn.qkv_proj.weight": "S(0)", "lm.model.layers.*.self_attn.o_proj.weight": "S(1)",
           "lm.model.layers.*.mlp.gate_up_proj.weight": "S(0)", "lm.model.layers.*.mlp.down_proj.weight": "S(1)"}
GPTJ_TP = {"lm.transformer.h.*.attn.[qkv]_proj.weight": "S(0)", "lm.transformer.h.*.attn.out_proj.weight": "S(1)",
           "lm.transformer.h.*.mlp.fc_in.weight": "S(0)", "lm.transformer.h.*.mlp.fc_in.bias": "S(0)",
           "lm.transformer.h.*.mlp.fc_out.weight": "S(1)"}
FALCON_TP = {"lm.transformer.h.*.self_attention.query_key_value.weight": "S(0)",
             "lm.transformer.h.*.self_attention.dense.weight": "S(1)",
             "lm.transformer.h.*.mlp.dense_h_to_4h.weight": "S(0)", "lm.transformer.h.*.mlp.dense_4h_to_h.weight": "S(1)"}
T5_TP = {"lm.*.layer.*.SelfAttention.[qkv].weight": "S(0)", "lm.*.layer.*.SelfAttention.o.weight": "S(1)",
         "lm.*.layer.*.EncDecAttention.[qkv].weight": "S(0)", "lm.*.layer.*.EncDecAttention.o.weight": "S(1)",
         "lm.*.layer.*.DenseReluDense.wi.weight": "S(0)", "lm.*.layer.*.DenseReluDense.wo.weight": "S(1)"}
WHISPER_TP = {"lm.model.*.layers.*.*attn.[qkv]_proj.weight": "S(0)", "lm.model.*.layers.*.*attn.[qv]_proj.bias": "S(0)",
              "lm.model.*.layers.*.*attn.out_proj.weight": "S(1)",
              "lm.model.*.layers.*.fc1.weight": "S(0)", "lm.model.*.layers.*.fc1.bias": "S(0)",
              "lm.model.*.layers.*.fc2.weight": "S(1)"}
# Experts of the batched_mm implementation: gate_up_proj (experts, 2 * inter, hidden) is column-parallel
# over its rows, down_proj (experts, hidden, inter) row-parallel over its columns.
MOE_EXPERTS_TP = {"lm.model.layers.*.mlp.experts.gate_up_proj": "S(1)", "lm.model.layers.*.mlp.experts.down_proj": "S(2)"}
CONVNEXT_TP = {"lm.convnext.encoder.stages.*.layers.*.pwconv1.weight": "S(0)",
               "lm.convnext.encoder.stages.*.layers.*.pwconv1.bias": "S(0)",
               "lm.convnext.encoder.stages.*.layers.*.pwconv2.weight": "S(1)"}


def _t5() -> nn.Module:
    import transformers
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                num_heads=4, dropout_rate=0.0, use_cache=False, decoder_start_token_id=0,
                                pad_token_id=0, eos_token_id=1, relative_attention_num_buckets=8,
                                relative_attention_max_distance=16)
    return LabelledLoss(transformers.T5ForConditionalGeneration(cfg))


WHISPER_MELS = 16
WHISPER_FRAMES = 32  # the encoder halves it: max_source_positions = 16


def _whisper() -> nn.Module:
    import transformers
    cfg = transformers.WhisperConfig(vocab_size=VOCAB, num_mel_bins=WHISPER_MELS, d_model=HIDDEN, encoder_layers=2,
                                     decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                                     encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=WHISPER_FRAMES // 2,
                                     max_target_positions=32, dropout=0.0, attention_dropout=0.0,
                                     activation_dropout=0.0, encoder_layerdrop=0.0, decoder_layerdrop=0.0,
                                     use_cache=False, decoder_start_token_id=1, pad_token_id=0, bos_token_id=1,
                                     eos_token_id=2, suppress_tokens=None, begin_suppress_tokens=None)
    return LabelledLoss(transformers.WhisperForConditionalGeneration(cfg), input_key="input_features")


def _whisper_inputs(seed: int = 1) -> tuple:
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(BATCH, WHISPER_MELS, WHISPER_FRAMES, generator=g)
    labels = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
    return features, labels


def _mamba() -> nn.Module:
    import transformers
    cfg = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, state_size=8, num_hidden_layers=2, expand=2,
                                   conv_kernel=4, use_cache=False, **NO_SPECIAL_TOKENS)
    return LabelledLoss(transformers.MambaForCausalLM(cfg))


IMAGE = 32
CLASSES = 10


def _resnet() -> nn.Module:
    import transformers
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                    layer_type="basic", num_labels=CLASSES)
    return LabelledLoss(transformers.ResNetForImageClassification(cfg), input_key="pixel_values")


def _convnext() -> nn.Module:
    import transformers
    # layer_scale_init_value 1e-6 (the default) would scale every block's gradient down to the tolerance
    cfg = transformers.ConvNextConfig(num_channels=3, patch_size=4, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1],
                                      num_labels=CLASSES, drop_path_rate=0.0, image_size=IMAGE,
                                      layer_scale_init_value=0.5)
    return LabelledLoss(transformers.ConvNextForImageClassification(cfg), input_key="pixel_values")


def _image_inputs(seed: int = 1) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)


def _moe(model_cls: str, config_cls: str, **config) -> Callable[[], nn.Module]:
    """A mixture-of-experts causal LM in transformers' ``batched_mm`` experts implementation (the one that
    torch.export captures: ``grouped_mm`` has no CPU kernel, ``eager`` loops over data-dependent experts)."""
    return _causal_lm(model_cls, config_cls, experts_implementation="batched_mm", **config)


def _lm_inputs(seed: int = 1) -> tuple:
    return lm_inputs(batch=BATCH, seq=SEQ, seed=seed)


def _short_lm_inputs(seed: int = 1) -> tuple:
    """Half :data:`SEQ` positions: Mamba's CPU path runs its scan one position at a time, so its captured graph
    (and the capture's time, 10 s at 16 positions, 6 s at 8) grows with the sequence."""
    return lm_inputs(batch=BATCH, seq=SEQ // 2, seed=seed)


LAYER1 = ("lm.model.layers.1",)
ZOO: dict[str, ZooModel] = {m.name: m for m in [
    ZooModel("gpt2", "decoder", gpt2_model, _lm_inputs, ("lm.transformer.h.1",), GPT2_TP),
    ZooModel("llama", "decoder", llama_model, _lm_inputs, LAYER1, LLAMA_TP),
    ZooModel("mistral", "decoder", _causal_lm("MistralForCausalLM", "MistralConfig", sliding_window=8, **DECODER),
             _lm_inputs, LAYER1, LLAMA_TP),
    ZooModel("phi3", "decoder", _causal_lm("Phi3ForCausalLM", "Phi3Config", resid_pdrop=0.0, embd_pdrop=0.0,
                                           attention_dropout=0.0, **DECODER), _lm_inputs, LAYER1, PHI3_TP),
    ZooModel("gemma2", "decoder", _causal_lm("Gemma2ForCausalLM", "Gemma2Config", head_dim=8, sliding_window=8,
                                             query_pre_attn_scalar=8, **DECODER), _lm_inputs, LAYER1, LLAMA_TP),
    ZooModel("gemma3", "decoder", _causal_lm("Gemma3ForCausalLM", "Gemma3TextConfig", head_dim=8, sliding_window=8,
                                             query_pre_attn_scalar=8, **DECODER), _lm_inputs, LAYER1, LLAMA_TP),
    ZooModel("qwen3", "decoder", _causal_lm("Qwen3ForCausalLM", "Qwen3Config", head_dim=8, **DECODER), _lm_inputs,
             LAYER1, LLAMA_TP),
    ZooModel("gptj", "decoder", _causal_lm("GPTJForCausalLM", "GPTJConfig", n_embd=HIDDEN, n_layer=2, n_head=4,
                                           n_positions=32, rotary_dim=4, n_inner=64, resid_pdrop=0.0,
                                           embd_pdrop=0.0, attn_pdrop=0.0), _lm_inputs, ("lm.transformer.h.1",),
             GPTJ_TP),
    ZooModel("falcon", "decoder", _causal_lm("FalconForCausalLM", "FalconConfig", hidden_size=HIDDEN,
                                             num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=False,
                                             multi_query=False, parallel_attn=True, alibi=False, bias=False,
                                             hidden_dropout=0.0, attention_dropout=0.0), _lm_inputs,
             ("lm.transformer.h.1",), FALCON_TP),
    ZooModel("t5", "encoder-decoder", _seeded(_t5), _lm_inputs, ("lm.decoder",), T5_TP),
    ZooModel("whisper", "encoder-decoder", _seeded(_whisper), _whisper_inputs, ("lm.model.decoder",), WHISPER_TP),
    ZooModel("mamba", "state-space", _seeded(_mamba), _short_lm_inputs, ("lm.backbone.layers.1",)),
    ZooModel("mixtral", "moe", _moe("MixtralForCausalLM", "MixtralConfig", num_local_experts=4, num_experts_per_tok=2,
                                    router_jitter_noise=0.0, **DECODER), _lm_inputs, LAYER1,
             {**LLAMA_ATTENTION_TP, **MOE_EXPERTS_TP}),
    ZooModel("qwen3_moe", "moe", _moe("Qwen3MoeForCausalLM", "Qwen3MoeConfig", head_dim=8, num_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                                      norm_topk_prob=True, **DECODER), _lm_inputs, LAYER1,
             {**LLAMA_ATTENTION_TP, **MOE_EXPERTS_TP}),
    ZooModel("resnet", "vision", _seeded(_resnet), _image_inputs, ("lm.resnet.encoder.stages.1",), microbatches=1),
    ZooModel("convnext", "vision", _seeded(_convnext), _image_inputs, ("lm.convnext.encoder.stages.1",), CONVNEXT_TP),
]}
