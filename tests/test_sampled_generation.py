"""Sampled generation through the whole loop: seeded determinism, per-call options."""

from helpers import make_decoder

PROMPT = [3, 17, 42, 8]


def test_same_seed_same_output_different_seed_different_output(models, drafts):
    decoder = make_decoder(models("llama", 0), drafts("llama", "perturbed"), "chain", k=3)
    first = decoder.generate(PROMPT, max_new_tokens=60, temperature=1.0, seed=17)
    again = decoder.generate(PROMPT, max_new_tokens=60, temperature=1.0, seed=17)
    other = decoder.generate(PROMPT, max_new_tokens=60, temperature=1.0, seed=18)
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids
    assert first.metrics.accepted_tokens > 0  # the draft's proposals were really verified


def test_same_draft_accepts_everything_under_sampling(models):
    target = models("qwen2", 0)
    decoder = make_decoder(target, target, "chain", k=4)
    out = decoder.generate(PROMPT, max_new_tokens=51, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    # q == target at every node: min(1, r/q) = 1, so every proposal is accepted.
    assert out.metrics.mean_accepted_length == 5.0
