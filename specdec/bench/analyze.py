"""`specdec analyze`: the measurements behind GSD's and DySpec's central claims, from any config.

Every verified step is recorded (the draft tree's tokens, parents and node probabilities, and the
verdict's path) and measured:
- re-occurring n-grams (GSD, its Figure 3): the share of drafted nodes whose token and `w`
  preceding tokens (along its path, then the context before the root) also end another drafted
  node of the same tree, for each window w;
- merged share (GSD): accepted tokens that came through merged DAG edges, over all accepted tokens;
- DAG nodes per step: distinct nodes drafted; unrolled nodes minus DAG nodes were never fed to the draft;
- calibration (DySpec): tested nodes binned by draft probability, and the share accepted per bin.
  A node is tested when its parent was accepted. Greedy verification tests every such child (only
  the target's argmax can pass); sampling verification visits children in order and stops at the
  accepted one, so later siblings were never tested and are left out.

A `gsd` config at temperature 0 also runs with merging off ("merge off") and with merging and
pruning off ("unpruned"): the n-gram share is measured on the trees merging acts on, before and
after pruning, and "merge off" gives the draft forwards and nodes that merging saves.

Example: root ─ a ─ x ─ y and root ─ b ─ x ─ y. At w = 0 the four nodes x, x, y, y re-occur (4 of
6 drafted nodes); at w = 1 the two y (key x y) do (2 of 6); at w = 2 none do (a x y, b x y).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from specdec.bench.methods import expand_sweeps, speculative
from specdec.bench.prompts import load_questions, prompt_file_name
from specdec.bench.report import device_description, machine_lines, merge_metrics, versions
from specdec.bench.runner import BenchSettings, build_decoders, conversation
from specdec.config import load_config
from specdec.strategies.base import Strategy
from specdec.tree import DraftTree, Verdict

logger = logging.getLogger(__name__)

GSD_VARIANTS = {  # name suffix -> overrides, for a gsd config at temperature 0
    "merge off": ["strategy.merge=false"],
    "unpruned": ["strategy.merge=false", "strategy.prob_threshold=0", "strategy.sibling_threshold=0"],
}


@dataclass
class Step:
    """What one verified step leaves for analysis (the draft tree without its [N, V] proposals)."""

    context: list[int]  # tokens before the root, newest last
    tokens: list[int]  # [N] the draft tree, node 0 the root
    parents: list[int]  # [N]
    node_probs: list[float]  # [N] draft probability of each node's token (nan: unknown)
    merged: list[bool]  # [N] reached through a merged DAG edge
    fixed: list[bool]  # [N] chosen from the context, not drawn (verified first)
    dag_nodes: int  # distinct draft nodes drafted, the root excluded
    path: list[int]  # the verdict: root, then the accepted nodes
    greedy: bool

    @classmethod
    def of(cls, tree: DraftTree, verdict: Verdict, context: list[int], greedy: bool) -> Step:
        n = len(tree)
        probs = tree.node_probs_of().tolist() if tree.node_probs_of is not None else [math.nan] * n
        dag = len(set(tree.dag_node.tolist())) - 1 if tree.dag_node is not None else n - 1
        return cls(context, tree.tokens.tolist(), tree.parents.tolist(), probs, tree.merged or [False] * n,
                   tree.fixed or [False] * n, dag, list(verdict.path), greedy)

    def children(self) -> list[list[int]]:
        kids: list[list[int]] = [[] for _ in self.tokens]
        for node, parent in enumerate(self.parents[1:], start=1):
            kids[parent].append(node)
        return kids


def ngram_keys(step: Step, window: int) -> list[tuple[int, ...]]:
    """[N] each node's token preceded by the `window` tokens before it (its path, then the context)."""
    keys = []
    for node, token in enumerate(step.tokens):
        tail, cur = [], step.parents[node]
        while cur >= 0 and len(tail) < window:
            tail.append(step.tokens[cur])
            cur = step.parents[cur]
        tail += step.context[::-1][: window - len(tail)]
        keys.append(tuple(tail[::-1]) + (token,))
    return keys


def reoccurring(step: Step, window: int) -> int:
    """Drafted nodes whose (window + 1)-gram also ends another drafted node of the tree."""
    keys = ngram_keys(step, window)[1:]
    counts = Counter(keys)
    return sum(counts[key] > 1 for key in keys)


