"""Cut code-completion prompts from installed third-party packages (never in the demo pair's
training corpus, which is the standard library) into Spec-Bench question JSONL: each prompt is a
documented function's signature and docstring, to be completed with its body.

Usage: python scripts/make_prompts.py [--out benchmarks/prompts/code.jsonl] [--count 24]
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
from pathlib import Path

PACKAGES = ("click", "pluggy", "yaml", "tqdm", "pydantic", "safetensors", "tokenizers", "huggingface_hub", "packaging")


def prompts_from(path: Path, per_file: int) -> list[str]:
    source = path.read_text()
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef) or not ast.get_docstring(node) or len(node.body) < 3:
            continue
        doc_end = node.body[0].end_lineno
        body_lines = node.end_lineno - doc_end
        if 4 <= body_lines and doc_end - node.lineno < 25:
            start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            found.append("\n".join(lines[start - 1 : doc_end]) + "\n")
        if len(found) == per_file:
            break
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/prompts/code.jsonl"))
    parser.add_argument("--count", type=int, default=24)
    args = parser.parse_args()
    questions = []
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for path in sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.py")):
            for text in prompts_from(path, per_file=1):
                questions.append({"question_id": f"{package}/{path.name}:{len(questions)}", "category": "code", "turns": [text]})
            if sum(q["question_id"].startswith(package + "/") for q in questions) >= 3:
                break
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(q) + "\n" for q in questions[: args.count]))
    print(f"wrote {min(len(questions), args.count)} prompts to {args.out}")


if __name__ == "__main__":
    main()
