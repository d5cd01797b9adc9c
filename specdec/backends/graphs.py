"""Fixed-shape forwards for the pytorch backend, replayed as CUDA graphs.

A forward of a small model launches a few hundred small kernels; on a GPU launching them can cost
more than running them (on an H100 a forward of the 12M demo target took ~5 ms for 1 or 64 tokens).
A CUDA graph replays a captured forward with one launch, but only at the shapes and addresses it
was captured with. So on this path:

- the query length Q is rounded up to a bucket (1, 2, 4, .., 64); padding query i sees only itself,
  and its KV entry lands after the Q real ones, where the next forward overwrites it;
- a batch's forward over k rows (specdec/backends/batched.py) runs over a row bucket (1, 2, 4, ..
  below the batch's rows, and its rows): the rows past k get padding queries only;
- every forward attends over the whole KV buffer (a fixed capacity), the additive mask hiding the
  slots that are not committed, pending or new;
- inputs are copied into the bucket's own tensors, and the cache writes at a slot tensor
  (each cache layer's `bind`) instead of at Python offsets.

Every (rows, Q) bucket is captured after the first prompt is in the cache (so capture time is never
counted as forward time), largest first, into one memory pool (a replay's logits are copied out
before the next replay). Longer forwards (a prompt, a tree of more than 64 nodes) run eagerly over
the same buffer. Without capture (a CPU), every forward runs eagerly: that is how the tests check
this path's output where there is no GPU.
"""

from __future__ import annotations

import torch

from specdec.errors import SpecdecError

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
HEADROOM = BUCKETS[-1]  # slots kept free past the context: a step's forwards of up to 64 tokens always fit


def row_buckets(rows: int) -> tuple[int, ...]:
    """Row counts a batch of `rows` rows runs its forwards at: the powers of two below it, and it."""
    return tuple(1 << i for i in range(rows.bit_length()) if 1 << i < rows) + (rows,)


class _Shape:
    """The fixed inputs of forwards of `rows` rows of `query` tokens over `capacity` slots, and their graph."""

    def __init__(self, rows: int, query: int, capacity: int, device: torch.device, dtype: torch.dtype):
        self.ids = torch.zeros(rows, query, dtype=torch.long, device=device)  # [k, Qb]
        self.positions = torch.zeros(rows, query, dtype=torch.long, device=device)  # [k, Qb]
        self.slots = torch.zeros(rows, query, dtype=torch.long, device=device)  # [k, Qb] where the new KV goes
        self.mask = torch.zeros(rows, 1, query, capacity, dtype=dtype, device=device)  # [k, 1, Qb, C] additive
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # [k, Qb, V], the graph's output


