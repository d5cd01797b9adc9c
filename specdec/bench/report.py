"""Summaries and files of a bench run: results.jsonl (Spec-Bench answers), report.json, report.md,
speedup.png and acceptance.png."""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from specdec import __version__
from specdec.bench.prompts import prompt_file_name
from specdec.bench.runner import BenchResult
from specdec.metrics import GenerationMetrics

logger = logging.getLogger(__name__)


def summarise(result: BenchResult) -> dict:
    ar_tps = _tokens_per_second(result.samples["ar"])
    ar_tokens = _outputs(result.samples["ar"])
    runs = []
    for method in result.methods:
        samples = result.samples[method.name]
        tps = _tokens_per_second(samples)
        metrics = [s.metrics for s in _flat(samples[0]) if s.metrics is not None]
        total = merge_metrics(metrics) if metrics else None
        step = total.step_seconds if total else 0.0
        mismatches = [q for q, (a, b) in enumerate(zip(_outputs(samples), ar_tokens)) if a != b]
        runs.append({
            "name": method.name, "strategy": method.strategy, "backend": method.backend,
            "tokens_per_second": tps, "speedup_vs_ar": tps / ar_tps if ar_tps else None,
            "mean_accepted_length": total.mean_accepted_length if total else None,
            "target_forwards": total.target_forwards / len(metrics) if total else None,
            "draft_forwards_per_step": total.draft_forwards / total.steps if total and total.steps else None,
            "drafted_nodes_per_step": total.drafted_nodes / total.steps if total and total.steps else None,
            "dag_nodes_per_step": total.dag_nodes / total.steps if total and total.steps else None,
            "draft_time_share": total.draft_forward_seconds / step if step else None,
            "verify_time_share": total.target_forward_seconds / step if step else None,
            "other_time_share": total.outside_forward_share if step else None,
            "acceptance_by_depth": total.acceptance_by_depth if total else [],
            "tau_by_category": _tau_by_category(result.questions, samples[0]) if total else {},
            "merged_share": total.merged_share if total and total.merged_hits else None,
            "outputs_match_ar": (not mismatches) if result.greedy else None,
            "expected_to_match_ar": method.exact,
            "agreement_with_ar": _agreement(_outputs(samples), ar_tokens) if result.greedy else None,
            "mismatched_prompts": [result.questions[q].question_id for q in mismatches] if result.greedy else [],
        })
    return {"device": device_description(), "versions": versions(), "settings": _settings(result), "runs": runs}


def _tau_by_category(questions, per_question: list[list]) -> dict[str, float]:
    """Mean accepted length over each category's prompts (first repeat)."""
    grouped: dict[str, list[GenerationMetrics]] = {}
    for question, turns in zip(questions, per_question):
        grouped.setdefault(question.category or "-", []).extend(s.metrics for s in turns if s.metrics is not None)
    return {category: merge_metrics(metrics).mean_accepted_length for category, metrics in grouped.items() if metrics}


def _flat(per_question: list[list]) -> list:
    return [sample for turns in per_question for sample in turns]


def _tokens_per_second(repeats: list[list[list]]) -> float:
    """Median over repeats of (all new tokens / all seconds)."""
    rates = []
    for per_question in repeats:
        flat = _flat(per_question)
        rates.append(sum(len(s.token_ids) for s in flat) / sum(s.seconds for s in flat))
    return statistics.median(rates)


def _outputs(repeats) -> list[list[list[int]]]:
    return [[s.token_ids for s in turns] for turns in repeats[0]]


def _agreement(outputs: list[list[list[int]]], reference: list[list[list[int]]]) -> float:
    """The share of ar's tokens that a method's output reproduces before it first differs, over
    every prompt turn (1.0: identical). A later turn follows each method's own earlier answers."""
    matched = total = 0
    for turns, ar_turns in zip(outputs, reference):
        for tokens, ar in zip(turns, ar_turns):
            same = next((i for i, (a, b) in enumerate(zip(tokens, ar)) if a != b), min(len(tokens), len(ar)))
            matched, total = matched + same, total + len(ar)
    return matched / total if total else 1.0


def merge_metrics(metrics: list[GenerationMetrics]) -> GenerationMetrics:
    total = GenerationMetrics()
    for m in metrics:
        for name in ("new_tokens", "target_forwards", "draft_forwards", "steps", "accepted_tokens", "drafted_nodes",
                     "dag_nodes", "merged_hits", "draft_seconds", "verify_seconds", "other_seconds",
                     "draft_forward_seconds", "target_forward_seconds", "total_seconds"):
            setattr(total, name, getattr(total, name) + getattr(m, name))
        for counts, more in ((total.reached_depth, m.reached_depth), (total.accepted_depth, m.accepted_depth)):
            counts.extend([0] * (len(more) - len(counts)))
            for depth, count in enumerate(more):
                counts[depth] += count
    return total


def _settings(result: BenchResult) -> dict:
    s = result.settings
    return {"configs": s.configs, "overrides": s.overrides, "prompts": str(s.prompts or "benchmarks/prompts/code.jsonl"),
            "questions": len(result.questions), "repeats": s.repeats, "warmup": s.warmup,
            "max_new_tokens": result.max_new_tokens, "batch_size": 1, "greedy": result.greedy}


def device_description() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        model = names[0] if names else model
    return f"CPU: {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def cpu_ticks(stat: Path = Path("/proc/stat")) -> tuple[int, int] | None:
    """(steal, all) clock ticks of every CPU since boot, from /proc/stat (None where there is none):
    steal is the time the hypervisor ran other guests while this VM's cores were ready to run."""
    try:
        line = stat.read_text().split("\n", 1)[0]  # cpu user nice system idle iowait irq softirq steal ...
        ticks = [int(value) for value in line.split()[1:9]]
    except (OSError, ValueError):
        return None
    return (ticks[7], sum(ticks)) if len(ticks) == 8 else None


