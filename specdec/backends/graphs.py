"""Fixed-shape forwards for the pytorch backend, replayed as CUDA graphs.

A forward of a small model launches a few hundred small kernels; on a GPU launching them can cost
more than running them (on an H100 a forward of the 12M demo target took ~5 ms for 1 or 64 tokens).
A CUDA graph replays a captured forward with one launch, but only at the shapes and addresses it
was captured with. So on this path:

- the query length Q is rounded up to a bucket (1, 2, 4, .., 64); padding query i sees only itself,
  and its KV entry lands after the Q real ones, where the next forward overwrites it;
- every forward attends over the whole KV buffer (a fixed capacity), the additive mask hiding the
  slots that are not committed, pending or new;
- inputs are copied into the bucket's own tensors, and the cache writes at a slot tensor
  (`_BufferLayer.slots`) instead of at Python offsets.

Every bucket is captured after the first prompt is in the cache (so capture time is never counted
as forward time). Longer forwards (a prompt, a tree of more than 64 nodes) run eagerly over the same
buffer. Without capture (a CPU), every forward runs eagerly: that is how the tests check this path's
output where there is no GPU.
"""

from __future__ import annotations

import torch

from specdec.errors import SpecdecError

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
HEADROOM = BUCKETS[-1]  # slots kept free past the context: a step's forwards of up to 64 tokens always fit


class _Shape:
    """The fixed inputs of forwards of `query` tokens over `capacity` slots, and their graph."""

    def __init__(self, query: int, capacity: int, device: torch.device, dtype: torch.dtype):
        self.ids = torch.zeros(1, query, dtype=torch.long, device=device)  # [1, Qb]
        self.positions = torch.zeros(1, query, dtype=torch.long, device=device)  # [1, Qb]
        self.slots = torch.zeros(query, dtype=torch.long, device=device)  # [Qb] where the new KV goes
        self.mask = torch.zeros(1, 1, query, capacity, dtype=dtype, device=device)  # [1, 1, Qb, C] additive
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # [1, Qb, V], the graph's output


class FixedShapes:
    """Runs the model's forwards at bucketed shapes over a cache of `capacity` slots per layer,
    replaying each bucket as a CUDA graph when `capture` (see `capture_all`)."""

    def __init__(self, model, cache, cache_argument: str, capacity: int, capture: bool):
        self.model, self.cache, self.capacity, self.capture = model, cache, capacity, capture
        self.cache_argument = cache_argument  # the forward's name for the cache (specdec.hf_compat)
        self.device, self.dtype = model.device, model.dtype
        self.arange = torch.arange(capacity, device=self.device)  # [C]
        self.shapes: dict[int, _Shape] = {}
        self.replays = 0  # forwards served by a graph

    def run(self, input_ids, position_ids, mask, committed: int, used: int, logits_to_keep: int = 0) -> torch.Tensor:
        """input_ids, position_ids [1, Q] (host or device); mask [1, Q, S + Q] bool over the pending
        and new entries; `used` = committed + S entries in the cache -> logits [1, Q or 1, V] float32."""
        query = input_ids.shape[1]
        if used + query > self.capacity:
            raise SpecdecError(
                f"a forward of {query} tokens after {used} cached entries overflows the {self.capacity}-slot KV buffer "
                f"of cuda_graphs; raise graph_context or draft smaller trees"
            )
        bucket = next((b for b in BUCKETS if query <= b and used + b <= self.capacity), None)
        if bucket is None or logits_to_keep:  # a prompt, or too close to the end to pad: eagerly
            shape = _Shape(query, self.capacity, self.device, self.dtype)
            self._load(shape, input_ids, position_ids, mask, committed, used)
            return self._call(shape, logits_to_keep).float()
        shape = self.shapes.get(bucket)
        if shape is None:
            shape = self.shapes[bucket] = _Shape(bucket, self.capacity, self.device, self.dtype)
        self._load(shape, input_ids, position_ids, mask, committed, used)
        if shape.graph is None:
            return self._call(shape)[:, :query].float()
        shape.graph.replay()
        self.replays += 1
        return shape.logits[:, :query].to(torch.float32, copy=True)  # the next replay overwrites shape.logits

    def capture_all(self, used: int) -> None:
        """Capture every bucket (once, when `capture`), with `used` entries in the cache. Each
        capture's warm-up really runs, on placeholder inputs whose KV lands in free slots past `used`."""
        if not self.capture or self.shapes or used + HEADROOM > self.capacity:
            return
        for bucket in BUCKETS:
            shape = self.shapes[bucket] = _Shape(bucket, self.capacity, self.device, self.dtype)
            placeholder = torch.zeros(1, bucket, dtype=torch.long)
            self._load(shape, placeholder, placeholder, torch.eye(bucket, dtype=torch.bool)[None], used, used)
            try:
                self._capture(shape)
            except RuntimeError as exc:  # e.g. an operation in the model's forward that waits for the host
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise SpecdecError(
                    f"{type(self.model).__name__}'s forward could not be captured as a CUDA graph ({reason}); "
                    "run it without cuda_graphs"
                ) from exc

    def _load(self, shape: _Shape, input_ids, position_ids, mask, committed: int, used: int) -> None:
        """Copy one forward's inputs into `shape`'s tensors, on the device, without waiting for it."""
        query, padded = input_ids.shape[1], shape.ids.shape[1]
        shape.ids[:, :query].copy_(input_ids, non_blocking=True)  # padding keeps earlier (valid) ids
        shape.positions[:, :query].copy_(position_ids, non_blocking=True)
        torch.add(self.arange[:padded], used, out=shape.slots)
        additive = shape.mask[0, 0]  # [Qb, C]
        additive.fill_(torch.finfo(self.dtype).min)
        additive[:, :committed] = 0.0
        additive[:query, committed : used + query].masked_fill_(mask[0].to(self.device, non_blocking=True), 0.0)
        if padded > query:
            additive[query:, used + query : used + padded].fill_diagonal_(0.0)  # padding sees itself

    def _call(self, shape: _Shape, logits_to_keep: int = 0) -> torch.Tensor:
        for layer in self.cache.layers:
            layer.slots = shape.slots
        out = self.model(
            input_ids=shape.ids,
            position_ids=shape.positions,
            attention_mask=shape.mask,
            use_cache=True,
            **{self.cache_argument: self.cache},
            logits_to_keep=logits_to_keep,
        )
        return out.logits  # [1, Qb or 1, V]

    def _capture(self, shape: _Shape) -> None:
        """Warm up on a side stream of this device (lazy initialisations must not be captured), then
        capture on it; `shape.graph` is set only once the capture succeeded."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self._call(shape)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device), torch.cuda.graph(graph, stream=side):
            shape.logits = self._call(shape)
        shape.graph = graph
