"""What one batched target forward costs on an ONNX-contract target, by rows and KV capacity: a
forward of one query per row over buffers of C slots, each (B, C) timed in turn within a round so
that a slow patch of the machine falls on all of them. The graph reads all C slots of every row,
which is why `BatchedOnnx` keeps C close to the longest row (specdec/backends/batched_onnx.py).
Given several configs, their targets take turns within each round too (an A/B of two exports).

    python scripts/batch_forward_cost.py CONFIG [CONFIG ...] [--batch-sizes 1,8] [--capacities 160,256,512] [--rounds 12]
"""

from __future__ import annotations

import argparse
import statistics

from specdec.backends.batched_onnx import time_runs
from specdec.batch import batched_backend
from specdec.decoder import SpeculativeDecoder


def forward_costs(targets: dict, sizes: list[int], capacities: list[int], rounds: int) -> dict[tuple[str, int, int], float]:
    """targets: name -> target backend -> {(name, B, C): median seconds of a forward of one query
    per row over buffers of C slots}."""
    batches = {(name, size): batched_backend(target, size) for name, target in targets.items() for size in sizes}
    seconds: dict[tuple[str, int, int], list[float]] = {(n, b, c): [] for n in targets for b in sizes for c in capacities}
    for _ in range(rounds):
        for (name, size), batch in batches.items():
            for capacity in capacities:
                seconds[(name, size, capacity)] += time_runs(batch, size, capacity, repeats=4)
    return {key: statistics.median(values) for key, values in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", metavar="CONFIG")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--capacities", default="160,192,256,320,512", help="ascending multiples of 32")
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args(argv)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    capacities = [int(c) for c in args.capacities.split(",")]
    targets = {config: SpeculativeDecoder.from_config(config).target for config in args.configs}
    costs = forward_costs(targets, sizes, capacities, args.rounds)
    print("| config | B | " + " | ".join(f"C = {c}" for c in capacities) + " |")
    print("|---|---:|" + "---:|" * len(capacities))
    for name in targets:
        for size in sizes:
            print(f"| {name} | {size} | " + " | ".join(f"{1e3 * costs[(name, size, c)]:.1f} ms" for c in capacities) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
