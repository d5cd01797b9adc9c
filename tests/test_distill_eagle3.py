"""`specdec distill --head eagle3`: the training-time test computes what the loop computes, and a
head trained end to end on the demo target loads, agrees with the target more than untrained, and
keeps the output lossless."""

from __future__ import annotations

import json

import pytest
import torch

from specdec.distill import distill
from specdec.distill.data import Example
from specdec.distill.eagle3 import ttt_loss
from specdec.eagle3 import is_head_folder
from test_distill import DEMO, assert_lossless_and_accepted, settings
from test_eagle3 import build_head, eagle_target, published_forward, target_features


def test_each_training_step_computes_the_head_at_that_draft_position(monkeypatch):
    """Step i's logits at position t equal the published forward over tokens 0..t where the first
    t - i + 1 read target features and the last i read the previous token's output."""
    import specdec.distill.eagle3 as training

    model = eagle_target()
    head = build_head(model, seed=5, draft_vocab=40)
    ids = [3, 17, 42, 8, 60, 5, 5, 21, 9, 1]
    example = Example(torch.tensor(ids), start=4, topk_ids=torch.zeros(len(ids) - 4, 2, dtype=torch.int32),
                      topk_logprobs=torch.zeros(len(ids) - 4, 2, dtype=torch.float16))
    example.features = target_features(model, ids).half()
    captured = []
    finish = head.finish

    def recording(attn, hidden):
        out = finish(attn, hidden)
        captured.append(out[1])
        return out

    monkeypatch.setattr(head, "finish", recording)
    ttt_loss(head, [example], torch.full((96,), -1), steps=3, max_len=64)
    assert len(captured) == 3
    state = {k: v for k, v in head.state_dict().items()}
    embed = model.get_input_embeddings().weight.detach()
    projected = list(example.features.float() @ state["fc.weight"].T)
    for step, logits in enumerate(captured):
        for t in range(step, len(ids)):
            inputs = [torch.zeros(head.config.hidden_size)] + projected[: t - step] + [None] * step
            want = published_forward(state, head.config, embed, ids[: t + 1], inputs)[-1]
            torch.testing.assert_close(logits[0, t].detach(), want, rtol=1e-4, atol=1e-4)
    assert training.STEP_WEIGHT < 1


@pytest.fixture(scope="module")
def trained_head(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill-eagle3")
    out = tmp / "head"
    return out, distill(DEMO, out, settings(tmp, head="eagle3", ttt_steps=2, max_steps=40, lr=3e-3))


def test_distill_writes_a_published_head_that_agrees_more_than_untrained(trained_head):
    out, summary = trained_head
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "README.md", "distill.json"}
    assert is_head_folder(out)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["draft_vocab_size"] == 600
    assert summary["heldout_top1_agreement"] > summary["untrained_top1_agreement"] + 0.05
    assert len(summary["heldout_top1_by_position"]) == 2
    card = (out / "README.md").read_text()
    assert "EAGLE-3 head" in card and f"{summary['heldout_top1_agreement']:.3f}" in card


def test_the_distilled_head_is_lossless_and_accepted(trained_head):
    from specdec.backends.eagle3 import Eagle3Backend

    assert_lossless_and_accepted(trained_head[0], Eagle3Backend)
