"""`hybrid`: one verified tree holding draft-model candidates and n-gram lookup candidates.

Each step, what followed the context's last n-gram earlier in the prompt and output is merged into
a trie of fixed candidates (specdec/strategies/lookup.py); the draft model's candidates grow
best-first beside them as in `dyspec`, and every node, fixed or drawn, may get draft children once
fed to the draft. Fixed nodes cost no draft forward to choose.

Lossless: a node's fixed children are verified first, each as a point-mass proposal, and its draft
children are drawn from the draft's proposal with the fixed tokens removed (specdec/verify.py).

`max_nodes` counts both kinds; with `auto` the planner values a fixed child by the acceptance
observed for lookup nodes at its depth, and skips the draft model (lookup only) while it cannot pay.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from specdec.strategies.base import TreeDrafter
from specdec.strategies.budget import Planner
from specdec.strategies.dyspec import DySpecOptions, DySpecStrategy, _Growth
from specdec.strategies.lookup import NgramIndex


class HybridOptions(DySpecOptions):
    max_ngram: int = Field(3, ge=1, le=64, description="longest n-gram looked up in the context")
    min_ngram: int = Field(1, ge=1, le=64, description="shortest n-gram looked up")
    lookup_tokens: int = Field(10, ge=1, le=256, description="continuation tokens taken per match")
    max_matches: int = Field(4, ge=1, le=64, description="most recent matches merged into the trie")
    lookup_value: float = Field(0.5, gt=0.0, le=1.0, description="fixed budgets: a lookup child's value, as a draft probability")

    @model_validator(mode="after")
    def _hybrid_checks(self):
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"min_ngram ({self.min_ngram}) is larger than max_ngram ({self.max_ngram})")
        if self.mode != "heap":
            raise ValueError("hybrid grows best-first: mode must be heap")
        return self


class HybridStrategy(DySpecStrategy):
    name = "hybrid"
    Options = HybridOptions

    def __init__(self, options: HybridOptions):
        super().__init__(options)
        self.index = NgramIndex(options.min_ngram, options.max_ngram)

    def reset(self) -> None:
        super().reset()
        self.index.reset()

    def growth(self, drafter: TreeDrafter, max_depth: int, planner: Planner | None) -> _Growth:
        opts = self.options
        trie = self.index.continuation_trie(drafter.ctx.tokens, min(opts.lookup_tokens, max_depth), opts.max_matches)
        return _Growth(drafter, max_depth, planner, trie, opts.lookup_value)
