"""What every backend that runs a specdec ONNX export shares (DESIGN.md section 5): the export's
manifest, the KV buffers and their bookkeeping, the tree-mask layout, chunked prefill, and the
optimization profiles an engine compiler needs. A subclass adds only how one forward executes
(`execute`): ONNX Runtime through I/O binding, TensorRT through tensor addresses.

Contract (specdec/export/onnx_graph.py): inputs input_ids, position_ids [1, Q], attention_mask
[1, 1, Q, C + Q] bool, past_key_values.{i}.key/value [1, H_kv, C, D]: a buffer of capacity C whose
slots the mask hides are ignored, and from format 4 logit_positions [K]; outputs logits [1, K, V]
([1, Q, V] before format 4), present.{i}.key/value [1, H_kv, Q, D] (the new entries only) and,
from format 3, features [1, Q, F] unless exported without (the hidden states entering the
manifest's `feature_layers`, for EAGLE-3 drafts). A prefill asks for the last position's logits
only; a tree forward for all. The export layer uses backends, never the reverse: exports made on
first use come from specdec.export.prepare.
"""

from __future__ import annotations

import functools
import json
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from specdec.backends.base import Backend
from specdec.backends.clock import ForwardClock, TimedForwards
from specdec.errors import SpecdecError

MANIFEST = "specdec_export.json"
FORMAT, FORMAT_VERSION = "specdec-onnx", 6
# format versions this specdec loads: 5 is 6 with the mask applied by a Where in every layer, 4 is
# 5 with its sibling projections unfused (both the same contract), 3 is 4 without
# logit_positions, 2 is 3 without features
READS = (2, 3, 4, 5, 6)
LOGIT_POSITIONS = "logit_positions"  # format 4: the last input
CAPACITY_STEP = 256  # the buffers grow by this many slots (growing copies the cache)
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_manifest(folder: Path) -> dict:
    """The manifest of an export folder, or one clear error saying what is wrong."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise SpecdecError(
            f"{str(folder)!r} is not a specdec ONNX export (no {MANIFEST}); "
            f"create one with: specdec export MODEL --format onnx --out {folder}"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SpecdecError(f"{path}: not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") not in READS:
        made_by = manifest.get("versions", {}).get("specdec", "an unknown version")
        raise SpecdecError(
            f"{path}: export format {manifest.get('format')!r} version {manifest.get('format_version')} "
            f"(made by specdec {made_by}); this specdec reads {FORMAT!r} versions {', '.join(map(str, READS))}: "
            "export the model again"
        )
    manifest.setdefault("feature_layers", [])  # format 2
    return manifest


def read_embedding(folder: Path) -> torch.Tensor:
    """The input embedding [V, H] of an export: the table its graph gathers `input_ids` from."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(Path(folder) / "model.onnx"), load_external_data=False).graph
    gathers = [n.input[0] for n in graph.node if n.op_type == "Gather" and len(n.input) == 2 and n.input[1] == "input_ids"]
    tables = [t for t in graph.initializer if t.name in gathers]
    if len(tables) != 1:
        raise SpecdecError(f"{folder}: cannot find the input embedding in the ONNX graph (no Gather of input_ids "
                           "from a stored table), which an EAGLE-3 draft shares; put the target on the pytorch backend")
    return torch.from_numpy(numpy_helper.to_array(tables[0], base_dir=str(folder)).copy())


def folder_eos(folder: Path) -> frozenset[int]:
    """The end-of-sequence ids saved beside an export (generation config, else model config)."""
    for name in ("generation_config.json", "config.json"):
        path = Path(folder) / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return frozenset([eos] if isinstance(eos, int) else eos)
    return frozenset()


