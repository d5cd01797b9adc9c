"""The batched loop: up to B sequences advance together, one target forward per step for all.

Each sequence has its own strategy (a fresh copy of the decoder's: adaptive state is per
sequence), its own row of the draft (a row of a batched draft model, or an EAGLE-3 head of its
own) and its own row of the target's KV buffer (specdec/backends/batched.py). One step: the running
sequences draft their trees in lockstep, so that the draft forwards of a round run as one call
(specdec/lockstep.py); one target forward scores all the trees; each sequence verifies and
commits its own path. A sequence that stops leaves its row at the step boundary, the highest
running sequence moves into the freed row (a forward spans rows 0 .. k - 1), and the next waiting
prompt takes a free row.

With `auto` budgets the rows plan their trees for the batch's tokens per second: each row's
planner sees the step's `Load` (the rows planned before it, and the draft rounds already paid
for) and the measured surface t(B, N) (specdec/strategies/budget.py).
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import replace
from functools import partial
from typing import TypeVar

from specdec.backends.base import Backend
from specdec.backends.batched import BatchedPyTorch, BatchedRows
from specdec.backends.batched_onnx import BatchedOnnx
from specdec.backends.eagle3 import Eagle3Backend
from specdec.backends.onnx_contract import OnnxContractBackend
from specdec.backends.pytorch import PyTorchBackend
from specdec.backends.vocab import MappedVocabBackend
from specdec.costs import CostModel, load_or_measure_surface
from specdec.decode import Sequence, speculative_decode
from specdec.errors import SpecdecError
from specdec.lockstep import Lockstep
from specdec.metrics import GenerationMetrics, StepStats
from specdec.strategies.base import Strategy
from specdec.strategies.budget import Load

T = TypeVar("T")


def batch_slices(decoder, requests: list, batch_size: int, on_tokens: Callable[[int, list[int]], None] | None = None,
                 on_step: Callable[[StepStats], None] | None = None,
                 ) -> Generator[None, None, list[tuple[list[int], GenerationMetrics]]]:
    """decoder: a SpeculativeDecoder; requests: its checked Requests. A generator that yields after
    each step of the batch (after each whole request when the batch is one row), so that a bench
    can interleave several decoders' slices (specdec/bench/batched.py), and returns (token ids,
    metrics) per request, in the given order (`drain` runs it through); the prompts start
    shortest first. `on_tokens(request index, block)` receives each block of emitted tokens,
    `on_step` every sequence's StepStats."""
    if batch_size < 1:
        raise SpecdecError(f"batch size must be at least 1, got {batch_size}")
    results: list = [None] * len(requests)
    if min(batch_size, len(requests)) == 1:  # one at a time: the single-sequence loop, which skips
        # the rows' bookkeeping (the demo pair's chain `auto` read 1.06x `ar` through one row of
        # this loop and 1.20x through `generate`)
        for index, request in enumerate(requests):
            results[index] = speculative_decode(decoder.target, decoder.draft, decoder.strategy, request.prompt_ids,
                                                request.warp, request.stopper, request.rng,
                                                None if on_tokens is None else partial(on_tokens, index), on_step)
            yield
        return results
    loop = BatchLoop(decoder, min(batch_size, len(requests)), on_step)
    # shortest prompts first: rows of like length share a batch, since its forward reads every
    # row's buffer up to the longest row's entries
    waiting = deque(sorted(enumerate(requests), key=lambda item: len(item[1].prompt_ids)))
    index_of: dict[int, int] = {}  # id(sequence) -> request index
    while waiting or loop.running:
        while loop.has_room() and waiting:  # a prompt may finish at once
            index, request = waiting.popleft()
            sequence = loop.join(request, None if on_tokens is None else partial(on_tokens, index))
            if sequence.done:
                results[index] = (sequence.generated, sequence.metrics)
            else:
                index_of[id(sequence)] = index
        for sequence in loop.step():
            results[index_of.pop(id(sequence))] = (sequence.generated, sequence.metrics)
        yield
    return results


