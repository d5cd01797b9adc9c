"""Test doubles for checking strategies: a toy backend whose logits are an explicit table.

`TableBackend` honours the backend contract literally: each query's context is the committed
tokens plus the pending entries its mask shows, in cache order. It also checks what a real model
would silently get wrong: that a query's position equals its context length, and that committed
entries were computed with exactly the prefix they end up following.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from specdec.backends.base import Backend, BackendOptions
from specdec.errors import SpecdecError

LogitsFn = Callable[[tuple[int, ...]], torch.Tensor]  # whole prefix -> [V] logits


class TableBackend(Backend):
    name = "table"
    Options = BackendOptions

    def __init__(self, logits_fn: LogitsFn, vocab_size: int, max_length: int = 4096, eos_token_ids=frozenset()):
        self.logits_fn = logits_fn
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.device = torch.device("cpu")
        self.eos_token_ids = frozenset(eos_token_ids)
        self.forward_calls = 0
        self.forward_seconds = 0.0
        self.committed: list[int] = []
        self.pending: list[tuple[int, ...]] = []  # each entry's full prefix, itself included

    @classmethod
    def load(cls, model: str, options: BackendOptions) -> TableBackend:
        raise SpecdecError("a table backend is built in code, not loaded from a config")

    @property
    def committed_len(self) -> int:
        return len(self.committed)

    @property
    def pending_len(self) -> int:
        return len(self.pending)

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        assert not self.pending, "prefill with pending entries"
        self.committed += input_ids[0].tolist()
        return self.logits_fn(tuple(self.committed))[None]

    def forward(self, input_ids, position_ids, mask) -> torch.Tensor:
        existing = len(self.pending)
        tokens, positions = input_ids[0].tolist(), position_ids[0].tolist()
        rows = []
        for j, (token, position) in enumerate(zip(tokens, positions)):
            visible = [k for k in range(existing + j) if mask[0, j, k]]
            assert mask[0, j, existing + j], "a query must see itself"
            prefix = tuple(self.committed) + tuple(self.pending[k][-1] for k in visible) + (token,)
            assert position == len(prefix) - 1, f"position {position} for a context of {len(prefix) - 1} tokens"
            self.pending.append(prefix)
            rows.append(self.logits_fn(prefix))
        self.forward_calls += 1
        return torch.stack(rows)[None]

    def commit(self, keep: list[int]) -> None:
        for index in keep:
            prefix = self.pending[index]
            assert prefix[:-1] == tuple(self.committed), "committed an entry computed with another prefix"
            self.committed.append(prefix[-1])
        self.pending = []

    def reset(self) -> None:
        self.committed, self.pending = [], []
