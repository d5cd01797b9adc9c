"""GSD and DySpec specifics on explicit-table models, and the options' validation."""

import itertools

import pytest

from helpers import record_steps
from specdec.config import GenerationOptions
from specdec.decoder import SpeculativeDecoder
from specdec.errors import SpecdecError
from specdec.plugins import get_strategy
from specdec.tree import validate_tree
from specdec.testing import TableBackend, random_table, table_greedy
from tables import ngram_logits


def decoder_for(target_logits, draft_logits, vocab, strategy, **options):
    component = get_strategy(strategy)
    return SpeculativeDecoder(
        TableBackend(target_logits, vocab), TableBackend(draft_logits, vocab),
        component.cls(component.cls.Options(**options)), GenerationOptions(),
    )


# Three hypotheses for the next token (1, 2, 8) that all continue with 3 4 5 6: with
# redundancy_threshold 2, the `5` after "3 4" repeats across branches and is drafted once.
PROMPT = [7]
CONTINUATION = {(0, 1): {3: 0.95}, (0, 2): {3: 0.95}, (0, 8): {3: 0.95}, (1, 3): {4: 0.95},
                (2, 3): {4: 0.95}, (8, 3): {4: 0.95}, (3, 4): {5: 0.95}, (4, 5): {6: 0.95}, (7,): {0: 0.99}}
DRAFT = ngram_logits({**CONTINUATION, (7, 0): {1: 0.36, 2: 0.33, 8: 0.29}}, vocab=10)
TARGET = ngram_logits({**CONTINUATION, (7, 0): {2: 0.9}}, vocab=10)  # the target takes the 2nd branch
GSD = dict(max_depth=5, max_nodes=32, redundancy_threshold=2)


def test_gsd_merges_a_repeated_ngram_and_accepts_the_merged_path():
    decoder = decoder_for(TARGET, DRAFT, 10, "gsd", **GSD)
    steps = record_steps(decoder)
    out = decoder.generate(PROMPT, max_new_tokens=12)
    assert out.token_ids == table_greedy(TARGET, PROMPT, 12)
    tree, verdict = steps[0]
    validate_tree(tree)
    assert tree.tokens[verdict.path].tolist() == [0, 2, 3, 4, 5, 6]  # accepted through branch 2
    assert [tree.merged[n] for n in verdict.path] == [False, False, False, False, True, True]
    dag = tree.dag_node.tolist()
    fives = [n for n in range(len(tree)) if tree.tokens[n] == 5]
    assert len(fives) == 3 and len({dag[n] for n in fives}) == 1  # one DAG node, target of two merges
    assert len(set(dag)) - 1 == 3 * 3 + 2 and len(tree) - 1 == 3 * 5  # 11 drafted, 15 verified
    assert out.metrics.merged_hits >= 2 and 0 < out.metrics.merged_share < 1
    assert out.metrics.dag_nodes < out.metrics.drafted_nodes


def test_gsd_with_and_without_merging_gives_the_same_output():
    merged = decoder_for(TARGET, DRAFT, 10, "gsd", **GSD).generate(PROMPT, max_new_tokens=12)
    plain = decoder_for(TARGET, DRAFT, 10, "gsd", merge=False, **GSD).generate(PROMPT, max_new_tokens=12)
    assert merged.token_ids == plain.token_ids
    assert plain.metrics.merged_hits == 0 and plain.metrics.dag_nodes == plain.metrics.drafted_nodes


@pytest.mark.parametrize("max_nodes", [1, 4, 9, 20])
def test_gsd_unrolled_tree_respects_max_nodes(max_nodes):
    draft = random_table(3, vocab=6, scale=0.5, context=1)  # flat, repetitive: many merges
    decoder = decoder_for(random_table(4, vocab=6, scale=2.0, context=None), draft, 6, "gsd", max_nodes=max_nodes, max_depth=4,
                          prob_threshold=0.0, sibling_threshold=0.0, redundancy_threshold=0)
    steps = record_steps(decoder)
    decoder.generate([1, 2, 3], max_new_tokens=30)
    for tree, _ in steps:
        validate_tree(tree)
        assert len(tree) - 1 <= max_nodes
        assert all(kv == -1 for kv, m in zip(tree.draft_kv or [], tree.merged or []) if m)
    if max_nodes >= 9:  # room for repeated tokens: merges must have happened
        assert any(any(t.merged or []) for t, _ in steps)


