"""Batched draft forwards for per-sequence strategies: run the rows' proposals in lockstep.

A strategy drafts its tree by calling `draft.forward` one level at a time, and knows nothing of
other sequences. In a batch (specdec/batch.py) each row's proposal runs as a coroutine (a
greenlet, on the calling thread); a row's draft backend, asked for a forward inside one, hands the
request to the `Lockstep` and is suspended. When every row of the round has either asked for a
forward or finished its tree, the asked forwards run as one call (`type(backend).forward_many`:
one batched model call for rows of a `BatchedRows`, one head call for EAGLE-3 heads) and those
rows resume.

One proposal runs at a time, always in the order the tasks were given, so a step does exactly
what running the proposals one after another would do, except that their draft forwards of the
same round share one model call. Strategies and plugins stay unchanged. Everything runs on the
calling thread: worker threads that ran torch ops kept CPU thread teams of their own (OpenMP),
which made every later forward of the process slower (B = 1 decoding ran 1.6x to 1.9x slower
after two batches of 16 rows).

A run also tells what it took (`seconds`), what its proposals cost around the draft forwards
(`host_seconds`: the strategies' own work, the distributions, the switches between rows) and how
many row forwards they asked for, which `auto` budgets learn from (`CostModel.observe_step`).

Example (chain k 2 on rows 0 and 1, a backing-off row 2 that drafts nothing): round 0 runs row 0
to its first draft forward, row 1 to its first, row 2 to the end of its proposal; one call of 2
rows answers rows 0 and 1; round 1 runs each to its second forward; one call; round 2 runs each to
the end of its proposal.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import greenlet

_tally: list | None = None  # [seconds in draft model calls, row forwards] of the run in progress
_START = object()  # a task's first resumption starts it


class Cancelled(Exception):
    """Raised inside a paused task when another task of the step failed."""


class _Task(greenlet.greenlet):
    """A row's proposal, run by a Lockstep: switches back to it with each forward it asks for."""


def forward(backend, request: tuple):
    """`backend`'s forward of `request` (input_ids, position_ids, mask) -> logits [1, Q, V]. Inside
    a task: suspended until the round's joint call. Outside: `type(backend).forward_many` of one."""
    task = greenlet.getcurrent()
    if not isinstance(task, _Task):
        return _call(type(backend), [(backend, request)])[0]
    return task.parent.switch((backend, request))  # the reply, or Cancelled raised here


def model_call(function: Callable, *args, row_forwards: int = 0) -> Any:
    """`function(*args)`, a call into a draft model, timed into the tally of the run in progress
    (if any) as model time, not host work: a draft's first prefill, and (with `row_forwards`) the
    joint forwards."""
    start = time.perf_counter()
    result = function(*args)
    if _tally is not None:
        _tally[0] += time.perf_counter() - start
        _tally[1] += row_forwards
    return result


def _call(kind: type, calls: list[tuple]) -> list:
    return model_call(kind.forward_many, calls, row_forwards=len(calls))


class Lockstep:
    """Runs a step's tasks (one per row) as coroutines, batching their draft forwards per round."""

    def __init__(self) -> None:
        self.seconds = self.host_seconds = 0.0  # of the last run
        self.row_forwards = 0

    def run(self, tasks: list[Callable[[], Any]], direct: Sequence[bool] = ()) -> list[Any]:
        """Call every task -> their results, in order (a lone task is simply called); set
        `seconds`, `host_seconds` (the run's time outside draft model calls: forwards, and a
        draft's first prefill) and `row_forwards`. A task marked `direct` (expected to ask for no
        forward: a row without a draft, or whose `auto` budget is backing off) is simply called in
        its turn, without a coroutine, which cost about 50 us a row in a step of the demo pair at
        B = 16; a forward it asks for anyway runs as a joint call of one."""
        global _tally
        _tally = tally = [0.0, 0]
        start = time.perf_counter()
        try:
            alone = len(tasks) == 1 or (len(direct) == len(tasks) and all(direct))
            return [task() for task in tasks] if alone else self._run(tasks, direct)
        finally:
            _tally = None
            self.seconds = time.perf_counter() - start
            self.host_seconds, self.row_forwards = self.seconds - tally[0], tally[1]

    def _run(self, tasks: list[Callable[[], Any]], direct: Sequence[bool]) -> list[Any]:
        direct = list(direct) + [False] * (len(tasks) - len(direct))
        coroutines = [None if plain else _Task(task) for task, plain in zip(tasks, direct)]  # their parent: this greenlet
        replies: list[Any] = [_START] * len(tasks)  # what each is resumed with
        results: list[Any] = [None] * len(tasks)
        active, failure = list(range(len(tasks))), None
        while active:
            requests = {}  # task index -> (backend, forward arguments)
            for i in active:  # one at a time: a deterministic round
                try:
                    if coroutines[i] is None:  # called in its turn of the first round
                        results[i] = tasks[i]()
                        continue
                    if replies[i] is _START:
                        value = coroutines[i].switch()
                    elif isinstance(replies[i], BaseException):
                        value = coroutines[i].throw(replies[i])
                    else:
                        value = coroutines[i].switch(replies[i])
                except Cancelled:
                    continue
                except BaseException as error:  # the task failed: the others end at their next forward
                    failure = failure or error
                    continue
                if coroutines[i].dead:
                    results[i] = value
                else:
                    requests[i] = value
            active = list(requests)
            if active:
                error = self._answer(requests, replies, cancel=failure is not None)
                failure = failure or error
        if failure is not None:
            raise failure
        return results

    @staticmethod
    def _answer(requests: dict[int, tuple], replies: list, cancel: bool) -> BaseException | None:
        """Run the asked forwards as joint calls (one per backend type), setting each task's
        reply, or cancel them (a task failed) -> the error a joint call raised, or None."""
        if cancel:
            for i in requests:
                replies[i] = Cancelled()
            return None
        by_type: dict[type, list[int]] = {}
        for i, (backend, _) in requests.items():
            by_type.setdefault(type(backend), []).append(i)
        for kind, group in by_type.items():
            try:
                outputs = _call(kind, [requests[i] for i in group])
            except BaseException as error:  # every suspended task ends; run() raises this
                for i in requests:
                    replies[i] = Cancelled()
                return error
            for i, output in zip(group, outputs):
                replies[i] = output
        return None
