"""The draft: the target's own architecture, a few of its layers, and a head over a reduced vocabulary.

Initialisation copies the target's embedding rows for the kept tokens (row `V_draft` is the mean,
standing for every other token), the chosen layers and the final norm, so training starts from the
target's representations rather than from noise.
"""

from __future__ import annotations

import re

import torch

from specdec.errors import SpecdecError


def _layer_pattern(model) -> re.Pattern:
    """Matches `<prefix>.<layers>.<i>.` in state-dict keys of Llama-, Qwen2-, Mistral- or GPT-2-style models."""
    keys = model.state_dict().keys()
    for name in ("layers", "h"):
        pattern = re.compile(rf"^(.*\.{name}\.)(\d+)\.(.*)$")
        if any(pattern.match(k) for k in keys):
            return pattern
    raise SpecdecError(f"cannot find the decoder layers of {type(model).__name__}; distill supports "
                       "Llama-, Qwen2-, Mistral- and GPT-2-style models")


def build_draft(target, layers: list[int], draft_to_target: list[int], copy_layers: bool = True):
    """A new model of the target's class with `layers` (target layer indices, copied when
    `copy_layers`, else freshly initialised) and a tied head over `draft_to_target` plus one row
    for every other token; embeddings and the final norm come from the target."""
    config = target.config.get_text_config().__class__.from_dict(target.config.get_text_config().to_dict())
    total = config.num_hidden_layers
    if not layers or any(not 0 <= i < total for i in layers):
        raise SpecdecError(f"draft layers {layers} must be indices of the target's {total} layers")
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in layers]
    config.vocab_size = len(draft_to_target) + 1
    config.tie_word_embeddings = True
    index = {t: i for i, t in enumerate(draft_to_target)}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, name, None)
        ids = [value] if isinstance(value, int) else list(value or [])
        mapped = [index[t] for t in ids if t in index]
        setattr(config, name, (mapped[0] if len(mapped) == 1 else mapped) if mapped else None)
    draft = type(target)(config)
    pattern = _layer_pattern(target)
    source, fresh = target.state_dict(), draft.state_dict()
    state = {}
    for key, value in fresh.items():
        match = pattern.match(key)
        if match:
            if copy_layers:
                state[key] = source[f"{match[1]}{layers[int(match[2])]}.{match[3]}"]
        elif key in source and source[key].shape == value.shape:
            state[key] = source[key]  # final norm, rotary buffers
    embedding = target.get_input_embeddings().weight.detach()
    rows = embedding[torch.tensor(draft_to_target)]
    draft.get_input_embeddings().weight.data.copy_(torch.cat([rows, embedding.mean(0, keepdim=True)]))
    draft.load_state_dict(state, strict=False)
    draft.tie_weights()
    return draft.float()
