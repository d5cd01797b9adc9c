"""The `specdec` command line (the measuring commands are in specdec/cli_measure.py). Heavy modules (torch,
transformers) are imported inside commands."""

from __future__ import annotations

import json
import logging
import sys

import click

from specdec.errors import SpecdecError

OVERRIDE_HELP = "override a config key, e.g. -o strategy.k=6 (repeatable)"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="specdec")
@click.option("--debug", is_flag=True, help="show tracebacks and debug logs")
def cli(debug: bool) -> None:
    """Lossless speculative decoding with pluggable strategies and backends."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not debug:  # our own one-line errors say what failed; keep library chatter out
        from huggingface_hub.utils import logging as hub_logging
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        hub_logging.set_verbosity_error()


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--prompt", help="prompt text (needs a tokenizer)")
@click.option("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
@click.option("--chat", is_flag=True, help="send --prompt as a user message through the tokenizer's chat template")
@click.option("--max-new-tokens", type=int, help="overrides generation.max_new_tokens")
@click.option("-o", "--override", "overrides", multiple=True, metavar="KEY=VALUE", help=OVERRIDE_HELP)
@click.option("--json", "as_json", is_flag=True, help='print one JSON object {"text", "token_ids", "metrics"}')
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False),
              help="decode the first turn of every question of a Spec-Bench JSONL file, batched; prints one JSON line each")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1), help="with --prompts: sequences per target forward")
def run(config, prompt, prompt_ids, chat, max_new_tokens, overrides, as_json, prompts_file, batch_size):
    """Generate a continuation of a prompt (or of every prompt in a file) with the models and strategy of CONFIG."""
    from specdec.config import load_config
    from specdec.decoder import SpeculativeDecoder

    if sum(x is not None for x in (prompt, prompt_ids, prompts_file)) != 1:
        raise click.UsageError("give exactly one of --prompt TEXT, --prompt-ids 1,2,3 or --prompts FILE")
    if chat and prompt is None and prompts_file is None:
        raise click.UsageError("--chat takes the user message as --prompt TEXT (or the questions of --prompts FILE)")
    overrides = list(overrides)
    if max_new_tokens is not None:
        overrides.append(f"generation.max_new_tokens={max_new_tokens}")
    cfg = load_config(config, overrides)
    decoder = SpeculativeDecoder.from_config(cfg)
    if prompts_file is not None:
        _run_batch(decoder, prompts_file, chat, batch_size)
        return
    source = prompt if prompt is not None else _parse_ids(prompt_ids)
    stream = None if as_json or decoder.tokenizer is None else _TextStream(decoder.tokenizer)
    if chat:
        out = decoder.generate(messages=[{"role": "user", "content": prompt}], on_tokens=stream)
    else:
        out = decoder.generate(source, on_tokens=stream)
    if as_json:
        click.echo(json.dumps({"text": out.text, "token_ids": out.token_ids, "metrics": out.metrics.to_dict()}))
        return
    if stream is None:
        click.echo(" ".join(map(str, out.token_ids)))
    else:
        click.echo()
    m = out.metrics
    click.echo(
        f"{m.new_tokens} tokens in {m.total_seconds:.2f} s ({m.tokens_per_second:.1f} tok/s); "
        f"mean accepted length {m.mean_accepted_length:.2f}; {m.target_forwards} target forwards, "
        f"{m.draft_forwards} draft forwards"
        + (f"; acceptance by draft position {' '.join(f'{a:.2f}' for a in m.acceptance_by_depth)}" if m.acceptance_by_depth else ""),
        err=True,
    )


def _run_batch(decoder, prompts_file: str, chat: bool, batch_size: int) -> None:
    import time

    from specdec.bench.prompts import load_questions

    questions = load_questions(prompts_file)
    first_turns = [q.turns[0] for q in questions]
    start = time.perf_counter()
    if chat:
        outputs = decoder.generate_batch(messages=[[{"role": "user", "content": t}] for t in first_turns], batch_size=batch_size)
    else:
        outputs = decoder.generate_batch(first_turns, batch_size=batch_size)
    seconds = time.perf_counter() - start
    for question, out in zip(questions, outputs):
        click.echo(json.dumps({"question_id": question.question_id, "text": out.text, "token_ids": out.token_ids,
                               "metrics": out.metrics.to_dict()}))
    tokens = sum(o.metrics.new_tokens for o in outputs)
    click.echo(f"{len(outputs)} prompts, {tokens} tokens in {seconds:.2f} s ({tokens / seconds:.1f} tok/s in all), "
               f"batch size {batch_size}", err=True)


class _TextStream:
    """Prints the text of each new block as it arrives (decoding the whole output each time keeps
    multi-token characters intact)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.printed = 0

    def __call__(self, block: list[int]) -> None:
        self.tokens.extend(block)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return
        click.echo(text[self.printed :], nl=False)
        sys.stdout.flush()
        self.printed = len(text)


