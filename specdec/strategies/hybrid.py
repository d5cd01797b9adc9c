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

from specdec.backends.base import Backend
from specdec.strategies.base import DraftContext, TreeDrafter
from specdec.strategies.dyspec import DySpecOptions, DySpecStrategy, _Growth, grow_auto
from specdec.strategies.lookup import NgramIndex
from specdec.tree import DraftTree, Verdict


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

    def propose(self, draft: Backend, ctx: DraftContext) -> DraftTree:
        opts = self.options
        max_depth = min(opts.max_depth, ctx.max_depth)
        trie = self.index.continuation_trie(ctx.tokens, min(opts.lookup_tokens, max_depth), opts.max_matches)
        planner = self.auto_planner() if opts.max_nodes == "auto" else None
        use_draft = planner is None or planner.should_draft()
        drafter = TreeDrafter(draft, ctx)
        growth = self._growth = _Growth(drafter, max_depth, planner, trie, opts.lookup_value)
        if planner is not None:
            planner.begin(len(ctx.tokens), len(ctx.tokens) - draft.committed_len if use_draft else 0)
        if use_draft:
            growth.open(0, drafter.start())
        if planner is not None:
            grow_auto(growth, planner, opts.node_cap, opts.expand_per_step, feed=use_draft)
        else:
            self._grow_best_first(growth, opts.max_nodes, opts.expand_per_step)
        return drafter.tree()

    def update(self, verdict: Verdict, tree: DraftTree) -> None:
        if self.planner is not None and len(tree) > 1:
            sources = ["lookup" if fixed else "draft" for fixed in self._growth.drafter.fixed]
            self.planner.observe(tree, verdict, self._growth.raw, sources)
