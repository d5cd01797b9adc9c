"""`SpeculativeDecoder`: the Python API around the loop (models, strategy, generation settings)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path

from specdec import plugins
from specdec.backends.base import Backend
from specdec.config import Config, GenerationOptions, ModelSpec, load_config
from specdec.costs import calibrated_costs, measured_costs
from specdec.decode import speculative_decode
from specdec.errors import SpecdecError
from specdec.metrics import GenerationMetrics, StepStats
from specdec.models import load_tokenizer
from specdec.sampling import Random, Warp
from specdec.stopping import Stopper
from specdec.strategies.base import Strategy

logger = logging.getLogger(__name__)


@dataclass
class GenerationOutput:
    token_ids: list[int]  # new tokens only
    text: str | None  # decoded new tokens, when a tokenizer exists
    metrics: GenerationMetrics


@dataclass
class Request:
    """One generation's checked inputs."""

    prompt_ids: list[int]
    warp: Warp
    stopper: Stopper
    rng: Random


class SpeculativeDecoder:
    def __init__(
        self,
        target: Backend,
        draft: Backend | None,
        strategy: Strategy,
        generation: GenerationOptions | None = None,
        tokenizer=None,
    ):
        if strategy.needs_draft and draft is None:
            raise SpecdecError(f"strategy {strategy.name!r} needs a draft model")
        if target.rows_interact and strategy.name != "ar":
            raise SpecdecError(f"this target computes each token with numbers that depend on the other tokens of its forward "
                               f"({target.rows_interact}), so verifying a draft cannot be lossless; run it with strategy ar, "
                               f"or use a target without that setting for {strategy.name!r}")
        if draft is not None and draft.vocab_size != target.vocab_size:
            raise SpecdecError(
                f"draft and target vocabularies differ ({draft.vocab_size} vs {target.vocab_size} "
                "tokens); speculative decoding needs a draft that shares the target's tokenizer"
            )
        self.target, self.draft, self.strategy = target, draft, strategy
        self.config: Config | None = None  # set by from_config: names the models whose costs are cached
        if strategy.needs_costs and strategy.planner is None:
            strategy.set_costs(measured_costs(target, draft))
        self.generation = generation or GenerationOptions()
        self.tokenizer = tokenizer

    @classmethod
    def from_config(cls, config: Config | str | Path, target=None, draft=None, tokenizer=None) -> SpeculativeDecoder:
        """Build from a Config (or a YAML path). `target` / `draft` may be already-loaded models
        (a `Backend`, or a `transformers` model, wrapped in the PyTorch backend); then the config's
        entries for them are not loaded."""
        if not isinstance(config, Config):
            config = load_config(config)
        if target is None and draft is None and config.draft is not None:
            _check_head_target(config)
        target_backend = _as_backend(target) if target is not None else load_backend(config.target)
        component = plugins.get_strategy(config.strategy.name)
        draft_backend = None  # a configured draft is not loaded for a strategy that does not use it
        if component.cls.needs_draft and draft is not None:
            draft_backend = _as_backend(draft)
        elif component.cls.needs_draft and config.draft is not None:
            draft_backend = load_backend(config.draft, target_backend)
        if tokenizer is None and target is None:
            tokenizer = load_tokenizer(config.target.model)
        strategy = component.cls(config.strategy.options)
        if strategy.needs_costs:
            strategy.set_costs(calibrated_costs(config, target_backend, draft_backend))
        decoder = cls(target_backend, draft_backend, strategy, config.generation, tokenizer)
        decoder.config = config
        return decoder

    def generate(
        self,
        prompt: str | list[int] | None = None,
        on_tokens: Callable[[list[int]], None] | None = None,
        on_step: Callable[[StepStats], None] | None = None,
        messages: list[dict] | None = None,
        **generation: object,
    ) -> GenerationOutput:
        """Generate a continuation of `prompt` (text, or token ids), or the assistant's answer to
        chat `messages` ([{"role": "user", "content": ...}, ...], rendered by the tokenizer's chat
        template; the answer ends at the template's end-of-turn token). Keyword arguments override
        the config's `generation` section for this call (max_new_tokens, temperature, seed, ...)."""
        request = self.prepare(prompt, messages, generation)
        plugins.notify("on_generation_start", decoder=self, prompt_ids=request.prompt_ids)

        def step(stats: StepStats) -> None:
            if on_step is not None:
                on_step(stats)
            plugins.notify("on_step", stats=stats)

        token_ids, metrics = speculative_decode(
            self.target, self.draft, self.strategy, request.prompt_ids, request.warp, request.stopper,
            request.rng, on_tokens=on_tokens, on_step=step,
        )
        return self._output(token_ids, metrics)

    def generate_batch(self, prompts: list[str | list[int]] | None = None, messages: list[list[dict]] | None = None,
                       batch_size: int = 8, on_tokens: Callable[[int, list[int]], None] | None = None,
                       **generation: object) -> list[GenerationOutput]:
        """Generate for many prompts (or chat conversations), up to `batch_size` at a time, each
        target forward scoring every running sequence's draft tree (specdec/batch.py). Returns one
        output per prompt, in order, each with its own metrics; greedy outputs equal `generate`'s.
        `on_tokens(prompt index, block)` receives each block of emitted tokens."""
        from specdec.batch import drain

        return drain(self.batch_slices(prompts, messages, batch_size, on_tokens, **generation))

    def batch_slices(self, prompts: list[str | list[int]] | None = None, messages: list[list[dict]] | None = None,
                     batch_size: int = 8, on_tokens: Callable[[int, list[int]], None] | None = None,
                     **generation: object) -> Generator[None, None, list[GenerationOutput]]:
        """`generate_batch` a slice at a time: a generator that yields after each step of the batch
        (each whole prompt at batch size 1) and returns generate_batch's outputs. `specdec bench
        --batch-size` interleaves the methods' slices so that a machine's drift falls on all alike."""
        from specdec.batch import batch_slices

        if (prompts is None) == (messages is None):
            raise SpecdecError("give exactly one of prompts or messages")
        items = [(p, None) for p in prompts] if prompts is not None else [(None, m) for m in messages]
        requests = [self.prepare(p, m, generation) for p, m in items]
        for request in requests:
            plugins.notify("on_generation_start", decoder=self, prompt_ids=request.prompt_ids)
        results = yield from batch_slices(self, requests, batch_size, on_tokens,
                                          on_step=lambda stats: plugins.notify("on_step", stats=stats))
        return [self._output(token_ids, metrics) for token_ids, metrics in results]

    def prepare(self, prompt, messages, generation: dict, fit_context: bool = False) -> Request:
        """Check and encode one generation's prompt (text or ids) or chat messages, and its
        settings (the config's generation section updated by `generation`) -> a Request for the
        loop. With `fit_context`, max_new_tokens is lowered to the room the context leaves."""
        from specdec.chat import chat_prompt_ids, end_of_turn_ids

        if (prompt is None) == (messages is None):
            raise SpecdecError("give exactly one of a prompt or chat messages")
        try:
            settings = self.generation.model_copy(update=generation)
            settings = GenerationOptions.model_validate(settings.model_dump())
        except Exception as exc:
            raise SpecdecError(f"bad generation option: {exc}") from None
        prompt_ids = self._encode(prompt if messages is None else chat_prompt_ids(self.tokenizer, messages))
        if fit_context:
            settings.max_new_tokens = max(1, min(settings.max_new_tokens, self.max_length - len(prompt_ids)))
        self._check_budget(len(prompt_ids), settings.max_new_tokens)
        eos = frozenset() if settings.ignore_eos else self.target.eos_token_ids
        eos |= frozenset(settings.stop_token_ids)
        if messages is not None:
            eos |= end_of_turn_ids(self.tokenizer)
        stopper = Stopper(settings.max_new_tokens, eos, settings.stop, self.tokenizer)
        warp = Warp(settings.temperature, settings.top_k, settings.top_p)
        return Request(prompt_ids, warp, stopper, Random(settings.seed))

    def _output(self, token_ids: list[int], metrics: GenerationMetrics) -> GenerationOutput:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True) if self.tokenizer else None
        output = GenerationOutput(token_ids, text, metrics)
        plugins.notify("on_generation_end", decoder=self, output=output)
        return output

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise SpecdecError("the target model has no tokenizer; pass token ids (--prompt-ids 1,2,3)")
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise SpecdecError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.target.vocab_size]
        if bad:
            raise SpecdecError(f"prompt token {bad[0]} is outside the vocabulary (0..{self.target.vocab_size - 1})")
        return ids

    @property
    def max_length(self) -> int:
        """The context: prompt and new tokens together (the shorter of the target's and the draft's)."""
        return min(m.max_length for m in (self.target, self.draft) if m is not None)

    def _check_budget(self, prompt_len: int, max_new_tokens: int) -> None:
        models = [("target", self.target)] + ([("draft", self.draft)] if self.draft else [])
        name, limit = min(((n, m.max_length) for n, m in models), key=lambda item: item[1])
        if prompt_len >= limit:
            raise SpecdecError(f"the prompt is {prompt_len} tokens, longer than the {name}'s context of {limit}")
        if prompt_len + max_new_tokens > limit:
            raise SpecdecError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the {name}'s "
                f"context of {limit}; lower max_new_tokens to at most {limit - prompt_len}"
            )


