"""`specdec analyze`'s measures on hand-built trees and DAGs, and on table models whose acceptance
is known exactly (issue 20)."""

import json
import math
from pathlib import Path

import pytest
import torch

from specdec.bench.analyze import Step, calibration, record, reoccurring, summarise, checked_nodes
from specdec.config import GenerationOptions
from specdec.decoder import SpeculativeDecoder
from specdec.plugins import get_strategy
from specdec.testing import TableBackend
from specdec.tree import DraftTree, Verdict
from test_cli import run_cli
from test_tree_strategies import DRAFT, GSD, PROMPT, TARGET, decoder_for


def hand_tree(tokens, parents, path, context=(), merged=None, probs=None, greedy=True) -> Step:
    n = len(tokens)
    depths = [0] * n
    for node in range(1, n):
        depths[node] = depths[parents[node]] + 1
    tree = DraftTree(torch.tensor(tokens), torch.tensor(parents), torch.tensor(depths), merged=merged,
                     node_probs_of=None if probs is None else lambda: torch.tensor(probs, dtype=torch.float))
    return Step.of(tree, Verdict(path, bonus_token=0), list(context), greedy)


# root ─ a ─ x ─ y and root ─ b ─ x ─ y (a=1, b=2, x=3, y=4; the root is 9)
TWO_BRANCHES = dict(tokens=[9, 1, 2, 3, 3, 4, 4], parents=[-1, 0, 0, 1, 2, 3, 4], path=[0, 1, 3, 5])


@pytest.mark.parametrize("window, expected", [(0, 4), (1, 2), (2, 0), (3, 0)])
def test_reoccurring_ngrams_of_two_branches_that_reconverge(window, expected):
    assert reoccurring(hand_tree(**TWO_BRANCHES), window) == expected


def test_ngram_keys_near_the_root_read_the_context():
    # root 9 with children 5 and 6; 6 ─ 5. The two 5 have keys (9, 5) and (6, 5) at w = 1, but
    # (8, 9, 5) at w = 2 only for the first: the context [8] pads the key before the root.
    step = hand_tree([9, 5, 6, 5], [-1, 0, 0, 2], [0], context=[7, 8])
    assert [reoccurring(step, w) for w in (0, 1, 2)] == [2, 0, 0]
    run = hand_tree([9, 5, 5, 5, 5], [-1, 0, 1, 2, 3], [0], context=[5, 5])  # root 9, then a run of 5
    assert reoccurring(run, 1) == 3  # (5, 5) ends nodes 2, 3 and 4; node 1's key is (9, 5)
    assert reoccurring(run, 4) == 0  # the root's place in each key differs


def test_merged_share_on_a_hand_built_unrolled_dag():
    # The DAG root ─ a ─ x ─ y, root ─ b ─┘ unrolled: b's x and y are merged copies. Accepting
    # b, x, y gives 2 merged tokens of 3; accepting a, x, y gives none.
    merged = [False, False, False, False, True, False, True]
    through_b = hand_tree(**{**TWO_BRANCHES, "path": [0, 2, 4, 6]}, merged=merged)
    through_a = hand_tree(**TWO_BRANCHES, merged=merged)
    metrics = type("M", (), dict(steps=2, new_tokens=8, mean_accepted_length=4.0, drafted_nodes=12, dag_nodes=8,
                                 draft_forwards=6))
    result = summarise("hand", 0.0, "gsd", [through_b, through_a], metrics, [0, 2], 10)
    assert result.merged_share == pytest.approx(2 / 6)
    assert result.reoccurring_share == {0: pytest.approx(8 / 12), 2: 0.0}
    assert result.dag_nodes_per_step == 4 and result.nodes_per_step == 6


def test_merged_share_recorded_from_gsd_on_table_models():
    decoder = decoder_for(TARGET, DRAFT, 10, "gsd", **GSD)
    steps = []
    record(decoder.strategy, steps, window=2, greedy=True)
    decoder.generate(PROMPT, max_new_tokens=12)
    first = steps[0]
    assert [first.tokens[n] for n in first.path] == [0, 2, 3, 4, 5, 6]
    assert sum(first.merged[n] for n in first.path[1:]) == 2  # the 5 and 6 after branch 2's "3 4"
    assert first.dag_nodes == 11 and len(first.tokens) - 1 == 15
    assert reoccurring(first, 2) > reoccurring(first, 3)  # the copies of "3 4 5" re-occur; with w=3 the branch differs


