"""Target features (EAGLE-3 drafts): the hidden states entering chosen decoder layers, kept by
forward pre-hooks on just those layers, never every layer's states. The pytorch backend keeps them
at run time; the ONNX export traces the same hooks into its `features` output."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from specdec.errors import SpecdecError


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The model's stack of decoder layers (Llama `model.layers`, GPT-2 `transformer.h`, ...)."""
    count = model.config.get_text_config().num_hidden_layers
    return next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count)


class LayerInputs:
    """The input of each watched decoder layer in the model's last forward."""

    def __init__(self, model: PreTrainedModel):
        self._model = model
        self._inputs: dict[int, torch.Tensor | None] = {}  # watched layer -> its input [B, Q, H]

    @classmethod
    def of(cls, model: PreTrainedModel) -> LayerInputs:
        """The model's one LayerInputs: backends sharing a model share its hooks instead of adding
        a hook per backend."""
        if not hasattr(model, "_specdec_layer_inputs"):
            model._specdec_layer_inputs = cls(model)
        return model._specdec_layer_inputs

    def watch(self, layers: tuple[int, ...]) -> None:
        stack = decoder_layers(self._model)
        bad = [i for i in layers if not 0 <= i < len(stack)]
        if bad:
            raise SpecdecError(f"features of decoder layer {bad[0]} were asked for, but the model has {len(stack)} layers (0 .. {len(stack) - 1})")
        for index in sorted(set(layers) - set(self._inputs)):
            stack[index].register_forward_pre_hook(self._keep(index), with_kwargs=True)
            self._inputs[index] = None

    def _keep(self, index: int):
        def hook(module, args, kwargs):
            self._inputs[index] = args[0] if args else kwargs["hidden_states"]  # [B, Q, H]
        return hook

    def concat(self, layers: tuple[int, ...]) -> torch.Tensor:
        """The watched `layers`' inputs in the last forward, concatenated in that order -> [B, Q, F]."""
        return torch.cat([self._inputs[i] for i in layers], dim=-1)
