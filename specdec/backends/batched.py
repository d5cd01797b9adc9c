"""Batched forwards: B rows over one model and one KV buffer per layer, [B, H_kv, capacity, D].

Each row is a `Backend` of its own (`Row`), with its own committed and pending entries, so a
`Sequence` (specdec/decode.py) runs on it unchanged. `BatchedRows.forward_rows` runs the forwards
of several rows as one model call; `BatchedPyTorch` runs it on a pytorch model (below), and
`BatchedOnnx` on an ONNX-contract export (specdec/backends/batched_onnx.py). On pytorch:
- row b's entries live in slots 0 .. used_b - 1 of buffer row b (used = committed + pending); the
  call attends over slots 0 .. S - 1, S the largest row's end, and the additive mask hides each
  row's slots that are not its own committed, pending or new entries;
- queries are padded to the longest row's Q; a padding query sees only itself, and its KV lands
  past the row's real entries, where a later forward or commit overwrites it;
- a call spans rows 0 .. k - 1, k - 1 the highest row with a forward, so the buffer is handed to
  attention as a view, never gathered; a row below k without a forward gets padding queries. The
  batched loop keeps its sequences in the lowest rows (`move_row`), so a draining batch costs what
  its running rows cost.
A prefill (a sequence joining its row) runs alone on that row's view of the buffer. With
`cuda_graphs` (specdec/backends/graphs.py) the buffer has a fixed capacity, every call attends over
all of it, and a call over k rows runs over the smallest row bucket of at least k rows at a
bucketed Q, so that each (rows, Q) bucket replays as one CUDA graph.

Example (2 rows; row 0 has 5 committed and a 3-node tree, row 1 has 2 committed and 1 query):
Q = 3, S = 8; row 1's queries 1 and 2 are padding at slots 3 and 4, each seeing only itself.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from specdec import lockstep
from specdec.backends.base import Backend, BackendOptions
from specdec.backends.clock import ForwardClock
from specdec.backends.graphs import FixedShapes
from specdec.backends.pytorch import PyTorchBackend
from specdec.errors import SpecdecError
from specdec.features import LayerInputs


class _RowsLayer(CacheLayerMixin):
    """One layer's KV for every row: [B, H_kv, capacity, D], grown geometrically (or allocated
    once at a fixed `capacity`: specdec.backends.graphs). Each model call first sets `select` (the
    rows it runs), `slots` [n, Q] (where each row's new entries go) and `end` (the slots attention
    reads)."""

    is_sliding = False

    def __init__(self, rows: int, capacity: int | None = None):
        super().__init__()
        self.rows, self.capacity = rows, capacity
        self.select = slice(0, rows)
        self.slots: torch.Tensor | None = None
        self.end = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        size = self.capacity or 0
        self._keys = key_states.new_zeros(self.rows, key_states.shape[1], size, key_states.shape[-1])
        self._values = value_states.new_zeros(self.rows, value_states.shape[1], size, value_states.shape[-1])
        self.is_initialized = True

    def _reserve(self, needed: int) -> None:
        capacity = self._keys.shape[2]
        if needed <= capacity:
            return
        capacity = max(2 * capacity, needed + 256)
        for name in ("_keys", "_values"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:2], capacity, old.shape[-1])  # zeros: masked slots stay finite
            new[:, :, : old.shape[2]] = old
            setattr(self, name, new)

    def update(self, key_states, value_states, *args, **kwargs):
        """key_states, value_states [n, H_kv, Q, D] -> the selected rows' keys, values [n, H_kv, end, D]."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.capacity is None:  # a fixed buffer never grows (and a captured graph cannot ask slots.max())
            self._reserve(max(self.end, int(self.slots.max()) + 1))
        rows = torch.arange(self.select.start, self.select.stop, device=self.device)[:, None]  # [n, 1]
        self._keys[rows, :, self.slots] = key_states.transpose(1, 2)  # [n, Q, H_kv, D]
        self._values[rows, :, self.slots] = value_states.transpose(1, 2)
        return self._keys[self.select, :, : self.end], self._values[self.select, :, : self.end]

    def bind(self, slots: torch.Tensor) -> None:
        """Fixed shapes: the next call runs rows 0 .. k - 1 at slots [k, Qb] over the whole buffer."""
        self.select, self.slots, self.end = slice(0, slots.shape[0]), slots, self.capacity

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.end, 0

    def get_seq_length(self) -> int:
        return 0  # positions are always given

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        pass