def test_tested_nodes_greedy_and_sampled():
    step = hand_tree([9, 1, 2, 3], [-1, 0, 0, 0], [0, 2])  # root children 1, 2, 3; 2 accepted
    assert checked_nodes(step) == [(1, False), (2, True), (3, False)]  # greedy: 3 is not the argmax either
    sampled = hand_tree([9, 1, 2, 3], [-1, 0, 0, 0], [0, 2], greedy=False)
    assert checked_nodes(sampled) == [(1, False), (2, True)]  # 3 was never visited


def constant(probs):
    logits = torch.tensor(probs, dtype=torch.float64).log()
    return lambda prefix: logits


Q = [0.65, 0.25, 0.06, 0.04]  # the draft, whatever the prefix (no probability near a bin edge)


def table_decoder(strategy, target_probs, **options):
    component = get_strategy(strategy)
    return SpeculativeDecoder(TableBackend(constant(target_probs), 4), TableBackend(constant(Q), 4),
                              component.cls(component.cls.Options(**options)), GenerationOptions())


def test_greedy_calibration_is_exact_on_table_models():
    # Target argmax is always 0, drawn by the draft with probability 0.65: every tested 0 is
    # accepted, every tested 1 (0.25) rejected, so the curve is 1.0 at 0.65 and 0.0 at 0.25.
    decoder = table_decoder("static_tree", [0.6, 0.3, 0.05, 0.05], branching=[2, 2])
    steps = []
    record(decoder.strategy, steps, window=0, greedy=True)
    decoder.generate([1, 2], max_new_tokens=30)
    bins = calibration(steps, 10)
    levels = sum(len(s.path) - 1 for s in steps)  # every level's 0 is accepted, so the path spans the tree
    assert levels >= 2 * len(steps) - 1  # two levels a step (the last may be cut by max_new_tokens)
    assert bins[6].tested == bins[2].tested == levels  # each level tests one 0 and one 1
    assert bins[6].rate == 1.0 and bins[2].rate == 0.0 and bins[6].mean_prob == pytest.approx(0.65)
    assert sum(b.tested for b in bins) == 2 * levels


def test_sampled_calibration_matches_min_one_p_over_q():
    # One drawn child per level, target p fixed: a token x drawn with probability q(x) is
    # accepted with probability min(1, p(x)/q(x)) = 0.5 for x = 0 (0.325/0.65), 1 for the others.
    decoder = table_decoder("chain", [0.325, 0.4, 0.15, 0.125], k=3)
    steps = []
    record(decoder.strategy, steps, window=0, greedy=False)
    for seed in range(40):
        decoder.generate([1, 2], max_new_tokens=40, temperature=1.0, seed=seed)
    bins = calibration(steps, 10)
    n = bins[6].tested
    assert n > 500 and abs(bins[6].rate - 0.5) < 5 * math.sqrt(0.25 / n)
    assert bins[2].rate == 1.0 and bins[0].rate == 1.0


def test_analyze_cli_writes_its_outputs_and_rejects_bad_numbers(capsys, tmp_path):
    config = Path(__file__).resolve().parents[1] / "configs" / "gsd.yaml"  # the demo pair (it has a tokenizer)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"question_id": "1", "category": "x", "turns": ["3 17 42"]}) + "\n")
    code, out, err = run_cli(capsys, "analyze", str(config), "--prompts", str(prompts), "--max-new-tokens", "8",
                             "-o", "strategy.max_nodes=8", "-o", "strategy.max_depth=3", "--temperatures", "0", "--out", str(tmp_path / "out"))
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert [r["name"] for r in report["runs"]] == ["gsd", "gsd (merge off)", "gsd (unpruned)"]
    assert all(r["steps"] > 0 and len(r["calibration"]) == 10 for r in report["runs"])
    assert "re-occurring, w=3" in out
    code, _, err = run_cli(capsys, "analyze", str(config), "--temperatures", "warm", "--out", str(tmp_path / "bad"))
    assert code == 2 and "--temperatures" in err and not (tmp_path / "bad").exists()
