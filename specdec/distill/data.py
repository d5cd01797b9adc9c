"""Distillation data: prompts, the target's own answers to them, and its top-k distributions.

Each example is one chat turn: the templated prompt, the target's greedy answer, and at every
answer position the target's top-k log-probabilities (recorded while it generates, so no second
teacher forward is needed). Greedy answers are what the draft meets at inference time.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from specdec.errors import SpecdecError

SEED_PROMPTS = Path(__file__).with_name("seed_prompts.txt")


@dataclass
class Example:
    ids: torch.Tensor  # [L] int32: prompt + answer, in target ids
    start: int  # index of the first answer token; position start - 1 + j predicts answer token j
    topk_ids: torch.Tensor  # [A, k] int32: the target's top-k next tokens at each answer position
    topk_logprobs: torch.Tensor  # [A, k] float16: their log-probabilities
    features: torch.Tensor | None = None  # [L, F] float16: the target's features (EAGLE-3 heads only)


def read_prompts(path: str | Path | None) -> list[str]:
    """One instruction per line of a text file, or the first turn of each Spec-Bench JSONL question."""
    path = Path(path) if path is not None else SEED_PROMPTS
    if not path.is_file():
        raise SpecdecError(f"prompt file {str(path)!r} does not exist")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        try:
            lines = [json.loads(line)["turns"][0] for line in lines]
        except (ValueError, KeyError, IndexError, TypeError):
            raise SpecdecError(f"{path}: expected Spec-Bench questions with `turns`") from None
    if not lines:
        raise SpecdecError(f"{path}: no prompts")
    return lines


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt as the model's chat template renders a user turn (plain text without one)."""
    from specdec.chat import chat_prompt_ids, has_template

    if has_template(tokenizer):
        return chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
    return tokenizer(prompt)["input_ids"]


class _TopK:
    """A logits processor that records the top-k log-probabilities of every step, unchanged scores."""

    def __init__(self, k: int):
        self.k = k
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []  # per step: ([B, k] ids, [B, k] logprobs)

    def __call__(self, input_ids, scores):
        top = scores.float().log_softmax(-1).topk(self.k, dim=-1)
        self.steps.append((top.indices.int(), top.values.half()))
        return scores


@torch.inference_mode()
def generate_examples(model, tokenizer, prompts: list[str], max_answer: int, topk: int, eos: set[int],
                      sample: bool = False) -> list[Example]:
    """The target's answers to a batch of prompts (greedy, or sampled from its unwarped
    distribution for variety), with its top-k at every answer position."""
    from transformers import GenerationConfig, LogitsProcessorList

    encoded = [chat_ids(tokenizer, p) for p in prompts]
    width = max(map(len, encoded))
    pad = min(eos) if eos else 0
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])  # left padding
    attention = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    recorder = _TopK(topk)
    config = GenerationConfig(max_new_tokens=max_answer, do_sample=sample, temperature=1.0, top_k=0, top_p=1.0,
                              eos_token_id=sorted(eos) or None, pad_token_id=pad)
    out = model.generate(ids.to(model.device), attention_mask=attention.to(model.device), generation_config=config,
                         logits_processor=LogitsProcessorList([recorder]))
    examples = []
    for row, prompt in enumerate(encoded):
        answer = out[row, width:].tolist()
        end = next((i + 1 for i, t in enumerate(answer) if t in eos), len(answer))
        if end == 0:
            continue
        top_ids = torch.stack([recorder.steps[i][0][row] for i in range(end)]).cpu()
        top_lp = torch.stack([recorder.steps[i][1][row] for i in range(end)]).cpu()
        examples.append(Example(torch.tensor(prompt + answer[:end], dtype=torch.int32), len(prompt), top_ids, top_lp))
    return examples


def choose_vocab(examples: list[Example], size: int, target_vocab: int, always: set[int]) -> list[int]:
    """The `size` target tokens the draft's head keeps: every token in `always` (EOS, chat
    markers), then the most frequent answer tokens and teacher top-1 choices, ties to lower ids
    (BPE merges come roughly in frequency order)."""
    counts: Counter[int] = Counter()
    for ex in examples:
        counts.update(ex.ids[ex.start :].tolist())
        counts.update(ex.topk_ids[:, 0].tolist())
        counts.update(ex.ids[: ex.start].tolist())
    ranked = sorted(range(target_vocab), key=lambda t: (t not in always, -counts.get(t, 0), t))
    return sorted(ranked[: min(size, target_vocab)])


def coverage(examples: list[Example], vocab: list[int]) -> float:
    """Share of the target's top-1 answer tokens that the reduced vocabulary contains."""
    keep = set(vocab)
    tops = [t for ex in examples for t in ex.topk_ids[:, 0].tolist()]
    return sum(t in keep for t in tops) / max(1, len(tops))
