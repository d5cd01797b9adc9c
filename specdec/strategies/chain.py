"""`chain`: standard speculative decoding, k draft tokens in a line, optionally adaptive k, or
`k: auto`: each step extends the chain while the expected tokens per second still improve
(specdec/strategies/budget.py), up to `max_k`.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from specdec.backends.base import Backend
from specdec.strategies.base import DraftContext, Strategy, StrategyOptions, TreeDrafter
from specdec.strategies.budget import Budget
from specdec.tree import DraftTree, Verdict, chain_tree


class ChainOptions(StrategyOptions):
    k: Budget(256) = Field(4, description="draft tokens per step, or auto (from measured costs)")
    adaptive: bool = Field(False, description="grow k on full acceptance, shrink it on a rejection")
    min_k: int = Field(1, ge=1, description="lower bound of adaptive k")
    max_k: int = Field(16, ge=1, le=256, description="upper bound of adaptive and auto k")

    @model_validator(mode="after")
    def _bounds(self):
        if self.adaptive and self.k == "auto":
            raise ValueError("k: auto already adapts; leave adaptive off")
        if self.adaptive and not self.min_k <= self.k <= self.max_k:
            raise ValueError(f"adaptive k needs min_k <= k <= max_k, got {self.min_k}, {self.k}, {self.max_k}")
        return self


class ChainStrategy(Strategy):
    name = "chain"
    Options = ChainOptions

    def __init__(self, options: ChainOptions):
        super().__init__(options)
        self.k = options.k

    @property
    def needs_costs(self) -> bool:
        return self.options.k == "auto"

    def reset(self) -> None:
        super().reset()
        self.k = self.options.k

    def propose(self, draft: Backend, ctx: DraftContext) -> DraftTree:
        if self.k == "auto":
            return self._propose_auto(draft, ctx, self.auto_planner())
        drafter = TreeDrafter(draft, ctx)
        length = min(self.k, ctx.max_depth)
        probs = drafter.start()  # [V], the root's draft distribution
        node = 0
        for depth in range(1, length + 1):
            (node,) = drafter.expand(node, probs, 1)
            if depth < length:  # the last draft token is verified, never fed
                probs = drafter.feed([node])[0]
        return drafter.tree()

    def _propose_auto(self, draft: Backend, ctx: DraftContext, planner) -> DraftTree:
        if not planner.start(len(ctx.tokens), len(ctx.tokens) - draft.committed_len):
            return chain_tree([ctx.tokens[-1]])
        drafter = TreeDrafter(draft, ctx)
        probs, node, estimate = drafter.start(), 0, 1.0
        self._raw = [1.0]
        for depth in range(1, min(self.options.max_k, ctx.max_depth) + 1):
            if depth > 1:  # the chain's last node must be fed before it can be extended
                if not planner.pays(planner.prospect(estimate, depth - 1), feed_queries=1):
                    break
                planner.draft_forward(1)
                probs = drafter.feed([node])[0]
            probs = drafter.proposal(node, probs)
            best = float(probs.max())
            planner.opened(best)
            value = estimate * planner.conditional("draft", depth, best)  # decided before drawing
            if not planner.pays(value):
                break
            node = drafter.draw(node, probs)
            self._raw.append(float(probs[drafter.tokens[node]]))
            estimate = value
            planner.add(value)
        planner.end()
        return drafter.tree()

    def update(self, verdict: Verdict, tree: DraftTree) -> None:
        if self.k == "auto":
            if len(tree) > 1:
                self.planner.observe(tree, verdict, self._raw, ["draft"] * len(tree))
            return
        if not self.options.adaptive or len(tree) == 1:
            return
        if verdict.num_accepted == tree.depth:
            self.k = min(self.k + 1, self.options.max_k)
        else:
            self.k = max(self.k - 1, self.options.min_k)
