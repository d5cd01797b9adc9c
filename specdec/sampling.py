"""Logit warping and the random source shared by drafting and verification.

Draft proposals and target distributions must be warped identically (temperature, then top-k,
then top-p, the order `transformers` applies them) or sampling verification is not lossless.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Warp:
    """Sampling settings; temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def warp_probs(logits: torch.Tensor, warp: Warp) -> torch.Tensor:
    """[..., V] logits -> [..., V] probabilities (float32, or float64 for float64 logits) after
    temperature, top-k and top-p."""
    scores = logits.to(torch.promote_types(logits.dtype, torch.float32)) / warp.temperature
    if warp.top_k > 0 and warp.top_k < scores.shape[-1]:
        kth = torch.topk(scores, warp.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if warp.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1)  # ascending
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1.0 - warp.top_p)
        drop_sorted[..., -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores.softmax(dim=-1)


class Random:
    """Seeded draws. Two primitives, so tests can enumerate every outcome of the same code:

    - `accept(prob)`: True with probability `prob`;
    - `sample(probs)`: an index drawn from the (not necessarily normalised) weights `probs [V]`.

    One CPU generator drives every draw (inverse-CDF sampling on the tensor's own device), so a
    seed gives the same output wherever the models run.
    """

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def accept(self, prob: float) -> bool:
        return self.uniform() < prob

    def sample(self, probs: torch.Tensor) -> int:
        cumulative = probs.double().cumsum(-1)  # [V]
        threshold = self.uniform() * cumulative[-1]
        # right=True never lands on a zero-weight entry: its cumulative equals its predecessor's.
        index = torch.searchsorted(cumulative, threshold.reshape(1), right=True)
        return int(index.clamp_(max=probs.shape[-1] - 1))

    def sample_without_replacement(self, probs: torch.Tensor, k: int) -> list[int]:
        """Up to k distinct indices, drawn one by one with the chosen ones removed."""
        weights = probs.clone()
        chosen: list[int] = []
        while len(chosen) < k and bool(weights.sum() > 0):
            index = self.sample(weights)
            chosen.append(index)
            weights[index] = 0.0
        return chosen
