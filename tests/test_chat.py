"""Chat prompts: the tokenizer's template renders the messages, the answer stops at the
template's end-of-turn token, and a tokenizer without a template gives one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from specdec.chat import chat_prompt_ids, end_of_turn_ids
from specdec.config import GenerationOptions
from specdec.decoder import SpeculativeDecoder
from specdec.errors import SpecdecError
from specdec.strategies.autoregressive import AutoregressiveStrategy as ArStrategy
from specdec.strategies.chain import ChainOptions, ChainStrategy
from specdec.testing import TableBackend

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo" / "target"
TEMPLATE = ("{% for m in messages %}<{{ m.role }}> {{ m.content }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")
ANSWER, FILLER = [4093, 4094, 4095], 4092  # ids no prompt below uses


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO)
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    tok.chat_template = TEMPLATE
    return tok


def scripted_target(end: int, vocab: int):
    """Greedy path after any prompt: ANSWER, the end-of-turn token, then FILLER forever."""
    def logits(prefix: tuple[int, ...]) -> torch.Tensor:
        out = torch.zeros(vocab, dtype=torch.float64)
        emitted = prefix[prefix.index(ANSWER[0]):] if ANSWER[0] in prefix else ()
        script = ANSWER + [end]
        out[script[len(emitted)] if len(emitted) < len(script) else FILLER] = 5.0
        return out

    return logits


def decoder(tokenizer, strategy):
    vocab = len(tokenizer)
    target = scripted_target(end=tokenizer.convert_tokens_to_ids("<|end|>"), vocab=vocab)
    draft = TableBackend(target, vocab) if strategy.needs_draft else None
    return SpeculativeDecoder(TableBackend(target, vocab), draft, strategy, GenerationOptions(max_new_tokens=20), tokenizer)


def test_end_of_turn_comes_from_the_template(tokenizer):
    assert end_of_turn_ids(tokenizer) == {tokenizer.convert_tokens_to_ids("<|end|>")}


@pytest.mark.parametrize("strategy", [ArStrategy(ArStrategy.Options()), ChainStrategy(ChainOptions(k=4))],
                         ids=["ar", "chain"])
def test_messages_are_templated_and_the_answer_stops_at_end_of_turn(tokenizer, strategy):
    dec = decoder(tokenizer, strategy)
    messages = [{"role": "user", "content": "def add(a, b):"}]
    out = dec.generate(messages=messages)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    assert out.token_ids == ANSWER + [end]  # stopped at the end-of-turn token, inside a drafted block for chain
    rendered = tokenizer("<user> def add(a, b):<|end|>\n<assistant> ", add_special_tokens=False)["input_ids"]
    assert chat_prompt_ids(tokenizer, messages) == rendered
    assert dec.target.committed[: len(rendered)] == rendered
    plain = dec.generate("<assistant> ")  # a plain prompt has no turn to end: the budget runs out
    assert len(plain.token_ids) == 20


def test_stop_token_ids_option_stops_plain_generation(tokenizer):
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    out = decoder(tokenizer, ArStrategy(ArStrategy.Options())).generate("x", stop_token_ids=[end])
    assert out.token_ids == ANSWER + [end]


def test_no_chat_template_is_one_line():
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(DEMO)
    with pytest.raises(SpecdecError, match="has no chat template"):
        chat_prompt_ids(plain, [{"role": "user", "content": "hi"}])


def test_malformed_messages_are_one_line(tokenizer):
    for messages in ([], [{"content": "no role"}], ["just text"]):
        with pytest.raises(SpecdecError, match="role"):
            chat_prompt_ids(tokenizer, messages)


def test_cli_chat_without_template_is_one_line(capsys, repo_mirror, monkeypatch):
    from specdec.cli import main

    monkeypatch.chdir(repo_mirror)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "configs/quickstart.yaml", "--chat", "--prompt", "hi", "--max-new-tokens", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1
    assert len(err) == 1 and err[0].startswith("error:") and "no chat template" in err[0]
