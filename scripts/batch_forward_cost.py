"""What one batched target forward costs on an ONNX-contract target, by rows and KV capacity: a
forward of one query per row over buffers of C slots, each (B, C) timed in turn within a round so
that a slow patch of the machine falls on all of them. The graph reads all C slots of every row,
which is why `BatchedOnnx` keeps C close to the longest row (specdec/backends/batched_onnx.py).
Given several configs, their targets take turns within each round too (an A/B of two exports).
With --mixed, rows of the given lengths instead (`1800,150x7`: one row of 1,800 entries and seven
of 150), a step of one query per row in one graph run against the same step split into groups as
`BatchedOnnx.groups` chooses (the first config's target).

    python scripts/batch_forward_cost.py CONFIG [CONFIG ...] [--batch-sizes 1,8] [--capacities 160,256,512] [--rounds 12]
    python scripts/batch_forward_cost.py CONFIG --mixed 1800,150x7 [--rounds 12]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

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


def mixed_step_costs(target, lengths: list[int], rounds: int) -> tuple[float, float, list]:
    """Rows holding `lengths` entries each (random tokens) -> (median seconds of a step of one query
    per row in one graph run, the same with the rows in groups, the groups). The two take turns
    within each round, on two batches over the same target; each step's entries are dropped after it."""
    measured = batched_backend(target, 1).measure_call_slots()
    batches = {}
    for call_slots in (math.inf, measured):
        batch = batches[call_slots] = batched_backend(target, len(lengths))
        for row, length in zip(batch.rows, lengths):
            row.prefill(torch.randint(0, target.vocab_size, (1, length)))
    seconds: dict[float, list[float]] = {call_slots: [] for call_slots in batches}
    for round_ in range(rounds + 1):  # the first round warms up
        for call_slots, batch in batches.items():
            target.call_slots = call_slots
            requests = {b: (torch.zeros(1, 1, dtype=torch.long), torch.tensor([[row.committed_len]]), torch.ones(1, 1, 1, dtype=torch.bool))
                        for b, row in enumerate(batch.rows)}
            start = time.perf_counter()
            batch.forward_rows(requests)
            if round_:
                seconds[call_slots].append(time.perf_counter() - start)
            for row in batch.rows:
                row.commit([])  # nothing kept: the next round times the same step
    target.call_slots = measured
    grouped = batches[measured]
    return (statistics.median(seconds[math.inf]), statistics.median(seconds[measured]),
            grouped.groups([row.committed_len for row in grouped.rows]))


def parse_lengths(text: str) -> list[int]:
    """`1800,150x7` -> [1800, 150, 150, 150, 150, 150, 150, 150]."""
    lengths = []
    for part in text.split(","):
        length, _, count = part.partition("x")
        lengths += [int(length)] * int(count or 1)
    return lengths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", metavar="CONFIG")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--capacities", default="160,192,256,320,512", help="ascending multiples of 32")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--mixed", metavar="LENGTHS", type=parse_lengths, help="rows of these many entries, e.g. 1800,150x7: one run against groups")
    args = parser.parse_args(argv)
    if args.mixed:
        target = SpeculativeDecoder.from_config(args.configs[0]).target
        one, grouped, groups = mixed_step_costs(target, args.mixed, args.rounds)
        print(f"rows of {args.mixed} entries: one run {1e3 * one:.1f} ms, groups {1e3 * grouped:.1f} ms "
              f"({grouped / one:.2f}x), a run's fixed cost {target.call_slots:.0f} row-slots; groups (rows, copied slots): {groups}")
        return 0
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
