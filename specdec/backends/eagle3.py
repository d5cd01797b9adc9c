"""An EAGLE-3 head as a draft backend: strategies drive it like any draft; it reads target features.

Each query token at position p needs an input hidden state (specdec.eagle3): fc(target features of
p - 1) when the target has computed position p - 1 (the loop hands the head those features after
every commit, `take_features`), else the head's own output at its parent, found from the mask (the
visible entry at position p - 1). A parent fed in the same forward (a lookup chain of `hybrid`) is
computed first: a forward runs in levels, each level's inputs known from earlier ones.

Commit keeps only entries computed from target features, as the reference does: accepted tree nodes
were computed from the head's own outputs, so they are fed again next step from the target's
features (they are lag tokens to `TreeDrafter`, fed in the same forward as the root).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from specdec import lockstep
from specdec.backends.base import Backend, BackendOptions
from specdec.backends.clock import ForwardClock, TimedForwards
from specdec.backends.vocab import scatter_to_target
from specdec.eagle3 import Eagle3Head, default_aux_layers, load_head
from specdec.errors import SpecdecError


class Eagle3Backend(TimedForwards, Backend):
    name = "eagle3"
    Options = BackendOptions

    def __init__(self, head: Eagle3Head, max_length: int, eos_token_ids: frozenset[int] = frozenset()):
        c = head.config
        self.head = head
        self.aux_layers = c.aux_layers  # the target layers whose inputs it reads
        self.feature_size = head.fc.in_features  # F = len(aux_layers) x the target's hidden size
        self.vocab_size = c.vocab_size
        self.max_length = max_length
        self.eos_token_ids = eos_token_ids
        self.device = head.lm_head.weight.device
        self.dtype = head.lm_head.weight.dtype
        self.clock = ForwardClock(self.device)
        self._columns = head.draft_to_target.to(self.device)  # [Vd] where the draft's logits land
        self._keys = torch.zeros(c.kv_heads, 0, c.head_dim, dtype=self.dtype, device=self.device)  # [Hk, cap, D]
        self._values = torch.zeros_like(self._keys)
        self._known = torch.zeros(0, c.hidden_size, dtype=self.dtype, device=self.device)  # [cap, H] fc(features) by position
        self._known_len = 0  # positions 0 .. _known_len - 1 have target features
        self._pending_pos: list[int] = []  # [S] position of each pending entry
        self._pending_out: list[torch.Tensor] = []  # [S] of [H]: the head's output there (before norm)
        self._pending_from_target: list[bool] = []  # [S] input came from target features

    @classmethod
    def load(cls, model: str, options: BackendOptions) -> Eagle3Backend:
        raise SpecdecError("an EAGLE-3 head reads its target's embedding and features; load it with its target "
                           "(SpeculativeDecoder.from_config, or specdec.decoder.load_backend(spec, target=...))")

    @classmethod
    def for_target(cls, folder: Path, target: Backend, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Eagle3Backend:
        """The head in `folder` on `device`, sharing `target`'s embedding; asks `target` for the
        features the head reads (its `eagle_aux_hidden_state_layer_ids`, else EAGLE-3's defaults)."""
        embed = target.input_embedding()
        head = load_head(folder, embed.to(device), default_aux_layers(target.num_layers), embed.shape[1])
        head = head.to(device=device, dtype=dtype)
        target.request_features(head.config.aux_layers)
        return cls(head, target.max_length, target.eos_token_ids)

    def take_features(self, position: int, features: torch.Tensor) -> None:
        """Target features [n, F] of positions position .. position + n - 1 (newly committed)."""
        with torch.inference_mode():
            hidden = self.head.project(features.to(self.device))  # [n, H]
        end = position + hidden.shape[0]
        self._known = _reserve(self._known, end, dim=0)
        self._known[position:end] = hidden
        self._known_len = end

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        positions = torch.arange(self._committed, self._committed + length)[None]
        causal = torch.ones(length, length, dtype=torch.bool).tril_()
        logits = self._forward(input_ids[0].tolist(), positions[0].tolist(), causal)[-1:]  # [1, Vd]
        self.commit(list(range(length)))
        return scatter_to_target(logits, self._columns, self.vocab_size)  # [1, V]

    def forward(self, input_ids, position_ids, mask) -> torch.Tensor:
        return lockstep.forward(self, (input_ids, position_ids, mask))  # batched with other rows' in a step

    @classmethod
    @torch.inference_mode()
    def forward_many(cls, calls: list[tuple[Eagle3Backend, tuple]]) -> list[torch.Tensor]:
        """Heads over the same weights (the rows of a batch) -> one head call per level."""
        backends = [backend for backend, _ in calls]
        with ExitStack() as timing:  # each backend's forward took the whole call
            for backend in backends:
                timing.enter_context(backend.clock.timing())
            logits = _forward_heads([(backend, ids[0].tolist(), positions[0].tolist(), mask[0])
                                     for backend, (ids, positions, mask) in calls])
        out = []
        for backend, row_logits in zip(backends, logits):
            backend.forward_calls += 1
            out.append(scatter_to_target(row_logits, backend._columns, backend.vocab_size)[None])  # [1, Q, V]
        return out

    def _forward(self, ids: list[int], positions: list[int], mask: torch.Tensor) -> torch.Tensor:
        """-> draft-vocabulary logits [Q, Vd]; the Q entries become pending."""
        return _forward_heads([(self, ids, positions, mask)])[0]

    def _plan(self, ids: list[int], positions: list[int], mask: torch.Tensor) -> _Plan:
        """Where a forward's inputs come from, with room reserved for its entries."""
        existing, query = len(self._pending_pos), len(ids)
        sources, level = self._inputs(positions, mask, existing)
        base = self._committed + existing
        self._keys = _reserve(self._keys, base + query, dim=1)
        self._values = _reserve(self._values, base + query, dim=1)
        logits = torch.empty(query, self.head.config.draft_vocab_size, dtype=self.dtype, device=self.device)
        return _Plan(self, ids, positions, mask, sources, level, base, [None] * query, logits)

    def _attend(self, plan: _Plan, rows: list[int], q_states, k, v) -> torch.Tensor:
        """Store the keys, values [Hk, R, D] of `plan`'s queries `rows` and attend -> [Hq, R, D]."""
        end = plan.base + len(plan.ids)
        slots = torch.tensor([plan.base + q for q in rows], device=self.device)
        self._keys.index_copy_(1, slots, k)
        self._values.index_copy_(1, slots, v)
        visible = torch.ones(len(rows), end, dtype=torch.bool, device=self.device)
        visible[:, self._committed :] = plan.mask[rows].to(self.device)
        return self.head.attention(q_states, self._keys[:, :end], self._values[:, :end], visible)

    def _pend(self, plan: _Plan) -> None:
        self._pending_pos += plan.positions
        self._pending_out += plan.outs
        self._pending_from_target += [source[0] == "target" for source in plan.sources]

    def _inputs(self, positions: list[int], mask: torch.Tensor, existing: int):
        """Where each query's input hidden state comes from -> (sources, levels): ("target", p - 1),
        ("pending", entry) or ("row", earlier query of this forward)."""
        sources, level = [], []
        all_positions = self._pending_pos + positions
        visible = None  # [Q][S + Q] on the host, read once and only when a parent must be found
        for q, p in enumerate(positions):
            if p - 1 < self._known_len:
                sources.append(("target", p - 1))
                level.append(0)
                continue
            visible = visible if visible is not None else mask.tolist()
            parent = next((j for j in range(existing + q - 1, -1, -1) if visible[q][j] and all_positions[j] == p - 1), None)
            if parent is None:
                raise RuntimeError(f"EAGLE-3 head: no target features for position {p - 1} and no parent in the mask")
            if parent < existing:
                sources.append(("pending", parent))
                level.append(0)
            else:
                sources.append(("row", parent - existing))
                level.append(level[parent - existing] + 1)
        return sources, level

    def _input(self, source: tuple[str, int], outs: list) -> torch.Tensor:
        kind, index = source
        if kind == "target":  # position -1 (the first token) has no previous state: zeros, as fc(0)
            return self._known[index] if index >= 0 else self._known.new_zeros(self._known.shape[1])
        return self._pending_out[index] if kind == "pending" else outs[index]

    @torch.inference_mode()
    def commit(self, keep: list[int]) -> None:
        kept = []
        for index in keep:  # the leading entries computed from target features
            if not self._pending_from_target[index]:
                break
            kept.append(index)
        if kept != list(range(len(kept))):
            index = torch.tensor(kept, device=self.device) + self._committed
            end = self._committed + len(kept)
            self._keys[:, self._committed : end] = self._keys.index_select(1, index)
            self._values[:, self._committed : end] = self._values.index_select(1, index)
        self._committed += len(kept)
        self._pending_pos, self._pending_out, self._pending_from_target = [], [], []

    @property
    def pending_len(self) -> int:
        return len(self._pending_pos)

    def reset(self) -> None:
        self._committed = 0
        self._known_len = 0
        self._pending_pos, self._pending_out, self._pending_from_target = [], [], []


@dataclass
class _Plan:
    """One head's forward in progress: its queries' input sources and levels, outputs so far."""

    backend: Eagle3Backend
    ids: list[int]
    positions: list[int]
    mask: torch.Tensor  # [Q, S + Q]
    sources: list[tuple[str, int]]
    level: list[int]
    base: int  # the slot of its first query
    outs: list[torch.Tensor | None]  # [Q] of [H]
    logits: torch.Tensor  # [Q, Vd]


def _forward_heads(calls: list[tuple[Eagle3Backend, list[int], list[int], torch.Tensor]]) -> list[torch.Tensor]:
    """Forwards (ids, positions [Q], mask [Q, S + Q]) of heads over the same weights -> their
    draft-vocabulary logits [Q, Vd]. Level by level, the queries of every head whose inputs are
    known run as one call of the head's projections and MLP; attention reads each head's own KV."""
    head = calls[0][0].head
    plans = [backend._plan(ids, positions, mask) for backend, ids, positions, mask in calls]
    for current in range(max(max(plan.level) for plan in plans) + 1):
        parts = [(plan, [q for q, level in enumerate(plan.level) if level == current]) for plan in plans]
        parts = [(plan, rows) for plan, rows in parts if rows]
        queries = [(plan, q) for plan, rows in parts for q in rows]
        hidden = torch.stack([plan.backend._input(plan.sources[q], plan.outs) for plan, q in queries])  # [R, H]
        device = hidden.device
        ids = torch.tensor([plan.ids[q] for plan, q in queries], device=device)  # [R]
        positions = torch.tensor([plan.positions[q] for plan, q in queries], device=device)  # [R]
        q_states, k, v = head.qkv(ids, hidden, positions)  # [Hq, R, D], [Hk, R, D] x 2
        attn, start = [], 0
        for plan, rows in parts:
            part = slice(start, start + len(rows))
            attn.append(plan.backend._attend(plan, rows, q_states[:, part], k[:, part], v[:, part]))
            start += len(rows)
        out, logits = head.finish(torch.cat(attn, dim=1), hidden)  # [R, H], [R, Vd]
        for j, (plan, q) in enumerate(queries):
            plan.outs[q] = out[j]
            plan.logits[q] = logits[j]
    for plan in plans:
        plan.backend._pend(plan)
    return [plan.logits for plan in plans]


def _reserve(buffer: torch.Tensor, needed: int, dim: int) -> torch.Tensor:
    """`buffer` with room for `needed` entries along `dim` (doubling; new room zeroed: masked
    entries must hold finite values)."""
    size = buffer.shape[dim]
    if needed <= size:
        return buffer
    shape = list(buffer.shape)
    shape[dim] = max(2 * size, needed + 256)
    grown = buffer.new_zeros(shape)
    grown.narrow(dim, 0, size).copy_(buffer)
    return grown
