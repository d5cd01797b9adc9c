"""The ONNX contract (DESIGN.md section 5) as a module torch.onnx can export.

Inputs: input_ids [B,Q] int64, position_ids [B,Q] int64, attention_mask [B,1,Q,P+Q] bool,
past_key_values.{i}.key / .value [B,H_kv,P,D]. Outputs: logits [B,Q,V], present.{i}.key / .value
[B,H_kv,P+Q,D]. B, Q, P and the mask's last axis are dynamic (the last is declared on its own:
dims cannot be declared as sums).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> KVShape:
        config = config.get_text_config()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, kv_heads, head_dim)


def input_names(layers: int) -> list[str]:
    return ["input_ids", "position_ids", "attention_mask"] + [
        f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")
    ]


def output_names(layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


class TreeMaskGraph(torch.nn.Module):
    """A causal LM taking a bool tree mask over past + new entries and explicit past KV tensors."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model
        self.layers = KVShape.of(model.config).layers

    def forward(self, input_ids, position_ids, attention_mask, past):
        cache = DynamicCache(
            ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)], config=self.model.config
        )
        dtype = self.model.dtype
        # transformers uses a 4D mask as given: make it additive in the model's dtype.
        additive = torch.where(
            attention_mask, torch.zeros((), dtype=dtype), torch.full((), torch.finfo(dtype).min, dtype=dtype)
        )
        out = self.model(
            input_ids=input_ids, position_ids=position_ids, attention_mask=additive,
            past_key_values=cache, use_cache=True,
        )
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return out.logits, presents


def example_inputs(shape: KVShape, vocab: int, dtype: torch.dtype, batch=2, query=3, past=5):
    """Example sizes >= 2, so the exporter does not specialise any dynamic dim to 0 or 1."""
    ids = torch.randint(0, vocab, (batch, query))
    positions = torch.arange(past, past + query).repeat(batch, 1)
    mask = torch.ones(batch, 1, query, past + query, dtype=torch.bool)
    kv = [torch.randn(batch, shape.kv_heads, past, shape.head_dim, dtype=dtype) for _ in range(2 * shape.layers)]
    return ids, positions, mask, kv


def dynamic_shapes(layers: int) -> dict:
    batch, query, past, total = (torch.export.Dim(n) for n in ("batch", "query", "past", "total"))
    return {
        "input_ids": {0: batch, 1: query},
        "position_ids": {0: batch, 1: query},
        "attention_mask": {0: batch, 2: query, 3: total},
        "past": [{0: batch, 2: past} for _ in range(2 * layers)],
    }
