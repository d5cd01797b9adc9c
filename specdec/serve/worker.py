"""The model's one thread: a `BatchLoop` fed from a bounded queue.

Between steps the worker admits waiting jobs into free rows, then drops jobs whose client left or
whose time ran out (their rows free at once), then runs one step of every running sequence. It
hands each job's tokens and its end to the job's asyncio loop (`call_soon_threadsafe`), so the
event loop never waits on a forward.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from specdec.batch import BatchLoop
from specdec.decode import Sequence

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One request in flight. `events` receives ("tokens", [ids]), then one of ("done",
    Sequence), ("timeout", None), ("cancelled", None) or ("error", message)."""

    request: object  # a decoder's checked Request
    deadline: float  # time.monotonic() after which the job is stopped
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set by the request's handler when its client disconnects

    def emit(self, kind: str, value=None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Worker:
    def __init__(self, decoder, max_batch: int, max_queue: int, metrics):
        self.decoder, self.max_batch, self.metrics = decoder, max_batch, metrics
        self.queue: queue.Queue[Job] = queue.Queue(max_queue)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="specdec-worker", daemon=True)
        self.jobs: dict[int, tuple[Job, Sequence]] = {}  # id(sequence) -> running job
        self.loop = BatchLoop(decoder, max_batch, on_step=metrics.step)  # here: a target it cannot batch fails at start

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; raises queue.Full when the queue is full."""
        self.queue.put_nowait(job)
        self.metrics.queue_depth.set(self.queue.qsize())

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel whatever still runs or waits, and end the thread."""
        self.stopping.set()
        self.thread.join(timeout)

    def _run(self) -> None:
        loop = self.loop
        while not (self.stopping.is_set() and not self.jobs and self.queue.empty()):
            self._admit(loop)
            self._drop(loop)
            if not loop.running:
                continue
            start, forwards = time.perf_counter(), loop.target.clock.seconds
            try:
                finished = loop.step()
            except Exception:  # a failed step fails its batch, never the server
                logger.exception("a decoding step failed")
                for job, _ in self.jobs.values():
                    job.emit("error", "the decoding step failed; see the server log")
                self.jobs.clear()
                loop = BatchLoop(self.decoder, self.max_batch, on_step=self.metrics.step)
                continue
            self.metrics.batch_step_seconds.observe(time.perf_counter() - start)
            self.metrics.target_forward_seconds.observe(loop.target.clock.seconds - forwards)
            for sequence in finished:
                job, _ = self.jobs.pop(id(sequence))
                job.emit("done", sequence)
            self.metrics.batch_running.set(len(loop.running))

    def _admit(self, loop: BatchLoop) -> None:
        while loop.has_room():
            try:  # wait briefly only when idle, so a running batch never stalls on the queue
                job = self.queue.get(timeout=0.05) if not loop.running else self.queue.get_nowait()
            except queue.Empty:
                return
            finally:
                self.metrics.queue_depth.set(self.queue.qsize())
            if job.cancelled or self.stopping.is_set():
                job.emit("cancelled")
                continue
            try:
                sequence = loop.join(job.request, lambda block, job=job: job.emit("tokens", block))
            except Exception:
                logger.exception("a prefill failed")
                job.emit("error", "the prefill failed; see the server log")
                continue
            if sequence.done:
                job.emit("done", sequence)
            else:
                self.jobs[id(sequence)] = (job, sequence)
            self.metrics.batch_running.set(len(loop.running))

    def _drop(self, loop: BatchLoop) -> None:
        now = time.monotonic()
        for key, (job, sequence) in list(self.jobs.items()):
            reason = "cancelled" if job.cancelled or self.stopping.is_set() else "timeout" if now > job.deadline else None
            if reason is not None:
                loop.cancel(sequence)
                del self.jobs[key]
                job.emit(reason)
        self.metrics.batch_running.set(len(loop.running))
