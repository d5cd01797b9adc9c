"""`dyspec` (arXiv 2410.11744): a dynamic token tree grown greedily by estimated acceptance.

A node's value is its path probability, the product of draft probabilities from the root. A
max-heap holds, for every drafted node, the candidate "its next child" valued at
path_prob(node) x (largest draft probability not drawn yet at node). `heap` mode pops the best
candidates, `expand_per_step` at a time, until the tree holds `max_nodes` draft nodes; each batch
of new nodes costs one draft forward. `threshold` mode grows level by level and keeps every
candidate whose value reaches `threshold`, within the same budget.

`max_nodes: auto` grows best-first with values from `specdec/strategies/budget.py` (path
probability calibrated against observed acceptance) and stops as soon as the best candidate, or
feeding the new nodes to reach their children, no longer raises the step's expected tokens per
second; `node_cap` and `max_depth` bound it.

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
from specdec.strategies.budget import Budget, Planner
from specdec.tree import DraftTree, Verdict


class DySpecOptions(StrategyOptions):
    max_nodes: Budget(1024) = Field(32, description="draft nodes per step (the root excluded), or auto")
    node_cap: int = Field(64, ge=1, le=1024, description="auto: most draft nodes per step")
    max_depth: int = Field(8, ge=1, le=256, description="deepest draft node")
    expand_per_step: int = Field(4, ge=1, le=1024, description="nodes added per draft forward (heap mode)")
    mode: Literal["heap", "threshold"] = Field("heap", description="best-first heap, or level-by-level threshold")
    threshold: float = Field(0.05, ge=0.0, le=1.0, description="threshold mode: least path probability kept")


class _Growth:
    """The tree under construction: proposals, node values, and the candidate heap.

    A heap entry (-value, tie-break, node, token) is "the next draft child of node" when token is
    -1, else the fixed child `token` of node (a lookup match, `lookup[node]` maps its tokens to
    their own continuations). A node's draft proposal gives its fixed tokens zero probability.
    """

    def __init__(self, drafter: TreeDrafter, max_depth: int, planner: Planner | None = None, lookup: dict | None = None,
                 lookup_value: float = 0.5):
        self.drafter = drafter
        self.max_depth = max_depth
        self.planner = planner
        self.lookup_value = lookup_value
        self.path_prob = [1.0]  # the node's value: path probability, or (auto) estimated acceptance
        self.raw = [1.0]  # probability of the node's token given its parent (1 for a fixed node)
        self.lookup = [lookup or {}]  # node -> {token: continuation trie} of its fixed children
        self.remaining: dict[int, torch.Tensor] = {}  # node -> [V] proposal minus drawn children
        self.heap: list[tuple[float, int, int, int]] = []
        self._order = count()
        self._offer(0, self.heap)

    def open(self, node: int, probs: torch.Tensor, heap: list | None = None) -> None:
        """Make `node` expandable (its draft distribution [V] is known) and push its first candidate."""
        if self.drafter.depths[node] < self.max_depth:
            self.remaining[node] = self.drafter.proposal(node, probs, exclude=list(self.lookup[node])).clone()
            if self.planner is not None:
                self.planner.opened(float(self.remaining[node].max()))
            self._push(node, self.heap if heap is None else heap)

    def _push(self, node: int, heap: list) -> None:
        best = float(self.remaining[node].max())
        if best > 0.0:
            heapq.heappush(heap, (-self.value(node, best), next(self._order), node, -1))

    def _offer(self, node: int, heap: list) -> None:
        """Queue the fixed children of `node`."""
        if self.drafter.depths[node] < self.max_depth:
            for token in self.lookup[node]:
                heapq.heappush(heap, (-self.value(node, 1.0, "lookup"), next(self._order), node, token))

    def value(self, node: int, prob: float, source: str = "draft") -> float:
        """Value of a child of `node` of probability `prob` (1 for a fixed child)."""
        if self.planner is None:
            return self.path_prob[node] * (prob if source == "draft" else self.lookup_value)
        return self.path_prob[node] * self.planner.conditional(source, self.drafter.depths[node] + 1, prob)

    def grow(self, heap: list) -> int:
        """Pop the best candidate of `heap` and add that child: a fixed token, or a draw from
        the node's proposal (then its next sibling is queued)."""
        value, _, node, token = heapq.heappop(heap)
        if token >= 0:
            child = self.drafter.add(node, token, fixed=True)
            self.raw.append(1.0)
            self.lookup.append(self.lookup[node][token])
            self.path_prob.append(-value)
            self._offer(child, heap)
            return child
        remaining = self.remaining[node]
        child = self.drafter.draw(node, remaining)
        token = self.drafter.tokens[child]
        self.raw.append(float(remaining[token]))
        self.lookup.append({})
        self.path_prob.append(self.value(node, self.raw[-1]))
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

    @property
    def needs_costs(self) -> bool:
        return self.options.max_nodes == "auto"

    def propose(self, draft: Backend, ctx: DraftContext) -> DraftTree:
        opts = self.options
        planner = self.auto_planner() if opts.max_nodes == "auto" else None
        # not drafting (auto): a root-only (or lookup-only) tree
        use_draft = planner is None or planner.start(len(ctx.tokens), len(ctx.tokens) - draft.committed_len)
        drafter = TreeDrafter(draft, ctx)
        growth = self._growth = self.growth(drafter, min(opts.max_depth, ctx.max_depth), planner)
        if use_draft:
            growth.open(0, drafter.start())
        if planner is not None:
            grow_auto(growth, planner, opts.node_cap, opts.expand_per_step, feed=use_draft)
        elif opts.mode == "heap":
            self._grow_best_first(growth, opts.max_nodes, opts.expand_per_step)
        else:
            self._grow_by_threshold(growth, opts.max_nodes, opts.threshold)
        return drafter.tree()

    def growth(self, drafter: TreeDrafter, max_depth: int, planner: Planner | None) -> _Growth:
        """The tree under construction; `hybrid` adds its lookup candidates here."""
        return _Growth(drafter, max_depth, planner)

    def update(self, verdict: Verdict, tree: DraftTree) -> None:
        if self.planner is not None and len(tree) > 1:
            sources = ["lookup" if fixed else "draft" for fixed in self._growth.drafter.fixed]
            self.planner.observe(tree, verdict, self._growth.raw, sources)

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


def grow_auto(growth: _Growth, planner: Planner, cap: int, per_forward: int, feed: bool = True) -> None:
    """Best-first, up to `per_forward` nodes a round while the best candidate pays; then feed the
    round's nodes (one draft forward) if the best of them is expected to have a child that pays
    for that forward too. Without `feed` (drafting skipped) only fixed candidates can join."""
    while growth.heap and planner.nodes < cap:
        batch = []
        while growth.heap and len(batch) < per_forward and planner.nodes < cap and planner.pays(-growth.heap[0][0]):
            value = -growth.heap[0][0]
            batch.append(growth.grow(growth.heap))
            planner.add(value)
        fed = [n for n in batch if growth.drafter.depths[n] < growth.max_depth] if feed else []
        if not fed or planner.nodes >= cap:
            if len(batch) == per_forward and not feed:
                continue  # fixed candidates only: no forward between rounds
            break
        best = max(fed, key=lambda n: growth.path_prob[n])
        prospect = planner.prospect(growth.path_prob[best], growth.drafter.depths[best])
        if not planner.pays(prospect, feed_queries=len(fed)):
            break
        planner.draft_forward(len(fed))
        growth.feed(fed)
    if feed:
        planner.end()
