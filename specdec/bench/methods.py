"""What `specdec bench` times: speculative configs (and their sweeps) and the baselines people
would use instead (`ar`, `hf`, `hf-assisted`, `hf-prompt-lookup`, `llama-cpp`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from specdec.config import Config, load_config, resolve
from specdec.decoder import SpeculativeDecoder
from specdec.errors import SpecdecError
from specdec.metrics import GenerationMetrics

BASELINES = ("ar", "hf", "hf-assisted", "hf-prompt-lookup", "llama-cpp")
DEFAULT_BASELINES = BASELINES[:4]  # llama-cpp needs an optional extra and a .gguf target


@dataclass
class Sample:
    token_ids: list[int]
    seconds: float
    accept_lengths: list[int]  # tokens emitted per verification step
    metrics: GenerationMetrics | None


@dataclass
class Method:
    name: str
    strategy: str
    backend: str
    generate: Callable[[list[int], int, frozenset[int]], Sample]  # (prompt ids, max_new_tokens, stop ids) -> Sample
    exact: bool = True  # computes the target's own numbers, so its greedy output must equal ar's


def expand_sweeps(path: str, overrides: list[str]) -> list[tuple[str, list[str]]]:
    """`-o key=[a,b]` sweeps the key over a and b, unless the list is itself a valid value of the
    key (e.g. strategy.branching=[4,2,2,1]). -> [(label, overrides)] for each combination."""
    runs: list[tuple[str, list[str]]] = [("", [])]
    for override in overrides:
        key, _, value = override.partition("=")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = None  # load_config reports it
        if isinstance(parsed, list) and parsed and not _valid(path, runs[0][1] + [override]):
            choices = [f"{key}={json.dumps(v)}" for v in parsed]
            runs = [(f"{label} {c}".strip(), prior + [c]) for label, prior in runs for c in choices]
        else:
            runs = [(label, prior + [override]) for label, prior in runs]
    return runs


def applies(path: str, override: str) -> bool:
    """Whether the config at `path` takes this override (for a sweep, its first value)."""
    key, _, value = override.partition("=")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return True  # let load_config report the malformed value
    first = [f"{key}={json.dumps(parsed[0])}"] if isinstance(parsed, list) and parsed else []
    return _valid(path, [override]) or bool(first) and _valid(path, first)


def _valid(path: str, overrides: list[str]) -> bool:
    try:
        load_config(path, overrides)
        return True
    except SpecdecError:
        return False


def speculative(name: str, decoder: SpeculativeDecoder) -> Method:
    def generate(prompt: list[int], max_new_tokens: int, stop: frozenset[int] = frozenset()) -> Sample:
        lengths: list[int] = []
        start = time.perf_counter()
        out = decoder.generate(prompt, max_new_tokens=max_new_tokens, stop_token_ids=sorted(stop),
                               on_step=lambda s: lengths.append(s.accepted + 1))
        return Sample(out.token_ids, time.perf_counter() - start, lengths, out.metrics)

    return Method(name, decoder.strategy.name, type(decoder.target).name, generate)


def ar_decoder(reference: SpeculativeDecoder, config: Config) -> SpeculativeDecoder:
    """The target alone, through the same backend and loop (no draft)."""
    raw = {**config.to_dict(), "strategy": {"name": "ar"}}
    raw.pop("draft", None)
    ar = SpeculativeDecoder.from_config(resolve(raw, config.source, Path.cwd()), target=reference.target)
    ar.tokenizer = reference.tokenizer
    return ar


def baseline(name: str, reference: SpeculativeDecoder, config: Config) -> Method:
    """A baseline over the models of the first config: `ar` runs the target alone through the same
    backend and loop; the `hf*` ones call transformers' `generate` on the PyTorch models."""
    if name == "ar":
        return speculative("ar", ar_decoder(reference, config))
    if name not in BASELINES:
        raise SpecdecError(f"unknown baseline {name!r}; available: {', '.join(BASELINES)}")
    if name == "llama-cpp":
        return _llama_cpp(reference, config.target.model)
    target = _hf_model(reference.target, config.target.model)
    kwargs: dict = {}
    if name == "hf-assisted":
        if reference.draft is None:
            raise SpecdecError("the hf-assisted baseline needs a draft model in the first config")
        kwargs["assistant_model"] = _hf_draft(reference.draft, config.draft.model)
    elif name == "hf-prompt-lookup":
        kwargs["prompt_lookup_num_tokens"] = 10
    eos = sorted(reference.target.eos_token_ids)

    @torch.inference_mode()
    def generate(prompt: list[int], max_new_tokens: int, stop: frozenset[int] = frozenset()) -> Sample:
        ids = torch.tensor([prompt], device=target.device)
        start = time.perf_counter()
        out = target.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=eos[0] if eos else 0, eos_token_id=sorted(set(eos) | stop) or None, **kwargs,
        )
        return Sample(out[0, len(prompt):].tolist(), time.perf_counter() - start, [], None)

    return Method(name, "-", "transformers", generate)


