"""`specdec bench`: time every method over a prompt set, side by side in one run.

Methods are interleaved within each repeat (all methods on all prompts, then the next repeat), so
drifting machine load touches every method alike. Batch size 1; warm-up runs are not timed.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from specdec import plugins
from specdec.bench.methods import DEFAULT_BASELINES, Method, Sample, applies, baseline, expand_sweeps, speculative
from specdec.bench.prompts import Question, load_questions
from specdec.config import ModelSpec, load_config
from specdec.decoder import SpeculativeDecoder, load_backend
from specdec.errors import SpecdecError
from specdec.models import load_tokenizer


@dataclass
class BenchSettings:
    configs: list[str]
    overrides: list[str] = field(default_factory=list)
    prompts: str | None = None
    baselines: list[str] = field(default_factory=lambda: list(DEFAULT_BASELINES))
    repeats: int = 3
    warmup: int = 1
    max_new_tokens: int | None = None
    limit: int | None = None
    chat: bool = False  # turns are user messages rendered by the chat template


@dataclass
class BenchResult:
    methods: list[Method]
    questions: list[Question]
    samples: dict[str, list[list[list[Sample]]]]  # method -> repeat -> question -> turn
    max_new_tokens: int
    greedy: bool
    settings: BenchSettings
    tokenizer: object


def run_bench(settings: BenchSettings) -> BenchResult:
    from specdec.chat import chat_prompt_ids

    questions = load_questions(settings.prompts, settings.limit)
    decoders, first_config = build_decoders(settings)
    reference = decoders[0][1]
    if reference.tokenizer is None:
        raise SpecdecError("bench needs a tokenizer with the target model to encode the prompts")
    if settings.chat:
        chat_prompt_ids(reference.tokenizer, [{"role": "user", "content": questions[0].turns[0]}])  # fail early
    names = ["ar"] + [b for b in settings.baselines if b != "ar"]  # ar is the reference of every speedup
    methods = [baseline(b, reference, first_config) for b in names]
    taken = set(names)  # a config named like a baseline (e.g. ar.yaml) keeps both, apart
    methods += [speculative(name if name not in taken else f"{name} (config)", decoder) for name, decoder in decoders]
    max_new = settings.max_new_tokens or first_config.generation.max_new_tokens
    for method in methods:
        for _ in range(settings.warmup):
            conversation(method, questions[0], reference.tokenizer, min(16, max_new), settings.chat)
    samples: dict[str, list] = {m.name: [] for m in methods}
    bar = tqdm(total=settings.repeats * len(methods) * len(questions), desc="bench", file=sys.stderr, unit="prompt")
    for _ in range(settings.repeats):
        for method in methods:
            runs = []
            for question in questions:
                runs.append(conversation(method, question, reference.tokenizer, max_new, settings.chat))
                bar.update()
            samples[method.name].append(runs)
    bar.close()
    greedy = first_config.generation.temperature == 0.0
    return BenchResult(methods, questions, samples, max_new, greedy, settings, reference.tokenizer)


def conversation(method: Method, question: Question, tokenizer, max_new: int, chat: bool) -> list[Sample]:
    """Each turn continues the previous turns and this method's own answers."""
    from specdec.chat import chat_prompt_ids, end_of_turn_ids

    context: list[int] = []
    messages: list[dict] = []
    stop = end_of_turn_ids(tokenizer) if chat else frozenset()
    out = []
    for number, turn in enumerate(question.turns):
        if chat:
            messages.append({"role": "user", "content": turn})
            context = chat_prompt_ids(tokenizer, messages)
        else:
            context += tokenizer(turn, add_special_tokens=number == 0)["input_ids"]
        sample = method.generate(context, max_new, stop)
        context += sample.token_ids
        messages.append({"role": "assistant", "content": tokenizer.decode(sample.token_ids, skip_special_tokens=True)})
        out.append(sample)
    return out


def build_decoders(settings: BenchSettings, loaded: dict | None = None):
    """A decoder per config and sweep point -> ([(name, decoder)], the first config). Models shared
    between them are loaded once (across calls too, when they pass the same `loaded` dict)."""
    loaded = {} if loaded is None else loaded

    def backend(spec: ModelSpec, target=None):
        key = json.dumps([spec.to_dict(), target is not None and id(target)], sort_keys=True)
        if key not in loaded:
            loaded[key] = load_backend(spec, target)  # a draft on `target`: an EAGLE-3 head reads its features
        return loaded[key]

    unused = [o for o in settings.overrides if not any(applies(path, o) for path in settings.configs)]
    if unused:
        raise SpecdecError(f"override {unused[0]!r} fits none of the configs")
    decoders, first, tokenizer = [], None, None
    for path in settings.configs:
        for label, overrides in expand_sweeps(path, [o for o in settings.overrides if applies(path, o)]):
            config = load_config(path, overrides)
            if first is None:
                first, tokenizer = config, load_tokenizer(config.target.model)
            needs_draft = plugins.get_strategy(config.strategy.name).cls.needs_draft
            target = backend(config.target)
            draft = backend(config.draft, target) if needs_draft and config.draft is not None else None
            decoder = SpeculativeDecoder.from_config(config, target=target, draft=draft, tokenizer=tokenizer)
            decoders.append((f"{Path(path).stem}{f' [{label}]' if label else ''}", decoder))
    return decoders, first