def _parse_ids(value: str) -> list[int]:
    try:
        return [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers", param_hint="--prompt-ids")


def _layer_list(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    if value.strip().lower() == "none":
        return ()
    try:
        return tuple(int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of layer indices (e.g. 2,15,27) or none") from None


@cli.command()
@click.argument("model", required=False)
@click.option("--format", "fmt", type=click.Choice(["onnx", "tensorrt"]), default="onnx", show_default=True,
              help="onnx: a graph with a dynamic tree-mask input; tensorrt: that graph plus an engine for this GPU")
@click.option("--out", type=click.Path(file_okay=False), help="output folder (must not exist or be empty)")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="weights and activations "
              "[default: float32 for onnx, float16 for tensorrt; bfloat16 is for tensorrt only]")
@click.option("--opset", type=int, help="ONNX opset (default: the exporter's)")
@click.option("--max-nodes", default=64, show_default=True, type=click.IntRange(1), help="tensorrt: largest verified tree")
@click.option("--max-context", type=click.IntRange(2), help="tensorrt: largest cache (default: the model's context)")
@click.option("--prefill-chunk", default=256, show_default=True, type=click.IntRange(1), help="tensorrt: prompt tokens per prefill forward")
@click.option("--max-batch", default=1, show_default=True, type=click.IntRange(1),
              help="tensorrt: most rows of a batched forward (batched decoding, specdec serve)")
@click.option("--validate", is_flag=True, help="check the export against PyTorch afterwards (tensorrt: then greedy decoding on the engine)")
@click.option("--check", "check_dir", type=click.Path(file_okay=False), help="only check an existing ONNX export folder")
@click.option("--feature-layers", callback=lambda ctx, param, value: _layer_list(value),
              help="onnx: decoder layers whose inputs the graph also returns, for EAGLE-3 drafts, e.g. 2,15,27, "
                   "or none [default: EAGLE-3's 2, N//2, N-3]")
@click.option("--weights", type=click.Choice(["auto", "float", "int4", "int8"]), default="auto", show_default=True,
              help="onnx: auto keeps a .gguf file's quantized weights quantized (MatMulNBits); float dequantizes every "
                   "weight; int4 / int8 quantize float weights per block (the target becomes that quantized model)")
@click.option("--activations", type=click.Choice(["float32", "int8"]), default="float32", show_default=True,
              help="onnx, quantized weights: int8 quantizes activations per block inside each product (faster; other numbers)")
def export(model, fmt, out, dtype, opset, max_nodes, max_context, prefill_chunk, max_batch, validate, check_dir,
           feature_layers, weights, activations):
    """Export MODEL (a local folder or hub id) to a graph with a dynamic tree-mask input."""
    from pathlib import Path

    from specdec.export.onnx import check_export, check_summary, export_onnx, worst_case

    if fmt == "tensorrt":
        from specdec.export.tensorrt import export_tensorrt

        if not model or not out:
            raise click.UsageError("give MODEL and --out DIR")
        engine = export_tensorrt(model, Path(out), dtype or "float16", opset, max_nodes, max_context, prefill_chunk,
                                 validate, report=click.echo, max_batch=max_batch)
        click.echo(f"exported {model} to {out} (engine {engine})", err=True)
        return
    if dtype == "bfloat16":
        raise click.UsageError("--dtype bfloat16 is for --format tensorrt (onnxruntime's CPU provider has no bfloat16 kernels)")
    if check_dir is None:
        if not model or not out:
            raise click.UsageError("give MODEL and --out DIR (or --check DIR to validate an export)")
        export_onnx(model, Path(out), dtype or "float32", opset, feature_layers, weights, activations)
        click.echo(f"exported {model} to {out}", err=True)
        if not validate:
            return
    folder = Path(check_dir or out)
    result = check_export(folder, model if check_dir else None)
    click.echo(check_summary(result))
    if not result["ok"]:
        raise SpecdecError(f"the export does not match PyTorch within tolerance ({worst_case(result)}); it is kept in {folder} "
                           "for inspection: delete it before using or exporting again")


@cli.command()
@click.argument("target")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="folder for the draft (must not exist or be empty)")
@click.option("--prompts", type=click.Path(dir_okay=False), help="instructions: a text file, one per line, or Spec-Bench JSONL (default: seeds shipped with specdec)")
@click.option("--limit", type=click.IntRange(1), help="use only the first N prompts")
@click.option("--head", "head", type=click.Choice(["layers", "eagle3"]), default="layers", show_default=True,
              help="layers: a small model of the target's architecture; eagle3: an EAGLE-3 head reading the target's features")
@click.option("--ttt-steps", default=3, show_default=True, type=click.IntRange(1), help="eagle3: draft steps unrolled per position in training")
@click.option("--layers", default=2, show_default=True, type=click.IntRange(1), help="draft depth (the target's first layers are copied)")
@click.option("--init", type=click.Choice(["target", "random"]), default="target", show_default=True, help="copy the target's first layers, or start them fresh")
@click.option("--draft-vocab", default=10240, show_default=True, type=click.IntRange(0), help="tokens in the draft's head (0 = full vocabulary)")
@click.option("--train-minutes", default=30.0, show_default=True, type=click.FloatRange(0), help="training time budget")
@click.option("--max-steps", type=click.IntRange(1), help="stop training after N steps if the time budget lasts that long")
@click.option("--max-answer-tokens", default=192, show_default=True, type=click.IntRange(1), help="length of each target answer")
@click.option("--sampled-answers", default=1, show_default=True, type=click.IntRange(0), help="sampled answers per training prompt, besides the greedy one")
@click.option("--lr", default=5e-4, show_default=True, type=click.FloatRange(0, min_open=True), help="peak learning rate")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N")
@click.option("--seed", default=0, show_default=True, type=int)
def distill(target, out, prompts, limit, head, ttt_steps, layers, init, draft_vocab, train_minutes, max_steps,
            max_answer_tokens, sampled_answers, lr, device, seed):
    """Train a small draft or an EAGLE-3 head for TARGET (a model folder, hub id or .gguf file) by
    distillation from its own answers. Interrupted runs resume from OUT.distill-work/."""
    from pathlib import Path

    from specdec.distill import DistillSettings, distill as run_distill

    settings = DistillSettings(head=head, ttt_steps=ttt_steps, prompts=prompts, limit=limit, layers=layers, init=init, draft_vocab=draft_vocab,
                               train_minutes=train_minutes, max_steps=max_steps, max_answer_tokens=max_answer_tokens,
                               sampled_answers=sampled_answers, lr=lr, device=device, seed=seed)
    summary = run_distill(target, Path(out), settings)
    click.echo(f"wrote {out}: held-out top-1 agreement {summary['heldout_top1_agreement']:.3f} "
               f"(untrained {summary['untrained_top1_agreement']:.3f}) in {summary['wall_minutes']:.1f} min", err=True)


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on (0.0.0.0: every interface)")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1), help="sequences decoded together")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1), help="requests waiting for a row; more get 503")
@click.option("--api-key", envvar="SPECDEC_API_KEY", help="require Authorization: Bearer KEY on /v1/* (or set SPECDEC_API_KEY)")
@click.option("--timeout", default=300.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="seconds a request may take, queueing included")
@click.option("--max-body", default=1_000_000, show_default=True, type=click.IntRange(1), help="largest request body, bytes")
@click.option("-o", "--override", "overrides", multiple=True, metavar="KEY=VALUE", help=OVERRIDE_HELP)
def serve(config, host, port, max_batch, max_queue, api_key, timeout, max_body, overrides):
    """Serve CONFIG over an OpenAI-compatible HTTP API (chat, completions, streaming, /metrics)."""
    import signal
    from pathlib import Path

    try:
        import uvicorn

        from specdec.serve.app import ServeSettings, create_app
    except ImportError as error:
        raise SpecdecError(f"specdec serve needs the [serve] extra ({error.name} is missing): pip install 'specdec[serve]'") from None
    from specdec.config import load_config
    from specdec.decoder import SpeculativeDecoder

    api_key = api_key or None  # an empty SPECDEC_API_KEY: no key
    decoder = SpeculativeDecoder.from_config(load_config(config, list(overrides)))
    name = Path(config).stem
    app = create_app(decoder, name, ServeSettings(max_batch, max_queue, api_key, timeout, max_body))
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo(f"warning: listening on {host} without --api-key: anyone who reaches it can use the model", err=True)
    click.echo(f"serving {name!r} on http://{host}:{port}/v1 (batch {max_batch}, queue {max_queue})", err=True)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again for the handler it
    # found: a no-op one makes that end an exit with status 0
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=int(timeout) + 5)


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="print the list as JSON")
def plugins_command(as_json):
    """List loaded plugins (built-in and installed), their versions and hooks."""
    from specdec.plugins import describe_plugins

    rows = describe_plugins()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        provides = ", ".join(f"{kind} {', '.join(row[kind])}" for kind in ("strategies", "backends") if row[kind])
        click.echo(f"{row['name']} ({row['distribution']} {row['version'] or '-'}): hooks {', '.join(row['hooks'])}"
                   + (f"; {provides}" if provides else ""))


@cli.group()
def config():
    """Inspect configs."""


@config.command("show")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("-o", "--override", "overrides", multiple=True, metavar="KEY=VALUE", help=OVERRIDE_HELP)
def config_show(path, overrides):
    """Print the resolved config of PATH, defaults included."""
    import yaml

    from specdec.config import load_config

    click.echo(yaml.safe_dump(load_config(path, list(overrides)).to_dict(), sort_keys=False), nl=False)


@config.command("schema")
def config_schema():
    """Print the JSON schema of configs (every registered strategy and backend)."""
    from specdec.schema import config_schema as build

    click.echo(json.dumps(build(), indent=2))


from specdec import cli_measure  # noqa: E402,F401 (registers bench, analyze, profile, calibrate)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        from specdec.plugins import get_plugin_manager

        get_plugin_manager().hook.register_commands(cli=cli)
        cli.main(args=args, prog_name="specdec", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        hint = " (see --help)" if isinstance(exc, click.UsageError) else ""
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except SpecdecError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
