"""`hybrid`: the n-gram index behind its lookup candidates, greedy losslessness, exact verification of
trees mixing fixed (lookup) and drawn children, and sampled output through the whole loop."""

from __future__ import annotations

import random
from collections import Counter

import pytest

import specdec.verify
from enumeration import enumerate_outcomes
from helpers import hf_greedy, make_decoder, record_steps
from specdec.config import GenerationOptions
from specdec.costs import CostModel, Curve
from specdec.decoder import SpeculativeDecoder
from specdec.plugins import get_strategy
from specdec.sampling import Warp, warp_probs
from specdec.strategies.lookup import NgramIndex
from specdec.testing import TableBackend, random_table
from specdec.tree import validate_tree
from test_sampling_exact import ROOT, WARPS, first_tokens_distribution, logits_table, target_distribution, verify_drafted
from test_sampling_loop import DRAFT, LENGTH, SAMPLES, TARGET, VOCAB, exact_distribution, tv_bound
from test_tree_strategies import decoder_for

# -- the n-gram index ----------------------------------------------------------------------------

A, B, C, D, X = 1, 2, 3, 4, 5


def test_continuation_trie_docstring_example():
    """Context `a b c a b d x a b`, n 2: the tail `a b` occurred at 3 and 0, followed by `d x` and
    `c a`: trie {d: {x: {}}, c: {a: {}}}, the most recent match first."""
    tokens = [A, B, C, A, B, D, X, A, B]
    trie = NgramIndex(2, 2).continuation_trie(tokens, 2, 4)
    assert trie == {D: {X: {}}, C: {A: {}}} and list(trie) == [D, C]
    assert NgramIndex(1, 3).continuation_trie(tokens, 2, 4) == trie  # `x a b` never occurred before: n = 2
    assert NgramIndex(2, 2).continuation_trie(tokens, 2, 1) == {D: {X: {}}}  # the most recent match only
    assert NgramIndex(2, 2).continuation_trie(tokens, 5, 4) == {D: {X: {A: {B: {}}}}, C: {A: {B: {D: {X: {}}}}}}
    assert NgramIndex(3, 3).continuation_trie(tokens, 2, 4) == {}  # no earlier `x a b`
    assert NgramIndex(1, 1).continuation_trie([A, B, A, B, A], 2, 4) == {B: {A: {}}}  # both matches agree


def test_index_grows_incrementally_like_a_fresh_one():
    rng = random.Random(0)
    tokens: list[int] = []
    index = NgramIndex(1, 3)
    for _ in range(80):
        tokens.append(rng.randrange(4))
        trie = index.continuation_trie(tokens, 3, 2)  # the same list, one token longer each time
        fresh = NgramIndex(1, 3)
        assert trie == fresh.continuation_trie(list(tokens), 3, 2)
        assert index.starts == fresh.starts
    tokens.extend([0, 1, 2, 3])  # several tokens at once
    assert index.continuation_trie(tokens, 4, 4) == NgramIndex(1, 3).continuation_trie(list(tokens), 4, 4)


def test_another_list_starts_the_index_over():
    index = NgramIndex(1, 2)
    first = [A, B, C, A, B, C, A]
    assert index.continuation_trie(first, 2, 4) == {B: {C: {}}}
    for other in ([X, D, X], [D, D, D, D, X, D, X, D, D, X, D], list(first)):  # shorter, longer, equal copy
        assert index.continuation_trie(other, 2, 4) == NgramIndex(1, 2).continuation_trie(other, 2, 4)
        fresh = NgramIndex(1, 2)
        fresh.sync(other)
        assert index.starts == fresh.starts
    shrunk = list(first)
    index.sync(shrunk)
    del shrunk[3:]  # the same list, shorter: start over too
    assert index.continuation_trie(shrunk, 2, 4) == {}
    fresh = NgramIndex(1, 2)
    fresh.sync([A, B, C])
    assert index.starts == fresh.starts