VOCAB = 6
DYSPEC_DRAFT = random_table(11, VOCAB, scale=2.0, context=None)


def path_probs(prompt_and_root: tuple, depth: int) -> dict[tuple, float]:
    """Draft path probability of every token path up to `depth` below the root."""
    probs = {(): 1.0}
    for length in range(1, depth + 1):
        for path in itertools.product(range(VOCAB), repeat=length):
            q = DYSPEC_DRAFT(prompt_and_root + path[:-1]).softmax(-1)
            probs[path] = probs[path[:-1]] * float(q[path[-1]])
    return probs


def first_tree(**options):
    decoder = decoder_for(random_table(12, VOCAB, scale=2.0, context=None), DYSPEC_DRAFT, VOCAB, "dyspec", **options)
    steps = record_steps(decoder)
    decoder.generate([1, 2], max_new_tokens=10)
    tree = steps[0][0]
    paths = []
    for node in range(len(tree)):
        path, n = [], node
        while n > 0:
            path.append(int(tree.tokens[n]))
            n = int(tree.parents[n])
        paths.append(tuple(path[::-1]))
    return tree, paths, path_probs((1, 2, int(tree.tokens[0])), options["max_depth"])


@pytest.mark.parametrize("max_nodes", [1, 5, 17, 40])
@pytest.mark.parametrize("per_forward", [1, 3])
def test_dyspec_uses_the_node_budget_exactly(max_nodes, per_forward):
    tree, _, _ = first_tree(max_nodes=max_nodes, max_depth=3, expand_per_step=per_forward)
    validate_tree(tree)
    assert len(tree) - 1 == max_nodes


def test_dyspec_expands_in_path_probability_order_and_keeps_the_best_nodes():
    tree, paths, probs = first_tree(max_nodes=15, max_depth=3, expand_per_step=1)
    values = [probs[p] for p in paths]
    assert values == sorted(values, reverse=True)  # popped best first
    best = sorted((p for p in probs if p), key=probs.get, reverse=True)[:15]
    assert set(paths[1:]) == set(best)


def test_dyspec_threshold_mode_keeps_exactly_the_nodes_above_threshold():
    tree, paths, probs = first_tree(mode="threshold", threshold=0.04, max_nodes=200, max_depth=3)
    assert set(paths[1:]) == {p for p, v in probs.items() if p and v >= 0.04}


@pytest.mark.parametrize(
    "strategy, options, message",
    [
        ("dyspec", {"max_nodes": -1}, "strategy.max_nodes: Value error, expected a whole number from 1 to 1024, or auto (got -1)"),
        ("gsd", {"max_nodes": 0}, "strategy.max_nodes: Input should be greater than or equal to 1"),
        ("gsd", {"prob_threshold": 1.5}, "strategy.prob_threshold: Input should be less than or equal to 1"),
        ("gsd", {"sibling_threshold": -0.1}, "strategy.sibling_threshold: Input should be greater than or equal to 0"),
        ("dyspec", {"threshold": 2}, "strategy.threshold: Input should be less than or equal to 1"),
        ("dyspec", {"mode": "beam"}, "strategy.mode: Input should be 'heap' or 'threshold'"),
        ("static_tree", {"branching": []}, "branching must be a non-empty list of positive counts"),
        ("static_tree", {"branching": [2, 0]}, "branching must be a non-empty list of positive counts"),
        ("static_tree", {"paths": [[0], [2]]}, "paths: [2] needs [1] as well"),
        ("static_tree", {"paths": [[0, 0]]}, "paths: [0, 0] needs [0] as well"),
        ("static_tree", {"branching": [2], "paths": [[0]]}, "give either branching or paths, not both"),
        ("static_tree", {"branching": [16, 16, 16]}, "the tree has more than 1024 nodes"),
    ],
)
def test_bad_options_give_one_clear_line(strategy, options, message):
    from specdec.config import resolve

    raw = {"target": {"model": "t"}, "draft": {"model": "d"}, "strategy": {"name": strategy, **options}}
    with pytest.raises(SpecdecError) as info:
        resolve(raw, "c.yaml")
    assert message in str(info.value) and str(info.value).startswith("c.yaml: strategy") and "\n" not in str(info.value)
