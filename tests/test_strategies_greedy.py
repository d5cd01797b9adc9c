"""Every strategy: greedy output token-identical to the target's own greedy decoding."""

import pytest

from helpers import first_child_depth, hf_greedy, make_decoder, record_steps
from specdec.tree import validate_tree

NEW_TOKENS = 205
PROMPT = [3, 17, 42, 8, 60, 5, 5, 21]
STRATEGIES = {
    "chain": ("chain", {"k": 4}),
    "static_tree": ("static_tree", {"branching": [3, 2, 1]}),
    "static_tree_paths": ("static_tree", {"paths": [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]]}),
    "gsd": ("gsd", {}),
    "gsd_deep": ("gsd", {"prob_threshold": 0.0, "max_depth": 4, "max_nodes": 24}),
    "gsd_no_merge": ("gsd", {"merge": False, "prob_threshold": 0.0, "max_depth": 4, "max_nodes": 24}),
    "dyspec": ("dyspec", {"max_nodes": 12, "max_depth": 5, "expand_per_step": 3}),
    "dyspec_threshold": ("dyspec", {"mode": "threshold", "threshold": 0.02, "max_nodes": 12}),
}
FIXED_DEPTH = {"chain": 4, "static_tree": 3, "static_tree_paths": 3}  # configured tree depth


@pytest.fixture(scope="module")
def references(request):
    from conftest import cached_model

    return {arch: hf_greedy(cached_model(arch, 0), PROMPT, NEW_TOKENS) for arch in ("llama", "qwen2", "gpt2")}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("draft", ["same", "random", "perturbed"])
@pytest.mark.parametrize("label", list(STRATEGIES))
def test_greedy_matches_target(label, draft, arch, models, drafts, references):
    name, options = STRATEGIES[label]
    decoder = make_decoder(models(arch, 0), drafts(arch, draft), name, **options)
    steps = record_steps(decoder)
    out = decoder.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    assert out.token_ids == references[arch]
    for tree, verdict in steps:
        validate_tree(tree)
        assert len(tree) - 1 <= options.get("max_nodes", 1024)
    if draft == "same":
        # The draft's first choice is the target's argmax: the whole first-child path is accepted.
        assert all(v.num_accepted == first_child_depth(t) for t, v in steps)
        if label in FIXED_DEPTH:  # tau = depth + 1 (the last step may be cut short by the budget)
            assert [t.depth for t, _ in steps[:-1]] == [FIXED_DEPTH[label]] * (len(steps) - 1)
            assert [v.num_accepted for t, v in steps] == [t.depth for t, _ in steps]
        assert out.metrics.mean_accepted_length == pytest.approx(1 + sum(first_child_depth(t) for t, _ in steps) / len(steps))
    if draft == "random":
        assert out.metrics.mean_accepted_length < 1.5