@pytest.mark.parametrize(
    "options, message",
    [
        ({"min_ngram": 4, "max_ngram": 2}, "c.yaml: strategy: Value error, min_ngram (4) is larger than max_ngram (2)"),
        ({"mode": "threshold"}, "c.yaml: strategy: Value error, hybrid grows best-first: mode must be heap"),
        ({"lookup_value": 0}, "c.yaml: strategy.lookup_value: Input should be greater than 0"),
        ({"max_nodes": 0}, "c.yaml: strategy.max_nodes: Value error, expected a whole number from 1 to 1024, or auto (got 0)"),
    ],
)
def test_bad_hybrid_options_give_one_clear_line(options, message):
    from specdec.config import resolve
    from specdec.errors import SpecdecError

    raw = {"target": {"model": "t"}, "draft": {"model": "d"}, "strategy": {"name": "hybrid", **options}}
    with pytest.raises(SpecdecError) as info:
        resolve(raw, "c.yaml")
    assert message in str(info.value) and "\n" not in str(info.value)


# -- greedy: token-identical to the target ---------------------------------------------------------

ARCHS = ["llama", "qwen2", "mistral", "gpt2"]
PROMPT = [3, 17, 42, 8, 60, 5, 5, 21, 9, 3, 17, 42, 8, 60, 11, 3, 17, 42]  # repeated n-grams
NEW_TOKENS = 120