def drain(slices: Generator[None, None, T]) -> T:
    """Run a generator of slices (`batch_slices`) to its end -> what it returns."""
    while True:
        try:
            next(slices)
        except StopIteration as end:
            return end.value


class BatchLoop:
    """Up to `rows` sequences over one batched target: `join` a request into a free row, `step`
    every running sequence once, `cancel` one between steps. `batch_slices` and the server's
    worker (specdec/serve/worker.py) drive it."""

    def __init__(self, decoder, rows: int, on_step: Callable[[StepStats], None] | None = None):
        self.decoder, self.on_step = decoder, on_step
        self.target = batched_backend(decoder.target, rows)
        self.costs = _batch_costs(decoder, rows)
        self.drafts, self.draft_rows = _row_drafts(decoder.draft, rows)
        self.lockstep = Lockstep()
        self.running: dict[int, Sequence] = {}  # row -> sequence, rows 0 .. n - 1

    def has_room(self) -> bool:
        return len(self.running) < len(self.target.rows)

    def join(self, request, on_tokens: Callable[[list[int]], None] | None = None) -> Sequence:
        """Prefill `request` (a decoder's checked Request) into the lowest free row -> its
        Sequence, already done when it stopped at its first token."""
        row = len(self.running)
        sequence = Sequence(self.target.rows[row], self.drafts[row], _row_strategy(self.decoder.strategy, self.costs),
                            request.prompt_ids, request.warp, request.stopper, request.rng, on_tokens, self.on_step)
        if sequence.done:
            sequence.target.reset()  # its entries leave with it
        else:
            self.running[row] = sequence
        return sequence

    def step(self) -> list[Sequence]:
        """One draft-then-verify step of every running sequence -> the sequences that finished."""
        if not self.running:
            return []
        order = sorted(self.running)
        sequences = [self.running[row] for row in order]
        context = statistics.fmean(sequence.target.committed_len for sequence in sequences)
        planners = [s.strategy.planner for s in sequences if s.strategy.planner is not None]
        load = Load(rows=len(sequences), context=context, waiting=set(planners))
        for planner in planners:
            planner.load = load
        start, forwarded = time.perf_counter(), self.target.clock.seconds
        emitted = sum(len(sequence.generated) for sequence in sequences)
        drafted = self.draft_rows.clock.seconds if self.draft_rows is not None else 0.0
        direct = [s.draft is None or (s.strategy.planner is not None and not s.strategy.planner.may_draft) for s in sequences]
        trees = dict(zip(order, self.lockstep.run([sequence.propose for sequence in sequences], direct)))
        drafted = self.draft_rows.clock.seconds - drafted if self.draft_rows is not None else 0.0
        logits = self.target.forward_rows({row: self.running[row].target_inputs(tree) for row, tree in trees.items()})
        forwarded = self.target.clock.seconds - forwarded
        finished = []
        for row, tree in trees.items():
            sequence = self.running[row]
            sequence.finish(tree, logits[row])
            if sequence.done:
                finished.append(self._leave(row))
        self._compact()
        if self.costs is not None:  # what the calibration does not hold: auto learns it as the batch runs
            seconds, nodes = time.perf_counter() - start, max(len(tree) for tree in trees.values()) - 1
            load.settle(self.costs, sum(len(sequence.generated) for sequence in sequences) - emitted, seconds, nodes)
            rounds = [(len(queries), max(queries.values())) for queries in load.rounds if queries]  # as planned
            self.costs.observe_step(len(order), nodes + 1, context, forwarded, seconds, self.lockstep, drafted, rounds)
        return finished

    def cancel(self, sequence: Sequence) -> None:
        """Stop a running sequence (between steps); its row frees at once."""
        for row, running in list(self.running.items()):
            if running is sequence:
                self._leave(row)
                self._compact()
                return

    def _leave(self, row: int) -> Sequence:
        """Take the sequence out of `row`, dropping its entries (so the target's buffers can shrink)."""
        sequence = self.running.pop(row)
        sequence.target.reset()
        return sequence

    def _compact(self) -> None:
        """Move the highest running sequences into free lower rows, so they hold rows 0 .. n - 1."""
        for free in range(len(self.running)):
            if free not in self.running:
                last = max(self.running)
                self.target.move_row(last, free)
                if self.draft_rows is not None:
                    self.draft_rows.move_row(last, free)
                self.drafts[free], self.drafts[last] = self.drafts[last], self.drafts[free]
                self.running[free] = self.running.pop(last)


