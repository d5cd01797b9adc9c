"""Forward costs measured on the actual device: t(Q), the wall time of one backend forward of Q new
entries over a cache of C committed entries, and the `CostModel` that `budget: auto` plans with.

A calibration measures t(Q) at a few cache lengths and caches the curve per model, backend,
device, dtype and host (DESIGN.md section 8), so the second run plans without measuring. Batched
decoding also measures the surface t(B, Q): one batched forward of B rows of Q entries each
(`Surface`), cached the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from specdec.backends.base import Backend
from specdec.models import cache_root, source_key

logger = logging.getLogger(__name__)

QUERIES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
ROW_QUERIES = (1, 2, 4, 8, 16, 32)  # t(B, Q): a batch's padded trees rarely need more
CONTEXTS = (256, 1024)
CURVE_VERSION = 1
RECENT_STEPS = 15  # the recent steps a batch's learned costs are the median of (`Recent`)
FORGET_AFTER = 256  # plain steps of B rows after which a losing record of B rows is forgotten (doubling each time)


def time_forward(backend: Backend, query: int, context: int, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of one forward of `query` new entries (a chain: the mask is dense enough
    that a tree of the same size costs the same) over `context` committed entries, as the backend
    times its forwards (on a GPU: device time, by CUDA events)."""
    ids, positions, mask = chain_inputs(backend, query, context)
    times = []
    for i in range(warmup + repeats):
        start = backend.forward_seconds
        backend.forward(ids, positions, mask)
        elapsed = backend.forward_seconds - start
        backend.rollback()
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def chain_inputs(backend: Backend, query: int, context: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Make the cache hold exactly `context` committed entries (content is irrelevant to cost)
    -> forward inputs of a chain of `query` new entries: ids, positions [1, Q], mask [1, Q, Q]."""
    if backend.committed_len != context or backend.pending_len:
        backend.reset()
        if backend.aux_layers is not None:  # a draft reading target features: zeros cost the same
            backend.take_features(0, torch.zeros(context + max(QUERIES), backend.feature_size))
        generator = torch.Generator().manual_seed(0)
        backend.prefill(torch.randint(0, backend.vocab_size, (1, context), generator=generator))
    ids = torch.randint(0, backend.vocab_size, (1, query))
    positions = torch.arange(context, context + query)[None]
    return ids, positions, torch.ones(query, query, dtype=torch.bool).tril_()[None]


@dataclass
class Curve:
    """t(Q) in seconds at each cache length: seconds[c][q] for contexts[c], queries[q]."""

    queries: list[int]
    contexts: list[int]
    seconds: list[list[float]]

    def at(self, query: float, context: float) -> float:
        """t(query, context), linear between measured points, extrapolated linearly beyond them,
        except below the shortest cache measured, where it is that cache's t: extrapolating down
        can make a larger Q look cheaper (the rows' slopes in C differ)."""
        per_context = [_interpolate(self.queries, row, query) for row in self.seconds]
        return max(_interpolate(self.contexts, per_context, max(context, self.contexts[0])), 1e-9)

    def ratios(self, context_index: int = 0) -> list[float]:
        row = self.seconds[context_index]
        return [t / row[0] for t in row]


@dataclass
class Surface:
    """t(B, Q) of batched forwards: curves[i] is t(Q) when rows[i] rows each add Q entries."""

    rows: list[int]
    curves: list[Curve]

    def at(self, rows: int, query: float, context: float) -> float:
        """t(rows, query, context), linear between measured batch sizes."""
        return max(_interpolate(self.rows, lambda i: self.curves[i].at(query, context), rows), 1e-9)

    @classmethod
    def from_dict(cls, data: dict) -> Surface:
        return cls(data["rows"], [Curve(**c) for c in data["curves"]])


def _interpolate(xs: Sequence[float], ys: Sequence[float] | Callable[[int], float], x: float) -> float:
    """y at x, linear between the two points around x (or the last two, beyond them); `ys` may
    be a function of the index, evaluated at those two points only."""
    y = ys if callable(ys) else ys.__getitem__
    if len(xs) == 1:
        return y(0)
    i = 1
    while i < len(xs) - 1 and xs[i] < x:
        i += 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], y(i - 1), y(i)
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def measure_curve(
    backend: Backend,
    queries: Sequence[int] = QUERIES,
    contexts: Sequence[int] = CONTEXTS,
    repeats: int = 5,
    progress: Callable[[str], None] | None = None,
) -> Curve:
    contexts = [c for c in contexts if c + max(queries) <= backend.max_length] or [max(1, backend.max_length - max(queries))]
    time_forward(backend, queries[0], contexts[0], repeats=1, warmup=2)  # first forwards set up thread pools
    seconds = []
    for context in contexts:
        say = (lambda done: progress(f"t(Q) over {context} entries, pass {done} of {repeats}")) if progress else None
        seconds.append(monotone(interleaved(queries, lambda query: time_forward(backend, query, context, 1, 0), repeats, say)))
    backend.reset()
    return Curve(list(queries), list(contexts), seconds)


def interleaved(points: Sequence, time_once: Callable[[object], float], repeats: int,
                progress: Callable[[int], None] | None = None) -> list[float]:
    """The median seconds of `time_once` at each point, over `repeats` passes through all the points
    after one untimed pass (the warmup). A machine that slows for a while then slows every point
    alike, so the ratios between points, which the planner decides by, hold; timing each point's
    repeats back to back would put a slow patch into some points only. `progress(pass)` is told
    before each timed pass."""
    for point in points:
        time_once(point)
    times: list[list[float]] = [[] for _ in points]
    for done in range(repeats):
        if progress is not None:
            progress(done + 1)
        for point, seen in zip(points, times):
            seen.append(time_once(point))
    return [statistics.median(seen) for seen in times]


def monotone(row: list[float]) -> list[float]:
    """The closest non-decreasing sequence (pool adjacent violators): more entries never cost
    less, and one noisy point must not make a planner prefer a bigger tree."""
    blocks: list[list[float]] = []  # [mean, count]
    for value in row:
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (a, n), (b, m) = blocks[-2], blocks.pop()
            blocks[-1] = [(a * n + b * m) / (n + m), n + m]
    return [mean for mean, count in blocks for _ in range(count)]


def row_counts(max_rows: int) -> list[int]:
    """Batch sizes a surface measures: powers of two below max_rows, and max_rows."""
    return sorted({2**i for i in range(max_rows.bit_length()) if 2**i < max_rows} | {max_rows})


def measure_surface(backend, max_rows: int, queries: Sequence[int] = ROW_QUERIES, contexts: Sequence[int] = CONTEXTS,
                    repeats: int = 5, progress: Callable[[str], None] | None = None) -> Surface:
    """t(B, Q) of a target's batched forwards (specdec/backends/batched.py), B in
    `row_counts(max_rows)`: every row holds `context` entries and adds a chain of Q."""
    from specdec.batch import batched_backend

    batch = batched_backend(backend, max_rows)
    contexts = [c for c in contexts if c + max(queries) <= backend.max_length] or [max(1, backend.max_length - max(queries))]
    counts = row_counts(max_rows)
    seconds = {count: [] for count in counts}  # per count: one row of t(Q) per context
    generator = torch.Generator().manual_seed(0)
    points = [(count, query) for count in counts for query in queries]
    for context in contexts:
        for row in batch.rows:
            row.reset()
            row.prefill(torch.randint(0, backend.vocab_size, (1, context), generator=generator))
        say = (lambda done: progress(f"t(B rows x Q) over {context} entries, pass {done} of {repeats}")) if progress else None
        measured = dict(zip(points, interleaved(points, lambda point: _time_rows(batch, *point, context), repeats, say)))
        for count in counts:
            seconds[count].append(monotone([measured[count, query] for query in queries]))
    for c in range(len(contexts)):  # more rows never cost less either
        for q in range(len(queries)):
            column = monotone([seconds[count][c][q] for count in counts])
            for count, value in zip(counts, column):
                seconds[count][c][q] = value
        for count in counts:  # and again within each row, which averaging across rows may have undone
            seconds[count][c] = monotone(seconds[count][c])
    return Surface(counts, [Curve(list(queries), list(contexts), seconds[count]) for count in counts])


def _time_rows(batch, count: int, query: int, context: int) -> float:
    """Seconds of one forward of `count` rows of `query` chain entries each (rolled back)."""
    ids = torch.randint(0, batch.rows[0].vocab_size, (1, query))
    positions = torch.arange(context, context + query)[None]
    mask = torch.ones(query, query, dtype=torch.bool).tril_()[None]
    start = batch.clock.seconds
    batch.forward_rows({b: (ids, positions, mask) for b in range(count)})
    for row in batch.rows[:count]:
        row.rollback()
    return batch.clock.seconds - start


class Pooled:
    """Of the last `size` (amount, seconds) pairs seen, the summed amounts over the summed seconds
    (`value`: `default` before any): a rate of recent steps that weighs each by its time, as a run
    does, where a median of their rates would let many short steps outvote a few long ones (a
    drafted step that accepts nothing runs below plain decoding; one that accepts many, far above)."""

    def __init__(self, default: float, size: int = RECENT_STEPS):
        self.value, self.seen = default, deque(maxlen=size)

    def add(self, amount: float, seconds: float) -> None:
        self.seen.append((amount, seconds))
        self.value = sum(a for a, _ in self.seen) / sum(s for _, s in self.seen)


class Recent:
    """The median of the last `size` values seen (`value`: `default` before any): robust to a
    step slowed by something else, and following the machine as it changes."""

    def __init__(self, default: float, size: int = RECENT_STEPS):
        self.value, self.seen = default, deque(maxlen=size)

    def add(self, value: float) -> None:
        self.seen.append(value)
        self.value = statistics.median(self.seen)


@dataclass
class CostModel:
    """What a step costs: target forwards of n tree nodes, draft forwards of q new entries, and,
    for batched decoding, target and draft forwards of B rows (`rows`, `draft_rows`).

    A batch's steps also teach it what the calibration does not hold (`observe_step`): `host`,
    the host's work per row draft forward (proposing around the forwards: the strategy, the
    distributions, the lockstep); `overhead`, the loop's own work per row and step (masks,
    verification, commits); `target_scale`, the ratio of the target's batched forwards' real
    time to its surface, which follows the machine when it runs slower or faster than when it was
    calibrated; and `draft_scale`, the same for the draft model's batched forwards, which also
    takes in what the planner prices as a steady step's feed but runs longer (a row catching its
    draft up pads the whole round to its lag). Every step of `auto`, alone or in a batch, joins
    the recent rates, per batch size, of plain steps (`plain`) and of drafted steps over them
    (`payoff`) (`record`).

    A cost model made from this one by `dataclasses.replace` shares what is learned (the objects,
    not copies): every batch over one decoder learns into the same records, so a decoder that runs
    many batches does not learn the machine again for each."""

    target: Curve
    draft: Curve | None
    rows: Surface | None = None
    draft_rows: Surface | None = None
    host: Recent = field(default_factory=lambda: Recent(0.0), repr=False, compare=False)
    overhead: Recent = field(default_factory=lambda: Recent(0.0), repr=False, compare=False)
    target_scale: Recent = field(default_factory=lambda: Recent(1.0), repr=False, compare=False)
    draft_scale: Recent = field(default_factory=lambda: Recent(1.0), repr=False, compare=False)
    plain: dict[int, Pooled] = field(default_factory=dict, repr=False, compare=False)
    payoff: dict[int, Pooled] = field(default_factory=dict, repr=False, compare=False)
    forget: dict[int, list[int]] = field(default_factory=dict, repr=False, compare=False)

    def observe_step(self, rows: int, nodes: int, context: float, target_seconds: float, step_seconds: float,
                     lockstep, draft_seconds: float = 0.0, draft_rounds: Sequence[tuple[int, int]] = ()) -> None:
        """Learn from one batched step of `rows` rows over about `context` cached entries each: its
        target forward of up to `nodes` entries per row took `target_seconds`, of a step of
        `step_seconds` whose proposals ran in `lockstep` (a specdec.lockstep.Lockstep after its
        run); the draft model's batched forwards took `draft_seconds` for rounds the planners
        priced as (rows, queries) each (`draft_rounds`)."""
        if lockstep.row_forwards:
            self.host.add(lockstep.host_seconds / lockstep.row_forwards)
        self.overhead.add(max(0.0, step_seconds - lockstep.seconds - target_seconds) / rows)
        if self.rows is not None:
            self.target_scale.add(target_seconds / self.rows.at(rows, nodes, context))
        if draft_rounds and self.draft_rows is not None:
            self.draft_scale.add(draft_seconds / sum(self.draft_rows.at(count, queries, context) for count, queries in draft_rounds))

    def record(self, rows: int, context: float, tokens: int, seconds: float, drafted: bool) -> Pooled | None:
        """A step of `rows` sequences that emitted `tokens` in `seconds` joins the recent steps of
        this many rows. A step without draft forwards joins the plain ones (`plain`, their tokens
        per second) -> None. A drafted step (any draft forward, whether or not it found a node: a
        start that found none cost its forward all the same) joins the drafted ones (`payoff`: the
        seconds plain decoding would have taken for their tokens, at its rate then, over the
        seconds they took; before any plain step, one token a row in a target forward of t(B, 1)
        and the loop's work per row, as learned, stand in for that rate) -> that record.

        A losing record stops the drafting that would update it, so one slow patch of the machine
        could keep drafting off for good: after FORGET_AFTER plain steps of this many rows it is
        forgotten, and the cost model decides again until drafted steps make a new one; the wait
        doubles each time a record is forgotten, and starts over once drafted steps pay."""
        plain = self.plain.setdefault(rows, Pooled(0.0))
        if not drafted:
            plain.add(tokens, seconds)
            payoff = self.payoff.get(rows)
            if payoff is not None and payoff.seen and payoff.value < 1.0:
                waited = self.forget.setdefault(rows, [0, FORGET_AFTER])  # [plain steps since, the wait]
                waited[0] += 1
                if waited[0] >= waited[1]:
                    del self.payoff[rows]
                    waited[:] = [0, 2 * waited[1]]
            return None
        rate = plain.value if plain.seen else rows / (
            self.target_seconds(1, context, rows=rows) + self.overhead.value * rows)
        payoff = self.payoff.setdefault(rows, Pooled(1.0))
        payoff.add(tokens / rate, seconds)
        if payoff.value >= 1.0:
            self.forget.pop(rows, None)
        elif rows in self.forget:
            self.forget[rows][0] = 0
        return payoff

    def target_seconds(self, nodes: int, context: int, rows: int | None = None) -> float:
        """One forward of `nodes` entries; with `rows`, a batched forward of that many rows of
        `nodes` entries each (the batch's trees are padded to the largest)."""
        if rows is not None and self.rows is not None:
            return self.rows.at(rows, nodes, context) * self.target_scale.value
        return self.target.at(nodes, context)

    def draft_seconds(self, query: int, context: int, rows: int | None = None) -> float:
        """One draft forward of `query` entries; with `rows`, a batched one of that many rows
        (without a measured draft surface, as one row's)."""
        if rows is not None and self.draft_rows is not None:
            return self.draft_rows.at(rows, query, context) * self.draft_scale.value
        return 0.0 if self.draft is None else self.draft.at(query, context)


def curve_path(spec, backend: Backend, kind: str = "") -> Path:
    """Cache file of one model spec's curve (or, kind "rows", its batched surface): model
    identity, backend, its options, device, host."""
    options = json.dumps(spec.options.model_dump(), sort_keys=True)
    host = f"{platform.node()}-{platform.machine()}-{torch.get_num_threads()}t"
    identity = f"{source_key(spec.model)}|{spec.backend}|{options}|{backend.device}|{host}|v{CURVE_VERSION}{kind}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:12]
    suffix = f"-{kind}" if kind else ""
    return cache_root() / "calibration" / f"{Path(spec.model).name}-{spec.backend}{suffix}-{key}.json"


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def load_or_measure(spec, backend: Backend, refresh: bool = False, **measure) -> Curve:
    """The cached curve of this model spec on this host, measured (and cached) when absent."""
    path = curve_path(spec, backend)
    if path.is_file() and not refresh:
        try:
            return Curve(**json.loads(path.read_text())["curve"])
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring an unreadable calibration %s", path)
    logger.warning("calibrating %s on %s (first use; cached in %s)", spec.model, spec.backend, path)
    curve = measure_curve(backend, **measure)
    _write_json(path, {"model": spec.model, "backend": spec.backend, "curve": asdict(curve)})
    return curve


def load_or_measure_surface(spec, backend, max_rows: int, refresh: bool = False, **measure) -> Surface:
    """The cached t(B, Q) surface of a target on this host, measured (and cached) when
    absent or when it stops short of `max_rows` rows. Without a spec (a decoder built from
    loaded models) it is measured and not cached."""
    path = curve_path(spec, backend, "rows") if spec is not None else None
    if path is not None and path.is_file() and not refresh:
        try:
            surface = Surface.from_dict(json.loads(path.read_text())["surface"])
            if max(surface.rows) >= max_rows:
                return surface
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring an unreadable calibration %s", path)
    where = f"cached in {path}" if path is not None else "not cached: no config names the model"
    logger.warning("calibrating batched forwards of up to %d rows (%s)", max_rows, where)
    surface = measure_surface(backend, max_rows, **measure)
    if path is not None:
        _write_json(path, {"model": spec.model, "backend": spec.backend, "surface": asdict(surface)})
    return surface


def calibrated_costs(config, target: Backend, draft: Backend | None, refresh: bool = False) -> CostModel:
    """The cost model of a config's target and draft: cached curves, measured on first use."""
    draft_curve = load_or_measure(config.draft, draft, refresh) if draft is not None else None
    return CostModel(load_or_measure(config.target, target, refresh), draft_curve)


def measured_costs(target: Backend, draft: Backend | None) -> CostModel:
    """A cost model measured now and not cached (backends given without a config)."""
    logger.warning("measuring forward costs for an auto budget (not cached: no config names the models)")
    return CostModel(measure_curve(target), measure_curve(draft) if draft is not None else None)
