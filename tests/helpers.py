"""Building decoders over in-memory models, and the target's own greedy decoding."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from specdec.backends.pytorch import PyTorchBackend
from specdec.config import GenerationOptions
from specdec.decoder import SpeculativeDecoder
from specdec.plugins import get_strategy


def load_script(name: str):
    """A fresh copy of scripts/NAME.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_decoder(target_model, draft_model, strategy: str = "chain", tokenizer=None, fixed_context: int | None = None,
                 **options) -> SpeculativeDecoder:
    """PyTorch backends over the models (at fixed shapes over `fixed_context` slots if given)."""
    component = get_strategy(strategy)
    return SpeculativeDecoder(
        PyTorchBackend(target_model, fixed_context),
        PyTorchBackend(draft_model, fixed_context) if draft_model is not None else None,
        component.cls(component.cls.Options(**options)),
        GenerationOptions(),
        tokenizer,
    )


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=0,
        )
    return out[0, len(prompt):].tolist()


def record_steps(decoder: SpeculativeDecoder) -> list:
    """Record (tree, verdict) of every step by wrapping the strategy's feedback method."""
    steps = []
    update = decoder.strategy.update

    def recording_update(verdict, tree):
        steps.append((tree, verdict))
        update(verdict, tree)

    decoder.strategy.update = recording_update
    return steps


def first_child_depth(tree) -> int:
    """Depth of the path that always takes a node's first child (the draft's top choice)."""
    children, node, depth = tree.children(), 0, 0
    while children[node]:
        node, depth = children[node][0], depth + 1
    return depth
