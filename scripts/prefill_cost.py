"""What batching prefills could save on a config's target: the first B chat prompts prefilled one
at a time (as the batched loop does when they join) against one prefill of all their tokens as a
single sequence (what a batched prefill computes, less the attention between prompts, so a lower
bound on its cost). Where a prefill is compute-bound the two are close and batching prefills
gains little; where it is bound by reading the weights, the single sequence is far cheaper.

    python scripts/prefill_cost.py CONFIG [--prompts FILE] [--batch-size 8] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from specdec.bench.prompts import load_questions
from specdec.decoder import SpeculativeDecoder


def prefill_seconds(target, ids: list[int]) -> float:
    target.reset()
    start = time.perf_counter()
    target.prefill(torch.tensor([ids]))  # [1, L]
    return time.perf_counter() - start


def prefill_costs(target, prompts: list[list[int]], rounds: int) -> tuple[float, float]:
    """-> median seconds of (the prompts prefilled one at a time, all their tokens as one
    sequence), the two alternating within each round so that the machine's drift falls on both."""
    joined = [token for ids in prompts for token in ids]
    prefill_seconds(target, prompts[0])  # warm-up
    alone, together = [], []
    for _ in range(rounds):
        alone.append(sum(prefill_seconds(target, ids) for ids in prompts))
        together.append(prefill_seconds(target, joined))
    return statistics.median(alone), statistics.median(together)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--prompts", default="benchmarks/prompts/chat.jsonl")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    decoder = SpeculativeDecoder.from_config(args.config)
    prompts = [decoder.prepare(None, [{"role": "user", "content": q.turns[0]}], {}).prompt_ids
               for q in load_questions(args.prompts, args.batch_size)]
    alone, together = prefill_costs(decoder.target, prompts, args.rounds)
    alone_ms, together_ms, tokens = 1e3 * alone, 1e3 * together, sum(map(len, prompts))
    print(f"{len(prompts)} prompts, {tokens} tokens (median of {args.rounds} rounds)")
    print(f"one at a time: {alone_ms:.1f} ms ({alone_ms / tokens:.2f} ms a token)")
    print(f"as one sequence: {together_ms:.1f} ms ({together_ms / tokens:.2f} ms a token), "
          f"{together_ms / alone_ms:.2f} of one at a time")


if __name__ == "__main__":
    main()
