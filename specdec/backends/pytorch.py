"""PyTorch backend: any Hugging Face causal LM, with a preallocated KV buffer and tree masks."""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin

from specdec.backends.base import Backend, BackendOptions
from specdec.backends.clock import ForwardClock, TimedForwards
from specdec.backends.graphs import HEADROOM, FixedShapes
from specdec.devices import Device, resolve_device
from specdec.errors import SpecdecError
from specdec.features import LayerInputs
from specdec.hf_compat import check_architecture
from specdec.models import context_limit, load_error, resolve_source

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PyTorchOptions(BackendOptions):
    device: Device = "cpu"
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = "float32"
    device_map: str | None = None  # e.g. "auto": spread a model larger than one device
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    revision: str | None = None
    trust_remote_code: bool = False
    cuda_graphs: bool = False  # replay forwards of up to 64 tokens as CUDA graphs (specdec.backends.graphs)
    graph_context: int = Field(2048, ge=128)  # KV slots the graphs attend over; the context is capped 64 below


class PyTorchBackend(TimedForwards, Backend):
    name = "pytorch"
    Options = PyTorchOptions
    returns_features = True

    def __init__(self, model: PreTrainedModel, fixed_context: int | None = None):
        """fixed_context: run at fixed shapes over a KV buffer of this many slots (CUDA graphs
        on a GPU, eagerly elsewhere; see specdec.backends.graphs); the context is capped HEADROOM
        slots below it."""
        self.cache_argument = check_architecture(model)  # the forward's name for the cache
        self.model = model.eval()
        config = model.config.get_text_config()
        self.vocab_size = config.vocab_size
        self.num_layers = config.num_hidden_layers
        self.max_length = context_limit(config)
        self.device = model.device
        self.dtype = model.dtype
        self.eos_token_ids = eos_token_ids(model)
        self._cache = Cache(layers=[_BufferLayer(fixed_context) for _ in range(config.num_hidden_layers)])
        self._committed = 0
        self._pending = 0
        self.clock = ForwardClock(self.device)
        self._feature_layers: tuple[int, ...] = ()  # whose inputs make `features` (request_features)
        self._layer_inputs = LayerInputs.of(self.model)
        self.fixed = None
        if fixed_context is not None:
            self.max_length = min(self.max_length, fixed_context - HEADROOM)
            self.fixed = FixedShapes(self.model, self._cache, self.cache_argument, fixed_context,
                                     capture=self.device.type == "cuda")

    @classmethod
    def load(cls, model: str, options: PyTorchOptions) -> PyTorchBackend:
        device = resolve_device(options.device)  # before the weights: a missing GPU is one line, at once
        if options.cuda_graphs and device.type != "cuda":
            raise SpecdecError(f"cuda_graphs needs a CUDA device; this backend runs on {device} (set device: cuda)")
        source = resolve_source(model, options.dtype)
        kwargs = dict(
            dtype="auto" if options.dtype == "auto" else DTYPES[options.dtype],
            attn_implementation=options.attn_implementation,
            revision=options.revision,
            trust_remote_code=options.trust_remote_code,
        )
        if options.device_map:
            kwargs["device_map"] = options.device_map
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except Exception as exc:
            raise load_error(model, exc) from exc
        if not options.device_map:
            hf_model = hf_model.to(device)
        return cls(hf_model, options.graph_context if options.cuda_graphs else None)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._pending:
            raise RuntimeError("prefill with pending entries; commit or rollback first")
        length = input_ids.shape[1]
        positions = torch.arange(self._committed, self._committed + length, device=self.device)
        causal = torch.ones(length, length, dtype=torch.bool, device=self.device).tril_()
        logits = self._run(input_ids, positions[None], causal[None], logits_to_keep=1)
        self._committed += length
        self._pending = 0
        if self.fixed is not None:
            self.fixed.capture_all([self._committed])
        return logits[:, -1]

    @torch.inference_mode()
    def forward(self, input_ids, position_ids, mask) -> torch.Tensor:
        with self.clock.timing():
            logits = self._run(input_ids, position_ids, mask, logits_to_keep=0)
        self._pending += input_ids.shape[1]
        self.forward_calls += 1
        return logits

    def input_embedding(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    def request_features(self, layers: tuple[int, ...]) -> None:
        if self.fixed is not None:
            raise SpecdecError("target features (an EAGLE-3 draft) do not run with cuda_graphs yet; set cuda_graphs: false")
        self._layer_inputs.watch(layers)
        self._feature_layers = tuple(layers)

    def _run(self, input_ids, position_ids, mask, logits_to_keep: int) -> torch.Tensor:
        logits = self._run_model(input_ids, position_ids, mask, logits_to_keep)
        if self._feature_layers:
            self.features = self._layer_inputs.concat(self._feature_layers)[0, : input_ids.shape[1]]  # [Q, F]
        return logits

    def _run_model(self, input_ids, position_ids, mask, logits_to_keep: int) -> torch.Tensor:
        """Inputs may be on the host: they are copied without waiting for the device (from pageable
        memory the copy stages the data before returning, so the caller may reuse it)."""
        query_len = input_ids.shape[1]
        if self.fixed is not None:
            used = self._committed + self._pending
            visible = torch.ones(1, query_len, used + query_len, dtype=torch.bool, device=mask.device)  # [1, Q, used + Q]
            visible[:, :, self._committed :] = mask
            return self.fixed.run(input_ids, position_ids, [used], visible, logits_to_keep)
        visible = self._committed + self._pending + query_len
        blocked = ~mask.to(self.device, non_blocking=True)  # [1, Q, S + Q]
        additive = torch.zeros(1, 1, query_len, visible, dtype=self.dtype, device=self.device)
        additive[..., self._committed :].masked_fill_(blocked[:, None], torch.finfo(self.dtype).min)
        out = self.model(
            input_ids=input_ids.to(self.device, non_blocking=True),
            position_ids=position_ids.to(self.device, non_blocking=True),
            attention_mask=additive,
            use_cache=True,
            **{self.cache_argument: self._cache},
            logits_to_keep=logits_to_keep,
        )
        return out.logits.float()  # [1, Q or 1, V]

    @torch.inference_mode()
    def commit(self, keep: list[int]) -> None:
        if keep != list(range(len(keep))):  # a prefix of pending is already in place
            index = torch.tensor(keep, dtype=torch.long) + self._committed  # [n], built on the host
            index = index.to(self.device, non_blocking=True)
            for layer in self._cache.layers:
                layer.move(index, self._committed)
        self._committed += len(keep)
        self._pending = 0
        for layer in self._cache.layers:
            layer.length = self._committed

    def op_profile(self, run) -> dict[str, float]:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])) as prof:
            run()
        return {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages() if e.self_cpu_time_total > 0}

    def reset(self) -> None:
        self._committed = 0
        self._pending = 0
        for layer in self._cache.layers:
            layer.length = 0


