"""Explicit next-token tables for TableBackend models."""

from __future__ import annotations

import math

import torch


def ngram_logits(rules: dict[tuple[int, ...], dict[int, float]], vocab: int, order: int = 2):
    """Logits from the last `order` tokens (fewer at the start): listed tokens get their
    probability, the rest of the mass is spread evenly over the other tokens."""

    def logits(prefix: tuple[int, ...]) -> torch.Tensor:
        probs = dict(rules.get(prefix[-order:], {}))
        rest = (1.0 - sum(probs.values())) / (vocab - len(probs))
        return torch.tensor([math.log(probs.get(t, rest)) for t in range(vocab)], dtype=torch.float64)

    return logits


def random_logits(seed: int, vocab: int, scale: float = 2.0, context: int | None = None):
    """Pseudo-random logits for every prefix (or its last `context` tokens)."""
    cache: dict[tuple[int, ...], torch.Tensor] = {}

    def logits(prefix: tuple[int, ...]) -> torch.Tensor:
        key = prefix if context is None else prefix[-context:]
        if key not in cache:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + hash((len(prefix),) + key) % 1_000_003)
            cache[key] = torch.randn(vocab, generator=gen, dtype=torch.float64) * scale
        return cache[key]

    return logits


def table_greedy(logits, prompt: list[int], new_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(new_tokens):
        tokens.append(int(logits(tuple(tokens)).argmax()))
    return tokens[len(prompt):]
