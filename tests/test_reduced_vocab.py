"""Drafts with a reduced vocabulary (specdec_vocab.json, as `specdec distill` writes them): the mapped
backend's contract, and losslessness with every strategy under greedy decoding and sampling."""

from __future__ import annotations

import pytest
import torch

import specdec.verify
from specdec.backends.vocab import MappedVocabBackend, read_vocab_map, write_vocab_map
from specdec.errors import SpecdecError
from specdec.plugins import get_strategy
from specdec.testing import TableBackend, check_greedy_lossless, check_sampling_lossless, random_table
from test_sampling_loop import STRATEGIES

SAMPLES = 4_000  # the TV bound follows the sample count; the control below still exceeds it


def make(label: str):
    name, options = STRATEGIES[label]
    component = get_strategy(name)
    return lambda: component.cls(component.cls.Options(**options))


def test_mapped_backend_speaks_target_ids():
    seen = []

    def draft_logits(prefix):  # draft rows: 0 -> target 4, 1 -> target 1, 2 -> every other token
        seen.append(prefix)
        return torch.tensor([1.0, 2.0, 9.0])

    backend = MappedVocabBackend(TableBackend(draft_logits, 3), [4, 1], target_vocab_size=6)
    logits = backend.prefill(torch.tensor([[1, 4, 5]]))  # [1, 6]
    assert seen[-1] == (1, 0, 2)  # target 5 is outside the map: the catch-all row
    assert logits[0, 4] == 1.0 and logits[0, 1] == 2.0
    assert torch.isinf(logits[0, [0, 2, 3, 5]]).all()  # never proposed, whatever the catch-all row says
    assert backend.vocab_size == 6 and backend.committed_len == 3


def test_mapped_backend_rejects_a_map_of_the_wrong_size():
    with pytest.raises(SpecdecError, match="vocabulary rows"):
        MappedVocabBackend(TableBackend(lambda p: torch.zeros(5), 5), [0, 1], target_vocab_size=6)


def test_vocab_map_round_trip_and_bad_maps(tmp_path):
    write_vocab_map(tmp_path, [3, 0, 7], 10)
    assert read_vocab_map(tmp_path) == {"draft_to_target": [3, 0, 7], "target_vocab_size": 10}
    write_vocab_map(tmp_path, [3, 3], 10)
    with pytest.raises(SpecdecError, match="distinct"):
        read_vocab_map(tmp_path)
    assert read_vocab_map(tmp_path / "missing") is None


@pytest.mark.parametrize("label", list(STRATEGIES))
def test_greedy_lossless_with_a_reduced_draft_vocabulary(label):
    # The target's greedy choices often fall outside the map: those steps must still be exact.
    check_greedy_lossless(make(label), vocab=6, draft_vocab=[0, 2, 3])


@pytest.mark.parametrize("label", list(STRATEGIES))
def test_sampling_lossless_with_a_reduced_draft_vocabulary(label):
    check_sampling_lossless(make(label), samples=SAMPLES, draft_vocab=[0, 2])


def test_control_skipping_the_residual_is_detected_with_a_reduced_vocabulary(monkeypatch):
    monkeypatch.setattr(specdec.verify, "_reject", lambda residual, draft_probs, token, mode: (residual, draft_probs))
    with pytest.raises(AssertionError, match="total variation"):
        check_sampling_lossless(make("chain"), samples=SAMPLES, draft_vocab=[0, 2])


def test_the_reduced_draft_does_propose_and_get_accepted():
    """Guards the tests above against a vacuous pass: the mapped draft's tokens are accepted."""
    from specdec.config import GenerationOptions
    from specdec.decoder import SpeculativeDecoder
    from specdec.testing import reduced_vocab_draft

    target = random_table(101, 6)
    draft = reduced_vocab_draft(target, [0, 2, 3, 5], 6)
    decoder = SpeculativeDecoder(TableBackend(target, 6), draft, make("chain")(), GenerationOptions())
    out = decoder.generate([1, 2, 3], max_new_tokens=60)
    assert out.metrics.mean_accepted_length > 1.2
