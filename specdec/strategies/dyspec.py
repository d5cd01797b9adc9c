"""`dyspec` (arXiv 2410.11744): a dynamic token tree grown greedily by estimated acceptance.

A node's value is its path probability, the product of draft probabilities from the root. A
max-heap holds, for every drafted node, the candidate "its next child" valued at
path_prob(node) x (largest draft probability not drawn yet at node). `heap` mode pops the best
candidates, `expand_per_step` at a time, until the tree holds `max_nodes` draft nodes; each batch
of new nodes costs one draft forward. `threshold` mode grows level by level and keeps every
candidate whose value reaches `threshold`, within the same budget.

Candidates are valued before their token is drawn, so under sampling a drawn child is never
discarded and sampling-without-replacement verification stays lossless.

Example (max_nodes 3, root children probs a .6, b .3; under a: x .9): pops a (.6), then ax (.54),
then b (.3) -> root -> {a -> {x}, b}.
"""

from __future__ import annotations

import heapq
from itertools import count
from typing import Literal

import torch
from pydantic import Field

from specdec.backends.base import Backend
from specdec.strategies.base import DraftContext, Strategy, StrategyOptions, TreeDrafter
from specdec.tree import DraftTree


class DySpecOptions(StrategyOptions):
    max_nodes: int = Field(32, ge=1, le=1024, description="draft nodes per step (the root excluded)")
    max_depth: int = Field(8, ge=1, le=256, description="deepest draft node")
    expand_per_step: int = Field(4, ge=1, le=1024, description="nodes added per draft forward (heap mode)")
    mode: Literal["heap", "threshold"] = Field("heap", description="best-first heap, or level-by-level threshold")
    threshold: float = Field(0.05, ge=0.0, le=1.0, description="threshold mode: least path probability kept")


class _Growth:
    """The tree under construction: proposals, path probabilities, and the candidate heap."""

    def __init__(self, drafter: TreeDrafter, max_depth: int):
        self.drafter = drafter
        self.max_depth = max_depth
        self.path_prob = [1.0]
        self.remaining: dict[int, torch.Tensor] = {}  # node -> [V] proposal minus drawn children
        self.heap: list[tuple[float, int, int]] = []  # (-value, tie-break, node)
        self._order = count()

    def open(self, node: int, logits: torch.Tensor, heap: list | None = None) -> None:
        """Make `node` expandable (its draft logits are known) and push its first candidate."""
        if self.drafter.depths[node] < self.max_depth:
            self.remaining[node] = self.drafter.proposal(node, logits).clone()
            self._push(node, self.heap if heap is None else heap)

    def _push(self, node: int, heap: list) -> None:
        best = float(self.remaining[node].max())
        if best > 0.0:
            heapq.heappush(heap, (-self.path_prob[node] * best, next(self._order), node))

    def grow(self, heap: list) -> int:
        """Pop the best candidate of `heap`, draw that child, queue its next sibling."""
        _, _, node = heapq.heappop(heap)
        remaining = self.remaining[node]
        child = self.drafter.draw(node, remaining)
        token = self.drafter.tokens[child]
        self.path_prob.append(self.path_prob[node] * float(remaining[token]))
        remaining[token] = 0.0
        self._push(node, heap)
        return child

    def feed(self, nodes: list[int], heap: list | None = None) -> None:
        nodes = [n for n in nodes if self.drafter.depths[n] < self.max_depth]
        if nodes:
            for node, row in zip(nodes, self.drafter.feed(nodes)):  # one draft forward
                self.open(node, row, heap)


class DySpecStrategy(Strategy):
    name = "dyspec"
    Options = DySpecOptions

    def propose(self, draft: Backend, ctx: DraftContext) -> DraftTree:
        opts = self.options
        drafter = TreeDrafter(draft, ctx)
        max_depth = min(opts.max_depth, ctx.max_depth)
        growth = _Growth(drafter, max_depth)
        growth.open(0, drafter.start())
        if opts.mode == "heap":
            self._grow_best_first(growth, opts.max_nodes, opts.expand_per_step)
        else:
            self._grow_by_threshold(growth, opts.max_nodes, opts.threshold)
        return drafter.tree()

    @staticmethod
    def _grow_best_first(growth: _Growth, budget: int, per_forward: int) -> None:
        added = 0
        while growth.heap and added < budget:
            batch = []
            while growth.heap and len(batch) < per_forward and added < budget:
                batch.append(growth.grow(growth.heap))
                added += 1
            if added < budget:
                growth.feed(batch)

    @staticmethod
    def _grow_by_threshold(growth: _Growth, budget: int, threshold: float) -> None:
        added, level = 0, growth.heap
        while level and added < budget:
            new, next_level = [], []
            while level and -level[0][0] >= threshold and added < budget:
                new.append(growth.grow(level))
                added += 1
            if not new or added >= budget:
                return
            growth.feed(new, next_level)
            level = next_level