@pytest.fixture(scope="module")
def references():
    from conftest import cached_model

    return {arch: hf_greedy(cached_model(arch, 0), PROMPT, NEW_TOKENS) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("draft", ["same", "random"])
def test_greedy_hybrid_matches_target(draft, arch, models, drafts, references):
    decoder = make_decoder(models(arch, 0), drafts(arch, draft), "hybrid", max_nodes=8, max_depth=5)
    steps = record_steps(decoder)
    out = decoder.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    assert out.token_ids == references[arch]
    for tree, _ in steps:
        validate_tree(tree)
        assert len(tree) - 1 <= 8 and tree.depth <= 5
        if tree.fixed is not None:
            assert len(tree.fixed) == len(tree) and not tree.fixed[0]
    with_lookup = [(t, v) for t, v in steps if t.fixed is not None and any(t.fixed)]
    assert with_lookup  # lookup branches did appear
    if draft == "random":  # the draft is useless; accepted tokens come from the lookup branches
        accepted_fixed = sum(t.fixed[n] for t, v in with_lookup for n in v.path[1:])
        assert accepted_fixed > 0 and accepted_fixed >= out.metrics.accepted_tokens - accepted_fixed


# -- exact enumeration of one step with fixed and drawn children -----------------------------------

def fixed_tokens(prefix: tuple, count: int, vocab: int) -> list[int]:
    """Deterministic stand-ins for lookup matches: a function of the prefix only. (Offset so that
    the root's is not the draft's favourite: removing that one leaves a proposal above the target on
    every other token, where verifying a fixed child as drawn happens to stay exact.)"""
    start = (7 * sum(prefix) + len(prefix) + 2) % vocab
    return [(start + j) % vocab for j in range(count)]


def one_step(rng, vocab, shape, mode, warp, control=None):
    """Draft a tree with (fixed, drawn) children per node at each depth of `shape`, the drawn ones
    from the draft's proposal with the fixed tokens removed, verify it -> the emitted tokens.
    Drawn children come first in node order (the verifier reorders them).
    `control="unexcluded"`: draw from the proposal without removing the fixed tokens (a draw equal
    to a fixed token is dropped); `"unmarked"`: leave `fixed` unset, so that fixed children are
    verified as if drawn."""
    draft, target = logits_table(2, vocab), logits_table(1, vocab)
    tokens, parents, prefixes, fixed, proposals = [ROOT], [-1], [(ROOT,)], [False], {}
    frontier = [0]
    for n_fixed, n_drawn in shape:
        next_frontier = []
        for node in frontier:
            lookups = fixed_tokens(prefixes[node], n_fixed, vocab)
            q = warp_probs(draft(prefixes[node]), warp)
            if control != "unexcluded":
                q = q.clone()
                q[lookups] = 0.0
            drawn = []
            if n_drawn and float(q.sum()) > 0.0:
                q = q / q.sum()
                proposals[node] = q
                if mode == "iid":
                    drawn = [rng.sample(q) for _ in range(n_drawn)]
                else:
                    drawn = rng.sample_without_replacement(q, n_drawn)
                drawn = [t for t in drawn if t not in lookups]  # only ever drops under "unexcluded"
            for token, is_fixed in [(t, False) for t in drawn] + [(t, True) for t in lookups]:
                tokens.append(token)
                parents.append(node)
                prefixes.append(prefixes[node] + (token,))
                fixed.append(is_fixed)
                next_frontier.append(len(tokens) - 1)
        frontier = next_frontier
    return verify_drafted(rng, tokens, parents, prefixes, proposals, vocab, mode, warp, target,
                          fixed=None if control == "unmarked" else fixed)


def max_error(vocab, shape, mode, warp, control=None) -> float:
    outcomes = enumerate_outcomes(lambda rng: one_step(rng, vocab, shape, mode, warp, control))
    assert abs(sum(outcomes.values()) - 1.0) < 1e-12
    length = len(shape) + 1
    got = first_tokens_distribution(outcomes, vocab, length, warp)
    want = target_distribution(vocab, length, warp)
    return max(abs(got[s] - want[s]) for s in want)


# (vocab, [(fixed, drawn) children per node at each depth])
SHAPES = [
    (5, [(1, 2)]),
    (5, [(2, 2)]),
    (4, [(1, 0), (1, 1)]),  # a lookup chain whose node also has a drawn child
    (4, [(1, 1), (1, 1)]),
    (4, [(1, 1), (0, 2)]),  # a fixed child with drawn children of its own
]


@pytest.mark.parametrize("mode", ["without_replacement", "iid"])
@pytest.mark.parametrize("vocab,shape", SHAPES, ids=[str(s) for _, s in SHAPES])
@pytest.mark.parametrize("warp", WARPS, ids=["plain", "temp-topk", "temp-topp"])
def test_fixed_and_drawn_children_are_exact(mode, vocab, shape, warp):
    assert max_error(vocab, shape, mode, warp) < 1e-12


def test_fixed_children_may_also_be_verified_last(monkeypatch):
    """Verifying the fixed children after the drawn ones is exact as well (each stage is a valid
    proposal given the rejections before it): "fixed first" is a convention, not a requirement."""

    def fixed_last(kids, key):
        return sorted(kids, key=lambda c: not key(c))

    monkeypatch.setattr(specdec.verify, "sorted", fixed_last, raising=False)  # shadows the builtin there
    assert [c for c in specdec.verify.sorted([1, 2, 3], key=lambda c: c != 2)] == [1, 3, 2]
    assert max_error(5, [(2, 2)], "without_replacement", WARPS[0]) < 1e-12


def test_control_drawing_the_fixed_tokens_too_breaks_exactness():
    assert max_error(5, [(1, 2)], "without_replacement", WARPS[0], control="unexcluded") > 1e-3


def test_control_verifying_fixed_children_as_drawn_breaks_exactness():
    assert max_error(5, [(1, 2)], "without_replacement", WARPS[0], control="unmarked") > 1e-3


def test_control_keeping_the_residual_after_a_fixed_rejection_breaks_exactness(monkeypatch):
    reject = specdec.verify._reject

    def skip_fixed_updates(residual, draft_probs, token, mode):
        if draft_probs is None:  # a fixed child (every drawn child here has a proposal)
            return residual, None
        return reject(residual, draft_probs, token, mode)

    monkeypatch.setattr(specdec.verify, "_reject", skip_fixed_updates)
    assert max_error(5, [(2, 1)], "without_replacement", WARPS[0]) > 1e-3


# -- sampling through the whole loop ---------------------------------------------------------------

LOOP_PROMPT = (1, 2, 3, 1, 2, 3, 0, 1, 2)  # the tail `1 2` and `2` recur: lookup candidates every step
HYBRID = dict(max_nodes=4, max_depth=2, expand_per_step=2)
# a 10 ms target forward growing 0.5 ms a node, a free draft: auto drafts a few nodes of each kind
LOOP_COSTS = CostModel(Curve([1, 2, 8], [0], [[0.010, 0.0105, 0.0135]]), None)


def sampled_tv(decoder, warp: Warp) -> tuple[float, float, Counter]:
    """TV of the first LENGTH tokens after LOOP_PROMPT, its bound, and what the trees held. One
    token more is generated, so that the first step may draft two deep."""
    seen = Counter()
    update = decoder.strategy.update

    def counting(verdict, tree):
        if len(tree) == 1:
            return update(verdict, tree)
        fixed = tree.fixed or [False] * len(tree)
        parents, tokens = tree.parents.tolist(), tree.tokens.tolist()
        seen["fixed_in_proposal"] += sum(  # a fixed token must have no mass in its parent's proposal
            float(tree.draft_probs[parents[n], tokens[n]]) > 0.0 for n in range(1, len(tree)) if fixed[n]
        ) if tree.draft_probs is not None else 0
        seen["trees"] += 1
        seen["deep"] += tree.depth == 2
        seen["with_fixed"] += any(fixed)
        seen["with_drawn"] += any(not f for f in fixed[1:])
        seen["accepted_fixed"] += any(fixed[n] for n in verdict.path[1:])
        seen["rejected_fixed"] += any(fixed[c] for c in tree.children()[verdict.path[-1]])
        update(verdict, tree)

    decoder.strategy.update = counting
    counts = Counter(
        tuple(decoder.generate(list(LOOP_PROMPT), max_new_tokens=LENGTH + 1, temperature=warp.temperature,
                               top_k=warp.top_k, top_p=warp.top_p, seed=seed).token_ids[:LENGTH])
        for seed in range(SAMPLES)
    )
    want = exact_distribution(warp, LOOP_PROMPT)
    return 0.5 * sum(abs(counts[s] / SAMPLES - p) for s, p in want.items()), tv_bound(want), seen


def auto_decoder(costs: CostModel, **options) -> SpeculativeDecoder:
    component = get_strategy("hybrid")
    strategy = component.cls(component.cls.Options(max_nodes="auto", **options))
    strategy.set_costs(costs)
    return SpeculativeDecoder(TableBackend(TARGET, VOCAB), TableBackend(DRAFT, VOCAB), strategy, GenerationOptions())


def assert_both_kinds_verified(seen: Counter) -> None:
    assert seen["with_fixed"] > seen["trees"] // 2 and seen["with_drawn"] > seen["trees"] // 2
    assert seen["accepted_fixed"] > 100 and seen["rejected_fixed"] > 100 and seen["deep"] > 100
    assert seen["fixed_in_proposal"] == 0


def test_sampled_hybrid_follows_the_target_distribution():
    tv, bound, seen = sampled_tv(decoder_for(TARGET, DRAFT, VOCAB, "hybrid", **HYBRID), Warp(1.0))
    assert_both_kinds_verified(seen)
    assert tv < bound


def test_sampled_auto_hybrid_follows_the_warped_target_distribution():
    tv, bound, seen = sampled_tv(auto_decoder(LOOP_COSTS, node_cap=4, max_depth=2), Warp(0.8, top_k=3))
    assert_both_kinds_verified(seen)
    assert tv < bound


def test_control_fixed_children_verified_as_drawn_is_detected():
    decoder = decoder_for(TARGET, DRAFT, VOCAB, "hybrid", **HYBRID)
    propose = decoder.strategy.propose

    def unmarked(draft, ctx):
        tree = propose(draft, ctx)
        tree.fixed = None  # the verifier now treats lookup children as drawn from the proposal
        return tree

    decoder.strategy.propose = unmarked
    tv, bound, _ = sampled_tv(decoder, Warp(1.0))
    assert tv > bound


def test_sampled_auto_hybrid_verifies_a_step_that_skipped_the_draft():
    """Auto backs off the draft after a step where no draft node paid; a following step may still
    hold lookup nodes (fixed only, no draft proposal anywhere) and must verify under sampling.

    Fails at the time of writing: such a tree has mode `without_replacement` but draft_probs None
    (TreeDrafter.tree records proposals only for opened nodes), and verify_sampling raises
    "'without_replacement' verification needs the tree's draft_probs"."""
    vocab = 20
    target = random_table(5, vocab, 1.5, context=None)
    draft = random_table(6, vocab, 0.3, context=None)  # nearly uniform: its nodes (~.05) never pay, lookups (.5) do
    component = get_strategy("hybrid")
    strategy = component.cls(component.cls.Options(max_nodes="auto"))
    strategy.set_costs(CostModel(Curve([1, 2], [0], [[1.0, 1.4]]), None))  # a node pays from .4 on
    decoder = SpeculativeDecoder(TableBackend(target, vocab), TableBackend(draft, vocab), strategy, GenerationOptions())
    steps = record_steps(decoder)
    for seed in range(5):
        decoder.generate([1, 2, 3, 1, 2, 3], max_new_tokens=30, temperature=1.0, seed=seed)
    assert any(t.draft_probs is None and len(t) > 1 for t, _ in steps)  # lookup-only steps happened
