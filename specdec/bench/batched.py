"""`specdec bench --batch-size`: aggregate throughput and per-request latency of batched decoding.

Every prompt (a question's first turn) is submitted at once; the loop decodes up to B of them per
target forward and refills rows as sequences finish. Per method and batch size:
- tokens/s: all new tokens over the method's time for the whole set (its own slices', below);
- decode tokens/s: the tokens the steps emitted (all but each request's first, which its prefill
  chooses) over that time less the prefills' (joining rows prefill one at a time, between
  steps): what batching the steps gives, apart from the prefills it cannot share;
- time to first token: from submission to a request's first token on the method's clock (waiting
  for a row included);
- inter-token latency: a block of n tokens emitted t after the request's previous block counts as
  n gaps of t / n; p50 and p99 over every gap of every request;
- CPU steal: the share of the CPUs' time the hypervisor gave other guests during the method's runs
  (from /proc/stat): a method's steal far from `ar`'s at the same B tells a ratio that a shared
  machine decided.
`ar` (the target alone through the same batched loop) is the reference at each batch size. The
methods run interleaved: each advances one slice (a step of its batch; a whole request at B = 1)
in turn, the turns' order alternating, and each is timed on a clock that runs only during its own
slices. A slow patch of a shared machine (seconds to minutes) then falls on every method alike
instead of on whichever ran then. The method that leads (takes the first slice, and with it
makes its batch's buffers first) still runs a few percent faster: two identical `ar` decoders at
B = 16 on the real pair read 0.95x and 1.05x each other by which led (BENCHMARKS.md). So a
repeat runs one interleaved pass per rotation of the methods' order, each method leading once, a
method's ratio to `ar` in a repeat is the geometric mean over those passes, and its speedup is the
median over repeats.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass

from tqdm import tqdm

from specdec.bench.methods import ar_decoder
from specdec.bench.prompts import load_questions, prompt_file_name
from specdec.bench.report import cell, cpu_ticks, device_description, machine_lines, merge_metrics, steal_percent, versions
from specdec.bench.runner import BenchSettings, build_decoders
from specdec.errors import SpecdecError


@dataclass
class BatchRun:
    tokens_per_second: float
    decode_tokens_per_second: float
    first_token: list[float]  # seconds, per request
    gaps: list[float]  # seconds, per emitted token after a request's first
    outputs: list[list[int]]
    metrics: list
    steal: float | None = None  # % of the CPUs' time the hypervisor stole during the run (None: not known here)


def run_batched(settings: BenchSettings, batch_sizes: list[int]) -> dict:
    if [b for b in settings.baselines if b != "ar"]:
        raise SpecdecError("with --batch-size only the ar baseline runs (the others decode one prompt at a time); "
                           "pass --baselines ar")
    questions = load_questions(settings.prompts, settings.limit)
    decoders, config = build_decoders(settings)
    methods = [("ar", ar_decoder(decoders[0][1], config))] + decoders
    max_new = settings.max_new_tokens or config.generation.max_new_tokens
    if settings.chat:
        inputs = dict(messages=[[{"role": "user", "content": q.turns[0]}] for q in questions])
    else:
        inputs = dict(prompts=[q.turns[0] for q in questions])
    largest = max(batch_sizes)  # warm up at the largest batch, which also measures auto's surfaces for it
    warm = {k: (v * largest)[:largest] for k, v in inputs.items()}
    for _, decoder in methods:
        for _ in range(settings.warmup):
            decoder.generate_batch(**warm, batch_size=largest, max_new_tokens=min(16, max_new))
    runs: dict[tuple[str, int], list[BatchRun]] = {}
    bar = tqdm(total=settings.repeats * len(batch_sizes), desc="bench", file=sys.stderr, unit="repeat")
    for _ in range(settings.repeats):
        for size in batch_sizes:
            for name, passes in repeat(methods, inputs, size, max_new).items():
                runs.setdefault((name, size), []).extend(passes)
            bar.update()
    bar.close()
    greedy = config.generation.temperature == 0.0
    rows = []
    for name, size in ((name, size) for name, _ in methods for size in batch_sizes):
        passes, ar_passes = runs[(name, size)], runs[("ar", size)]
        median, ratios = _median(passes), repeat_ratios(passes, ar_passes, len(methods))
        total = merge_metrics(median.metrics)
        rows.append({
            "name": name, "batch_size": size, "tokens_per_second": median.tokens_per_second,
            "decode_tokens_per_second": median.decode_tokens_per_second,
            "speedup_vs_ar": statistics.median(ratios), "speedup_vs_ar_range": [min(ratios), max(ratios)],
            "mean_accepted_length": total.mean_accepted_length,
            "drafted_nodes_per_step": total.drafted_nodes / total.steps if total.steps else 0.0,
            "first_token_p50_ms": 1e3 * statistics.median(median.first_token),
            "inter_token_p50_ms": 1e3 * percentile(median.gaps, 0.5),
            "inter_token_p99_ms": 1e3 * percentile(median.gaps, 0.99),
            "outputs_match_ar": all(r.outputs == a.outputs for r, a in zip(passes, ar_passes)) if greedy else None,
            "steal_percent": _mean_steal(passes),
        })
    return {"device": device_description(), "versions": versions(), "runs": rows, "settings": {
        "configs": settings.configs, "overrides": settings.overrides, "prompts": settings.prompts, "questions": len(questions),
        "max_new_tokens": max_new, "repeats": settings.repeats, "warmup": settings.warmup, "chat": settings.chat,
        "batch_sizes": batch_sizes, "greedy": greedy}}


def repeat(methods: list[tuple[str, object]], inputs: dict, batch_size: int, max_new: int) -> dict[str, list[BatchRun]]:
    """One repeat at one batch size: an interleaved pass of every method per rotation of their
    order, each leading once (the leader runs faster, see above) -> each method's passes."""
    runs: dict[str, list[BatchRun]] = {name: [] for name, _ in methods}
    for shift in range(len(methods)):
        order = methods[shift:] + methods[:shift]
        together = [Pass(decoder, inputs, batch_size, max_new) for _, decoder in order]
        interleave(together)
        for (name, _), done in zip(order, together, strict=True):
            runs[name].append(done.result())
    return runs