@dataclass(frozen=True)
class Profile:
    """The (min, opt, max) query length Q, buffer capacity C, batch B and (format 4) count K of
    positions whose logits return (default: as Q) of one optimization profile."""

    name: str
    query: tuple[int, int, int]
    capacity: tuple[int, int, int]
    batch: tuple[int, int, int] = (1, 1, 1)
    kept: tuple[int, int, int] | None = None

    def shapes(self, manifest: dict) -> dict[str, list[tuple[int, ...]]]:
        """Input name -> [min, opt, max] shapes. In each set the mask's last dim is C + Q."""
        heads, dim = manifest["kv_heads"], manifest["head_dim"]
        sets = list(zip(self.query, self.capacity, self.batch))
        names = manifest["inputs"]
        shapes = {
            names[0]: [(b, q) for q, _, b in sets],
            names[1]: [(b, q) for q, _, b in sets],
            names[2]: [(b, 1, q, c + q) for q, c, b in sets],
        }
        shapes.update({name: [(b, heads, c, dim) for _, c, b in sets] for name in names[3:] if name != LOGIT_POSITIONS})
        if names[-1] == LOGIT_POSITIONS:
            shapes[LOGIT_POSITIONS] = [(k,) for k in self.kept or self.query]
        return shapes

    def holds(self, query: int, capacity: int, batch: int = 1) -> bool:
        return all(low <= size <= high for size, (low, _, high) in
                   ((query, self.query), (capacity, self.capacity), (batch, self.batch)))


def profiles(max_nodes: int, max_context: int, prefill_chunk: int, max_batch: int = 1) -> list[Profile]:
    """verify (Q 1..max_nodes, B 1..max_batch: the batched loop's forwards) and prefill (Q up to
    one prefill chunk, B 1: a sequence joining its row prefills alone), both over C 1..max_context.
    C is never 0: an empty cache is passed as one masked sentinel slot."""
    if not 1 <= max_nodes < max_context or not 1 <= prefill_chunk < max_context:
        raise SpecdecError(f"max_nodes ({max_nodes}) and prefill_chunk ({prefill_chunk}) must be at least 1 and "
                           f"below the context ({max_context})")
    if max_batch < 1:
        raise SpecdecError(f"max_batch must be at least 1, got {max_batch}")
    verify = Profile("verify", (1, min(16, max_nodes), max_nodes), (1, min(4 * CAPACITY_STEP, max_context), max_context),
                     (1, min(8, max_batch), max_batch))
    prefill = Profile("prefill", (1, prefill_chunk, prefill_chunk), (1, min(prefill_chunk, max_context), max_context),
                      kept=(1, 1, prefill_chunk))  # a prefill returns the last position's logits
    return [verify, prefill]


