"""`specdec profile` and `specdec calibrate`: forward cost curves t(Q) and where a forward's time goes.

The operator breakdown runs the backend's own profiler (torch.profiler, ONNX Runtime's session
profiling) over a few forwards of Q entries and groups the time by operator type; what the wall
time holds beyond the operators (input and mask building, KV writes, framework dispatch) is shown
as "outside operators".
"""

from __future__ import annotations

import statistics
import time

from specdec.backends.base import Backend
from specdec.costs import Curve, Surface, chain_inputs

TOP_OPERATORS = 10


def curve_table(curve: Curve) -> str:
    """t(Q) in ms and t(Q)/t(1), one block per cache length."""
    lines = []
    for context, row in zip(curve.contexts, curve.seconds):
        lines.append(f"  over {context} cached entries:")
        lines.append("    Q       " + "".join(f"{q:>8}" for q in curve.queries))
        lines.append("    t(Q) ms " + "".join(f"{t * 1e3:>8.1f}" for t in row))
        lines.append("    t(Q)/t(1)" + "".join(f"{t / row[0]:>8.2f}" for t in row)[1:])
    return "\n".join(lines)


def surface_table(surface: Surface) -> str:
    """t(B, Q) in ms, one line per batch size B, and the time per row-token at the largest Q."""
    lines = []
    for c, context in enumerate(surface.curves[0].contexts):
        queries = surface.curves[0].queries
        lines.append(f"  over {context} cached entries per row:")
        lines.append("    B \\ Q    " + "".join(f"{q:>8}" for q in queries) + "   ms per row-token at Q=1")
        for rows, curve in zip(surface.rows, surface.curves):
            row = curve.seconds[c]
            lines.append(f"    {rows:<9}" + "".join(f"{t * 1e3:>8.1f}" for t in row) + f"{row[0] * 1e3 / rows:>10.2f}")
    return "\n".join(lines)


def breakdown(backend: Backend, query: int, context: int, repeats: int = 5) -> tuple[float, list[tuple[str, float]]] | None:
    """(wall seconds per forward, [(operator, seconds per forward)] largest first, with the time
    outside operators last) for forwards of `query` entries over `context`; None without a profiler."""
    ids, positions, mask = chain_inputs(backend, query, context)
    backend.forward(ids, positions, mask)  # warm-up
    backend.rollback()
    walls = []

    def run():
        for _ in range(repeats):
            start = time.perf_counter()
            backend.forward(ids, positions, mask)
            walls.append(time.perf_counter() - start)
            backend.rollback()

    seconds = backend.op_profile(run)
    backend.reset()
    if seconds is None:
        return None
    wall = statistics.mean(walls)
    per_forward = sorted(((op, s / repeats) for op, s in seconds.items()), key=lambda item: -item[1])
    top, rest = per_forward[:TOP_OPERATORS], sum(s for _, s in per_forward[TOP_OPERATORS:])
    if rest > 0:
        top.append(("(other operators)", rest))
    top.append(("(outside operators)", max(0.0, wall - sum(s for _, s in per_forward))))
    return wall, top


def breakdown_table(wall: float, rows: list[tuple[str, float]]) -> str:
    return "\n".join(f"    {op:<40} {s * 1e3:8.2f} ms {100 * s / wall:5.1f}%" for op, s in rows)