class BatchedRows(ABC):
    """`rows` sequences over one model. A subclass keeps the KV buffers (`buffers`) and runs one
    model call over rows 0 .. k - 1 (`_call`)."""

    clock: ForwardClock

    def __init__(self, backend: Backend, rows: int):
        self.rows = [Row(self, backend, b) for b in range(rows)]

    @abstractmethod
    def buffers(self) -> list[torch.Tensor]:
        """Every layer's key and value buffer, [B, H_kv, capacity, D] (none before the first call)."""

    @abstractmethod
    def _call(self, span: int, ids: torch.Tensor, positions: torch.Tensor, used: list[int],
              visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One model call over rows 0 .. span - 1: ids, positions [k, Q]; row b's existing entries
        are slots 0 .. used[b] - 1, its new ones go to slots used[b] .. used[b] + Q - 1, and
        visible [k, Q, max(used) + Q] says what each query sees, existing slots first, then the
        Q new entries -> logits [k, Q, V], features [k, Q, F] (or None)."""

    @abstractmethod
    def prefill_row(self, index: int, input_ids: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append a prompt [1, L] to row `index` after its `start` entries -> last logits [1, V],
        features [L, F] (or None)."""

    @torch.inference_mode()
    def forward_rows(self, requests: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict[int, torch.Tensor]:
        """{row: (input_ids, position_ids [1, Q_b], mask [1, Q_b, S_b + Q_b])} -> {row: logits [Q_b, V]}
        from one model call over rows 0 .. max(requests); each row's Q_b entries become pending,
        as `Backend.forward` would."""
        span = self._span(max(requests) + 1)
        query = max(ids.shape[1] for ids, _, _ in requests.values())
        used = [row.committed_len + row.pending_len for row in self.rows[:span]]
        ids = torch.zeros(span, query, dtype=torch.long)  # [k, Q]
        positions = torch.tensor(used)[:, None] + torch.arange(query)  # [k, Q]
        positions.clamp_(max=self.rows[0].max_length - 1)  # padding queries: any valid position
        visible = torch.zeros(span, query, max(used) + query, dtype=torch.bool)  # [k, Q, S + Q]
        width = max(used)
        for b, row in enumerate(self.rows[:span]):
            visible[b, :, : row.committed_len] = True
            count = 0
            if b in requests:
                row_ids, row_positions, mask = requests[b]
                count = row_ids.shape[1]
                ids[b, :count], positions[b, :count] = row_ids[0], row_positions[0]
                visible[b, :count, row.committed_len : used[b]] = mask[0, :, : row.pending_len]
                visible[b, :count, width : width + count] = mask[0, :, row.pending_len :]
            padding = torch.arange(count, query)
            visible[b, padding, width + padding] = True  # a padding query sees itself
        before = self.clock.seconds
        with self.clock.timing():
            logits, features = self._call(span, ids, positions, used, visible)  # [k, Q, V]
        seconds = self.clock.seconds - before
        out = {}
        for b, (row_ids, _, _) in requests.items():
            row = self.rows[b]
            row._pending += row_ids.shape[1]
            row.forward_calls += 1
            row.forward_seconds += seconds  # each row's forward took the whole call
            out[b] = logits[b, : row_ids.shape[1]]
            if features is not None:
                row.features = features[b, : row_ids.shape[1]]  # [Q_b, F]
        return out

    def _span(self, rows: int) -> int:
        """Rows a call over rows 0 .. rows - 1 runs (a subclass may pad them to a fixed shape)."""
        return rows

    @torch.inference_mode()
    def keep(self, index: int, keep: list[int], start: int) -> None:
        """In row `index`, move the entries at start + keep[i] to slots start .. start + len(keep) - 1."""
        if keep == list(range(len(keep))):
            return
        slots = torch.tensor(keep, dtype=torch.long) + start
        for buffer in self.buffers():
            slots = slots.to(buffer.device)
            buffer[index, :, start : start + len(keep)] = buffer[index].index_select(1, slots)

    @torch.inference_mode()
    def move_row(self, source: int, destination: int) -> None:
        """Move the sequence of row `source` (its committed entries; none pending) to the unused
        row `destination`: the `Row` object moves with it, so whoever holds it keeps using it."""
        moving, free = self.rows[source], self.rows[destination]
        if moving.pending_len:
            raise RuntimeError("move a row between steps, with nothing pending")
        for buffer in self.buffers():
            buffer[destination, :, : moving.committed_len] = buffer[source, :, : moving.committed_len]
        moving.index, free.index = destination, source
        self.rows[source], self.rows[destination] = free, moving
        free.reset()


class BatchedPyTorch(BatchedRows):
    """`rows` sequences over the model of a pytorch backend (its weights are shared, not copied)."""

    def __init__(self, backend: PyTorchBackend, rows: int):
        self.model, self.device, self.dtype = backend.model, backend.device, backend.dtype
        self.cache_argument = backend.cache_argument
        self.feature_layers = backend._feature_layers  # an EAGLE-3 draft reads the inputs of these layers
        self.layer_inputs = LayerInputs.of(self.model)
        capacity = backend.fixed.capacity if backend.fixed is not None else None  # cuda_graphs: fixed shapes
        self.cache = Cache(layers=[_RowsLayer(rows, capacity) for _ in range(backend.num_layers)])
        self.fixed = None if capacity is None else FixedShapes(self.model, self.cache, self.cache_argument, capacity,
                                                               backend.fixed.capture, rows)
        self.clock = ForwardClock(self.device)
        super().__init__(backend, rows)

    def buffers(self) -> list[torch.Tensor]:
        return [t for layer in self.cache.layers if layer.is_initialized for t in (layer._keys, layer._values)]

    def _span(self, rows: int) -> int:
        """With fixed shapes, the smallest row bucket of at least `rows` rows (the rows past them
        get padding queries only)."""
        return rows if self.fixed is None else next(bucket for bucket in self.fixed.row_buckets if bucket >= rows)

    def _call(self, span, ids, positions, used, visible):
        """The new entries of row b sit right after its own: the [k, 1, Q, S] additive mask puts
        each row's columns of `visible` at its slots, S = max(used) + Q."""
        if self.fixed is not None:
            return self.fixed.run(ids, positions, used, visible), None
        query, width = ids.shape[1], max(used)
        additive = torch.full((span, 1, query, width + query), torch.finfo(self.dtype).min, dtype=self.dtype)
        for b in range(span):
            additive[b, 0, :, : used[b]].masked_fill_(visible[b, :, : used[b]], 0.0)
            additive[b, 0, :, used[b] : used[b] + query].masked_fill_(visible[b, :, width:], 0.0)
        slots = torch.tensor(used)[:, None] + torch.arange(query)  # [k, Q]
        return self._run(slice(0, span), ids, positions, additive, slots, width + query, 0)

    def prefill_row(self, index, input_ids, start):
        length = input_ids.shape[1]
        slots = torch.arange(start, start + length)[None]  # [1, L]
        additive = torch.zeros(1, 1, length, start + length, dtype=self.dtype)
        causal = torch.ones(length, length, dtype=torch.bool).tril_()
        additive[0, 0, :, start:].masked_fill_(~causal, torch.finfo(self.dtype).min)
        logits, features = self._run(slice(index, index + 1), input_ids, slots, additive, slots, start + length, 1)
        if self.fixed is not None:
            used = [row.committed_len + row.pending_len for row in self.rows]
            used[index] = start + length
            self.fixed.capture_all(used)
        return logits[:, -1], None if features is None else features[0]

    def _run(self, select: slice, ids, positions, additive, slots, end: int, logits_to_keep: int):
        """One model call over the rows `select` -> logits [n, Q or 1, V], features [n, Q, F] (or None)."""
        for layer in self.cache.layers:
            layer.select, layer.slots, layer.end = select, slots.to(self.device), end
        out = self.model(
            input_ids=ids.to(self.device), position_ids=positions.to(self.device),
            attention_mask=additive.to(self.device), use_cache=True, logits_to_keep=logits_to_keep,
            **{self.cache_argument: self.cache},
        )
        features = self.layer_inputs.concat(self.feature_layers) if self.feature_layers else None
        return out.logits.float(), features


class Row(Backend):
    """One row of a `BatchedRows`: the Backend contract over that row's entries."""

    name = "row"
    Options = BackendOptions

    def __init__(self, batch: BatchedRows, backend: Backend, index: int):
        # a weak reference: the batch holds its rows, and a cycle would keep its KV buffers alive
        # after the batch is dropped, until Python's cyclic collector ran (hundreds of MB a
        # `generate_batch` call)
        self.batch, self.index, self.name = weakref.proxy(batch), index, backend.name
        self.vocab_size, self.max_length, self.device = backend.vocab_size, backend.max_length, backend.device
        self.eos_token_ids, self.num_layers = backend.eos_token_ids, backend.num_layers
        self.features: torch.Tensor | None = None
        self.forward_calls, self.forward_seconds = 0, 0.0
        self._committed = self._pending = 0

    @classmethod
    def load(cls, model: str, options: BackendOptions) -> Row:
        raise SpecdecError("a batch row is made by a batched backend, not loaded")

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._pending:
            raise RuntimeError("prefill with pending entries; commit or rollback first")
        logits, features = self.batch.prefill_row(self.index, input_ids, self._committed)
        if features is not None:
            self.features = features  # [L, F]
        self._committed += input_ids.shape[1]
        return logits

    def forward(self, input_ids, position_ids, mask) -> torch.Tensor:
        return lockstep.forward(self, (input_ids, position_ids, mask))  # batched with other rows' in a step

    @classmethod
    def forward_many(cls, calls: list[tuple[Row, tuple]]) -> list[torch.Tensor]:
        """Rows of one batch -> one model call."""
        out = calls[0][0].batch.forward_rows({row.index: request for row, request in calls})
        return [out[row.index][None] for row, _ in calls]

    def commit(self, keep: list[int]) -> None:
        self.batch.keep(self.index, keep, self._committed)
        self._committed += len(keep)
        self._pending = 0

    def reset(self) -> None:
        self._committed = self._pending = 0
