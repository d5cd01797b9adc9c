"""Model sources shared by backends: local path or hub id checks, context limits, tokenizers."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from specdec.errors import SpecdecError

logger = logging.getLogger(__name__)


def looks_like_path(model: str) -> bool:
    """A hub id is `name` or `org/name`; anything else (./x, /x, ~/x, a/b/c) is a local path."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model


def check_model_source(model: str) -> None:
    """Fail early, in one line, on a local model path that does not exist."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise SpecdecError(f"model directory {model!r} has no config.json; is it a Hugging Face model?")
    elif looks_like_path(model):
        raise SpecdecError(f"model path {model!r} does not exist; check the `model:` key in the config")


def context_limit(config) -> int:
    """Longest sequence the model can attend over correctly with a full (non-windowed) tree mask."""
    limit = getattr(config, "max_position_embeddings", None) or 2**31 - 1
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window and (layer_types is None or "sliding_attention" in layer_types):
        limit = min(limit, window)  # tree masks are full masks: stay inside the window
    return limit


def load_tokenizer(model: str):
    """The tokenizer stored with a model, or None when there is none (e.g. tiny test models)."""
    from transformers import AutoTokenizer

    path = Path(model).expanduser()
    if path.is_dir() and not any(
        (path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    ):
        return None
    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:
        logger.warning("no tokenizer loaded for %s: %s", model, str(exc).splitlines()[0] if str(exc) else exc)
        return None
