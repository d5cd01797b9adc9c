"""`chain`: standard speculative decoding, k draft tokens in a line, optionally adaptive k."""

from __future__ import annotations

from pydantic import Field, model_validator

from specdec.backends.base import Backend
from specdec.strategies.base import DraftContext, Strategy, StrategyOptions, TreeDrafter
from specdec.tree import DraftTree, Verdict


class ChainOptions(StrategyOptions):
    k: int = Field(4, ge=1, le=256, description="draft tokens per step")
    adaptive: bool = Field(False, description="grow k on full acceptance, shrink it on a rejection")
    min_k: int = Field(1, ge=1, description="lower bound of adaptive k")
    max_k: int = Field(16, ge=1, le=256, description="upper bound of adaptive k")

    @model_validator(mode="after")
    def _bounds(self):
        if self.adaptive and not self.min_k <= self.k <= self.max_k:
            raise ValueError(f"adaptive k needs min_k <= k <= max_k, got {self.min_k}, {self.k}, {self.max_k}")
        return self


class ChainStrategy(Strategy):
    name = "chain"
    Options = ChainOptions

    def __init__(self, options: ChainOptions):
        super().__init__(options)
        self.k = options.k

    def reset(self) -> None:
        self.k = self.options.k

    def propose(self, draft: Backend, ctx: DraftContext) -> DraftTree:
        drafter = TreeDrafter(draft, ctx)
        length = min(self.k, ctx.max_depth)
        logits = drafter.start()
        node = 0
        for depth in range(1, length + 1):
            (node,) = drafter.expand(node, logits, 1)
            if depth < length:  # the last draft token is verified, never fed
                logits = drafter.feed([node])[0]
        return drafter.tree()

    def update(self, verdict: Verdict, tree: DraftTree) -> None:
        if not self.options.adaptive or len(tree) == 1:
            return
        if verdict.num_accepted == tree.depth:
            self.k = min(self.k + 1, self.options.max_k)
        else:
            self.k = max(self.k - 1, self.options.min_k)
