"""How steady a batched cost surface's shape is when its repeats run back to back (each point's
5 forwards in a row, as calibration did before session 13) or interleaved (5 passes over every
point, `specdec.costs.interleaved`). The two methods take turns, `--rounds` times each, over the
same rows of CONFIG's target; each line gives t(B, Q) / t(B, 1) per B for Q = 2, 4, 8, and the end
gives the spread (max - min over rounds) of t(B, 2) / t(B, 1) and t(B, 4) / t(B, 1) at B = 8, 16:
the ratios an `auto` planner decides by.

    python scripts/compare_calibration.py CONFIG [--rounds 4]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from specdec import costs
from specdec.batch import batched_backend
from specdec.decoder import SpeculativeDecoder

QUERIES, COUNTS, CONTEXT, REPEATS = (1, 2, 4, 8), (1, 4, 8, 16), 256, 5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    target = SpeculativeDecoder.from_config(args.config).target
    batch = batched_backend(target, max(COUNTS))
    generator = torch.Generator().manual_seed(0)
    for row in batch.rows:
        row.prefill(torch.randint(0, target.vocab_size, (1, CONTEXT), generator=generator))
    points = [(count, query) for count in COUNTS for query in QUERIES]

    def once(point) -> float:
        return costs._time_rows(batch, *point, CONTEXT)

    def back_to_back() -> dict:
        measured = {}
        for point in points:
            once(point)  # warm-up
            measured[point] = statistics.median(once(point) for _ in range(REPEATS))
        return measured

    def interleaved() -> dict:
        return dict(zip(points, costs.interleaved(points, once, REPEATS)))

    seen: dict[str, list[dict]] = {"back to back": [], "interleaved": []}
    for _ in range(args.rounds):
        for name, measure in (("back to back", back_to_back), ("interleaved", interleaved)):
            t = measure()
            seen[name].append(t)
            ratios = " ".join(f"B{b}: " + "/".join(f"{t[b, q] / t[b, 1]:.2f}" for q in QUERIES[1:]) for b in COUNTS)
            print(f"{name:12} {ratios}  t(16, 1) = {1e3 * t[16, 1]:.1f} ms", flush=True)
    for name, rounds in seen.items():
        for b in (8, 16):
            for q in (2, 4):
                ratios = [t[b, q] / t[b, 1] for t in rounds]
                print(f"{name:12} t({b}, {q}) / t({b}, 1): {min(ratios):.2f} to {max(ratios):.2f}, "
                      f"spread {max(ratios) - min(ratios):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
