"""The prompt_lookup strategy passes the same losslessness checks as specdec's built-ins."""

import pytest

from specdec.testing import check_greedy_lossless, check_sampling_lossless
from specdec_prompt_lookup.strategy import PromptLookupOptions, PromptLookupStrategy, continuations


@pytest.mark.parametrize("options", [{}, {"max_ngram": 1, "num_tokens": 3, "max_matches": 2}])
def test_greedy_output_equals_the_targets(options):
    check_greedy_lossless(lambda: PromptLookupStrategy(PromptLookupOptions(**options)))


def test_sampled_output_follows_the_target_distribution():
    check_sampling_lossless(lambda: PromptLookupStrategy(PromptLookupOptions(max_ngram=1, num_tokens=2)))


def test_continuations_of_the_most_recent_matches_first():
    context = [1, 2, 3, 1, 2, 4, 5, 1, 2]
    assert continuations(context, PromptLookupOptions(max_ngram=2), 2) == [[4, 5], [3, 1]]
    assert continuations([7, 8, 9], PromptLookupOptions(), 3) == []


def test_bad_ngram_range_is_refused():
    with pytest.raises(ValueError, match="min_ngram \\(3\\) is larger than max_ngram \\(2\\)"):
        PromptLookupOptions(min_ngram=3, max_ngram=2)