def interleave(passes: list[Pass]) -> None:
    """Advance every pass a slice at a time until all end, in turns whose order alternates
    (first to last, then last to first), so that each method meets the machine's drift alike."""
    turn = 0
    while live := [p for p in passes if not p.done]:
        for p in live if turn % 2 == 0 else live[::-1]:
            p.advance()
        turn += 1


class Pass:
    """One method's decoding of the prompts at one batch size, a slice at a time
    (`SpeculativeDecoder.batch_slices`), on a clock of its own that runs only during its slices:
    its throughput and latencies are what it would show alone."""

    def __init__(self, decoder, inputs: dict, batch_size: int, max_new: int):
        count = len(next(iter(inputs.values())))
        self.last: list[float | None] = [None] * count  # own-clock time of each request's latest block
        self.first_token = [0.0] * count  # seconds, per request
        self.gaps: list[float] = []
        self.seconds, self.started = 0.0, 0.0  # own time so far; when the running slice started
        self.steal, self.ticks = 0, 0  # stolen and all CPU ticks during the slices (-1: not known here)
        self.outputs = None
        self.slices = decoder.batch_slices(**inputs, batch_size=batch_size, on_tokens=self._on_tokens, max_new_tokens=max_new)

    @property
    def done(self) -> bool:
        return self.outputs is not None

    def advance(self) -> None:
        before, self.started = cpu_ticks(), time.perf_counter()
        try:
            next(self.slices)
        except StopIteration as end:
            self.outputs = end.value
        self.seconds += time.perf_counter() - self.started
        after = cpu_ticks()
        if before is None or after is None or self.ticks < 0:
            self.ticks = -1
        else:
            self.steal, self.ticks = self.steal + after[0] - before[0], self.ticks + after[1] - before[1]

    def _on_tokens(self, index: int, block: list[int]) -> None:
        now = self.seconds + time.perf_counter() - self.started
        if self.last[index] is None:
            self.first_token[index] = now
        elif block:
            self.gaps.extend([(now - self.last[index]) / len(block)] * len(block))
        self.last[index] = now

    def result(self) -> BatchRun:
        outputs, seconds = self.outputs, self.seconds
        tokens = sum(len(o.token_ids) for o in outputs)
        prefill_seconds = sum(o.metrics.prefill_seconds for o in outputs)
        decode = sum(max(0, len(o.token_ids) - 1) for o in outputs) / max(seconds - prefill_seconds, 1e-9)
        steal = steal_percent((0, 0), (self.steal, self.ticks))  # None where not known (ticks -1)
        return BatchRun(tokens / seconds, decode, self.first_token, self.gaps, [o.token_ids for o in outputs],
                        [o.metrics for o in outputs], steal)