class _BufferLayer(CacheLayerMixin):
    """One layer's KV in a preallocated buffer [B, H_kv, capacity, D] that grows geometrically.

    Appending Q entries is an index write, not a `torch.cat` of the whole cache, so the cost of a
    step does not grow with the sequence length (apart from attention itself).

    With a fixed `capacity` (specdec.backends.graphs) the buffer is allocated once, zeroed (the
    mask hides unused slots, whose values must be finite), written at the device tensor `slots`
    and returned whole, so a forward has the same shapes and addresses at every step.
    """

    is_sliding = False

    def __init__(self, capacity: int | None = None):
        super().__init__()
        self.length = 0
        self.capacity = capacity
        self.slots: torch.Tensor | None = None  # [Q] buffer slots of the next update (fixed capacity)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        size = self.capacity or 0
        self._keys = key_states.new_zeros(*key_states.shape[:2], size, key_states.shape[-1])
        self._values = value_states.new_zeros(*value_states.shape[:2], size, value_states.shape[-1])
        self.is_initialized = True

    def _reserve(self, needed: int) -> None:
        capacity = self._keys.shape[-2]
        if needed <= capacity:
            return
        capacity = max(2 * capacity, needed + 256)  # headroom: a prefill is followed by steps
        for name in ("_keys", "_values"):
            old = getattr(self, name)
            new = old.new_empty(*old.shape[:2], capacity, old.shape[-1])
            new[..., : self.length, :] = old[..., : self.length, :]
            setattr(self, name, new)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.capacity is not None:
            self._keys.index_copy_(2, self.slots, key_states)
            self._values.index_copy_(2, self.slots, value_states)
            return self._keys, self._values
        end = self.length + key_states.shape[-2]
        self._reserve(end)
        self._keys[..., self.length : end, :] = key_states
        self._values[..., self.length : end, :] = value_states
        self.length = end
        self.keys = self._keys[..., :end, :]
        self.values = self._values[..., :end, :]
        return self.keys, self.values

    def bind(self, slots: torch.Tensor) -> None:
        """Fixed shapes: the next update writes at slots [1, Qb] (specdec.backends.graphs)."""
        self.slots = slots[0]

    def move(self, index: torch.Tensor, start: int) -> None:
        """Copy the entries at `index` [n] to positions start .. start + n - 1."""
        if not self.is_initialized:
            return
        end = start + index.shape[0]
        self._keys[..., start:end, :] = self._keys.index_select(-2, index)
        self._values[..., start:end, :] = self._values.index_select(-2, index)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = 0


def eos_token_ids(model: PreTrainedModel) -> frozenset[int]:
    """The end-of-sequence ids of a model's generation config (else its config)."""
    config = model.generation_config if model.generation_config is not None else model.config
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)

