"""Every strategy through the whole loop under sampling, on position-dependent Markov tables: the
empirical joint distribution of the first 3 tokens matches the exact target distribution within a
total-variation bound derived from the sample count; the negative controls exceed it."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch

import specdec.verify
from specdec.sampling import Warp, warp_probs
from specdec.testing import random_table
from test_tree_strategies import decoder_for

VOCAB, LENGTH, SAMPLES, DELTA = 4, 3, 12_000, 1e-6
PROMPT = (1, 2)
TARGET = random_table(21, VOCAB, 1.5, context=1)  # next token depends on the last token and the position
DRAFT = random_table(22, VOCAB, 1.5, context=1)
STRATEGIES = {
    "chain": ("chain", {"k": 2}),
    "static_tree": ("static_tree", {"branching": [2, 2]}),
    "gsd": ("gsd", dict(max_out_degree=2, prob_threshold=0.0, sibling_threshold=0.0, max_depth=2, redundancy_threshold=0)),
    "dyspec": ("dyspec", dict(max_nodes=4, max_depth=2, expand_per_step=2)),
    "dyspec_threshold": ("dyspec", dict(mode="threshold", threshold=0.1, max_nodes=6, max_depth=3)),
}


def exact_distribution(warp: Warp, prompt: tuple = PROMPT) -> dict[tuple, float]:
    dist = {}
    for seq in itertools.product(range(VOCAB), repeat=LENGTH):
        prob = 1.0
        for j in range(LENGTH):
            prob *= float(warp_probs(TARGET(prompt + seq[:j]), warp)[seq[j]])
        dist[seq] = prob
    return dist


def tv_bound(dist: dict[tuple, float]) -> float:
    """E[TV] <= 1/2 sum sqrt(p(1-p)/N) (Jensen), plus the McDiarmid deviation at level DELTA
    (one sample moves the TV by at most 1/N): exceeded with probability < DELTA."""
    expected = 0.5 * sum(math.sqrt(p * (1 - p) / SAMPLES) for p in dist.values())
    return expected + math.sqrt(math.log(1 / DELTA) / (2 * SAMPLES))


def sampled_tv(decoder, warp: Warp) -> tuple[float, float]:
    counts = Counter(
        tuple(decoder.generate(list(PROMPT), max_new_tokens=LENGTH, temperature=warp.temperature,
                               top_k=warp.top_k, top_p=warp.top_p, seed=seed).token_ids)
        for seed in range(SAMPLES)
    )
    want = exact_distribution(warp)
    return 0.5 * sum(abs(counts[s] / SAMPLES - p) for s, p in want.items()), tv_bound(want)


@pytest.mark.parametrize("label", list(STRATEGIES))
def test_sampled_output_follows_the_target_distribution(label):
    name, options = STRATEGIES[label]
    tv, bound = sampled_tv(decoder_for(TARGET, DRAFT, VOCAB, name, **options), Warp(1.0))
    assert tv < bound


def test_warped_sampling_follows_the_warped_target():
    name, options = STRATEGIES["static_tree"]
    tv, bound = sampled_tv(decoder_for(TARGET, DRAFT, VOCAB, name, **options), Warp(0.7, top_k=3))
    assert tv < bound


@pytest.mark.parametrize("label", ["chain", "static_tree", "gsd"])
def test_control_skipping_the_residual_is_detected(label, monkeypatch):
    monkeypatch.setattr(specdec.verify, "_reject", lambda residual, draft_probs, token, mode: (residual, draft_probs))
    name, options = STRATEGIES[label]
    tv, bound = sampled_tv(decoder_for(TARGET, DRAFT, VOCAB, name, **options), Warp(1.0))
    assert tv > bound


def wrap_propose(decoder, change):
    propose = decoder.strategy.propose

    def changed(draft, ctx):
        tree = propose(draft, ctx)
        change(tree, ctx)
        return tree

    decoder.strategy.propose = changed


def test_control_verifying_out_of_sampling_order_is_detected():
    decoder = decoder_for(TARGET, DRAFT, VOCAB, "static_tree", branching=[3])

    def reverse_root_children(tree, ctx):  # depth 1: nodes 1..N-1 are the root's children
        tree.tokens[1:] = tree.tokens[1:].flip(0)

    wrap_propose(decoder, reverse_root_children)
    tv, bound = sampled_tv(decoder, Warp(1.0))
    assert tv > bound


def test_control_draft_distribution_before_warping_is_detected():
    decoder = decoder_for(TARGET, DRAFT, VOCAB, "static_tree", branching=[2, 2])

    def unwarped_proposals(tree, ctx):
        if tree.draft_probs is None:  # a root-only tree at the end of the budget
            return
        for node in range(len(tree)):
            if tree.draft_probs[node].sum() > 0:
                path, n = [], node
                while n > 0:
                    path.append(int(tree.tokens[n]))
                    n = int(tree.parents[n])
                tree.draft_probs[node] = DRAFT(tuple(ctx.tokens) + tuple(path[::-1])).softmax(-1).to(torch.float32)

    wrap_propose(decoder, unwarped_proposals)
    tv, bound = sampled_tv(decoder, Warp(0.5))
    assert tv > bound
