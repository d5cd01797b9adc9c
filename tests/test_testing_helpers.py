"""specdec.testing: the losslessness checks plugin authors run, proven to pass on a built-in and
to fail on broken strategies; the example plugin package when installed and when not."""

import pytest

from specdec import plugins
from specdec.errors import SpecdecError
from specdec.strategies.chain import ChainOptions, ChainStrategy
from specdec.testing import check_greedy_lossless, check_sampling_lossless


class WrongRoot(ChainStrategy):
    """Puts another token at the root, so the target scores the wrong context (wrong draft
    tokens alone would only be rejected)."""

    def propose(self, draft, ctx):
        tree = super().propose(draft, ctx)
        tree.tokens[0] = (tree.tokens[0] + 1) % 6
        return tree


class OverclaimedProposals(ChainStrategy):
    """Claims its draft tokens were sampled from the uniform distribution while taking the most
    likely one: verification then over-accepts."""

    def propose(self, draft, ctx):
        tree = super().propose(draft, ctx)
        if tree.draft_probs is not None:
            for node in range(len(tree) - 1):
                tree.tokens[node + 1] = int(tree.draft_probs[node].argmax())
            tree.draft_probs[:] = 1.0 / tree.draft_probs.shape[-1]
        return tree


def test_checks_pass_on_a_builtin_strategy():
    check_greedy_lossless(lambda: ChainStrategy(ChainOptions(k=3)))
    assert check_sampling_lossless(lambda: ChainStrategy(ChainOptions(k=2))) < 0.05


def test_greedy_check_fails_on_a_broken_strategy():
    with pytest.raises(AssertionError, match="greedy output differs from the target's"):
        check_greedy_lossless(lambda: WrongRoot(ChainOptions(k=3)))


def test_sampling_check_fails_on_a_broken_strategy():
    with pytest.raises(AssertionError, match="sampled distribution is off"):
        check_sampling_lossless(lambda: OverclaimedProposals(ChainOptions(k=2)))


@pytest.fixture
def fresh_plugins():
    plugins.reload_plugins()
    yield
    plugins.reload_plugins()


def test_the_installed_example_plugin_is_listed_and_usable(fresh_plugins, monkeypatch):
    monkeypatch.delenv("SPECDEC_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("SPECDEC_BLOCK_PLUGINS", raising=False)
    rows = {row["name"]: row for row in plugins.describe_plugins()}
    assert rows["specdec-prompt-lookup"]["strategies"] == ["prompt_lookup"]
    from specdec.config import resolve

    cfg = resolve({"target": {"model": "t"}, "strategy": {"name": "prompt_lookup", "num_tokens": 5}})
    assert cfg.strategy.options.num_tokens == 5 and cfg.draft is None
    from specdec.schema import config_schema

    assert "prompt_lookup" in str(config_schema()) and "max_ngram" in str(config_schema())


def test_without_the_plugin_a_config_asking_for_it_names_the_package(fresh_plugins, monkeypatch):
    monkeypatch.setenv("SPECDEC_BLOCK_PLUGINS", "specdec-prompt-lookup")
    from specdec.config import resolve

    with pytest.raises(SpecdecError, match=r"unknown strategy 'prompt_lookup'; .* provided by the plugin package "
                       r"specdec-prompt-lookup \(pip install ./plugins/specdec-prompt-lookup\)"):
        resolve({"target": {"model": "t"}, "strategy": {"name": "prompt_lookup"}})