def steal_percent(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of the CPUs' time between two `cpu_ticks()` readings that the hypervisor stole, in %."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return 100 * (after[0] - before[0]) / (after[1] - before[1])


def versions() -> dict:
    import transformers

    return {"specdec": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def write_outputs(result: BenchResult, report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.jsonl").open("w") as handle:
        for method in result.methods:
            for question, turns in zip(result.questions, result.samples[method.name][0]):
                handle.write(json.dumps(_answer(method.name, question.question_id, turns, result.tokenizer)) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    _plots(report, out)


def _answer(model_id: str, question_id: str, turns, tokenizer) -> dict:
    return {"question_id": question_id, "model_id": model_id, "tstamp": time.time(), "choices": [{
        "index": 0, "turns": [tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in turns], "new_tokens": [len(s.token_ids) for s in turns],
        "wall_time": [s.seconds for s in turns], "accept_lengths": [s.accept_lengths for s in turns]}]}


def cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def machine_lines(report: dict) -> list[str]:
    """The device and versions lines every report starts with."""
    return [f"Device: {report['device']}  ",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + "  "]


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        *machine_lines(report),
        f"Settings: {s['questions']} prompts from `{prompt_file_name(s['prompts'])}`, max_new_tokens {s['max_new_tokens']}, "
        f"batch size 1, {'greedy' if s['greedy'] else 'sampling'}, median of {s['repeats']} interleaved repeats "
        f"after {s['warmup']} warm-up; configs {', '.join(s['configs'])}" + (f"; overrides {' '.join(s['overrides'])}" if s["overrides"] else ""),
        "",
        "| method | strategy | backend | tokens/s | speedup vs ar | tau | nodes/step | target fwd/prompt "
        "| draft fwd/step | draft share | verify share | other share | same as ar |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["runs"]:
        other = f"no: {r['agreement_with_ar']:.0%} agreement (other kernels)" if r["agreement_with_ar"] is not None else "no"
        match = {True: "yes", False: "**NO**" if r["expected_to_match_ar"] else other, None: "-"}[r["outputs_match_ar"]]
        lines.append(
            f"| {r['name']} | {r['strategy']} | {r['backend']} | {r['tokens_per_second']:.1f} | "
            f"{cell(r['speedup_vs_ar'], '.2f')}x | {cell(r['mean_accepted_length'], '.2f')} | "
            f"{cell(r['drafted_nodes_per_step'], '.1f')} | "
            f"{cell(r['target_forwards'], '.1f')} | {cell(r['draft_forwards_per_step'], '.2f')} | "
            f"{cell(r['draft_time_share'], '.0%')} | {cell(r['verify_time_share'], '.0%')} | "
            f"{cell(r['other_time_share'], '.0%')} | {match} |"
        )
    categories = sorted({c for r in report["runs"] for c in r["tau_by_category"]})
    if categories:
        lines += ["", "tau (mean accepted length) by category:", "",
                  "| method | " + " | ".join(categories) + " |", "|---|" + "---:|" * len(categories)]
        for r in report["runs"]:
            if r["tau_by_category"]:
                cells = " | ".join(cell(r["tau_by_category"].get(c), ".2f") for c in categories)
                lines.append(f"| {r['name']} | {cells} |")
    merging = [r for r in report["runs"] if r["strategy"] == "gsd"]
    if merging:
        lines += ["", "GSD merging (unrolled nodes are verified; DAG nodes are drafted):", "",
                  "| method | unrolled nodes/step | DAG nodes/step | merged share of accepted tokens |", "|---|---:|---:|---:|"]
        for r in merging:
            lines.append(f"| {r['name']} | {cell(r['drafted_nodes_per_step'], '.1f')} | "
                         f"{cell(r['dag_nodes_per_step'], '.1f')} | {cell(r['merged_share'] or 0.0, '.1%')} |")
    depth = max((len(r["acceptance_by_depth"]) for r in report["runs"]), default=0)
    if depth:
        lines += ["", "acceptance by draft position (share of steps whose tree reached position d that accepted a token there):",
                  "", "| method | " + " | ".join(str(d) for d in range(1, depth + 1)) + " |", "|---|" + "---:|" * depth]
        for r in report["runs"]:
            if r["acceptance_by_depth"]:
                cells = [cell(a, ".2f") for a in r["acceptance_by_depth"]] + ["-"] * (depth - len(r["acceptance_by_depth"]))
                lines.append(f"| {r['name']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def _plots(report: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'specdec[bench]'): no plots written")
        return
    runs = report["runs"]
    fig, ax = plt.subplots(figsize=(max(6, len(runs) * 0.9), 4))
    ax.bar(range(len(runs)), [r["speedup_vs_ar"] or 0 for r in runs], color="tab:blue")
    ax.set_ylabel("speedup vs ar (tokens/s)")
    ax.set_xticks(range(len(runs)), [r["name"] for r in runs], rotation=30, ha="right")
    tau = ax.twinx()
    tau.plot(range(len(runs)), [r["mean_accepted_length"] or float("nan") for r in runs], "o", color="tab:red")
    tau.set_ylabel("mean accepted length (tau)", color="tab:red")
    ax.set_title(report["device"], fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        if r["acceptance_by_depth"]:
            ax.plot(range(1, len(r["acceptance_by_depth"]) + 1), r["acceptance_by_depth"], marker="o", label=r["name"])
    ax.set_xlabel("depth")
    ax.set_ylabel("acceptance rate")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "acceptance.png", dpi=120)
    plt.close(fig)