def batched_backend(target: Backend, rows: int) -> BatchedRows:
    """`rows` rows over a target's model: pytorch, or an ONNX-contract export (onnxruntime, or a
    tensorrt engine whose profiles take that many rows)."""
    if target.rows_interact:  # rows would change each other's tokens
        raise SpecdecError(f"this target cannot decode a batch losslessly: {target.rows_interact}; "
                           "decode one prompt at a time, or export it without int8 activations")
    if type(target) is PyTorchBackend:
        return BatchedPyTorch(target, rows)
    if isinstance(target, OnnxContractBackend):
        if target.max_batch is not None and rows > target.max_batch:
            raise SpecdecError(f"the {target.name} engine runs at most {target.max_batch} rows per forward, not {rows}; "
                               f"rebuild it with --max-batch {rows} (target.max_batch: {rows}), or lower the batch size")
        return BatchedOnnx(target, rows)
    raise SpecdecError(f"batched decoding runs on a pytorch, onnxruntime or tensorrt target, not {target.name}; "
                       "change target.backend, or decode one prompt at a time")


def _batch_costs(decoder, rows: int) -> CostModel | None:
    """The decoder's cost model with the t(B, N) surfaces of the target and of a draft model up
    to `rows` rows (cached per config), for `auto` budgets; None without them. (An EAGLE-3 head's
    batched forward is costed as one row's.)"""
    planner = decoder.strategy.planner
    if planner is None:
        return None
    config, draft = decoder.config, draft_model(decoder.draft)
    target = load_or_measure_surface(config.target if config else None, decoder.target, rows)
    draft_rows = load_or_measure_surface(config.draft if config else None, draft, rows) if draft is not None else None
    return replace(planner.costs, rows=target, draft_rows=draft_rows)


def draft_model(draft: Backend | None) -> PyTorchBackend | None:
    """The pytorch draft model a batch runs in rows (also inside a reduced vocabulary), or None
    (no draft, an EAGLE-3 head)."""
    inner = draft.inner if isinstance(draft, MappedVocabBackend) else draft
    return inner if type(inner) is PyTorchBackend else None


def _row_drafts(draft: Backend | None, rows: int) -> tuple[list[Backend | None], BatchedRows | None]:
    """A draft backend for each row, over the same weights -> (them, the batched draft model whose
    rows they are, or None): the rows of a batched pytorch draft, or EAGLE-3 heads of their own
    (each reads its row's target features)."""
    if draft is None:
        return [None] * rows, None
    if isinstance(draft, Eagle3Backend):
        return [Eagle3Backend(draft.head, draft.max_length, draft.eos_token_ids) for _ in range(rows)], None
    model = draft_model(draft)
    if model is None:
        raise SpecdecError(f"batched decoding takes a pytorch draft model or an EAGLE-3 head so far, not {draft.name}; "
                           "decode one prompt at a time with this draft")
    batch = BatchedPyTorch(model, rows)
    if isinstance(draft, MappedVocabBackend):  # a reduced-vocabulary draft
        return [MappedVocabBackend(row, draft.draft_to_target.tolist(), draft.vocab_size) for row in batch.rows], batch
    return list(batch.rows), batch


def _row_strategy(strategy: Strategy, costs: CostModel | None) -> Strategy:
    """A fresh strategy with the same options (and the batch's costs, for `auto` budgets)."""
    copy = type(strategy)(strategy.options)
    if costs is not None:
        copy.set_costs(costs)
    return copy
