"""Model sources shared by backends: local folders, hub ids and `.gguf` files, context limits, tokenizers.

A `.gguf` file is dequantized once into a Hugging Face folder under the cache
(`$SPECDEC_CACHE_DIR/gguf`, default `~/.cache/specdec/gguf`); every later load reads that folder.
The model is then the dequantized one: exactness is relative to it, not to llama.cpp's kernels.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from specdec.errors import SpecdecError

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
GGUF_DTYPES = ("float32", "float16", "bfloat16")


def cache_root() -> Path:
    """Where specdec keeps what it builds on first use (GGUF conversions, ONNX exports)."""
    return Path(os.environ.get("SPECDEC_CACHE_DIR") or Path.home() / ".cache" / "specdec").expanduser()


def looks_like_path(model: str) -> bool:
    """A hub id is `name` or `org/name`; anything else (./x, /x, ~/x, a/b/c, x.gguf) is a local path."""
    return (
        model.startswith((".", "/", "~")) or model.count("/") > 1 or model.endswith(".gguf")
        or os.sep != "/" and os.sep in model
    )


def resolve_source(model: str, dtype: str | None = "float32") -> str:
    """What `from_pretrained` can load for `model`: a hub id or model folder as is (checked when
    local), a `.gguf` file as its converted folder in `dtype` (converted on first use)."""
    path = Path(model).expanduser()
    if path.is_file():
        return str(gguf_folder(path, dtype))
    if path.exists():
        if not (path / "config.json").is_file():
            raise SpecdecError(f"model directory {model!r} has no config.json; is it a Hugging Face model or an EAGLE-3 head?")
    elif looks_like_path(model):
        raise SpecdecError(f"model path {model!r} does not exist; check the `model:` key in the config")
    return model


def check_gguf(path: Path) -> None:
    with open(path, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise SpecdecError(
                f"{str(path)!r} is a file but not a GGUF checkpoint; give a .gguf file or a Hugging Face model folder"
            )


def source_key(model: str) -> str:
    """A short key for a model source that changes when a local file or folder's files change."""
    path = Path(model).expanduser()
    identity = model
    if path.exists():
        files = [path] if path.is_file() else [f for f in path.iterdir() if f.is_file()]
        stats = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
        identity = f"{path.resolve()}:{stats}"
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


def gguf_folder(path: Path, dtype: str | None = "float32") -> Path:
    """The cached Hugging Face folder of a GGUF file in `dtype`, converting it on first use.
    `dtype=None` takes any conversion already made (e.g. to read the tokenizer), else float32."""
    check_gguf(path)
    stem = cache_root() / "gguf" / f"{path.stem}-{source_key(str(path))}"
    if dtype is None:
        made = [f for f in sorted(stem.parent.glob(f"{stem.name}-*")) if (f / "config.json").is_file()]
        if made:
            return made[0]
    if dtype not in GGUF_DTYPES:
        dtype = "float32"  # None or "auto": GGUF blocks dequantize to float32
    folder = stem.with_name(f"{stem.name}-{dtype}")
    if not (folder / "config.json").is_file():
        logger.warning("converting %s to a %s model in %s (first use; later loads reuse it)", path, dtype, folder)
        _convert_gguf(path, folder, dtype)
    return folder


def _convert_gguf(path: Path, folder: Path, dtype: str) -> None:
    """Dequantize `path` into `folder` (written whole or not at all)."""
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise SpecdecError("loading .gguf files needs gguf and accelerate: pip install 'specdec[gguf]'") from None
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # dequantizing takes a while: show it
    try:
        kwargs = dict(gguf_file=path.name, dtype=getattr(torch, dtype))
        model = AutoModelForCausalLM.from_pretrained(path.parent, **kwargs)
    except Exception as exc:  # the magic matched: whatever fails now is this file's content (truncated, unsupported)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecdecError(f"transformers cannot read {str(path)!r} as a model: {first}") from exc
    finally:
        if not bars:
            hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:  # weights-only GGUF files exist; the model is still usable with token ids
        logger.warning("no tokenizer in %s: %s", path, str(exc).strip().splitlines()[0] if str(exc).strip() else exc)
        tokenizer = None
    # The weights are plain dequantized tensors now; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.save_pretrained(partial)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def load_error(model: str, exc: Exception) -> Exception:
    """One line for a model that `from_pretrained` could not load; unexpected errors pass through."""
    from safetensors import SafetensorError

    if not isinstance(exc, (OSError, ValueError, SafetensorError)):
        return exc
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, SafetensorError):
        return SpecdecError(f"could not load model {model!r}: a weights file is truncated or corrupt ({first_line}); "
                            "copy or download the model again")
    hint = "" if looks_like_path(model) else " (a hub id: check the name and the network; HF_HUB_OFFLINE=1 uses only the local cache)"
    return SpecdecError(f"could not load model {model!r}: {first_line}{hint}")


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
    if path.is_file():
        path = Path(resolve_source(model, dtype=None))
        model = str(path)
    if path.is_dir() and not any(
        (path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    ):
        return None
    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:
        logger.warning("no tokenizer loaded for %s: %s", model, str(exc).splitlines()[0] if str(exc) else exc)
        return None
