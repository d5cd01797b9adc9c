"""Exact enumeration of every outcome of a randomised function, with its probability.

`ScriptedRandom` stands in for `specdec.sampling.Random`: each draw follows a script of choices,
so re-running the same production code over every script visits every outcome once.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from specdec.sampling import Random


class ScriptedRandom(Random):
    def __init__(self, script: list[int]):
        self.script = script
        self.choices: list[int] = []
        self.options: list[int] = []  # number of options at each draw
        self.prob = 1.0

    def _choose(self, options: list[tuple[object, float]]):
        i = len(self.choices)
        choice = self.script[i] if i < len(self.script) else 0
        self.choices.append(choice)
        self.options.append(len(options))
        value, weight = options[choice]
        self.prob *= weight
        return value

    def accept(self, prob: float) -> bool:
        return self._choose([(v, w) for v, w in ((True, prob), (False, 1.0 - prob)) if w > 0.0])

    def sample(self, probs: torch.Tensor) -> int:
        weights = probs.double() / probs.double().sum()
        return self._choose([(i, float(w)) for i, w in enumerate(weights) if w > 0.0])


def enumerate_outcomes(fn) -> dict:
    """fn(rng) -> hashable outcome; returns {outcome: probability} over every draw sequence."""
    results: dict = defaultdict(float)
    script: list[int] = []
    while True:
        rng = ScriptedRandom(script)
        results[fn(rng)] += rng.prob
        i = len(rng.choices) - 1
        while i >= 0 and rng.choices[i] + 1 >= rng.options[i]:
            i -= 1
        if i < 0:
            return dict(results)
        script = rng.choices[:i] + [rng.choices[i] + 1]
