"""The batched loop: up to B sequences advance together, one target forward per step for all.

Each sequence has its own strategy (a fresh copy of the decoder's: adaptive state is per
sequence), its own draft cache (a draft backend over the same weights) and its own row of the
target's KV buffer (specdec/backends/batched.py). One step: every running sequence drafts its tree;
one target forward scores all the trees; each sequence verifies and commits its own path. A
sequence that stops leaves its row at the step boundary, the highest running sequence moves into
the freed row (a forward spans rows 0 .. k - 1), and the next waiting prompt takes a free row.

With `auto` budgets the rows plan their trees for the batch's tokens per second: each row's
planner sees the step's `Load` (the rows planned before it) and the measured surface t(B, N)
(specdec/strategies/budget.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import replace
from functools import partial

from specdec.backends.base import Backend
from specdec.backends.batched import BatchedPyTorch, BatchedRows
from specdec.backends.batched_onnx import BatchedOnnx
from specdec.backends.eagle3 import Eagle3Backend
from specdec.backends.onnxruntime import OnnxRuntimeBackend
from specdec.backends.pytorch import PyTorchBackend
from specdec.backends.vocab import MappedVocabBackend
from specdec.costs import CostModel, load_or_measure_surface
from specdec.decode import Sequence
from specdec.errors import SpecdecError
from specdec.metrics import GenerationMetrics, StepStats
from specdec.strategies.base import Strategy
from specdec.strategies.budget import Load


def decode_batch(decoder, requests: list, batch_size: int, on_tokens: Callable[[int, list[int]], None] | None = None,
                 on_step: Callable[[StepStats], None] | None = None) -> list[tuple[list[int], GenerationMetrics]]:
    """decoder: a SpeculativeDecoder; requests: its checked Requests -> (token ids, metrics) per
    request. `on_tokens(request index, block)` receives each block of emitted tokens, `on_step`
    every sequence's StepStats."""
    if batch_size < 1:
        raise SpecdecError(f"batch size must be at least 1, got {batch_size}")
    rows = min(batch_size, len(requests))
    target = batched_backend(decoder.target, rows)
    costs = _batch_costs(decoder, rows)
    drafts = [_row_draft(decoder.draft) for _ in range(rows)]
    waiting = deque(enumerate(requests))
    running: dict[int, tuple[int, Sequence]] = {}  # row -> (request index, sequence)
    results: list = [None] * len(requests)
    while waiting or running:
        for row in range(rows):  # free rows take waiting prompts (a prompt may finish at once)
            while row not in running and waiting:
                index, request = waiting.popleft()
                stream = None if on_tokens is None else partial(on_tokens, index)
                sequence = Sequence(target.rows[row], drafts[row], _row_strategy(decoder.strategy, costs),
                                    request.prompt_ids, request.warp, request.stopper, request.rng, stream, on_step)
                if sequence.done:
                    results[index] = (sequence.generated, sequence.metrics)
                else:
                    running[row] = (index, sequence)
        if not running:
            break
        load = Load(rows=len(running))
        for _, sequence in running.values():
            if sequence.strategy.planner is not None:
                sequence.strategy.planner.load = load
        trees = {row: sequence.propose() for row, (_, sequence) in running.items()}
        logits = target.forward_rows({row: running[row][1].target_inputs(tree) for row, tree in trees.items()})
        for row, tree in trees.items():
            index, sequence = running[row]
            sequence.finish(tree, logits[row])
            if sequence.done:
                results[index] = (sequence.generated, sequence.metrics)
                del running[row]
        _compact(target, running, drafts)
    return results


def batched_backend(target: Backend, rows: int) -> BatchedRows:
    """`rows` rows over a target's model: pytorch, or an onnxruntime export."""
    if type(target) is PyTorchBackend:
        return BatchedPyTorch(target, rows)
    if type(target) is OnnxRuntimeBackend:
        return BatchedOnnx(target, rows)
    raise SpecdecError(f"batched decoding runs on a pytorch or onnxruntime target, not {target.name}; "
                       "change target.backend, or decode one prompt at a time")


def _compact(target: BatchedRows, running: dict, drafts: list) -> None:
    """Move the highest running sequences into free lower rows, so they hold rows 0 .. n - 1."""
    for free in range(len(running)):
        if free not in running:
            last = max(running)
            target.move_row(last, free)
            drafts[free], drafts[last] = drafts[last], drafts[free]
            running[free] = running.pop(last)


def _batch_costs(decoder, rows: int) -> CostModel | None:
    """The decoder's cost model with the target's t(B, N) surface up to `rows` rows (cached per
    config), for `auto` budgets; None without them."""
    planner = decoder.strategy.planner
    if planner is None:
        return None
    spec = decoder.config.target if decoder.config is not None else None
    return replace(planner.costs, rows=load_or_measure_surface(spec, decoder.target, rows))


def _row_draft(draft: Backend | None) -> Backend | None:
    """A draft backend of its own for one row, over the same weights (an EAGLE-3 head reads its
    row's target features)."""
    if draft is None:
        return None
    if isinstance(draft, Eagle3Backend):
        return Eagle3Backend(draft.head, draft.max_length, draft.eos_token_ids)
    if isinstance(draft, MappedVocabBackend):  # a reduced-vocabulary draft
        return MappedVocabBackend(_row_draft(draft.inner), draft.draft_to_target.tolist(), draft.vocab_size)
    if type(draft) is not PyTorchBackend:
        raise SpecdecError(f"batched decoding takes a pytorch draft model or an EAGLE-3 head so far, not {draft.name}; "
                           "decode one prompt at a time with this draft")
    return PyTorchBackend(draft.model)


def _row_strategy(strategy: Strategy, costs: CostModel | None) -> Strategy:
    """A fresh strategy with the same options (and the batch's costs, for `auto` budgets)."""
    copy = type(strategy)(strategy.options)
    if costs is not None:
        copy.set_costs(costs)
    return copy
