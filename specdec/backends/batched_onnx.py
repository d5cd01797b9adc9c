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

Rows of very different lengths are split into two graph runs (`groups`) when that reads fewer
slots: at B = 8 with one row of 1,800 entries and seven of under 192, one run reads 8 x 1,856
slots (123 ms on the AMD EPYC of BENCHMARKS.md), while the long row alone (40 ms) and the seven
short rows over a copy of their first 192 slots (49 ms, and the copy) read under a quarter of
that. Each extra run costs the graph's fixed work (the weights), which this measures once, as a
number of row-slots (`measure_call_slots`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from specdec.backends.batched import BatchedRows
from specdec.backends.clock import ForwardClock
from specdec.backends.onnx_contract import OnnxContractBackend

COPY_COST = 3  # a row-slot read from a copy costs this many read in place (copied, then read)
FIT_STEP = 32  # capacity is the longest row rounded up to this many slots (resizing copies the cache)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch's own work around a graph run (masks, the cache write) on one thread. Its OpenMP
    workers woken for them otherwise spin beside onnxruntime's threads: on the real pair at B = 16
    (2 cores) `ar`'s forwards took 98 to 105 ms a step with them and 82 without
    (`scripts/paired_batch.py ... --batch-sizes 16 --steps`, BENCHMARKS.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
        if rows > 1:
            self.measure_call_slots()  # now, so that no step's timing holds it

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
        groups = self.groups(used)
        if len(groups) == 1:
            return self._execute(groups[0][0], ids, positions, used, visible)
        width, logits, features = max(used), None, None
        for rows, slots in groups:  # each group's mask: its rows' first max(used) columns, then the new entries
            index = torch.tensor(rows)
            part_visible = torch.cat([visible[index, :, : max(used[b] for b in rows)], visible[index, :, width:]], dim=2)
            part_logits, part_features = self._execute(rows, ids[index], positions[index], [used[b] for b in rows],
                                                       part_visible, past_slots=slots)
            if logits is None:
                logits = part_logits.new_empty(span, *part_logits.shape[1:])  # [k, Q, V]
                features = None if part_features is None else part_features.new_empty(span, *part_features.shape[1:])
            logits[index] = part_logits
            if features is not None:
                features[index] = part_features
        return logits, features

    def groups(self, used: list[int]) -> list[tuple[list[int], int | None]]:
        """The rows of a call (holding `used` entries each) as one or two graph runs, whichever
        reads fewer row-slots, an extra run's fixed cost counted as `measure_call_slots` ->
        [(rows, past slots: None to read the buffers in place, else a copy of that many first
        slots)]. A run reads in place only over consecutive rows, at the whole capacity; a copy
        costs its slots three times (copying costs one to two reads: 15 rows of 160 slots of
        SmolLM2-135M took 11 to 27 ms to copy and about 14 ms to read in the graph). Two runs
        split the rows by length, or take a range of consecutive rows (the long ones and those
        between them) in place and the others from a copy."""
        whole = list(range(len(used)))
        if len(used) == 1:  # nothing to split (and a batch of one row has not measured `fixed`)
            return [(whole, None)]
        capacity, fixed = self.cache.shape[3], self.measure_call_slots()  # measured as the batch was made

        def run(rows: list[int]) -> tuple[float, int | None]:
            copy = min(capacity, max(slots[b] for b in rows))
            copied = COPY_COST * len(rows) * copy
            if _consecutive(rows) and len(rows) * capacity <= copied:
                return len(rows) * capacity, None
            return copied, copy

        slots = [max(1, -(-u // FIT_STEP) * FIT_STEP) for u in used]
        fewest = sum(min(capacity, COPY_COST * s) for s in slots) + fixed  # what any split costs at least
        if fewest >= len(used) * capacity:  # no split pays (most steps)
            return [(whole, None)]
        order, longest = sorted(whole, key=lambda b: -used[b]), max(whole, key=lambda b: used[b])
        firsts = [order[:split] for split in range(1, len(used))]
        firsts += [whole[start:end] for start in range(longest + 1) for end in range(longest + 1, len(used) + 1)
                   if end - start < len(used)]  # the in-place ranges holding the longest row
        best = (len(used) * capacity, [(whole, None)])  # one run over all rows, in place
        for first in firsts:
            parts = [sorted(first), [b for b in whole if b not in first]]
            (one, one_slots), (other, other_slots) = run(parts[0]), run(parts[1])
            if one + other < best[0]:
                best = (one + other, [(parts[0], one_slots), (parts[1], other_slots)])
        if len(best[1]) == 1 or best[0] + fixed >= len(used) * capacity:  # the extra run's fixed cost
            return [(whole, None)]
        return best[1]

    def measure_call_slots(self) -> float:
        """A graph run's fixed cost (the work that does not grow with the cache: the weights) as a
        number of row-slots read, measured once on one row at two capacities: t(C) = r (F + C)
        -> F; infinite (never split) where the reading cost does not show. Kept on the backend, for
        every batch over it; a batch of several rows measures it when it is made."""
        if self.backend.call_slots is None:
            small = FIT_STEP
            large = min(2048, (self.backend.max_length - 1) // FIT_STEP * FIT_STEP)
            probe = BatchedOnnx(self.backend, 1)
            times = {small: [], large: []}
            for _ in range(5):  # interleaved, so that a slow patch of the machine falls on both
                for capacity in times:
                    times[capacity] += time_runs(probe, 1, capacity, repeats=1, warmup=1)
            short, long = min(times[small]), min(times[large])  # the least disturbed runs
            per_slot = (long - short) / (large - small) if large > small else 0.0
            self.backend.call_slots = max(0.0, short / per_slot - small) if per_slot > 0 else math.inf
        return self.backend.call_slots

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
            logits, chunk_features = self._execute([index], chunk, torch.arange(used, used + length)[None], [used], visible,
                                                   last_only=True, past_slots=max(used, 1))
            if chunk_features is not None:
                features.append(chunk_features[0])
        return logits[:, -1], torch.cat(features) if features else None

    @one_torch_thread()
    def _execute(self, rows: list[int], ids, positions, used: list[int], visible, last_only: bool = False,
                 past_slots: int | None = None):
        """One graph run over `rows` (see `BatchedRows._call`; ids, positions, used and visible
        are theirs, in that order); logits of the last position alone if `last_only` (where the
        export can skip the others). With `past_slots` None the graph reads the buffers in place,
        all their slots (`rows` must be consecutive: a view, not a copy); else a copy of their
        first `past_slots` slots: a prefill reads only its row's entries (or one masked sentinel
        slot when there are none), so it does not attend over slots the other rows grew."""
        count, query = ids.shape
        index = torch.tensor(rows, device=self.device)
        if past_slots is None:  # [k, H_kv, C, D] views
            past = [t[rows[0] : rows[-1] + 1] for t in self.kv]
        elif _consecutive(rows):  # [k, H_kv, past_slots, D] copies; slicing copies faster than gathering
            past = [t[rows[0] : rows[-1] + 1, :, :past_slots].contiguous() for t in self.kv]
        else:
            past = [t[:, :, :past_slots].index_select(0, index) for t in self.kv]
        width, capacity = max(used), past[0].shape[2]
        mask = torch.zeros(count, 1, query, capacity + query, dtype=torch.bool)  # [k, 1, Q, C + Q]
        mask[:, 0, :, :width] = visible[:, :, :width]
        mask[:, 0, :, capacity:] = visible[:, :, width:]
        kept = self.backend.logit_count(query, last_only)
        outputs, presents = self._outputs(count, query, kept)
        self.backend.execute(self.backend.graph_inputs(ids, positions, mask, past, kept), outputs)
        slots = (torch.tensor(used)[:, None] + torch.arange(query)).to(self.device)  # [k, Q]
        self.cache[:, index[:, None], :, slots] = presents.permute(1, 3, 0, 2, 4)  # [k, Q, 2L, H_kv, D]
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


def _consecutive(rows: list[int]) -> bool:
    return rows == list(range(rows[0], rows[-1] + 1))


def time_runs(batch: BatchedOnnx, rows: int, capacity: int, repeats: int, warmup: int = 2) -> list[float]:
    """Seconds of `repeats` graph runs of one query per row over rows 0 .. rows - 1 of `batch`,
    whose buffers hold `capacity` slots (a multiple of FIT_STEP, or the nearest above), after
    `warmup` runs (the first runs of a new shape plan its memory)."""
    batch._fit(capacity)
    used = min(capacity, 150) - 1  # every row holds this many entries; the graph reads all slots anyway
    ids = torch.zeros(rows, 1, dtype=torch.long)  # [B, 1]
    positions = torch.full((rows, 1), used)  # [B, 1]
    visible = torch.ones(rows, 1, used + 1, dtype=torch.bool)  # [B, 1, S + 1]
    seconds = []
    for repeat in range(warmup + repeats):
        start = time.perf_counter()
        batch._execute(list(range(rows)), ids, positions, [used] * rows, visible)
        if repeat >= warmup:
            seconds.append(time.perf_counter() - start)
    return seconds
