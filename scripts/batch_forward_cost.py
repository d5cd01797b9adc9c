"""What one batched target forward costs on an ONNX-contract target, by rows and KV capacity: a
forward of one query per row over buffers of C slots, each (B, C) timed in turn within a round so
that a slow patch of the machine falls on all of them. The graph reads all C slots of every row,
which is why `BatchedOnnx` keeps C close to the longest row (specdec/backends/batched_onnx.py).

    python scripts/batch_forward_cost.py CONFIG [--batch-sizes 1,8] [--capacities 160,256,512] [--rounds 12]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from specdec.batch import batched_backend
from specdec.decoder import SpeculativeDecoder


def forward_costs(target, sizes: list[int], capacities: list[int], rounds: int) -> dict[tuple[int, int], float]:
    """{(B, C): median seconds of a forward of one query per row over buffers of C slots}."""
    batches = {size: batched_backend(target, size) for size in sizes}
    seconds: dict[tuple[int, int], list[float]] = {(b, c): [] for b in sizes for c in capacities}
    for _ in range(rounds):
        for size in sizes:
            batch = batches[size]
            for capacity in capacities:
                batch._fit(capacity)  # the buffers' capacity: C (a multiple of FIT_STEP) or the nearest above
                used = min(capacity, 150) - 1  # every row holds this many entries
                ids = torch.zeros(size, 1, dtype=torch.long)  # [B, 1]
                positions = torch.full((size, 1), used)  # [B, 1]
                visible = torch.ones(size, 1, used + 1, dtype=torch.bool)  # [B, 1, S + 1]
                for repeat in range(6):
                    start = time.perf_counter()
                    batch._execute(0, ids, positions, [used] * size, visible)
                    if repeat >= 2:  # the first runs of a new shape plan its memory
                        seconds[(size, capacity)].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--capacities", default="160,192,256,320,512", help="ascending multiples of 32")
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args(argv)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    capacities = [int(c) for c in args.capacities.split(",")]
    costs = forward_costs(SpeculativeDecoder.from_config(args.config).target, sizes, capacities, args.rounds)
    print("| B | " + " | ".join(f"C = {c}" for c in capacities) + " |")
    print("|---:|" + "---:|" * len(capacities))
    for size in sizes:
        print(f"| {size} | " + " | ".join(f"{1e3 * costs[(size, c)]:.1f} ms" for c in capacities) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