def checked_nodes(step: Step) -> list[tuple[int, bool]]:
    """(node, accepted) for every node the verifier tested (see the module docstring)."""
    kids, out = step.children(), []
    for i, node in enumerate(step.path):
        accepted = step.path[i + 1] if i + 1 < len(step.path) else None
        for kid in sorted(kids[node], key=lambda k: not step.fixed[k]):  # the verifier's order
            out.append((kid, kid == accepted))
            if kid == accepted and not step.greedy:
                break
    return out


@dataclass
class Bin:
    low: float
    high: float
    tested: int = 0
    accepted: int = 0
    prob_sum: float = 0.0

    @property
    def rate(self) -> float | None:
        return self.accepted / self.tested if self.tested else None

    @property
    def mean_prob(self) -> float | None:
        return self.prob_sum / self.tested if self.tested else None


def calibration(steps: list[Step], bins: int) -> list[Bin]:
    """Tested nodes with a known draft probability, in `bins` equal-width bins over [0, 1]."""
    out = [Bin(b / bins, (b + 1) / bins) for b in range(bins)]
    for step in steps:
        for node, accepted in checked_nodes(step):
            prob = step.node_probs[node]
            if math.isnan(prob):
                continue
            cell = out[min(int(prob * bins), bins - 1)]
            cell.tested += 1
            cell.accepted += accepted
            cell.prob_sum += prob
    return out


@dataclass
class RunAnalysis:
    name: str
    temperature: float
    strategy: str
    steps: int
    new_tokens: int
    tau: float  # mean accepted length, bonus included
    nodes_per_step: float  # unrolled draft nodes verified
    dag_nodes_per_step: float  # distinct draft nodes drafted
    draft_forwards_per_step: float
    merged_share: float  # of accepted tokens
    reoccurring_share: dict[int, float]  # window -> share of drafted nodes
    calibration: list[dict] = field(default_factory=list)


def summarise(name: str, temperature: float, strategy: str, steps: list[Step], metrics, windows: list[int],
              bins: int) -> RunAnalysis:
    drafted = sum(len(s.tokens) - 1 for s in steps)
    accepted = sum(len(s.path) - 1 for s in steps)
    merged = sum(s.merged[n] for s in steps for n in s.path[1:])
    total_steps = metrics.steps or 1
    return RunAnalysis(
        name, temperature, strategy, metrics.steps, metrics.new_tokens, metrics.mean_accepted_length,
        metrics.drafted_nodes / total_steps, metrics.dag_nodes / total_steps, metrics.draft_forwards / total_steps,
        merged / accepted if accepted else 0.0,
        {w: (sum(reoccurring(s, w) for s in steps) / drafted if drafted else 0.0) for w in windows},
        [{**asdict(b), "rate": b.rate, "mean_prob": b.mean_prob} for b in calibration(steps, bins)],
    )


def record(strategy: Strategy, steps: list[Step], window: int, greedy: bool) -> None:
    """Make `strategy` append a Step for every drafted step it proposes and is told the verdict of."""
    propose, update = strategy.propose, strategy.update
    contexts: dict[int, list[int]] = {}

    def recorded_propose(draft, ctx):
        tree = propose(draft, ctx)
        contexts[id(tree)] = ctx.tokens[max(0, len(ctx.tokens) - 1 - window):-1]
        return tree

    def recorded_update(verdict, tree):
        context = contexts.pop(id(tree), None)
        if context is not None and len(tree) > 1:
            steps.append(Step.of(tree, verdict, context, greedy))
        update(verdict, tree)

    strategy.propose, strategy.update = recorded_propose, recorded_update


@dataclass
class AnalyzeSettings:
    config: str
    overrides: list[str] = field(default_factory=list)
    prompts: str | None = None
    limit: int | None = None
    max_new_tokens: int | None = None
    chat: bool = False
    temperatures: list[float] = field(default_factory=lambda: [0.0, 0.6])
    windows: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    bins: int = 10


