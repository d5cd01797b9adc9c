"""Batched forwards on an ONNX-contract export (specdec/backends/onnx_contract.py), through the
contract's batch dimension: B rows of KV buffers [B, H_kv, capacity, D] per layer and key/value,
views of one tensor [2L, B, H_kv, capacity, D] (so that one write stores a forward's new entries).

A call over rows 0 .. k - 1 passes their buffers (a contiguous view, never a copy) as the past and
a mask [k, 1, Q, C + Q], C the capacity: in the graph the Q new entries come after the C past
slots. The graph reads all C slots of every row, so C follows the longest row closely (rounded up
to FIT_STEP slots, and shrunk when the longest rows leave): at B = 8 on SmolLM2-135M each 32 slots
of capacity cost 0.7 to 0.9 ms of a forward's 37 to 54 ms (scripts/batch_forward_cost.py).

Each row's Q new entries (`present`, [k, H_kv, Q, D]) are then written at its own slots
used_b .. used_b + Q - 1; a padding query's entry lands past the row's real ones, where a later
forward or commit overwrites it. Rows, bookkeeping and masks are shared with the pytorch path
(specdec/backends/batched.py).
"""

from __future__ import annotations

import torch

from specdec.backends.batched import BatchedRows
from specdec.backends.clock import ForwardClock
from specdec.backends.onnx_contract import OnnxContractBackend

FIT_STEP = 32  # capacity is the longest row rounded up to this many slots (resizing copies the cache)


class BatchedOnnx(BatchedRows):
    """`rows` sequences over the session (or engine) of an ONNX-contract backend."""

    def __init__(self, backend: OnnxContractBackend, rows: int):
        self.backend, self.device, self.dtype = backend, backend.device, backend.dtype
        heads, dim = backend.manifest["kv_heads"], backend.manifest["head_dim"]
        # every layer's key and value buffer in one tensor [2L, B, H_kv, C, D], so that one write
        # stores a forward's new entries; zeros: slots the mask hides must hold finite values
        self.cache = torch.zeros(2 * backend.num_layers, rows, heads, 0, dim, dtype=self.dtype, device=self.device)
        self.kv = list(self.cache.unbind(0))  # [B, H_kv, C, D] views, bound to the graph as they are
        self.clock = ForwardClock(self.device)
        super().__init__(backend, rows)

    def buffers(self) -> list[torch.Tensor]:
        return self.kv

    def _fit(self, needed: int) -> None:
        """Make the capacity hold `needed` slots and every row's entries, rounded up to FIT_STEP;
        shrink it when it is more than one step over that (the longest rows left)."""
        live = max(needed, *(row.committed_len + row.pending_len for row in self.rows))
        fitted = max(live, min(-(-live // FIT_STEP) * FIT_STEP, self.backend.max_length))
        capacity = self.cache.shape[3]
        if live <= capacity <= fitted + FIT_STEP:
            return
        old = self.cache
        self.cache = old.new_empty(*old.shape[:3], fitted, old.shape[4])
        kept = min(capacity, fitted)
        self.cache[:, :, :, :kept] = old[:, :, :, :kept]
        self.cache[:, :, :, kept:] = 0  # slots the mask hides must hold finite values
        self.kv = list(self.cache.unbind(0))

    def _call(self, span, ids, positions, used, visible):
        self._fit(max(used) + ids.shape[1])
        return self._execute(0, ids, positions, used, visible)

    def prefill_row(self, index, input_ids, start):
        """In chunks of the backend's `prefill_chunk` tokens, as a single sequence's prefill; the
        capacity grows once for the whole prompt (each growth copies every row's buffers)."""
        features, chunk_size = [], self.backend.prefill_chunk
        self._fit(start + input_ids.shape[1])
        for offset in range(0, input_ids.shape[1], chunk_size):
            chunk = input_ids[:, offset : offset + chunk_size]
            length, used = chunk.shape[1], start + offset
            visible = torch.ones(1, length, used + length, dtype=torch.bool)  # [1, L, S + L]
            visible[0, :, used:] = torch.ones(length, length, dtype=torch.bool).tril_()
            logits, chunk_features = self._execute(index, chunk, torch.arange(used, used + length)[None], [used], visible,
                                                   last_only=True, past_slots=max(used, 1))
            if chunk_features is not None:
                features.append(chunk_features[0])
        return logits[:, -1], torch.cat(features) if features else None

    def _execute(self, first: int, ids, positions, used: list[int], visible, last_only: bool = False,
                 past_slots: int | None = None):
        """One graph run over rows first .. first + k - 1 (see `BatchedRows._call`); logits of the
        last position alone if `last_only` (where the export can skip the others). The graph reads
        `past_slots` slots of the buffers (default all: a view, not a copy); a prefill reads only
        its row's entries (a copy of them, or one masked sentinel slot when there are none), so it
        does not attend over slots the other rows grew."""
        count, query = ids.shape
        rows = slice(first, first + count)
        past = [t[rows] for t in self.kv]  # [k, H_kv, C, D] views
        if past_slots is not None:
            past = [t[:, :, :past_slots].contiguous() for t in past]
        width, capacity = max(used), past[0].shape[2]
        mask = torch.zeros(count, 1, query, capacity + query, dtype=torch.bool)  # [k, 1, Q, C + Q]
        mask[:, 0, :, :width] = visible[:, :, :width]
        mask[:, 0, :, capacity:] = visible[:, :, width:]
        kept = self.backend.logit_count(query, last_only)
        outputs, presents = self._outputs(count, query, kept)
        self.backend.execute(self.backend.graph_inputs(ids, positions, mask, past, kept), outputs)
        index = torch.arange(first, first + count, device=self.device)[:, None]  # [k, 1]
        slots = (torch.tensor(used)[:, None] + torch.arange(query)).to(self.device)  # [k, Q]
        self.cache[:, index, :, slots] = presents.permute(1, 3, 0, 2, 4)  # [k, Q, 2L, H_kv, D]
        columns = self.backend._feature_columns
        features = outputs[-1].index_select(2, columns) if columns is not None else None  # [k, Q, F]
        return outputs[0].float(), features

    def _outputs(self, count: int, query: int, kept: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Empty outputs of a run over `count` rows -> (the graph's outputs: logits [k, K, V], the
        presents [k, H_kv, Q, D] of each layer's key and value, then features [k, Q, F_all] if the
        export has them; the presents as one tensor [2L, k, H_kv, Q, D], whose views they are)."""
        one = self.backend.output_buffers(query, kept)  # a single sequence's, batch 1 (empty: nothing is filled)
        layers = len(self.kv)
        presents = torch.empty(layers, count, *one[1].shape[1:], dtype=one[1].dtype, device=self.device)
        logits, *features = (torch.empty(count, *t.shape[1:], dtype=t.dtype, device=self.device)
                             for t in [one[0], *one[1 + layers :]])
        return [logits, *presents.unbind(0), *features], presents
