"""The backend contract (DESIGN.md section 5): a model plus a KV cache of committed + pending entries.

- committed: entries whose KV is final; always visible to every query.
- pending: speculative entries appended since the last commit; visible only through the mask.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from specdec.errors import SpecdecError


class BackendOptions(BaseModel):
    """Base of every backend's options model (the only source of its defaults)."""

    model_config = ConfigDict(extra="forbid")


class Backend(ABC):
    """Executes forwards of one causal LM and owns its KV cache."""

    name: ClassVar[str]
    Options: ClassVar[type[BackendOptions]]

    vocab_size: int
    max_length: int  # context limit in tokens (positions 0 .. max_length - 1)
    device: torch.device
    eos_token_ids: frozenset[int] = frozenset()
    forward_calls: int = 0  # incremented by every `forward`; the loop reports draft forwards from it
    forward_seconds: float = 0.0  # time spent in `forward`, device work included (specdec.backends.clock)
    # What `load` takes besides a model folder or hub id: "onnx" (a specdec ONNX export) or "tensorrt"
    # (an export with an engine for this GPU); specdec.export.prepare makes it on first use.
    artifact: ClassVar[str | None] = None
    # Target features (EAGLE-3 drafts, DESIGN.md section 5): a draft that reads them names the target
    # layers whose inputs it needs; a target asked for them keeps `features` [Q, F] of its last
    # prefill or forward (every position computed), F = len(layers) x hidden size.
    aux_layers: tuple[int, ...] | None = None
    features: torch.Tensor | None = None
    returns_features: ClassVar[bool] = False  # whether `request_features` works on this backend
    num_layers: int = 0  # decoder layers, where known
    # why a token's logits depend on the other tokens in the same forward (not just on its ancestors),
    # or "" if they do not: speculation is lossless only on a target whose rows do not interact
    rows_interact: str = ""

    @classmethod
    @abstractmethod
    def load(cls, model: str, options: BackendOptions) -> Backend:
        """Build the backend for a model path or hub id."""

    _committed: int = 0  # default bookkeeping of the two counts below
    _pending: int = 0

    @property
    def committed_len(self) -> int:
        """Number of committed cache entries."""
        return self._committed

    @property
    def pending_len(self) -> int:
        """Number of pending cache entries."""
        return self._pending

    @abstractmethod
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [1, L] -> logits [1, V] of the last position; the L tokens become committed.
        Requires no pending entries."""

    @abstractmethod
    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """input_ids, position_ids [1, Q]; mask [1, Q, S + Q] bool over the S pending entries and
        the Q new ones (committed entries are always visible) -> logits [1, Q, V].
        The Q new entries become pending, after the S existing ones."""

    @classmethod
    def forward_many(cls, calls: list[tuple[Backend, tuple]]) -> list[torch.Tensor]:
        """The forwards of several backends of this type, [(backend, (input_ids, position_ids,
        mask))] -> their logits [1, Q, V], in order. A backend that can run them as one call
        (batched rows, EAGLE-3 heads) overrides this; specdec.lockstep gathers them."""
        return [backend.forward(*request) for backend, request in calls]

    @abstractmethod
    def commit(self, keep: list[int]) -> None:
        """Keep these pending indices, in this order, as committed; drop the other pending ones."""

    def rollback(self) -> None:
        """Drop every pending entry."""
        self.commit([])

    @abstractmethod
    def reset(self) -> None:
        """Drop the whole cache."""

    def input_embedding(self) -> torch.Tensor:
        """Target side: the input embedding [V, H] (an EAGLE-3 draft shares it)."""
        raise self._no_features()

    def request_features(self, layers: tuple[int, ...]) -> None:
        """Target side: from now on keep `features`, the hidden states entering decoder `layers`
        (of `num_layers`), concatenated in that order."""
        raise self._no_features()

    @classmethod
    def _no_features(cls) -> SpecdecError:
        return SpecdecError(f"the {cls.name} backend does not return hidden states, which an EAGLE-3 draft reads; "
                            "put the target on the pytorch backend")

    def take_features(self, position: int, features: torch.Tensor) -> None:
        """Draft side: the target's features [n, F] of newly committed positions position .. position + n - 1."""

    def op_profile(self, run: Callable[[], object]) -> dict[str, float] | None:
        """Call `run` under this backend's operator profiler -> seconds spent per operator type
        (None: this backend has no profiler). Used by `specdec profile`."""
        run()
        return None