def _mean_steal(runs: list[BatchRun]) -> float | None:
    """The mean CPU steal of a method's runs (None if unknown)."""
    steals = [run.steal for run in runs]
    return None if None in steals else statistics.fmean(steals)


def _median(passes: list[BatchRun]) -> BatchRun:
    """The pass of median throughput."""
    return sorted(passes, key=lambda r: r.tokens_per_second)[len(passes) // 2]


def repeat_ratios(runs: list[BatchRun], ar_runs: list[BatchRun], passes: int) -> list[float]:
    """A method's throughput over `ar`'s, per repeat: the geometric mean of the ratios of the
    repeat's `passes` passes (one per rotation of the methods' order), in which the methods
    paired ran interleaved."""
    ratios = [r.tokens_per_second / a.tokens_per_second for r, a in zip(runs, ar_runs, strict=True)]
    return [statistics.geometric_mean(ratios[i : i + passes]) for i in range(0, len(ratios), passes)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _range(extremes: list[float] | None) -> str:
    """The lowest and highest of a method's per-repeat ratios to `ar` ('-' in older reports)."""
    return "-" if extremes is None else f"{extremes[0]:.2f} to {extremes[1]:.2f}"


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        *machine_lines(report),
        f"Settings: {s['questions']} prompts (first turns) from `{prompt_file_name(s['prompts'])}`{' as chat' if s['chat'] else ''}, "
        f"max_new_tokens {s['max_new_tokens']}, batch sizes {', '.join(map(str, s['batch_sizes']))}, "
        f"{'greedy' if s['greedy'] else 'sampling'}, median of {s['repeats']} repeats (speedups: of ratios within a repeat, each method leading once); configs {', '.join(s['configs'])}"
        + (f"; overrides {' '.join(s['overrides'])}" if s["overrides"] else ""),
        "",
        "| method | batch | tokens/s (all) | vs ar | repeats' range | decode tokens/s | tau | nodes/step | first token p50 ms | inter-token p50 ms | p99 ms | same as ar | CPU steal % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in report["runs"]:
        match = {True: "yes", False: "**NO**", None: "-"}[r["outputs_match_ar"]]
        lines.append(f"| {r['name']} | {r['batch_size']} | {r['tokens_per_second']:.1f} | {r['speedup_vs_ar']:.2f}x | "
                     f"{_range(r.get('speedup_vs_ar_range'))} | {r['decode_tokens_per_second']:.1f} | {r['mean_accepted_length']:.2f} | {r['drafted_nodes_per_step']:.1f} | {r['first_token_p50_ms']:.0f} | "
                     f"{r['inter_token_p50_ms']:.1f} | {r['inter_token_p99_ms']:.1f} | {match} | {cell(r.get('steal_percent'), '.1f')} |")
    return "\n".join(lines) + "\n"
