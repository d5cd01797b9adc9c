"""The strategy interface and `TreeDrafter`, the shared way to grow a draft tree with a draft model.

A strategy proposes a DraftTree rooted at the newest emitted token and may adapt after each
verdict. The draft's cache may lag the emitted text by a few tokens (an accepted leaf that was
never fed, the bonus token); `TreeDrafter.start` feeds them in the same forward as the root. A
longer lag is prefilled up to the root first: a draft model starts empty (the loop prefills only
the target), so the first `start` prefills it with the context but the root, and a strategy that
skipped drafting for some steps (`auto`) catches up the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from specdec import lockstep
from specdec.backends.base import Backend
from specdec.costs import CostModel
from specdec.errors import SpecdecError
from specdec.sampling import Random, Warp, warp_probs
from specdec.strategies.budget import STEADY_LAG, Planner
from specdec.tree import DraftTree, Verdict


class StrategyOptions(BaseModel):
    """Base of every strategy's options model (the only source of its defaults)."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class DraftContext:
    """What a strategy may read when proposing."""

    tokens: list[int]  # prompt + emitted so far; tokens[-1] is the root
    prompt_len: int
    max_depth: int  # deepest node allowed this step (budget and context limit)
    warp: Warp
    rng: Random


class Strategy(ABC):
    name: ClassVar[str]
    Options: ClassVar[type[StrategyOptions]]
    needs_draft: ClassVar[bool] = True

    def __init__(self, options: StrategyOptions):
        self.options = options
        self.planner: Planner | None = None

    @property
    def needs_costs(self) -> bool:
        """True when a budget is `auto`: the decoder then calls `set_costs` before generating."""
        return False

    def set_costs(self, costs: CostModel) -> None:
        """Measured forward costs on this device, for `auto` budgets."""
        self.planner = Planner(costs)

    def auto_planner(self) -> Planner:
        if self.planner is None:
            raise SpecdecError(
                f"strategy {self.name!r} has an auto budget but no measured costs; build it through "
                "SpeculativeDecoder (it calibrates on first use) or call set_costs(CostModel(...))"
            )
        return self.planner

    def reset(self) -> None:
        """Called before each generation: forget adaptive state."""
        if self.planner is not None:
            self.planner.reset()

    @abstractmethod
    def propose(self, draft: Backend | None, ctx: DraftContext) -> DraftTree:
        """Draft a tree whose node 0 is ctx.tokens[-1] and whose depth is <= ctx.max_depth (>= 1)."""

    def update(self, verdict: Verdict, tree: DraftTree) -> None:
        """Feedback after verification (e.g. adapt the draft length)."""


