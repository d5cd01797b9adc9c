"""Batched speed of configs against `ar`, paired: in each repeat every method decodes the same
prompts at batch size B, the methods interleaved a step at a time, one pass per rotation of their
order, as `specdec bench --batch-size` runs them, and a method's figure is the median over repeats
of its tokens per second over `ar`'s in the same repeat (the geometric mean over its passes). A
slow patch of this machine lasts seconds to minutes, so it falls on every method alike. Also
prints the draft nodes per step. `specdec bench --batch-size` reports the same medians with latency and output
checks; this script is the quick way to weigh a change at a few batch sizes. With `--steps`, also
each method's mean step at the full batch, split into the target forward, the draft rounds
(`Lockstep.run`, proposals included) and the rest (inputs, verification, commits, `auto`'s
bookkeeping): where a method's steps cost more than `ar`'s with the same trees. Of the draft
rounds, the catch-ups (a draft prefilled over a lag longer than a steady step's: a row's first
start over its prompt, or a probe after skipped steps) are shown apart, with their count.

    python scripts/paired_batch.py CONFIG [CONFIG ...] [--batch-sizes 8,16] [--repeats 5] [--limit 16] [--steps] [--chat]
"""

from __future__ import annotations

import argparse
import statistics
import time

from specdec import batch, lockstep
from specdec.bench.batched import repeat, repeat_ratios
from specdec.bench.methods import ar_decoder
from specdec.bench.prompts import load_questions
from specdec.decoder import SpeculativeDecoder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--batch-sizes", default="8,16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--steps", action="store_true", help="also split each method's full-batch steps")
    parser.add_argument("--chat", action="store_true", help="questions as chat messages, as specdec bench --chat")
    args = parser.parse_args(argv)
    steps: list[tuple] = []  # (decoder, rows, seconds, target forward, draft rounds,
    # catch-up seconds, catch-ups)
    if args.steps:
        _time_steps(steps)
    questions = [question.turns[0] for question in load_questions(None, args.limit)]
    inputs = dict(messages=[[{"role": "user", "content": q}] for q in questions]) if args.chat else dict(prompts=questions)
    decoders = {path: SpeculativeDecoder.from_config(path) for path in args.configs}
    first = next(iter(decoders.values()))
    decoders = {"ar": ar_decoder(first, first.config), **decoders}
    batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    for decoder in decoders.values():  # warm-up, and the batched surfaces measured or loaded
        decoder.generate_batch(**inputs, batch_size=max(batch_sizes), max_new_tokens=8)
    for batch_size in batch_sizes:
        runs = {name: [] for name in decoders}
        split = {name: [] for name in decoders}
        for _ in range(args.repeats):  # as specdec bench runs them (interleaved, each method leading once)
            steps.clear()
            for name, passes in repeat(list(decoders.items()), inputs, batch_size, args.max_new_tokens).items():
                runs[name] += passes
                split[name] += [step[2:] for step in steps if step[0] is decoders[name] and step[1] == batch_size]
        for name in decoders:
            ratio = statistics.median(repeat_ratios(runs[name], runs["ar"], len(decoders)))
            rates = [run.tokens_per_second for run in runs[name]]
            nodes = [sum(m.drafted_nodes for m in run.metrics) / sum(m.steps for m in run.metrics) for run in runs[name]]
            print(f"B {batch_size} {name}: {ratio:.3f}x ar, {statistics.median(nodes):.2f} nodes/step "
                  f"({statistics.median(rates):.1f} tok/s)", flush=True)
            if split[name]:
                total, forward, draft, catch_up = (1000 * statistics.fmean(part) for part in list(zip(*split[name]))[:4])
                print(f"  {len(split[name])} steps of {batch_size} rows: {total:.2f} ms a step, target forward {forward:.2f}, "
                      f"draft rounds {draft:.2f} (catch-ups {catch_up:.2f}: {sum(s[4] for s in split[name])} of them), "
                      f"rest {total - forward - draft:.2f}", flush=True)
    return 0


def _time_steps(steps: list) -> None:
    """Record every `BatchLoop.step`'s decoder, rows, seconds, target forward seconds, draft round seconds,
    and the seconds and count of its draft catch-ups (`lockstep.model_call`s that are not joint
    forwards)."""
    step, model_call = batch.BatchLoop.step, lockstep.model_call
    catch_ups = [0.0, 0]

    def timed_call(function, *args, row_forwards=0):
        start = time.perf_counter()
        result = model_call(function, *args, row_forwards=row_forwards)
        if not row_forwards:
            catch_ups[0], catch_ups[1] = catch_ups[0] + time.perf_counter() - start, catch_ups[1] + 1
        return result

    def timed(loop):
        rows, start, forwarded = len(loop.running), time.perf_counter(), loop.target.clock.seconds
        catch_ups[:] = [0.0, 0]
        finished = step(loop)
        steps.append((loop.decoder, rows, time.perf_counter() - start, loop.target.clock.seconds - forwarded, loop.lockstep.seconds,
                      *catch_ups))
        return finished

    batch.BatchLoop.step = timed
    lockstep.model_call = timed_call


if __name__ == "__main__":
    raise SystemExit(main())
