"""One-at-a-time speed of configs against `ar`, in this checkout and in a checkout of another
commit, alternating: in each repeat every checkout runs in a fresh process, which decodes the
prompts one after another (`generate_batch` with batch size 1 here; `generate` there, for a commit
from before batching with `--generate`) with `ar` and with each config, and reports each config's
tokens per second over `ar`'s in the same process. A figure is the median over repeats. Each
checkout keeps its own calibration cache (SPECDEC_CACHE_DIR), so that a commit whose calibration
differs plans with its own. Greedy outputs are checked against `ar`'s.

    git worktree add /tmp/old COMMIT
    python scripts/against_commit.py /tmp/old CONFIG [CONFIG ...] [--repeats 5] [--limit 16] [--chat --prompts FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def one_run(argv: list[str]) -> None:
    """In a checkout: decode the prompts with `ar` and each config (in `order`), print one JSON line."""
    import time

    from specdec.config import load_config, resolve
    from specdec.decoder import SpeculativeDecoder

    mode, order, prompts_file, tokens, chat, *configs = argv
    prompts = json.loads(Path(prompts_file).read_text())
    decoders = {path: SpeculativeDecoder.from_config(path) for path in configs}
    # `ar` as specdec.bench.methods.ar_decoder makes it, written out: commits from before batching
    # have neither that function nor `decoder.config`
    first, config = decoders[configs[0]], load_config(configs[0])
    raw = {**config.to_dict(), "strategy": {"name": "ar"}}
    raw.pop("draft", None)
    ar = SpeculativeDecoder.from_config(resolve(raw, config.source, Path.cwd()), target=first.target)
    ar.tokenizer = first.tokenizer
    decoders = {"ar": ar, **decoders}

    def run(decoder, items, new_tokens):
        inputs = [[{"role": "user", "content": p}] for p in items] if chat == "1" else items
        if mode == "batch":
            return decoder.generate_batch(**{"messages" if chat == "1" else "prompts": inputs}, batch_size=1,
                                          max_new_tokens=new_tokens)
        return [decoder.generate(**{"messages" if chat == "1" else "prompt": x}, max_new_tokens=new_tokens) for x in inputs]

    for decoder in decoders.values():  # warm-up (and calibration, on first use)
        run(decoder, prompts[:2], 8)
    results = {}
    items = list(decoders.items())
    for name, decoder in items if int(order) % 2 == 0 else items[::-1]:
        start = time.perf_counter()
        outputs = run(decoder, prompts, int(tokens))
        results[name] = (sum(len(o.token_ids) for o in outputs) / (time.perf_counter() - start), [o.token_ids for o in outputs])
    print(json.dumps({name: {"tps": tps, "same": ids == results["ar"][1]} for name, (tps, ids) in results.items()}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", help="a checkout of the other commit (e.g. a git worktree)")
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompts", default=None, help="Spec-Bench JSONL (default: the bench's code prompts)")
    parser.add_argument("--chat", action="store_true", help="send each prompt as a user message")
    parser.add_argument("--generate", action="store_true", help="the other checkout predates generate_batch")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from specdec.bench.prompts import load_questions

    prompts = Path(os.environ.get("TMPDIR", "/tmp")) / f"against_commit_{os.getpid()}.json"
    prompts.write_text(json.dumps([q.turns[0] for q in load_questions(args.prompts, args.limit)]))
    configs = [str(Path(c).resolve()) for c in args.configs]
    cache = Path(os.environ.get("SPECDEC_CACHE_DIR") or Path.home() / ".cache" / "specdec")
    checkouts = {"this": (HERE, "batch", cache), "other": (Path(args.other).resolve(), "generate" if args.generate else "batch",
                                                           cache.parent / (cache.name + "-other"))}
    ratios: dict[str, dict[str, list[float]]] = {name: {} for name in checkouts}
    for repeat in range(args.repeats):
        for name in list(checkouts)[:: 1 if repeat % 2 == 0 else -1]:
            root, mode, own_cache = checkouts[name]
            env = dict(os.environ, PYTHONPATH=str(root), SPECDEC_CACHE_DIR=str(own_cache))
            command = [sys.executable, str(Path(__file__).resolve()), "--one-run", mode, str(repeat), str(prompts),
                       str(args.max_new_tokens), "1" if args.chat else "0", *configs]
            done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
            if done.returncode:
                sys.stderr.write(done.stderr[-3000:])
                return 1
            result = json.loads(done.stdout.strip().splitlines()[-1])
            for config, figures in result.items():
                if not figures["same"]:
                    print(f"{name} {config}: output differs from ar's", file=sys.stderr)
                    return 1
                ratios[name].setdefault(config, []).append(figures["tps"] / result["ar"]["tps"])
            print(repeat, name, {Path(c).stem: round(r[-1], 3) for c, r in ratios[name].items()},
                  f"ar {result['ar']['tps']:.1f} tok/s", flush=True)
    for name in checkouts:
        print(name, {Path(c).stem: round(statistics.median(r), 3) for c, r in ratios[name].items() if c != "ar"})
    prompts.unlink()
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one-run"]:
        one_run(sys.argv[2:])
    else:
        raise SystemExit(main())
