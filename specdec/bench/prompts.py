"""Prompt sets for `specdec bench`, in Spec-Bench's question format (JSON lines):
{"question_id": ..., "category": ..., "turns": ["first prompt", "follow-up", ...]}."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from specdec.errors import SpecdecError

DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / "benchmarks" / "prompts" / "code.jsonl"


def prompt_file_name(path: str | None) -> str:
    """How a report names a prompt file: as given, or the default set's path in the repository."""
    return path if path is not None else DEFAULT_PROMPTS.relative_to(DEFAULT_PROMPTS.parents[2]).as_posix()


@dataclass
class Question:
    question_id: str
    category: str
    turns: list[str]


def load_questions(path: str | Path | None = None, limit: int | None = None) -> list[Question]:
    path = Path(path) if path is not None else DEFAULT_PROMPTS
    if not path.is_file():
        raise SpecdecError(f"prompt file {str(path)!r} does not exist")
    questions = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SpecdecError(f"{path}:{number}: not UTF-8 text; save the prompt file as UTF-8 JSON lines") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("each line must be a JSON object with `turns`")
            turns = record["turns"]
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
                raise ValueError("`turns` must be a non-empty list of strings")
            questions.append(Question(str(record.get("question_id", number)), str(record.get("category", "")), turns))
        except (ValueError, KeyError, TypeError) as exc:
            detail = "missing `turns`" if isinstance(exc, KeyError) else str(exc)
            raise SpecdecError(f"{path}:{number}: not a Spec-Bench question ({detail})") from None
    if not questions:
        raise SpecdecError(f"{path}: no questions")
    return questions[:limit] if limit else questions
