"""Timing of backend forwards without waiting for the device.

On a CPU a forward's time is its wall time. On CUDA the host returns before the device finishes, so
wall time is launch time: the clock records a pair of CUDA events around each forward on the current
stream and adds up their elapsed times only when read (a read waits for the last timed forward).
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class ForwardClock:
    """Seconds spent in forwards on one device."""

    def __init__(self, device: torch.device):
        self.device = device
        self._seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # forwards not added yet

    @contextmanager
    def timing(self):
        if self.device.type != "cuda":
            start = time.perf_counter()
            yield
            self._seconds += time.perf_counter() - start
            return
        stream = torch.cuda.current_stream(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        yield
        end.record(stream)
        self._events.append((start, end))

    @property
    def seconds(self) -> float:
        for start, end in self._events:
            end.synchronize()
            self._seconds += start.elapsed_time(end) / 1e3  # milliseconds
        self._events.clear()
        return self._seconds


class TimedForwards:
    """Mixin for a Backend whose `forward` runs under `self.clock.timing()`: it reads
    `forward_seconds` from the clock."""

    clock: ForwardClock

    @property
    def forward_seconds(self) -> float:
        return self.clock.seconds
