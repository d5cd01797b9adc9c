"""Chat prompts: a tokenizer's chat template applied to messages, and its end-of-turn tokens."""

from __future__ import annotations

import functools

from specdec.errors import SpecdecError

_MARK = "\u2063specdec-answer\u2063"  # an assistant message no template rewrites


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` ({"role", "content"} dicts) rendered by the tokenizer's chat
    template, ending with the prompt of the assistant's next turn."""
    if tokenizer is None or not has_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") if tokenizer is not None else ""
        raise SpecdecError(f"the tokenizer{f' of {name!r}' if name else ''} has no chat template; "
                           "give a plain prompt instead (drop --chat / messages=)")
    if not messages or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages):
        raise SpecdecError('messages must be a non-empty list of {"role": ..., "content": ...} dicts')
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


@functools.lru_cache(maxsize=16)
def _end_of_turn(tokenizer) -> frozenset[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}], tokenize=False
    )
    after = text.split(_MARK, 1)[1] if _MARK in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return frozenset(ids[:1]) if ids and ids[0] in special else frozenset()


def end_of_turn_ids(tokenizer) -> frozenset[int]:
    """The special token the chat template puts right after an assistant message (e.g.
    `<|im_end|>`, `<|eot_id|>`), where a chat answer ends; empty when there is none."""
    return _end_of_turn(tokenizer) if has_template(tokenizer) else frozenset()