class OnnxContractBackend(TimedForwards, Backend):
    """KV buffers [1, H_kv, capacity, D] per layer and key/value, grown in CAPACITY_STEP slots
    (at most the context); the graph reads them in place (a prefill chunk: a copy of the filled
    slots) and returns only the new entries, which this class writes after the committed and
    pending ones."""

    returns_features = True  # exports of format 3 (request_features refuses the others in one line)
    max_batch: int | None = None  # most rows one forward may run (a TensorRT engine's profile); None: any
    call_slots: float | None = None  # a run's fixed cost in row-slots read: measured as BatchedOnnx makes its first batch of rows

    def __init__(self, manifest: dict, device: torch.device, eos_token_ids=frozenset(), prefill_chunk: int = 256):
        self.manifest = manifest
        self.folder: Path | None = None  # the export's folder, where `load` knows it (input_embedding)
        self.num_layers = manifest["layers"]
        self.picks_logits = manifest["inputs"][-1] == LOGIT_POSITIONS  # format 4: a prefill skips the others' logits
        if manifest.get("weights", {}).get("accuracy") == "int8":  # measured: docs/export.md#quantized-gguf-weights
            self.rows_interact = "onnxruntime's int8-activation kernels give a token other numbers when other tokens share its forward"
        self._feature_columns: torch.Tensor | None = None  # [F] of the features output, once requested
        self.vocab_size = manifest["vocab_size"]
        self.max_length = manifest["context"]
        self.device = device
        self.dtype = TORCH_DTYPES[manifest["dtype"]]
        self.eos_token_ids = frozenset(eos_token_ids)
        self.prefill_chunk = prefill_chunk
        self.forward_calls, self.clock = 0, ForwardClock(device)
        self.reset()

    @abstractmethod
    def execute(self, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        """Run the graph on `inputs` (in manifest["inputs"] order) into the preallocated `outputs`
        (manifest["outputs"] order); every tensor is contiguous on self.device."""

    def reset(self) -> None:
        layers, heads, dim = self.manifest["layers"], self.manifest["kv_heads"], self.manifest["head_dim"]
        # zeros: slots the mask hides must hold finite values
        self.kv = [torch.zeros(1, heads, 0, dim, dtype=self.dtype, device=self.device) for _ in range(2 * layers)]
        self._committed, self._pending = 0, 0

    def _reserve(self, needed: int) -> None:
        capacity = self.kv[0].shape[2]
        if needed <= capacity:
            return
        capacity = max(needed, min(-(-needed // CAPACITY_STEP) * CAPACITY_STEP, self.max_length))
        used = self._committed + self._pending
        for i, old in enumerate(self.kv):
            new = old.new_zeros(*old.shape[:2], capacity, old.shape[3])
            new[:, :, :used] = old[:, :, :used]
            self.kv[i] = new

    def input_embedding(self) -> torch.Tensor:
        if self.folder is None:
            raise SpecdecError("this ONNX backend was built without its export folder, where the input embedding is read")
        return read_embedding(self.folder).to(self.device)

    def request_features(self, layers: tuple[int, ...]) -> None:
        exported = self.manifest["feature_layers"]
        where = f" ({self.folder})" if self.folder else ""
        if not exported:
            raise SpecdecError(f"this ONNX export{where} has no features output (format {self.manifest['format_version']}, "
                               "or exported with --feature-layers none), which an EAGLE-3 draft reads; export the model again")
        missing = [i for i in layers if i not in exported]
        if missing:
            raise SpecdecError(f"this ONNX export{where} returns the inputs of layers {exported}, but the draft reads "
                               f"{list(layers)}; export again with --feature-layers {','.join(map(str, layers))}")
        hidden = self.manifest["hidden_size"]
        self._feature_columns = torch.cat([torch.arange(exported.index(i) * hidden, (exported.index(i) + 1) * hidden)
                                           for i in layers]).to(self.device)

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """In chunks of `prefill_chunk` tokens: the graph's attention materialises [Q, C + Q]
        scores per head, and a bounded Q keeps that (and an engine's prefill profile) small."""
        if self._pending:
            raise RuntimeError("prefill with pending entries; commit or rollback first")
        features = []
        for start in range(0, input_ids.shape[1], self.prefill_chunk):
            chunk = input_ids[:, start : start + self.prefill_chunk]
            length = chunk.shape[1]
            causal = torch.ones(length, length, dtype=torch.bool).tril_()[None]
            logits = self._forward(chunk, torch.arange(self._committed, self._committed + length)[None], causal, last_only=True,
                                   past_slots=self._committed)
            self.commit(list(range(length)))
            if self._feature_columns is not None:
                features.append(self.features)
        if features:
            self.features = torch.cat(features)  # [L, F], every prompt position
        return logits[:, -1]

    def forward(self, input_ids, position_ids, mask) -> torch.Tensor:
        return self._forward(input_ids, position_ids, mask, last_only=False)

    def _forward(self, input_ids, position_ids, mask, last_only: bool, past_slots: int | None = None) -> torch.Tensor:
        """A timed forward -> logits [1, Q, V], or [1, 1, V] (the last position's) if `last_only`
        and the export can skip the others (format 4). With `past_slots` None the graph reads the
        buffers in place, all their slots; else a copy of their first `past_slots` (at least one)."""
        with self.clock.timing():
            logits = self._run(input_ids, position_ids, mask, last_only, past_slots)
        self.forward_calls += 1
        return logits

    def _run(self, input_ids, position_ids, mask, last_only: bool, past_slots: int | None) -> torch.Tensor:
        query, used = input_ids.shape[1], self._committed + self._pending
        self._reserve(used + query)
        # An empty cache is passed as one sentinel slot that the mask hides (no dimension is 0). A
        # prefill chunk reads a copy of the filled slots: every slot the graph reads costs Q (up to
        # a chunk) score columns, and the buffer holds at least Q more (SmolLM2-135M's prefill of
        # the 48 chat prompts on onnxruntime: 36.6 s over copies, 40.1 s over the whole buffer).
        if past_slots is not None:
            past = [t[:, :, : max(past_slots, 1)].contiguous() for t in self.kv]
        else:
            past = self.kv if used else [t[:, :, :1] for t in self.kv]
        capacity = past[0].shape[2]
        mask = mask.to(self.device, non_blocking=True)
        full = torch.zeros(1, 1, query, capacity + query, dtype=torch.bool, device=self.device)  # [1, 1, Q, C + Q]
        full[0, 0, :, : self._committed] = True
        full[0, 0, :, self._committed : used] = mask[0, :, : self._pending]
        full[0, 0, :, capacity:] = mask[0, :, self._pending :]
        kept = self.logit_count(query, last_only)
        outputs = self.output_buffers(query, kept)
        self.execute(self.graph_inputs(input_ids, position_ids, full, [t.contiguous() for t in past], kept), outputs)
        for buffer, new in zip(self.kv, outputs[1 : 1 + len(self.kv)]):
            buffer[:, :, used : used + query] = new
        if self._feature_columns is not None:
            self.features = outputs[-1][0].index_select(1, self._feature_columns)  # [Q, F]
        self._pending += query
        return outputs[0].float()

    def graph_inputs(self, ids, positions, mask, past: list[torch.Tensor], kept: int | None = None) -> list[torch.Tensor]:
        """The graph's inputs in the manifest's order, on the device: ids, positions [B, Q], the mask
        [B, 1, Q, C + Q], the past buffers, then (format 4) the positions [K] whose logits to return:
        the last `kept` (see `logit_count`; default all)."""
        query = ids.shape[1]
        inputs = [t.to(self.device, torch.long, non_blocking=True) for t in (ids, positions)]
        inputs += [mask.to(self.device, non_blocking=True)] + past
        if self.picks_logits:
            inputs.append(torch.arange(query - (query if kept is None else kept), query, device=self.device))
        return inputs

    def logit_count(self, query: int, last_only: bool) -> int:
        """K: how many positions' logits a forward of `query` tokens returns."""
        return 1 if last_only and self.picks_logits else query

    def output_buffers(self, query: int, kept: int | None = None) -> list[torch.Tensor]:
        """Empty outputs for a forward of `query` tokens, in the manifest's order: logits [1, K, V]
        (K = `kept`, default Q), the presents [1, H_kv, Q, D], then features [1, Q, F] if the
        export has them."""
        empty = functools.partial(torch.empty, dtype=self.dtype, device=self.device)
        outputs = [empty(1, query if kept is None else kept, self.vocab_size)]
        outputs += [empty(1, t.shape[1], query, t.shape[3]) for t in self.kv]
        if self.manifest["feature_layers"]:
            outputs.append(empty(1, query, len(self.manifest["feature_layers"]) * self.manifest["hidden_size"]))
        return outputs

    def commit(self, keep: list[int]) -> None:
        if keep != list(range(len(keep))):  # a prefix of pending is already in place
            index = torch.tensor(keep, dtype=torch.long).to(self.device, non_blocking=True) + self._committed
            end = self._committed + len(keep)
            for buffer in self.kv:
                buffer[:, :, self._committed : end] = buffer.index_select(2, index)
        self._committed += len(keep)
        self._pending = 0
