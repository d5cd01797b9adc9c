"""What differs between the transformers releases specdec supports, asked of the model, not of a version number.

transformers 5.24 renamed the forward's `past_key_values` argument to `cache` (the old name still
works until 5.40, with a FutureWarning). A model's forward is asked which parameter takes a `Cache`
object, so every release in the declared range, and a later rename, passes the cache by its own name.
"""

from __future__ import annotations

import inspect

import transformers

from specdec.errors import SpecdecError

CACHE_NAMES = ("cache", "past_key_values")  # newest spelling first


def cache_argument(model) -> str | None:
    """The name under which `model.forward` takes a transformers `Cache`, or None when it takes none.

    Example: LlamaForCausalLM -> "cache" on transformers 5.24, "past_key_values" on 5.23.
    """
    params = inspect.signature(model.forward).parameters
    for name, param in params.items():
        if "Cache" in str(param.annotation):  # `Cache | None`, as a type or a string
            return name
    return next((name for name in CACHE_NAMES if name in params), None)


def check_architecture(model) -> str:
    """Tree masks need a forward that takes explicit position ids, a 4D attention mask and a Cache
    object; returns the cache argument's name, or raises one line naming the model and the library."""
    params = inspect.signature(model.forward).parameters
    missing = [name for name in ("position_ids", "attention_mask") if name not in params]
    cache = cache_argument(model)
    if cache is None:
        missing.append("a Cache argument")
    if missing:
        raise SpecdecError(
            f"{type(model).__name__} cannot take a tree attention mask with transformers {transformers.__version__}: "
            f"its forward takes no {' / '.join(missing)}; use a Llama, Qwen2, Mistral or GPT-2 style model"
        )
    return cache