class TreeDrafter:
    """Grows a DraftTree while feeding its nodes to the draft backend under a tree mask.

    Draft pending layout for one step: the lag tokens (the root last) in `start`, then the nodes of
    each `feed` call in order. `draft_kv[node]` records where each fed node's KV lives.

    Example (chain of 3 with a lag of one accepted leaf `a`):
        start()      feeds [a, root]   -> pending 0, 1; returns the root's distribution
        feed([n1])   feeds [n1]        -> pending 2; n1 attends to a, root, n1
        feed([n2])   feeds [n2]        -> pending 3; the leaf n3 is never fed
    """

    def __init__(self, draft: Backend, ctx: DraftContext):
        self.draft = draft
        self.ctx = ctx
        self.greedy = ctx.warp.greedy
        self.tokens = [ctx.tokens[-1]]
        self.parents = [-1]
        self.depths = [0]
        self.draft_kv = [-1]
        self.fixed = [False]
        self.proposals: dict[int, torch.Tensor] = {}  # node -> [V] draft_probs of its children (sampling)
        self.rows: dict[int, torch.Tensor] = {}  # node -> [V] the proposal its children are chosen from
        self._lag = 0

    def distributions(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits [Q, V] on the draft's device -> [Q, V] on the host: the distributions
        children are chosen from (softmax when greedy, the warped distribution otherwise), computed
        on the device and read in one copy, so growing the tree never waits on the device again."""
        probs = logits.float().softmax(dim=-1) if self.greedy else warp_probs(logits, self.ctx.warp)
        return probs.cpu()

    def start(self) -> torch.Tensor:
        """Feed the tokens the draft has not seen, ending with the root -> the root's
        distribution [V] (see `distributions`). A lag longer than a drafting step's (the draft's
        first step, or a catch-up after skipped steps) is prefilled up to the root, so that the
        draft computes logits for its last token only, and in a batch the other rows' draft round
        is not padded to its length."""
        committed = self.draft.committed_len
        lag = self.ctx.tokens[committed:]
        if len(lag) > STEADY_LAG or (committed == 0 and len(lag) > 1):
            lockstep.model_call(self.draft.prefill, torch.tensor([lag[:-1]], dtype=torch.long))
            committed, lag = committed + len(lag) - 1, lag[-1:]
        ids = torch.tensor([lag], dtype=torch.long)
        positions = torch.arange(committed, committed + len(lag))[None]
        causal = torch.ones(len(lag), len(lag), dtype=torch.bool).tril_()[None]
        logits = self.draft.forward(ids, positions, causal)[0, -1:]  # [1, V]
        self._lag = len(lag) - 1
        self.draft_kv[0] = self._lag
        return self.distributions(logits)[0]

    def add(self, parent: int, token: int, fixed: bool = False) -> int:
        self.fixed.append(fixed)
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        self.draft_kv.append(-1)
        return len(self.tokens) - 1

    def feed(self, nodes: list[int]) -> torch.Tensor:
        """Run the draft over `nodes` (their ancestors fed earlier or in this call) -> their
        distributions [Q, V] (see `distributions`)."""
        existing = self.draft.pending_len
        for j, node in enumerate(nodes):
            self.draft_kv[node] = existing + j
        mask = torch.zeros(len(nodes), existing + len(nodes), dtype=torch.bool)
        mask[:, : self._lag] = True  # lag tokens precede the root: ancestors of every node
        for row, node in enumerate(nodes):
            while node >= 0:
                if self.draft_kv[node] < 0:
                    raise RuntimeError(f"draft node {node} fed before its ancestor")
                mask[row, self.draft_kv[node]] = True
                node = self.parents[node]
        root_position = len(self.ctx.tokens) - 1
        ids = torch.tensor([[self.tokens[n] for n in nodes]], dtype=torch.long)
        positions = torch.tensor([[root_position + self.depths[n] for n in nodes]])
        return self.distributions(self.draft.forward(ids, positions, mask[None])[0])

    def proposal(self, node: int, probs: torch.Tensor, exclude: list[int] | None = None) -> torch.Tensor:
        """Draft distribution [V] over `node`'s children, from its row of `start` or `feed`; when
        sampling it is recorded for verification. `exclude`: the tokens of fixed children, given
        zero probability (all zeros if they held all of it)."""
        if exclude:
            probs = probs.clone()
            probs[exclude] = 0.0
            total = float(probs.sum())
            probs = probs / total if total > 0.0 else probs
        self.rows[node] = probs
        if not self.greedy:
            self.proposals[node] = probs
        return probs

    def expand(self, node: int, probs: torch.Tensor, count: int) -> list[int]:
        """Add up to `count` distinct children of `node` chosen from its distribution [V] (a row
        of `start` or `feed`): top-k when greedy, sampled without replacement otherwise."""
        probs = self.proposal(node, probs)
        if self.greedy:
            chosen = torch.topk(probs, min(count, probs.shape[-1])).indices.tolist()
        else:
            chosen = self.ctx.rng.sample_without_replacement(probs, count)
        return [self.add(node, token) for token in chosen]

    def draw(self, node: int, remaining: torch.Tensor) -> int:
        """Add one more child of `node`: the most likely of `remaining` [V] (its proposal with the
        children drawn so far zeroed) when greedy, a sample from it otherwise. Decide to draw
        before drawing: a drawn child must never be discarded, or sampling is not lossless."""
        token = int(remaining.argmax()) if self.greedy else self.ctx.rng.sample(remaining)
        return self.add(node, token)

    def tree(self) -> DraftTree:
        draft_probs = None
        if self.proposals:
            vocab = next(iter(self.proposals.values())).shape[-1]
            draft_probs = torch.zeros(len(self.tokens), vocab)
            for node, probs in self.proposals.items():
                draft_probs[node] = probs
        return DraftTree(
            tokens=torch.tensor(self.tokens, dtype=torch.long),
            parents=torch.tensor(self.parents, dtype=torch.long),
            depths=torch.tensor(self.depths, dtype=torch.long),
            mode="deterministic" if self.greedy or not self.proposals else "without_replacement",
            draft_probs=draft_probs,
            draft_kv=self.draft_kv,
            fixed=self.fixed if any(self.fixed) else None,
            node_probs_of=lambda: torch.tensor([self._node_prob(n) for n in range(len(self.tokens))]),
        )

    def _node_prob(self, node: int) -> float:
        row = self.rows.get(self.parents[node])
        return float("nan") if row is None or self.fixed[node] else float(row[self.tokens[node]])
