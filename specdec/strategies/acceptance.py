"""Acceptance of a draft node as a function of its raw value (its draft probability given its
parent; 1 for a lookup match), fitted to what verification accepts: the `auto` planner keeps one
`Fit` per (source, depth) (specdec/strategies/budget.py)."""

from __future__ import annotations

DECAY = 0.95  # weight of the past in the fits, per step
PRIOR_POINTS = (0.25, 0.75)  # raw values of the prior's two unit-weight points


class Fit:
    """Acceptance as a line in the raw value, a + b x raw clipped to [0, 1] (b >= 0), by least
    squares over decayed points. Seeded with two unit-weight points on prior x raw, so it starts
    there and the data take over within a few steps. A line, not a scale: a draft may be
    underconfident (the demo pair's draft tokens of probability 0.15 to 0.7 were accepted 80% of
    the time, where one scale fitted to all its tokens estimated a token of 0.25 at 0.5) or
    overconfident."""

    def __init__(self, prior: float):
        self.sums = [0.0] * 5  # decayed sums of w, w x, w x^2, w y, w x y
        for x in PRIOR_POINTS:
            self.add(x, prior * x)

    def add(self, x: float, y: float) -> None:
        for i, value in enumerate((1.0, x, x * x, y, x * y)):
            self.sums[i] += value

    def decay(self) -> None:
        self.sums = [DECAY * value for value in self.sums]

    def at(self, x: float) -> float:
        w, wx, wxx, wy, wxy = self.sums
        spread = w * wxx - wx * wx
        slope = max(0.0, (w * wxy - wx * wy) / spread) if spread > 1e-9 * w * w else 0.0
        return min(1.0, max(0.0, (wy + slope * (x * w - wx)) / w))
