"""`specdec bench`, `analyze`, `profile` and `calibrate`: the commands that measure. They register
on the `specdec` group (specdec/cli.py), which imports this module."""

from __future__ import annotations

import json

import click

from specdec.cli import OVERRIDE_HELP, cli
from specdec.errors import SpecdecError


@cli.command()
@click.argument("configs", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--prompts", type=click.Path(dir_okay=False), help="Spec-Bench question JSONL (default: benchmarks/prompts/code.jsonl)")
@click.option("--baselines", default="ar,hf,hf-assisted,hf-prompt-lookup", show_default=True,
              help="comma-separated baselines over the first config's models ('ar' is always run); also llama-cpp "
                   "(plain llama.cpp on the first config's .gguf target; pip install 'specdec[llamacpp]')")
@click.option("--out", default="out/bench", show_default=True, type=click.Path(file_okay=False), help="output folder")
@click.option("-o", "--override", "overrides", multiple=True, metavar="KEY=VALUE",
              help="override a key of every config; a list value sweeps it, e.g. -o strategy.max_nodes=[8,16,32]")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1), help="timed repeats (the median is reported)")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0), help="untimed runs per method first")
@click.option("--max-new-tokens", type=click.IntRange(1), help="overrides generation.max_new_tokens")
@click.option("--limit", type=click.IntRange(1), help="use only the first N prompts")
@click.option("--chat", is_flag=True, help="send each turn as a user message through the target's chat template")
@click.option("--batch-size", "batch_sizes", help="comma-separated batch sizes, e.g. 1,4,8: decode every prompt's first "
              "turn at once, batched, and report aggregate throughput and latency (with --baselines ar)")
@click.option("--server", metavar="URL", help="load a running OpenAI-compatible server instead (no CONFIGS), e.g. http://127.0.0.1:8000")
@click.option("--concurrency", default="1,4,8,16", show_default=True, help="with --server: comma-separated client counts")
@click.option("--api-key", envvar="SPECDEC_API_KEY", help="with --server: its key (or set SPECDEC_API_KEY)")
def bench(configs, prompts, baselines, out, overrides, repeats, warmup, max_new_tokens, limit, chat, batch_sizes, server,
          concurrency, api_key):
    """Time CONFIGS against the baselines on a prompt set (or load a server); write reports to --out."""
    from pathlib import Path

    from specdec.bench.report import markdown, summarise, write_outputs
    from specdec.bench.runner import BenchSettings, run_bench

    if (server is None) == (not configs):
        raise click.UsageError("give CONFIGS to time, or --server URL to load a running server (not both)")
    if server is not None:
        _bench_server(server, api_key, prompts, chat, limit, max_new_tokens, _numbers(concurrency, "--concurrency"), Path(out))
        return

    settings = BenchSettings(
        list(configs), list(overrides), prompts, [b.strip() for b in baselines.split(",") if b.strip()],
        repeats, warmup, max_new_tokens, limit, chat,
    )
    if batch_sizes is not None:
        _bench_batched(settings, _numbers(batch_sizes, "--batch-size"), Path(out))
        return
    result = run_bench(settings)
    report = summarise(result)
    write_outputs(result, report, Path(out))
    click.echo(markdown(report), nl=False)
    click.echo(f"wrote {out}/: results.jsonl, report.json, report.md, speedup.png, acceptance.png", err=True)
    bad = [r["name"] for r in report["runs"] if r["outputs_match_ar"] is False and r["expected_to_match_ar"]]
    if bad:
        raise SpecdecError(f"greedy outputs differ from ar for: {', '.join(bad)} (see report.json)")


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--prompts", type=click.Path(dir_okay=False), help="Spec-Bench question JSONL (default: benchmarks/prompts/code.jsonl)")
@click.option("--chat", is_flag=True, help="send each turn as a user message through the target's chat template")
@click.option("--limit", type=click.IntRange(1), help="use only the first N prompts")
@click.option("--max-new-tokens", type=click.IntRange(1), help="overrides generation.max_new_tokens")
@click.option("-o", "--override", "overrides", multiple=True, metavar="KEY=VALUE",
              help="override a config key; a list value sweeps it, e.g. -o strategy.max_out_degree=[2,4,8]")
