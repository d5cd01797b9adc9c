"""Rule-based next-token tables for TableBackend models (random ones: specdec.testing.random_table)."""

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