def _llama_cpp(reference: SpeculativeDecoder, model: str) -> Method:
    """Plain llama.cpp decoding of the first config's target, a .gguf file, through llama-cpp-python:
    the same prompt ids, greedy, the same stop ids and token budget, as many threads as torch uses.
    Its numbers are llama.cpp's quantized kernels', so its output is not expected to equal `ar`'s."""
    if not str(model).endswith(".gguf"):
        raise SpecdecError(f"the llama-cpp baseline runs the first config's target as a .gguf file; {model!r} is not one")
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SpecdecError("the llama-cpp baseline needs llama-cpp-python: pip install 'specdec[llamacpp]' "
                           "(it builds llama.cpp from source, which takes minutes)") from None
    threads = torch.get_num_threads()
    llm = Llama(model_path=str(Path(model).expanduser()), n_ctx=min(reference.target.max_length, 8192),
                n_threads=threads, n_threads_batch=threads, verbose=False)
    eos = reference.target.eos_token_ids

    def generate(prompt: list[int], max_new_tokens: int, stop: frozenset[int] = frozenset()) -> Sample:
        llm.reset()  # no KV reuse from the previous prompt: every method prefills the whole prompt
        tokens: list[int] = []
        start = time.perf_counter()
        for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            tokens.append(int(token))
            if token in eos or token in stop or len(tokens) >= max_new_tokens:
                break
        return Sample(tokens, time.perf_counter() - start, [], None)

    return Method("llama-cpp", "-", "llama.cpp", generate, exact=False)


def _hf_draft(backend, model: str):
    """The draft as a transformers model over the target's vocabulary. A reduced-vocabulary draft
    becomes a copy whose embedding is indexed by target ids and whose head scatters its logits into
    the target vocabulary (-inf elsewhere): the same proposals as in specdec's loop."""
    from specdec.backends.vocab import MappedVocabBackend

    if not isinstance(backend, MappedVocabBackend):
        return _hf_model(backend, model)
    import copy

    hf = copy.deepcopy(_hf_model(backend.inner, model))
    weight = hf.get_input_embeddings().weight.detach()
    hf.set_input_embeddings(torch.nn.Embedding.from_pretrained(weight[backend.target_to_draft], freeze=True))
    hf.lm_head = _ScatterHead(hf.lm_head, backend)
    hf.config.vocab_size = backend.vocab_size
    return hf


class _ScatterHead(torch.nn.Module):
    def __init__(self, head: torch.nn.Module, mapped):
        super().__init__()
        self.head, self.to_target = head, mapped.to_target_logits

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.to_target(self.head(hidden))


def _hf_model(backend, model: str):
    """The transformers model behind a backend: the PyTorch backend's own, else `model` (or the
    source of an ONNX export) loaded in float32 on the CPU."""
    if hasattr(getattr(backend, "model", None), "generate"):
        return backend.model
    from transformers import AutoModelForCausalLM

    from specdec.backends.onnx_contract import MANIFEST, read_manifest
    from specdec.models import load_error, resolve_source

    if (Path(model).expanduser() / MANIFEST).is_file():
        model = read_manifest(Path(model).expanduser())["source_model"]
    try:
        return AutoModelForCausalLM.from_pretrained(resolve_source(model), dtype=torch.float32).eval()
    except Exception as exc:
        raise load_error(model, exc) from exc
