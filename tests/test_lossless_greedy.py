"""Greedy speculative output is token-identical to the target's own greedy decoding."""

import pytest

from helpers import hf_greedy, make_decoder
from tiny_models import ARCHS

NEW_TOKENS = 211  # 1 token from the prefill + 42 full steps of k + 1 = 5 with k = 4
PROMPT = [3, 17, 42, 8, 60, 5, 5, 21]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("draft", ["same", "random", "perturbed"])
def test_chain_greedy_matches_target_generate(arch, draft, models, drafts):
    target = models(arch, 0)
    drafter = drafts(arch, draft)
    decoder = make_decoder(target, drafter, "chain", k=4)
    out = decoder.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    expected = hf_greedy(target, PROMPT, NEW_TOKENS)
    assert out.token_ids == expected
    m = out.metrics
    assert m.new_tokens == NEW_TOKENS
    assert m.target_forwards == m.steps + 1
    if draft == "same":
        assert m.mean_accepted_length == 5.0  # everything accepted: tau = k + 1
        assert m.target_forwards == 1 + (NEW_TOKENS - 1) // 5
    elif draft == "random":
        assert m.mean_accepted_length < 1.5  # little accepted, output still exact
    else:
        assert 1.3 < m.mean_accepted_length < 4.5  # partial acceptance: lagging draft cache exercised
    assert len(set(expected)) > 10, "degenerate reference output makes the check weak"


@pytest.mark.parametrize("strategy, options", [("chain", {"k": 3}), ("dyspec", {"max_nodes": 6}), ("gsd", {"max_nodes": 8})])
def test_a_draft_model_is_prefilled_when_first_asked_to_draft(strategy, options, models, monkeypatch):
    """The loop prefills the target alone; the first step's TreeDrafter.start prefills the draft
    with the prompt (the context but the root), then feeds the root by itself."""
    from specdec.backends.pytorch import PyTorchBackend

    target, drafter = models("llama", 0), models("llama", 1)
    decoder = make_decoder(target, drafter, strategy, **options)
    calls = []  # (who, call, tokens)
    prefill, forward, propose = PyTorchBackend.prefill, PyTorchBackend.forward, decoder.strategy.propose
    monkeypatch.setattr(PyTorchBackend, "prefill", lambda self, ids: (calls.append((self, "prefill", ids.shape[1])), prefill(self, ids))[1])
    monkeypatch.setattr(PyTorchBackend, "forward", lambda self, ids, *a: (calls.append((self, "forward", ids.shape[1])), forward(self, ids, *a))[1])
    monkeypatch.setattr(decoder.strategy, "propose", lambda *a: (calls.append(("strategy", "propose", 0)), propose(*a))[1])
    out = decoder.generate(PROMPT, max_new_tokens=40)
    assert out.token_ids == hf_greedy(target, PROMPT, 40)
    assert calls[:4] == [(decoder.target, "prefill", len(PROMPT)), ("strategy", "propose", 0),
                         (decoder.draft, "prefill", len(PROMPT)), (decoder.draft, "forward", 1)]  # the prompt, then the root
    assert [(who, call) for who, call, _ in calls].count((decoder.draft, "prefill")) == 1


@pytest.mark.parametrize("adaptive", [False, True])
def test_adaptive_k_stays_lossless(adaptive, models):
    target, drafter = models("llama", 0), models("llama", 1)
    decoder = make_decoder(target, drafter, "chain", k=3, adaptive=adaptive, min_k=1, max_k=8)
    out = decoder.generate(PROMPT, max_new_tokens=120)
    assert out.token_ids == hf_greedy(target, PROMPT, 120)


def test_adaptive_k_grows_on_full_acceptance(models):
    target = models("llama", 0)
    decoder = make_decoder(target, target, "chain", k=2, adaptive=True, min_k=1, max_k=6)
    out = decoder.generate(PROMPT, max_new_tokens=60)
    assert out.metrics.reached_depth[5] > 0 and len(out.metrics.reached_depth) == 6  # grew to max_k, no further
    assert out.token_ids == hf_greedy(target, PROMPT, 60)


def test_from_config_accepts_already_loaded_models(models):
    import specdec
    from specdec.backends.pytorch import PyTorchBackend

    target = models("gpt2", 0)
    cfg = specdec.load_config(data={"target": {"model": "unused"}, "draft": {"model": "unused"}, "strategy": {"k": 3}})
    for draft in (target, PyTorchBackend(target)):  # a transformers model, or a backend
        decoder = specdec.SpeculativeDecoder.from_config(cfg, target=target, draft=draft)
        out = decoder.generate(PROMPT, max_new_tokens=41)  # the prefill's token + 10 steps of k + 1
        assert out.token_ids == hf_greedy(target, PROMPT, 41) and out.metrics.mean_accepted_length == 4.0