@click.option("--temperatures", default="0,0.6", show_default=True, help="comma-separated temperatures to run at")
@click.option("--windows", default="0,1,2,3", show_default=True,
              help="comma-separated n-gram windows w (preceding tokens) for the re-occurring n-gram share")
@click.option("--bins", default=10, show_default=True, type=click.IntRange(1, 100), help="draft probability bins")
@click.option("--out", default="out/analyze", show_default=True, type=click.Path(file_okay=False), help="output folder")
def analyze(config, prompts, chat, limit, max_new_tokens, overrides, temperatures, windows, bins, out):
    """Measure what GSD's and DySpec's papers measure: re-occurring n-grams, merged share, and
    acceptance by draft probability, per step of CONFIG's generations."""
    from pathlib import Path

    from specdec.bench.analyze import AnalyzeSettings, analyze, markdown, write_outputs

    settings = AnalyzeSettings(config, list(overrides), prompts, limit, max_new_tokens, chat,
                               _numbers(temperatures, "--temperatures", float, 0), _numbers(windows, "--windows", int, 0), bins)
    report = analyze(settings)
    written = write_outputs(report, Path(out))
    click.echo(markdown(report), nl=False)
    click.echo(f"wrote {out}/: {', '.join(written)}", err=True)


def _numbers(value: str, name: str, kind=int, least: float = 1):
    """A comma-separated list of numbers, each >= `least` (a one-line error otherwise)."""
    what = "whole numbers" if kind is int else "numbers"
    try:
        numbers = [kind(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated {what}, e.g. 1,4,16; got {value!r}", param_hint=name) from None
    if not numbers or min(numbers) < least:
        raise click.BadParameter(f"expected {what} >= {least:g}; got {value!r}", param_hint=name)
    return numbers


def _bench_server(url, api_key, prompts, chat, limit, max_new_tokens, levels, out) -> None:
    from specdec.bench.prompts import load_questions
    from specdec.bench.server import markdown, run_server_bench

    turns = [q.turns[0] for q in load_questions(prompts, limit)]
    report = run_server_bench(url, api_key or None, turns, chat, max_new_tokens or 128, levels)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    click.echo(markdown(report), nl=False)
    click.echo(f"wrote {out}/: report.json, report.md", err=True)
    failed = [r for r in report["runs"] if r["errors"]]
    if failed:
        raise SpecdecError(f"{failed[0]['errors']} requests failed at concurrency {failed[0]['concurrency']}: {failed[0]['first_error']}")


def _bench_batched(settings, sizes: list[int], out) -> None:
    from specdec.bench.batched import markdown, run_batched

    report = run_batched(settings, sizes)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    click.echo(markdown(report), nl=False)
    click.echo(f"wrote {out}/: report.json, report.md", err=True)
    bad = sorted({f"{r['name']} at batch {r['batch_size']}" for r in report["runs"] if r["outputs_match_ar"] is False})
    if bad:
        raise SpecdecError(f"greedy outputs differ from ar for: {', '.join(bad)} (see report.json)")


def _models(config, which: str):
    """[(role, spec, backend)] of a config's target and draft (`which`: target, draft or both)."""
    from specdec.decoder import load_backend

    roles = [("target", config.target), ("draft", config.draft)]
    roles = [(r, spec) for r, spec in roles if spec is not None and which in (r, "both")]
    if not roles:
        raise SpecdecError(f"the config has no {which} model")
    from specdec.eagle3 import head_folder

    head = config.draft is not None and which != "target" and head_folder(config.draft.model) is not None
    target = load_backend(config.target) if head else None  # an EAGLE-3 head is loaded on its target
    loaded = {"target": target} if target is not None else {}
    return [(role, spec, loaded.get(role) or load_backend(spec, target)) for role, spec in roles]


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--queries", default="1,2,4,8,16,32,64", show_default=True, help="query sizes Q (tree nodes per forward)")
@click.option("--contexts", default="256,2048", show_default=True, help="cached entries before the forward")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(1), help="timed forwards per point (median)")
@click.option("--breakdown", "breakdown_q", default=16, show_default=True, type=click.IntRange(0),
              help="Q of the operator breakdown (0: none)")
@click.option("--model", "which", type=click.Choice(["target", "draft", "both"]), default="both", show_default=True)
@click.option("-o", "--override", "overrides", multiple=True, metavar="KEY=VALUE", help=OVERRIDE_HELP)
def profile(config, queries, contexts, repeats, breakdown_q, which, overrides):
    """Print t(Q) and t(Q)/t(1) of CONFIG's models and where a forward's time goes."""
    from specdec.config import load_config
    from specdec.costs import measure_curve
    from specdec.profile import breakdown, breakdown_table, curve_table

    queries, contexts = _numbers(queries, "--queries"), _numbers(contexts, "--contexts")
    for role, spec, backend in _models(load_config(config, list(overrides)), which):
        click.echo(f"{role}: {spec.model} on {spec.backend} ({backend.device})")
        click.echo(curve_table(measure_curve(backend, queries, contexts, repeats)))
        if breakdown_q:
            context = min(contexts[0], backend.max_length - breakdown_q)
            found = breakdown(backend, breakdown_q, context, repeats)
            if found is None:
                click.echo(f"  (the {spec.backend} backend has no operator profiler)")
            else:
                wall, rows = found
                click.echo(f"  where the time goes, Q={breakdown_q} over {context} cached ({wall * 1e3:.1f} ms per forward under the profiler):")
                click.echo(breakdown_table(wall, rows))


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--refresh", is_flag=True, help="measure again even when a cached calibration exists")
@click.option("--batch-size", type=click.IntRange(1), help="also the batched surfaces t(B, Q) of the target and a draft model, B up to this")
@click.option("--plot", type=click.Path(dir_okay=False), help="also draw the curves into this PNG (needs matplotlib)")
@click.option("-o", "--override", "overrides", multiple=True, metavar="KEY=VALUE", help=OVERRIDE_HELP)
def calibrate(config, refresh, batch_size, plot, overrides):
    """Measure (or show the cached) forward cost curves that `auto` budgets plan with."""
    from specdec.batch import draft_model
    from specdec.config import load_config
    from specdec.costs import curve_path, load_or_measure, load_or_measure_surface
    from specdec.profile import curve_table, surface_table

    curves, surface = [], None
    for role, spec, backend in _models(load_config(config, list(overrides)), "both"):
        curve = load_or_measure(spec, backend, refresh)
        curves.append((role, spec, curve))
        click.echo(f"{role}: {spec.model} on {spec.backend} ({backend.device}); cached in {curve_path(spec, backend)}")
        click.echo(curve_table(curve))
        rows_of = backend if role == "target" else draft_model(backend)
        if batch_size and rows_of is not None:
            measured = load_or_measure_surface(spec, rows_of, batch_size, refresh)
            click.echo(f"{role}, batched: cached in {curve_path(spec, rows_of, 'rows')}")
            click.echo(surface_table(measured))
            surface = measured if role == "target" else surface
    if plot:
        _plot_curves(curves, surface, plot)
        click.echo(f"wrote {plot}", err=True)


def _plot_curves(curves, surface, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SpecdecError("--plot needs matplotlib: pip install 'specdec[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(curves) + (surface is not None)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
    for ax, (role, spec, curve) in zip(axes[0], curves):
        for context, row in zip(curve.contexts, curve.seconds):
            ax.plot(curve.queries, [t * 1e3 for t in row], marker="o", label=f"{context} cached")
        ax.set(title=f"{role} ({spec.backend})", xlabel="entries per forward (Q)", ylabel="t(Q), ms", xscale="log")
        ax.legend()
    if surface is not None:
        ax = axes[0][-1]
        for rows, curve in zip(surface.rows, surface.curves):
            ax.plot(curve.queries, [t * 1e3 for t in curve.seconds[0]], marker="o", label=f"B = {rows}")
        ax.set(title=f"target, batched, {surface.curves[0].contexts[0]} cached", xlabel="entries per row (Q)",
               ylabel="t(B, Q), ms", xscale="log", yscale="log")
        ax.legend()
    fig.tight_layout()
    tmp = f"{path}.partial.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    import os

    os.replace(tmp, path)
