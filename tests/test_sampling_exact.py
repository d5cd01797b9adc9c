"""Exact enumeration: one draft-and-verify step under each sampling mode leaves the distribution of
the first tokens equal to the (warped) target's, to 1e-12. Negative controls must break it."""

from __future__ import annotations

import itertools

import pytest
import torch

import specdec.verify
from enumeration import enumerate_outcomes
from specdec.sampling import Warp, warp_probs
from specdec.tree import DraftTree, depths_from_parents, validate_tree
from specdec.verify import verify_sampling

ROOT = 0
WARPS = [Warp(1.0), Warp(0.7, top_k=3), Warp(1.3, top_p=0.8)]
SHAPES = {5: [[3], [1, 1]], 4: [[2, 1], [1, 3]]}  # vocab -> children per depth


def logits_table(seed: int, vocab: int):
    """Position- and context-dependent logits: prefix (root first) -> [V] float64."""
    cache: dict[tuple, torch.Tensor] = {}

    def logits(prefix: tuple) -> torch.Tensor:
        if prefix not in cache:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + hash(prefix) % 1_000_003)
            cache[prefix] = torch.randn(vocab, generator=gen, dtype=torch.float64) * 1.5
        return cache[prefix]

    return logits


def one_step(rng, vocab, shape, mode, warp, *, unwarped_q=False, reverse_order=False):
    """Draft a tree of `shape` from the draft table, verify it against the target table -> the
    emitted tokens (accepted + bonus)."""
    draft, target = logits_table(2, vocab), logits_table(1, vocab)
    tokens, parents, prefixes, proposals = [ROOT], [-1], [(ROOT,)], {}
    frontier = [0]
    for count in shape:
        next_frontier = []
        for node in frontier:
            q = warp_probs(draft(prefixes[node]), warp)
            if mode == "deterministic":
                chosen = torch.topk(q, count).indices.tolist()
            elif mode == "iid":
                chosen = [rng.sample(q) for _ in range(count)]
            else:
                chosen = rng.sample_without_replacement(q, count)
            proposals[node] = warp_probs(draft(prefixes[node]), Warp(1.0)) if unwarped_q else q
            if reverse_order:
                chosen = chosen[::-1]
            for token in chosen:
                tokens.append(token)
                parents.append(node)
                prefixes.append(prefixes[node] + (token,))
                next_frontier.append(len(tokens) - 1)
        frontier = next_frontier
    return verify_drafted(rng, tokens, parents, prefixes, proposals, vocab, mode, warp, target)


def verify_drafted(rng, tokens, parents, prefixes, proposals, vocab, mode, warp, target, fixed=None) -> tuple:
    """The drafted tree (node lists, proposals {node: q [V]}) verified against the `target` table ->
    the emitted tokens (accepted + bonus)."""
    parents_t = torch.tensor(parents)
    draft_probs = torch.zeros(len(tokens), vocab, dtype=torch.float64)
    for node, q in proposals.items():
        draft_probs[node] = q
    tree = DraftTree(torch.tensor(tokens), parents_t, depths_from_parents(parents_t), mode, draft_probs, fixed=fixed)
    validate_tree(tree)
    target_probs = torch.stack([warp_probs(target(p), warp) for p in prefixes])
    verdict = verify_sampling(tree, target_probs, rng)
    return tuple(tokens[n] for n in verdict.path[1:]) + (verdict.bonus_token,)


def first_tokens_distribution(outcomes: dict, vocab: int, length: int, warp: Warp) -> dict:
    """Distribution of the first `length` tokens when the target samples the rest exactly."""
    target = logits_table(1, vocab)
    dist: dict[tuple, float] = {}
    for seq in itertools.product(range(vocab), repeat=length):
        total = 0.0
        for emitted, prob in outcomes.items():
            if seq[: len(emitted)] != emitted[:length]:
                continue
            for j in range(len(emitted), length):
                prob *= float(warp_probs(target((ROOT,) + seq[:j]), warp)[seq[j]])
            total += prob
        dist[seq] = total
    return dist


def target_distribution(vocab: int, length: int, warp: Warp) -> dict:
    return first_tokens_distribution({(): 1.0}, vocab, length, warp)


def max_error(vocab, shape, mode, warp, **control) -> float:
    outcomes = enumerate_outcomes(lambda rng: one_step(rng, vocab, shape, mode, warp, **control))
    assert abs(sum(outcomes.values()) - 1.0) < 1e-12
    length = len(shape) + 1
    got = first_tokens_distribution(outcomes, vocab, length, warp)
    want = target_distribution(vocab, length, warp)
    return max(abs(got[s] - want[s]) for s in want)


CASES = [(v, shape) for v, shapes in SHAPES.items() for shape in shapes]


@pytest.mark.parametrize("mode", ["iid", "without_replacement", "deterministic"])
@pytest.mark.parametrize("vocab,shape", CASES)
@pytest.mark.parametrize("warp", WARPS, ids=["plain", "temp-topk", "temp-topp"])
def test_sampling_rule_is_exact(mode, vocab, shape, warp):
    assert max_error(vocab, shape, mode, warp) < 1e-12


@pytest.mark.parametrize("mode", ["iid", "without_replacement", "deterministic"])
def test_control_skipping_the_residual_breaks_exactness(mode, monkeypatch):
    monkeypatch.setattr(specdec.verify, "_reject", lambda residual, draft_probs, token, mode: (residual, draft_probs))
    assert max_error(5, [3], mode, WARPS[0]) > 1e-3


def test_control_verifying_out_of_sampling_order_breaks_exactness():
    assert max_error(5, [3], "without_replacement", WARPS[0], reverse_order=True) > 1e-3


@pytest.mark.parametrize("mode", ["iid", "without_replacement"])
def test_control_draft_distribution_before_warping_breaks_exactness(mode):
    assert max_error(5, [3], mode, Warp(0.5, top_k=3), unwarped_q=True) > 1e-3
