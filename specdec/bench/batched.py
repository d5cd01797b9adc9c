"""`specdec bench --batch-size`: aggregate throughput and per-request latency of batched decoding.

Every prompt (a question's first turn) is submitted at once; the loop decodes up to B of them per
target forward and refills rows as sequences finish. Per method and batch size:
- tokens/s: all new tokens over the wall time of the whole set;
- decode tokens/s: the tokens the steps emitted (all but each request's first, which its prefill
  chooses) over the wall time less the prefills' (joining rows prefill one at a time, between
  steps): what batching the steps gives, apart from the prefills it cannot share;
- time to first token: from submission to a request's first token (waiting for a row included);
- inter-token latency: a block of n tokens emitted t after the request's previous block counts as
  n gaps of t / n; p50 and p99 over every gap of every request;
- CPU steal: the share of the CPUs' time the hypervisor gave other guests during the method's runs
  (from /proc/stat): a method's steal far from `ar`'s at the same B tells a ratio that a shared
  machine decided.
`ar` (the target alone through the same batched loop) is the reference at each batch size. A
repeat runs every method at one B back to back before the next B, and a method's speedup is the
median over repeats of its throughput over `ar`'s in the same repeat: pairs minutes apart on a
noisy machine would compare the machine's drift as much as the methods. Odd repeats run the
methods in reverse order, so a machine drifting within a repeat favours a method against `ar` in
one repeat and `ar` in the next, instead of the last method in every repeat.
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
            _run(decoder, warm, largest, min(16, max_new))
    runs: dict[tuple[str, int], list[BatchRun]] = {}
    bar = tqdm(total=settings.repeats * len(methods) * len(batch_sizes), desc="bench", file=sys.stderr, unit="batch run")
    for repeat in range(settings.repeats):
        for size in batch_sizes:
            for name, decoder in methods if repeat % 2 == 0 else methods[::-1]:
                runs.setdefault((name, size), []).append(_run(decoder, inputs, size, max_new))
                bar.update()
    bar.close()
    greedy = config.generation.temperature == 0.0
    rows = []
    for name, size in ((name, size) for name, _ in methods for size in batch_sizes):
        repeats, ar_repeats = runs[(name, size)], runs[("ar", size)]
        median, ar, ratios = _median(repeats), _median(ar_repeats), paired_ratios(repeats, ar_repeats)
        total = merge_metrics(median.metrics)
        rows.append({
            "name": name, "batch_size": size, "tokens_per_second": median.tokens_per_second,
            "decode_tokens_per_second": median.decode_tokens_per_second,
            "speedup_vs_ar": paired_speedup(repeats, ar_repeats), "speedup_vs_ar_range": [min(ratios), max(ratios)],
            "mean_accepted_length": total.mean_accepted_length,
            "drafted_nodes_per_step": total.drafted_nodes / total.steps if total.steps else 0.0,
            "first_token_p50_ms": 1e3 * statistics.median(median.first_token),
            "inter_token_p50_ms": 1e3 * percentile(median.gaps, 0.5),
            "inter_token_p99_ms": 1e3 * percentile(median.gaps, 0.99),
            "outputs_match_ar": median.outputs == ar.outputs if greedy else None,
            "steal_percent": _mean_steal(repeats),
        })
    return {"device": device_description(), "versions": versions(), "runs": rows, "settings": {
        "configs": settings.configs, "overrides": settings.overrides, "prompts": settings.prompts, "questions": len(questions),
        "max_new_tokens": max_new, "repeats": settings.repeats, "warmup": settings.warmup, "chat": settings.chat,
        "batch_sizes": batch_sizes, "greedy": greedy}}


def _run(decoder, inputs: dict, batch_size: int, max_new: int) -> BatchRun:
    count = len(next(iter(inputs.values())))
    last: list[float | None] = [None] * count
    first_token: list[float] = [0.0] * count
    gaps: list[float] = []

    def on_tokens(index: int, block: list[int]) -> None:
        now = time.perf_counter()
        if last[index] is None:
            first_token[index] = now - start
        elif block:
            gaps.extend([(now - last[index]) / len(block)] * len(block))
        last[index] = now

    ticks, start = cpu_ticks(), time.perf_counter()
    outputs = decoder.generate_batch(**inputs, batch_size=batch_size, on_tokens=on_tokens, max_new_tokens=max_new)
    seconds, steal = time.perf_counter() - start, steal_percent(ticks, cpu_ticks())
    tokens = sum(len(o.token_ids) for o in outputs)
    prefill_seconds = sum(o.metrics.prefill_seconds for o in outputs)
    decode = sum(max(0, len(o.token_ids) - 1) for o in outputs) / max(seconds - prefill_seconds, 1e-9)
    return BatchRun(tokens / seconds, decode, first_token, gaps, [o.token_ids for o in outputs], [o.metrics for o in outputs],
                    steal)


def _mean_steal(runs: list[BatchRun]) -> float | None:
    """The mean CPU steal of a method's runs (None if unknown)."""
    steals = [run.steal for run in runs]
    return None if None in steals else statistics.fmean(steals)


def _median(repeats: list[BatchRun]) -> BatchRun:
    """The repeat of median throughput."""
    return sorted(repeats, key=lambda r: r.tokens_per_second)[len(repeats) // 2]


def paired_ratios(runs: list[BatchRun], ar_runs: list[BatchRun]) -> list[float]:
    """A method's throughput over `ar`'s in the same repeat, per repeat."""
    return [r.tokens_per_second / a.tokens_per_second for r, a in zip(runs, ar_runs, strict=True)]


def paired_speedup(runs: list[BatchRun], ar_runs: list[BatchRun]) -> float:
    """The median over repeats of a method's throughput over `ar`'s in the same repeat."""
    return statistics.median(paired_ratios(runs, ar_runs))


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
        f"{'greedy' if s['greedy'] else 'sampling'}, median of {s['repeats']} repeats (speedups: of ratios within a repeat); configs {', '.join(s['configs'])}"
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