def load_backend(spec: ModelSpec, target: Backend | None = None) -> Backend:
    """The configured backend over `spec.model`; a draft with a reduced vocabulary (a
    `specdec_vocab.json` beside its weights) is wrapped so that it speaks target ids; an EAGLE-3
    head (recognised from its files) is loaded on top of `target`."""
    from specdec.backends.vocab import MappedVocabBackend, read_vocab_map
    from specdec.eagle3 import head_folder
    from specdec.export import prepare

    if target is not None and (folder := head_folder(spec.model)) is not None:
        return _load_head(spec, folder, target)
    component = plugins.get_backend(spec.backend)
    logger.info("loading %s with the %s backend", spec.model, spec.backend)
    backend = component.cls.load(prepare(spec.model, component.cls, spec.options), spec.options)
    vocab_map = read_vocab_map(spec.model) if Path(spec.model).expanduser().is_dir() else None
    if vocab_map is not None:
        backend = MappedVocabBackend(backend, vocab_map["draft_to_target"], vocab_map["target_vocab_size"])
    return backend


def _check_head_target(config: Config) -> None:
    """An EAGLE-3 head over a target backend that cannot return hidden states: one line, before anything loads."""
    from specdec.eagle3 import head_folder

    target_cls = plugins.get_backend(config.target.backend).cls
    if not target_cls.returns_features and plugins.get_strategy(config.strategy.name).cls.needs_draft \
            and head_folder(config.draft.model) is not None:
        raise target_cls._no_features()


def _load_head(spec: ModelSpec, folder: Path, target: Backend) -> Backend:
    import torch

    from specdec.backends.eagle3 import Eagle3Backend
    from specdec.devices import resolve_device

    if spec.backend != "pytorch":
        raise SpecdecError(f"{spec.model!r} is an EAGLE-3 head, which runs on the pytorch backend; set draft.backend: pytorch")
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(spec.options.dtype, torch.float32)
    return Eagle3Backend.for_target(folder, target, resolve_device(spec.options.device), dtype)


def _as_backend(model) -> Backend:
    if isinstance(model, Backend):
        return model
    from specdec.backends.pytorch import PyTorchBackend

    return PyTorchBackend(model)
