"""Boundaries: EOS accepted mid-block, stop strings, exact max_new_tokens, context budget."""

import pytest

from helpers import hf_greedy, make_decoder
from specdec.errors import SpecdecError

PROMPT = [3, 17, 42, 8, 60, 5, 5, 21]
K = 4  # with the "same" draft every step emits a block of K + 1 tokens: indices 1-5, 6-10, ...


class LetterTokenizer:
    """A stand-in tokenizer: token t decodes to one letter."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + t % 26) for t in ids)


def mid_block_index(reference, predicate) -> int:
    """First index i inside a block (not its first or last token) where predicate(i) holds."""
    return next(i for i in range(6, len(reference) - 2) if (i - 1) % (K + 1) in (1, 2, 3) and predicate(i))


def test_eos_accepted_mid_block_stops_exactly_there(models):
    target = models("llama", 0)
    reference = hf_greedy(target, PROMPT, 80)
    i = mid_block_index(reference, lambda i: reference[i] not in reference[:i])
    decoder = make_decoder(target, target, "chain", k=K)
    decoder.target.eos_token_ids = frozenset({reference[i]})
    out = decoder.generate(PROMPT, max_new_tokens=80)
    assert out.token_ids == reference[: i + 1]
    out = decoder.generate(PROMPT, max_new_tokens=80, ignore_eos=True)
    assert out.token_ids == reference


def test_stop_string_completed_mid_block_stops_at_its_last_token(models):
    target = models("llama", 0)
    reference = hf_greedy(target, PROMPT, 80)
    text = LetterTokenizer().decode(reference)
    i = mid_block_index(reference, lambda i: text[i - 1 : i + 1] not in text[: i])
    decoder = make_decoder(target, target, "chain", tokenizer=LetterTokenizer(), k=K)
    out = decoder.generate(PROMPT, max_new_tokens=80, stop=[text[i - 1 : i + 1]])
    assert out.token_ids == reference[: i + 1]
    assert out.text.endswith(text[i - 1 : i + 1])


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 6, 7, 13])
def test_max_new_tokens_is_exact_even_when_a_block_overshoots(max_new_tokens, models):
    target = models("qwen2", 0)
    decoder = make_decoder(target, target, "chain", k=K)
    out = decoder.generate(PROMPT, max_new_tokens=max_new_tokens)
    assert out.token_ids == hf_greedy(target, PROMPT, max_new_tokens)
    assert out.metrics.new_tokens == max_new_tokens


def test_generation_fills_the_context_exactly_without_overrunning_positions(models):
    target = models("gpt2", 0)  # absolute position embeddings: a position past the context would fail
    decoder = make_decoder(target, target, "chain", k=K)
    budget = target.config.n_positions - len(PROMPT)
    out = decoder.generate(PROMPT, max_new_tokens=budget)
    assert out.token_ids == hf_greedy(target, PROMPT, budget)


def test_budget_beyond_the_context_is_refused_up_front(models):
    target = models("llama", 0)
    decoder = make_decoder(target, target, "chain")
    with pytest.raises(SpecdecError, match="exceeds the target's context of 512; lower max_new_tokens to at most 504"):
        decoder.generate(PROMPT, max_new_tokens=505)
    with pytest.raises(SpecdecError, match="the prompt is 600 tokens, longer than the target's context of 512"):
        decoder.generate([1] * 600, max_new_tokens=1)


def test_stop_strings_without_a_tokenizer_are_refused(models):
    target = models("llama", 0)
    decoder = make_decoder(target, target, "chain")
    with pytest.raises(SpecdecError, match="stop strings need a tokenizer"):
        decoder.generate(PROMPT, max_new_tokens=5, stop=["x"])
