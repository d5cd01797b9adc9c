"""Batched draft forwards for per-sequence strategies: run the rows' proposals in lockstep.

A strategy drafts its tree by calling `draft.forward` one level at a time, and knows nothing of
other sequences. In a batch (specdec/batch.py) each row's proposal runs as a coroutine on a worker
thread of its own; a row's draft backend, asked for a forward on such a thread, hands the request
to the `Lockstep` and waits. When every row of the round has either asked for a forward or
finished its tree, the asked forwards run as one call (`type(backend).forward_many`: one batched
model call for rows of a `BatchedRows`, one head call for EAGLE-3 heads) and those rows resume.

Only one thread runs at a time, always in the order the tasks were given, so a step does exactly
what running the proposals one after another would do, except that their draft forwards of the
same round share one model call. Strategies and plugins stay unchanged.

Example (chain k 2 on rows 0 and 1, a backing-off row 2 that drafts nothing): round 0 runs row 0
to its first draft forward, row 1 to its first, row 2 to the end of its proposal; one call of 2
rows answers rows 0 and 1; round 1 runs each to its second forward; one call; round 2 runs each to
the end of its proposal.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

_thread = threading.local()  # .worker: the _Worker running on this thread


class Cancelled(Exception):
    """Raised inside a paused task when another task of the step failed."""


def forward(backend, request: tuple):
    """`backend`'s forward of `request` (input_ids, position_ids, mask) -> logits [1, Q, V]. Inside
    a task: paused until the round's joint call. Outside: `type(backend).forward_many` of one."""
    worker = getattr(_thread, "worker", None)
    if worker is None:
        return type(backend).forward_many([(backend, request)])[0]
    return worker.pause(backend, request)


class Lockstep:
    """Runs a step's tasks (one per row) as coroutines, batching their draft forwards per round."""

    def __init__(self) -> None:
        self._workers: list[_Worker] = []
        self._yielded = threading.Semaphore(0)  # a worker paused or finished its task

    def run(self, tasks: list[Callable[[], Any]]) -> list[Any]:
        """Call every task -> their results, in order. A lone task runs on this thread."""
        if len(tasks) == 1:
            return [tasks[0]()]
        while len(self._workers) < len(tasks):
            self._workers.append(_Worker(self._yielded))
        workers = self._workers[: len(tasks)]
        for worker, task in zip(workers, tasks):
            worker.task, worker.result, worker.error, worker.done = task, None, None, False
        active, failure = workers, None
        try:
            while active:
                for worker in active:  # one at a time: a deterministic round
                    worker.wake.release()
                    self._yielded.acquire()
                active = [worker for worker in workers if not worker.done]
                failure = failure or next((w.error for w in workers if w.error and not isinstance(w.error, Cancelled)), None)
                if active:
                    error = self._answer(active, cancel=failure is not None)
                    failure = failure or error
        except BaseException:  # interrupted here (Ctrl-C): leave these workers paused for good, start afresh
            self._workers, self._yielded = [], threading.Semaphore(0)
            raise
        for worker in workers:
            worker.task = None
        if failure is not None:
            raise failure
        return [worker.result for worker in workers]

    @staticmethod
    def _answer(paused: list[_Worker], cancel: bool) -> BaseException | None:
        """Run the paused forwards as joint calls (one per backend type), or cancel them (a task
        failed) -> the error a joint call raised, or None."""
        if cancel:
            for worker in paused:
                worker.reply = Cancelled()
            return None
        by_type: dict[type, list[_Worker]] = {}
        for worker in paused:
            by_type.setdefault(type(worker.request[0]), []).append(worker)
        for kind, group in by_type.items():
            try:
                outputs = kind.forward_many([worker.request for worker in group])
            except BaseException as error:  # every paused task ends; run() raises this
                for worker in paused:
                    worker.reply = Cancelled()
                return error
            for worker, output in zip(group, outputs):
                worker.reply = output
        return None


class _Worker:
    """A daemon thread that runs one task at a time when woken, pausing at draft forwards."""

    def __init__(self, yielded: threading.Semaphore):
        self.yielded, self.wake = yielded, threading.Semaphore(0)
        self.task: Callable[[], Any] | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False
        self.request: tuple | None = None  # (backend, forward arguments) while paused
        self.reply: Any = None
        threading.Thread(target=self._loop, name="specdec-lockstep", daemon=True).start()

    def _loop(self) -> None:
        _thread.worker = self
        while True:
            self.wake.acquire()
            try:
                self.result = self.task()
            except BaseException as error:  # handed to the coordinator, which raises it
                self.error = error
            self.done, self.request = True, None
            self.yielded.release()

    def pause(self, backend, request: tuple) -> Any:
        self.request = (backend, request)
        self.yielded.release()
        self.wake.acquire()
        reply, self.reply, self.request = self.reply, None, None
        if isinstance(reply, BaseException):
            raise reply
        return reply