class FixedShapes:
    """Runs the model's forwards at bucketed shapes over a cache of `capacity` slots per layer and
    `rows` rows (one sequence: 1), replaying each bucket as a CUDA graph when `capture` (see
    `capture_all`). The cache's layers take each call's slots with `bind(slots)`."""

    def __init__(self, model, cache, cache_argument: str, capacity: int, capture: bool, rows: int = 1):
        self.model, self.cache, self.capacity, self.capture = model, cache, capacity, capture
        self.cache_argument = cache_argument  # the forward's name for the cache (specdec.hf_compat)
        self.device, self.dtype = model.device, model.dtype
        self.row_buckets = row_buckets(rows)
        self.arange = torch.arange(capacity, device=self.device)  # [C]
        self.shapes: dict[tuple[int, int], _Shape] = {}  # (rows, Qb) -> its inputs and graph
        self.pool = None  # the graphs' shared memory pool, once one is captured
        self.replays = 0  # forwards served by a graph

    def run(self, ids, positions, used: list[int], visible, logits_to_keep: int = 0) -> torch.Tensor:
        """ids, positions [k, Q] (host or device), k a row bucket; row b's entries are slots
        0 .. used[b] - 1 of its buffer row, and its Q new ones go to used[b] .. used[b] + Q - 1;
        visible [k, Q, W + Q] bool (W = max(used)) says what each query sees of the existing
        slots, then of the Q new entries -> logits [k, Q or 1, V] float32."""
        rows, query = ids.shape
        if max(used) + query > self.capacity:
            raise SpecdecError(
                f"a forward of {query} tokens after {max(used)} cached entries overflows the {self.capacity}-slot KV "
                f"buffer of cuda_graphs; raise graph_context or draft smaller trees"
            )
        bucket = next((b for b in BUCKETS if query <= b and max(used) + b <= self.capacity), None)
        if bucket is None or logits_to_keep:  # a prompt, or too close to the end to pad: eagerly
            shape = _Shape(rows, query, self.capacity, self.device, self.dtype)
            self._load(shape, ids, positions, used, visible)
            return self._call(shape, logits_to_keep).float()
        shape = self.shapes.get((rows, bucket))
        if shape is None:
            shape = self.shapes[rows, bucket] = _Shape(rows, bucket, self.capacity, self.device, self.dtype)
        self._load(shape, ids, positions, used, visible)
        if shape.graph is None:
            return self._call(shape)[:, :query].float()
        shape.graph.replay()
        self.replays += 1
        return shape.logits[:, :query].to(torch.float32, copy=True)  # the next replay overwrites shape.logits

    def capture_all(self, used: list[int]) -> None:
        """Capture every bucket (once, when `capture`), with used[b] entries in row b of the cache.
        Each capture's warm-up really runs, on placeholder inputs whose KV lands in free slots past
        each row's entries."""
        if not self.capture or self.shapes or max(used) + HEADROOM > self.capacity:
            return
        for rows in reversed(self.row_buckets):  # largest first: the smaller ones reuse its pool
            width = max(used[:rows])
            for bucket in reversed(BUCKETS):
                shape = self.shapes[rows, bucket] = _Shape(rows, bucket, self.capacity, self.device, self.dtype)
                placeholder = torch.zeros(rows, bucket, dtype=torch.long)
                itself = torch.eye(bucket, dtype=torch.bool).expand(rows, bucket, bucket)
                visible = torch.cat([torch.zeros(rows, bucket, width, dtype=torch.bool), itself], dim=2)
                self._load(shape, placeholder, placeholder, used[:rows], visible)
                try:
                    self._capture(shape)
                except RuntimeError as exc:  # e.g. an operation in the model's forward that waits for the host
                    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise SpecdecError(
                        f"{type(self.model).__name__}'s forward could not be captured as a CUDA graph ({reason}); "
                        "run it without cuda_graphs"
                    ) from exc

    def _load(self, shape: _Shape, ids, positions, used: list[int], visible) -> None:
        """Copy one forward's inputs into `shape`'s tensors, on the device, without waiting for it."""
        rows, query = ids.shape
        padded, width = shape.ids.shape[1], visible.shape[2] - query
        shape.ids[:, :query].copy_(ids, non_blocking=True)  # padding keeps earlier (valid) ids
        shape.positions[:, :query].copy_(positions, non_blocking=True)
        start = torch.tensor(used)[:, None].to(self.device, non_blocking=True)  # [k, 1]
        torch.add(self.arange[:padded], start, out=shape.slots)  # [k, Qb]
        seen = visible.to(self.device, non_blocking=True)  # [k, Q, W + Q]
        additive = shape.mask[:, 0]  # [k, Qb, C]
        additive.fill_(torch.finfo(self.dtype).min)
        additive[:, :query, :width].masked_fill_(seen[:, :, :width], 0.0)
        new = torch.zeros(rows, query, query, dtype=self.dtype, device=self.device)  # [k, Q, Q] over the new entries
        new.masked_fill_(~seen[:, :, width:], torch.finfo(self.dtype).min)
        additive[:, :query].scatter_(2, shape.slots[:, None, :query].expand(rows, query, query), new)
        if padded > query:  # a padding query sees itself
            additive[:, query:].scatter_(2, shape.slots[:, query:, None], 0.0)

    def _call(self, shape: _Shape, logits_to_keep: int = 0) -> torch.Tensor:
        for layer in self.cache.layers:
            layer.bind(shape.slots)
        out = self.model(
            input_ids=shape.ids,
            position_ids=shape.positions,
            attention_mask=shape.mask,
            use_cache=True,
            **{self.cache_argument: self.cache},
            logits_to_keep=logits_to_keep,
        )
        return out.logits  # [k, Qb or 1, V]

    def _capture(self, shape: _Shape) -> None:
        """Warm up on a side stream of this device (lazy initialisations must not be captured), then
        capture on it into the shared pool; `shape.graph` is set only once the capture succeeded."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self._call(shape)
        current.wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device), torch.cuda.graph(graph, pool=self.pool, stream=side):
            shape.logits = self._call(shape)
        shape.graph = graph
