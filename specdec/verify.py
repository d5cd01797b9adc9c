"""Lossless verification of a draft tree against the target's distributions (DESIGN.md section 6).

Greedy: follow the child carrying the target's argmax; the bonus is the argmax at the last
accepted node. Output is token-identical to target-only greedy decoding.

Sampling: at each node start from the residual r = target_probs[node] and visit the children in
draft order:
- `iid` (children drawn independently from q): accept x with prob min(1, r(x)/q(x));
  on reject r <- norm(max(r - q, 0)).
- `without_replacement` (children drawn from q without replacement): as `iid`, then also
  q(x) <- 0 and renormalise q; the visiting order must be the sampling order.
- `deterministic` (q is a point mass on each child): accept x with prob r(x); on reject r(x) <- 0
  and renormalise.
Fixed children (tree.fixed: chosen from the context, not drawn) are visited first, each as a
deterministic proposal; the drawn children follow, by the tree's mode, from a q that gives the fixed
tokens zero probability. Each stage leaves r the target's distribution conditioned on the
rejections so far, so any such sequence of proposals stays exact.
If every child is rejected the bonus token is drawn from r.
"""

from __future__ import annotations

import torch

from specdec.sampling import Random
from specdec.tree import DraftTree, Verdict


def verify_greedy(tree: DraftTree, target_logits: torch.Tensor) -> Verdict:
    """target_logits [N, V] -> the longest path of target argmax choices, plus the bonus."""
    target_choice = target_logits.argmax(dim=-1).tolist()  # [N]
    tokens = tree.tokens.tolist()
    children = tree.children()
    path = [0]
    while True:
        node = path[-1]
        wanted = target_choice[node]
        nxt = next((c for c in children[node] if tokens[c] == wanted), None)
        if nxt is None:
            return Verdict(path=path, bonus_token=wanted)
        path.append(nxt)


def verify_sampling(tree: DraftTree, target_probs: torch.Tensor, rng: Random) -> Verdict:
    """target_probs [N, V] (warped exactly like the draft) -> a verdict whose emitted tokens
    follow the target distribution exactly."""
    if tree.mode != "deterministic" and len(tree) > 1 and tree.draft_probs is None:
        raise ValueError(f"{tree.mode!r} verification needs the tree's draft_probs")
    proposals = None if tree.mode == "deterministic" else tree.draft_probs
    tokens = tree.tokens.tolist()
    fixed = tree.fixed or [False] * len(tree)
    children = tree.children()
    if tree.fixed:
        children = [sorted(kids, key=lambda c: not fixed[c]) for kids in children]  # fixed first
    path = [0]
    while True:
        node = path[-1]
        residual = target_probs[node]  # [V]
        draft_probs = None if proposals is None or not children[node] else proposals[node]  # [V]
        accepted = None
        for child in children[node]:
            token = tokens[child]
            proposal = None if fixed[child] else draft_probs
            if rng.accept(_acceptance(residual, proposal, token)):
                accepted = child
                break
            if fixed[child]:
                residual, _ = _reject(residual, None, token, "deterministic")
            else:
                residual, draft_probs = _reject(residual, draft_probs, token, tree.mode)
        if accepted is None:
            return Verdict(path=path, bonus_token=rng.sample(residual))
        path.append(accepted)


def _acceptance(residual: torch.Tensor, draft_probs: torch.Tensor | None, token: int) -> float:
    target_p = float(residual[token])
    if draft_probs is None:
        return target_p
    draft_p = float(draft_probs[token])
    if draft_p <= 0.0:  # cannot have been drawn; accept only what the target allows outright
        return 1.0 if target_p > 0.0 else 0.0
    return min(1.0, target_p / draft_p)


def _reject(
    residual: torch.Tensor, draft_probs: torch.Tensor | None, token: int, mode: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The residual (and, without replacement, the proposal) after rejecting `token`."""
    if draft_probs is None:
        updated = residual.clone()
        updated[token] = 0.0
        return _normalise(updated, fallback=residual), None
    updated = _normalise((residual - draft_probs).clamp_(min=0.0), fallback=residual)
    if mode == "without_replacement":
        draft_probs = draft_probs.clone()
        draft_probs[token] = 0.0
        draft_probs = _normalise(draft_probs, fallback=draft_probs)
    return updated, draft_probs


def _normalise(weights: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """weights / sum; `fallback` when the sum is 0 or not finite (r == q up to rounding: the
    rejection that led here had probability ~0, so any valid distribution keeps the output exact
    to that rounding)."""
    total = weights.sum()
    if not bool(torch.isfinite(total)) or float(total) <= 0.0:
        return fallback
    return weights / total