def analyze(settings: AnalyzeSettings) -> dict:
    questions = load_questions(settings.prompts, settings.limit)
    first_point = expand_sweeps(settings.config, settings.overrides)[0][1]
    is_gsd = load_config(settings.config, first_point).strategy.name == "gsd"
    loaded: dict = {}
    runs = []
    for temperature in settings.temperatures:
        variants = {"": []}
        if is_gsd and temperature == 0.0:
            variants.update(GSD_VARIANTS)
        for suffix, extra in variants.items():
            overrides = settings.overrides + extra + [f"generation.temperature={temperature}"]
            bench = BenchSettings([settings.config], overrides, max_new_tokens=settings.max_new_tokens)
            decoders, config = build_decoders(bench, loaded)
            max_new = settings.max_new_tokens or config.generation.max_new_tokens
            for name, decoder in decoders:
                steps: list[Step] = []
                record(decoder.strategy, steps, max(settings.windows, default=0), temperature == 0.0)
                method = speculative(name, decoder)
                samples = [s for q in questions for s in conversation(method, q, decoder.tokenizer, max_new, settings.chat)]
                metrics = merge_metrics([s.metrics for s in samples])
                label = f"{name} ({suffix})" if suffix else name
                runs.append(summarise(label, temperature, decoder.strategy.name, steps, metrics, settings.windows, settings.bins))
    return {"device": device_description(), "versions": versions(), "settings": asdict(settings),
            "prompts": len(questions), "runs": [asdict(r) for r in runs]}


def markdown(report: dict) -> str:
    s = report["settings"]
    windows = s["windows"]
    lines = [
        *machine_lines(report),
        f"Settings: config `{s['config']}`" + (f", overrides {' '.join(s['overrides'])}" if s["overrides"] else "")
        + f"; {report['prompts']} prompts from `{prompt_file_name(s['prompts'])}`{' (chat)' if s['chat'] else ''}, max_new_tokens "
        f"{s['max_new_tokens'] or 'from the config'}",
        "",
        "| run | T | steps | tau | nodes/step | DAG nodes/step | draft fwd/step | merged share | "
        + " | ".join(f"re-occurring, w={w}" for w in windows) + " |",
        "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(windows),
    ]
    for r in report["runs"]:
        shares = " | ".join(f"{r['reoccurring_share'][w]:.1%}" for w in windows)
        lines.append(f"| {r['name']} | {r['temperature']:g} | {r['steps']} | {r['tau']:.2f} | {r['nodes_per_step']:.1f} | "
                     f"{r['dag_nodes_per_step']:.1f} | {r['draft_forwards_per_step']:.2f} | {r['merged_share']:.1%} | {shares} |")
    lines += ["", "Acceptance of tested nodes by draft probability (rate, tested nodes):", "",
              "| draft probability | " + " | ".join(f"{r['name']}, T={r['temperature']:g}" for r in report["runs"]) + " |",
              "|---|" + "---:|" * len(report["runs"])]
    for b in range(s["bins"]):
        cells = []
        for r in report["runs"]:
            cell = r["calibration"][b]
            cells.append("-" if cell["rate"] is None else f"{cell['rate']:.2f} ({cell['tested']})")
        first = report["runs"][0]["calibration"][b] if report["runs"] else {"low": b / s["bins"], "high": (b + 1) / s["bins"]}
        lines.append(f"| {first['low']:.1f}-{first['high']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(report: dict, out: Path) -> list[str]:
    """analysis.json, analysis.md and (with matplotlib) calibration.png and ngrams.png; each file
    is written whole or not at all. -> the names written."""
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "analysis.json", json.dumps(report, indent=2) + "\n")
    _write(out / "analysis.md", markdown(report))
    return ["analysis.json", "analysis.md"] + _plots(report, out)


def _write(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def _plots(report: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'specdec[bench]'): no plots written")
        return []
    runs = report["runs"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot([0, 1], [0, 1], ":", color="gray", label="acceptance = draft probability")
    for r in runs:
        points = [(c["mean_prob"], c["rate"]) for c in r["calibration"] if c["rate"] is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=f"{r['name']}, T={r['temperature']:g}")
    ax.set(xlabel="draft probability of the node's token", ylabel="acceptance rate of tested nodes", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7)
    ax.set_title(report["device"], fontsize=8)
    fig.tight_layout()
    _save(fig, out / "calibration.png")
    plt.close(fig)
    windows = report["settings"]["windows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        if r["temperature"] == 0.0:
            ax.plot(windows, [r["reoccurring_share"][w] for w in windows], marker="o", label=r["name"])
    ax.set(xlabel="window w (preceding tokens in the n-gram key)", ylabel="share of drafted nodes re-occurring", xticks=windows)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out / "ngrams.png")
    plt.close(fig)
    return ["calibration.png", "ngrams.png"]


def _save(fig, path: Path) -> None:
    partial = path.with_name(path.stem + ".partial.png")
    fig.savefig(partial, dpi=110)
    os.replace(partial, path)
