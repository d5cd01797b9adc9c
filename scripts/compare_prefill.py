"""Prefill time of two ONNX exports (specdec export folders) on the same chat prompts, the exports
taking turns so that the machine's drift falls on both: e.g. a format-3 export (every prompt
position's logits) against a format-4 one (the last position's only).

    python scripts/compare_prefill.py CONFIG EXPORT_A EXPORT_B [--prompts FILE] [--limit 16] [--repeats 4]

CONFIG gives the tokenizer and chat template (its target's); each repeat prefills every prompt once
per export, and the line per export gives each repeat's seconds and their median.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("exports", nargs=2)
    parser.add_argument("--prompts", default="benchmarks/prompts/chat.jsonl")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args(argv)
    from specdec.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeOptions
    from specdec.bench.prompts import load_questions
    from specdec.decoder import SpeculativeDecoder
    from specdec.errors import SpecdecError

    try:
        decoder = SpeculativeDecoder.from_config(args.config)
        prompts = [decoder.prepare(None, [{"role": "user", "content": q.turns[0]}], {}).prompt_ids
                   for q in load_questions(args.prompts, args.limit)]
        backends = {folder: OnnxRuntimeBackend.load(folder, OnnxRuntimeOptions()) for folder in args.exports}
    except SpecdecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    seconds = prefill_seconds(backends, prompts, args.repeats)
    print(f"{len(prompts)} prompts, {sum(map(len, prompts))} tokens, {args.repeats} repeats")
    for folder, times in seconds.items():
        version = backends[folder].manifest["format_version"]
        print(f"format {version} {folder}: {' '.join(f'{t:.2f}' for t in times)} s, median {statistics.median(times):.2f} s")
    return 0


def prefill_seconds(backends: dict, prompts: list[list[int]], repeats: int) -> dict[str, list[float]]:
    """name -> seconds to prefill every prompt, per repeat; the backends take turns within a repeat."""
    import torch

    seconds: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(repeats):
        for name, backend in backends.items():
            start = time.perf_counter()
            for prompt in prompts:
                backend.reset()
                backend.prefill(torch.tensor([prompt]))
            seconds[name].append(time.perf_counter() - start)
    return seconds


if __name__ == "__main__":
    sys.exit(main())
