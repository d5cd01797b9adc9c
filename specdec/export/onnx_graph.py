"""The ONNX contract (DESIGN.md section 5) as a module torch.onnx can export.

Inputs: input_ids [B,Q] int64, position_ids [B,Q] int64, attention_mask [B,1,Q,C+Q] bool,
past_key_values.{i}.key / .value [B,H_kv,C,D]: a KV buffer of capacity C, whose slots the mask does
not show are ignored (they must hold finite values), and (format 4) logit_positions [K] int64: the
query positions whose logits to return (0 .. Q - 1 to score a tree; Q - 1 alone for a prefill, so
the output projection is not run for positions nobody reads). Outputs: logits [B,K,V] (format 3 and
older: [B,Q,V]), present.{i}.key / .value [B,H_kv,Q,D]: the KV of the Q new entries only, for the
caller to write into its buffer, and (from format 3, unless exported without) features [B,Q,F]: the
hidden states entering the decoder layers the manifest's `feature_layers` names, concatenated (F =
their count x the hidden size), which an EAGLE-3 draft reads.
The graph never copies the past: attention reads it in place (specdec/attention.py). B, Q, C, K and
the mask's last axis are dynamic (the last is declared on its own: dims cannot be declared as sums).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin

from specdec import attention
from specdec.backends.onnx_contract import LOGIT_POSITIONS
from specdec.features import LayerInputs
from specdec.hf_compat import check_architecture


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
    ] + [LOGIT_POSITIONS]


def output_names(layers: int, features: bool) -> list[str]:
    presents = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return ["logits"] + presents + (["features"] if features else [])


class TreeMaskGraph(torch.nn.Module):
    """A causal LM taking a bool tree mask over a past KV buffer + the new entries, returning the
    new entries' KV, and with `feature_layers` the hidden states entering those decoder layers.
    Switches `model` to the "specdec_tree" attention implementation."""

    def __init__(self, model: PreTrainedModel, feature_layers: tuple[int, ...] = ()):
        super().__init__()
        model.set_attn_implementation(attention.NAME)
        self.model = model
        self.cache_argument = check_architecture(model)
        self.layers = KVShape.of(model.config).layers
        self.feature_layers = feature_layers
        self.layer_inputs = LayerInputs(model)
        self.layer_inputs.watch(feature_layers)

    def forward(self, input_ids, position_ids, attention_mask, past, logit_positions):
        cache = Cache(layers=[_NewEntries() for _ in range(self.layers)])
        out = self.model(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention.mask_bias(attention_mask), use_cache=True,
            logits_to_keep=logit_positions, **{self.cache_argument: cache},
            specdec_past=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)],
        )
        presents = []
        for layer in cache.layers:
            presents += [layer.keys, layer.values]
        if self.feature_layers:
            return out.logits, presents, self.layer_inputs.concat(self.feature_layers)
        return out.logits, presents


class _NewEntries(CacheLayerMixin):
    """A cache layer that keeps only what this forward adds (the past is read in place)."""

    is_sliding = False

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys, self.values = key_states, value_states
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1


def example_inputs(shape: KVShape, vocab: int, dtype: torch.dtype, batch=2, query=3, past=5):
    """Example sizes >= 2, so the exporter does not specialise any dynamic dim to 0 or 1."""
    ids = torch.randint(0, vocab, (batch, query))
    positions = torch.arange(past, past + query).repeat(batch, 1)
    mask = torch.ones(batch, 1, query, past + query, dtype=torch.bool)
    kv = [torch.randn(batch, shape.kv_heads, past, shape.head_dim, dtype=dtype) for _ in range(2 * shape.layers)]
    return ids, positions, mask, kv, torch.arange(1, query)  # K = Q - 1: K and Q stay separate dims


def dynamic_shapes(layers: int) -> dict:
    batch, query, capacity, total, kept = (torch.export.Dim(n) for n in ("batch", "query", "capacity", "total", "kept"))
    return {
        "input_ids": {0: batch, 1: query},
        "position_ids": {0: batch, 1: query},
        "attention_mask": {0: batch, 2: query, 3: total},
        "past": [{0: batch, 2: capacity} for _ in range(2 * layers)],
        "logit_positions": {0: kept},
    }
