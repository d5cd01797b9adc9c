"""Tiny randomly initialised causal LMs of the architectures we support, built from configs."""

from __future__ import annotations

import torch
from transformers import (
    GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
    Qwen2Config, Qwen2ForCausalLM,
)

VOCAB = 96
ARCHS = ("llama", "qwen2", "mistral", "gpt2")


def tiny_model(arch: str, seed: int, vocab: int = VOCAB, hidden: int = 64, layers: int = 2, context: int = 512):
    """Random weights with a wide init so greedy outputs vary; no EOS so generation runs to the budget."""
    common = dict(vocab_size=vocab, eos_token_id=None, bos_token_id=None, pad_token_id=None, initializer_range=0.3)
    if arch == "gpt2":
        config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=context, **common)
        cls = GPT2LMHeadModel
    else:
        cls, config_cls = {
            "llama": (LlamaForCausalLM, LlamaConfig),
            "qwen2": (Qwen2ForCausalLM, Qwen2Config),
            "mistral": (MistralForCausalLM, MistralConfig),
        }[arch]
        config = config_cls(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=context, **common,
        )
    torch.manual_seed(seed)
    return cls(config).eval()


def perturbed_copy(model, scale: float, seed: int):
    """The model with Gaussian noise on every weight: a draft that agrees with it only partly."""
    import copy

    clone = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in clone.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * scale * param.std().nan_to_num(0.0))
    return clone.eval()
