"""A tiny ``transformers`` causal LM built from a config (random init, no download), for tests and docs."""

from __future__ import annotations

import torch
from torch import nn

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 128) -> nn.Module:
    """A fp32 ``LlamaForCausalLM`` (hidden ``hidden``, MLP ``2*hidden``, 4 heads / 2 KV heads,
    untied head) with weights drawn from ``seed``: the same seed gives the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                         max_position_embeddings=128, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()
