"""`specdec distill` end to end on the shipped demo target: the draft it writes loads as a
reduced-vocabulary draft, agrees with the target more than before training, keeps the output
lossless, and an interrupted run resumes from its cached data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import specdec.distill
from specdec.distill import DistillSettings, distill

DEMO = str(Path(__file__).resolve().parents[1] / "models" / "demo" / "target")
PROMPTS = ["def add(a, b):", "import os", "class Point:", "for i in range(10):", "def main():",
           "with open(path) as f:", "if __name__ == '__main__':", "def read_lines(path):",
           "try:", "return [x for x in", "def __init__(self, name):", "import sys"] * 2


def settings(tmp_path: Path, **changes) -> DistillSettings:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"{p}  # {i}" for i, p in enumerate(PROMPTS)) + "\n")
    base = dict(prompts=str(prompts), max_answer_tokens=24, sampled_answers=1, generate_batch=8, layers=1,
                draft_vocab=600, train_minutes=10, max_steps=30, batch_tokens=1024, heldout=0.25, lr=2e-3)
    return DistillSettings(**{**base, **changes})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    out = tmp / "draft"
    return out, distill(DEMO, out, settings(tmp))


def test_distill_writes_a_draft_that_agrees_more_than_untrained(trained):
    out, summary = trained
    assert {"config.json", "model.safetensors", "specdec_vocab.json", "README.md", "distill.json",
            "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert summary["heldout_top1_agreement"] > summary["untrained_top1_agreement"] + 0.05
    assert summary["draft_vocab"] == 600 and summary["steps"] > 0
    assert not out.with_name(out.name + ".distill-work").exists()  # cleaned after success
    card = (out / "README.md").read_text()
    assert f"{summary['heldout_top1_agreement']:.3f}" in card and "held-out" in card


def test_the_distilled_draft_is_lossless_and_accepted(trained):
    from specdec.backends.vocab import MappedVocabBackend

    assert_lossless_and_accepted(trained[0], MappedVocabBackend)


def assert_lossless_and_accepted(out: Path, backend_type: type) -> None:
    """The draft in `out` loads as `backend_type` over the demo target, its greedy output equals the
    target's own, and it is accepted at least once."""
    from specdec.config import load_config
    from specdec.decoder import SpeculativeDecoder

    data = {"target": {"model": DEMO}, "draft": {"model": str(out)}, "strategy": {"name": "chain", "k": 3},
            "generation": {"max_new_tokens": 40}}
    spec = SpeculativeDecoder.from_config(load_config(data=data))
    assert isinstance(spec.draft, backend_type)
    ar = SpeculativeDecoder.from_config(load_config(data={**data, "strategy": {"name": "ar"}}))
    accepted = 0
    for prompt in ("def add(a, b):", "import json"):
        got, want = spec.generate(prompt), ar.generate(prompt)
        assert got.token_ids == want.token_ids
        accepted += got.metrics.accepted_tokens
    assert accepted > 0


def test_an_interrupted_run_resumes_from_its_data(tmp_path, monkeypatch):
    out = tmp_path / "draft"
    original = specdec.distill._train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(specdec.distill, "_train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill(DEMO, out, settings(tmp_path, max_steps=3))
    work = out.with_name("draft.distill-work")
    state = json.loads((work / "state.json").read_text())
    assert state["minutes_before"] > 0 and list((work / "data" / "train").glob("*.pt"))

    def no_generation(*args, **kwargs):
        raise AssertionError("the cached answers should have been reused")

    monkeypatch.setattr(specdec.distill, "_train", original)
    monkeypatch.setattr("specdec.distill.data.generate_examples", no_generation)
    summary = distill(DEMO, out, settings(tmp_path, max_steps=3))
    assert summary["wall_minutes"] > state["minutes_before"] and (out / "config.json").is_file()


def test_other_settings_on_an_unfinished_run_are_refused(tmp_path, monkeypatch):
    out = tmp_path / "draft"
    monkeypatch.setattr(specdec.distill, "_train", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        distill(DEMO, out, settings(tmp_path, max_steps=3))
    with pytest.raises(specdec.errors.SpecdecError, match="other settings"):
        distill(DEMO, out, settings(tmp_path, layers=2))


@pytest.mark.parametrize("target, prompts", [("missing/model", None), (DEMO, "missing.txt")])
def test_bad_inputs_leave_nothing_behind(tmp_path, capsys, target, prompts):
    from specdec.cli import main

    args = ["distill", target, "--out", str(tmp_path / "out")] + (["--prompts", prompts] if prompts else [])
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1 and err[0].startswith("error:")
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_a_non_empty_output_folder(tmp_path, capsys):
    from specdec.cli import main

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", DEMO, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1 and "not empty" in err[0]
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
