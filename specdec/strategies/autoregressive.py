"""`ar`: no drafting; the target decodes one token per forward through the same backend and loop.
The baseline every speedup is measured against."""

from __future__ import annotations

from specdec.backends.base import Backend
from specdec.strategies.base import DraftContext, Strategy, StrategyOptions
from specdec.tree import DraftTree, chain_tree


class AutoregressiveOptions(StrategyOptions):
    pass


class AutoregressiveStrategy(Strategy):
    name = "ar"
    Options = AutoregressiveOptions
    needs_draft = False

    def propose(self, draft: Backend | None, ctx: DraftContext) -> DraftTree:
        return chain_tree([ctx.tokens[-1]])
