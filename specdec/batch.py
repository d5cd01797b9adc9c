"""The batched loop: up to B sequences advance together, one target forward per step for all.

Each sequence has its own strategy (a fresh copy of the decoder's: adaptive state is per
sequence), its own draft cache (a draft backend over the same weights) and its own row of the
target's KV buffer (specdec/backends/batched.py). One step: every running sequence drafts its tree;
one target forward scores all the trees; each sequence verifies and commits its own path. A
sequence that stops leaves its row at the step boundary, and the next waiting prompt takes it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from functools import partial

from specdec.backends.base import Backend
from specdec.backends.batched import BatchedPyTorch
from specdec.backends.eagle3 import Eagle3Backend
from specdec.backends.pytorch import PyTorchBackend
from specdec.backends.vocab import MappedVocabBackend
from specdec.decode import Sequence
from specdec.errors import SpecdecError
from specdec.metrics import GenerationMetrics, StepStats
from specdec.strategies.base import Strategy


def decode_batch(decoder, requests: list, batch_size: int, on_tokens: Callable[[int, list[int]], None] | None = None,
                 on_step: Callable[[StepStats], None] | None = None) -> list[tuple[list[int], GenerationMetrics]]:
    """decoder: a SpeculativeDecoder; requests: its checked Requests -> (token ids, metrics) per
    request. `on_tokens(request index, block)` receives each block of emitted tokens, `on_step`
    every sequence's StepStats."""
    if batch_size < 1:
        raise SpecdecError(f"batch size must be at least 1, got {batch_size}")
    if not isinstance(decoder.target, PyTorchBackend):
        raise SpecdecError(f"batched decoding runs on a pytorch target so far, not {decoder.target.name}; "
                           "set target.backend: pytorch, or decode one prompt at a time")
    rows = min(batch_size, len(requests))
    target = BatchedPyTorch(decoder.target, rows)
    drafts = [_row_draft(decoder.draft) for _ in range(rows)]
    waiting = deque(enumerate(requests))
    running: dict[int, tuple[int, Sequence]] = {}  # row -> (request index, sequence)
    results: list = [None] * len(requests)
    while waiting or running:
        for row in range(rows):  # free rows take waiting prompts (a prompt may finish at once)
            while row not in running and waiting:
                index, request = waiting.popleft()
                stream = None if on_tokens is None else partial(on_tokens, index)
                sequence = Sequence(target.rows[row], drafts[row], _row_strategy(decoder.strategy),
                                    request.prompt_ids, request.warp, request.stopper, request.rng, stream, on_step)
                if sequence.done:
                    results[index] = (sequence.generated, sequence.metrics)
                else:
                    running[row] = (index, sequence)
        if not running:
            break
        trees = {row: sequence.propose() for row, (_, sequence) in running.items()}
        logits = target.forward_rows({row: running[row][1].target_inputs(tree) for row, tree in trees.items()})
        for row, tree in trees.items():
            index, sequence = running[row]
            sequence.finish(tree, logits[row])
            if sequence.done:
                results[index] = (sequence.generated, sequence.metrics)
                del running[row]
    return results


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


def _row_strategy(strategy: Strategy) -> Strategy:
    """A fresh strategy with the same options (and measured costs, for `auto` budgets)."""
    copy = type(strategy)(strategy.options)
    if strategy.planner is not None:
        copy.set_costs(strategy.planner.costs)
    return copy
