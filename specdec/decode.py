"""The draft-then-verify loop (DESIGN.md section 3).

One step: the strategy drafts a tree rooted at the newest emitted token; the target scores every
node in one forward under the tree's ancestor mask; the verifier keeps the longest valid path plus
a bonus token; both caches commit that path; stop conditions are checked token by token.

A `Sequence` is one generation in progress; `speculative_decode` gives it the target's forwards one
at a time, and the batched loop (specdec/batch.py) gives many sequences one forward together.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from specdec.backends.base import Backend
from specdec.metrics import GenerationMetrics, StepStats
from specdec.sampling import Random, Warp, warp_probs
from specdec.stopping import Stopper
from specdec.strategies.base import DraftContext, Strategy
from specdec.tree import DraftTree, Verdict, ancestor_mask, chain_tree
from specdec.verify import verify_greedy, verify_sampling


def speculative_decode(
    target: Backend,
    draft: Backend | None,
    strategy: Strategy,
    prompt: list[int],
    warp: Warp,
    stopper: Stopper,
    rng: Random,
    on_tokens: Callable[[list[int]], None] | None = None,
    on_step: Callable[[StepStats], None] | None = None,
) -> tuple[list[int], GenerationMetrics]:
    """Generate from `prompt` -> (new token ids, metrics). Lossless: greedy output equals the
    target's own greedy decoding; sampled output follows the target's distribution.
    `on_tokens` receives each block of emitted tokens (for streaming), `on_step` each StepStats."""
    sequence = Sequence(target, draft, strategy, prompt, warp, stopper, rng, on_tokens, on_step)
    while not sequence.done:
        tree = sequence.propose()
        stats = sequence.finish(tree, target.forward(*sequence.target_inputs(tree))[0])  # [N, V]
        if strategy.planner is not None:  # `auto` learns whether its drafted steps beat plain ones
            strategy.planner.settle(stats, target.committed_len)
    return sequence.generated, sequence.metrics


class Sequence:
    """One generation: prefilled on creation, then advanced a step at a time by `propose` (draft a
    tree) and `finish` (verify the target's logits for it, commit, check stops)."""

    def __init__(self, target: Backend, draft: Backend | None, strategy: Strategy, prompt: list[int], warp: Warp,
                 stopper: Stopper, rng: Random, on_tokens=None, on_step=None):
        self.target, self.draft, self.strategy = target, draft, strategy
        self.prompt, self.warp, self.stopper, self.rng = prompt, warp, stopper, rng
        self.on_tokens, self.on_step = on_tokens, on_step
        self.metrics, self.start = GenerationMetrics(), time.perf_counter()
        first = _prefill(target, draft, strategy, prompt, warp, rng)
        self.metrics.prefill_seconds = time.perf_counter() - self.start
        self.metrics.target_forwards = 1  # the prefill
        self.generated: list[int] = []
        self.tokens = list(prompt)  # the draft context; grows by each step's emitted block
        emitted = self._extend([first])
        if on_tokens is not None:
            on_tokens(emitted)

    def propose(self) -> DraftTree:
        target, draft, tokens = self.target, self.draft, self.tokens
        ctx = DraftContext(tokens, len(self.prompt), _max_depth(target, draft, self.stopper, tokens, self.generated),
                           self.warp, self.rng)
        self._t0, self._before = time.perf_counter(), _counters(target, draft)
        tree = self.strategy.propose(draft, ctx) if ctx.max_depth > 0 else chain_tree([tokens[-1]])
        self._t1 = time.perf_counter()
        return tree

    def target_inputs(self, tree: DraftTree) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The target forward that scores `tree`: ids, positions [1, N], ancestor mask [1, N, N]."""
        positions = self.target.committed_len + tree.depths  # [N]
        return tree.tokens[None], positions[None], ancestor_mask(tree.parents)[None]

    def finish(self, tree: DraftTree, logits: torch.Tensor) -> StepStats:
        """Verify `tree` against the target's logits [N, V] for it; commit; emit; check stops ->
        the step's stats."""
        target, draft = self.target, self.draft
        verdict = _verify(tree, logits, self.warp, self.rng)
        t2 = time.perf_counter()
        committed = target.committed_len
        target.commit(verdict.path)
        if draft is not None:
            _commit_draft(draft, tree, verdict.path)
            if draft.aux_layers is not None:  # an EAGLE-3 head reads the target's features
                draft.take_features(committed, target.features[verdict.path])
        self.strategy.update(verdict, tree)
        emitted = self._extend(tree.tokens[verdict.path[1:]].tolist() + [verdict.bonus_token])
        stats = _step_stats(tree, verdict, self._before, _counters(target, draft), (self._t0, self._t1, t2, time.perf_counter()))
        self.metrics.add(stats)
        if self.on_tokens is not None:
            self.on_tokens(emitted)
        if self.on_step is not None:
            self.on_step(stats)
        return stats

    def _extend(self, block: list[int]) -> list[int]:
        """Append `block` up to the first stop -> the tokens emitted."""
        before = len(self.generated)
        self.done = self.stopper.extend(self.generated, block)
        self.tokens.extend(self.generated[before:])
        self.metrics.new_tokens = len(self.generated)
        self.metrics.total_seconds = time.perf_counter() - self.start
        return self.generated[before:]


def _counters(target: Backend, draft: Backend | None) -> tuple[int, float, float]:
    """(draft forwards, draft forward seconds, target forward seconds) so far."""
    if draft is None:
        return 0, 0.0, target.forward_seconds
    return draft.forward_calls, draft.forward_seconds, target.forward_seconds


def _step_stats(tree: DraftTree, verdict: Verdict, before, after, times) -> StepStats:
    t0, t1, t2, t3 = times
    return StepStats(
        drafted_nodes=len(tree) - 1,
        tree_depth=tree.depth,
        accepted=verdict.num_accepted,
        draft_forwards=after[0] - before[0],
        draft_seconds=t1 - t0,
        verify_seconds=t2 - t1,
        other_seconds=t3 - t2,
        draft_forward_seconds=after[1] - before[1],
        target_forward_seconds=after[2] - before[2],
        dag_nodes=len(set(tree.dag_node.tolist())) - 1 if tree.dag_node is not None else len(tree) - 1,
        merged_hits=sum(tree.merged[n] for n in verdict.path[1:]) if tree.merged else 0,
    )


def _prefill(target, draft, strategy, prompt, warp, rng) -> int:
    """Reset everything, fill the target's cache (and an EAGLE-3 head's) with the prompt, and
    choose the first new token."""
    strategy.reset()
    ids = torch.tensor([prompt], dtype=torch.long)
    target.reset()
    logits = target.prefill(ids)[0]  # [V], on the target's device
    if draft is not None:
        draft.reset()
        if draft.aux_layers is not None:  # an EAGLE-3 head reads the target's features of the prompt, here
            draft.take_features(0, target.features)
            draft.prefill(ids)
        # a draft model catches up on the prompt when first asked to draft (TreeDrafter.start):
        # a sequence whose steps never draft (auto in a full batch) never pays for it
    return int(logits.argmax()) if warp.greedy else rng.sample(warp_probs(logits, warp).cpu())


def _max_depth(target, draft, stopper, tokens, generated) -> int:
    """Deepest draft node worth verifying: no deeper than the tokens still wanted, and every node
    position (len(tokens) - 1 + depth) inside both models' context."""
    limits = [stopper.max_new_tokens - len(generated) - 1, target.max_length - len(tokens)]
    if draft is not None:
        limits.append(draft.max_length - len(tokens))
    return max(0, min(limits))


def _verify(tree: DraftTree, logits: torch.Tensor, warp: Warp, rng: Random) -> Verdict:
    """The one host read of a target step: the [N] argmax choices, or the warped [N, V]
    probabilities in one copy (verify_sampling reads many single entries)."""
    if warp.greedy:
        return verify_greedy(tree, logits)
    return verify_sampling(tree, warp_probs(logits, warp).cpu(), rng)


def _commit_draft(draft: Backend, tree: DraftTree, path: list[int]) -> None:
    """Commit the lag tokens, the root and the accepted nodes whose draft KV is valid; the first
    accepted node without one (and the bonus token) stay behind, to be fed next step."""
    kv = tree.draft_kv
    if kv is None or kv[0] < 0:
        draft.rollback()
        return
    keep = list(range(kv[0] + 1))
    for node in path[1:]:
        if kv[node] < 0:
            break
        keep.append(kv[node])
    draft.commit(keep)
