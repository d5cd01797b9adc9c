"""Reduced draft vocabularies (FR-Spec, EAGLE-3's d2t): a draft whose head covers only some target
tokens, used through any backend.

A draft model folder with a `specdec_vocab.json` has `draft_vocab + 1` rows: row i < draft_vocab is
target token `draft_to_target[i]`, the last row stands for every other target token (inputs only).
`MappedVocabBackend` wraps the draft's backend: target ids in, target-vocabulary logits out, with
-inf outside the map. The draft then proposes zero probability there, and verification stays
lossless: the target's residual keeps the full mass of every token the draft cannot propose.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from specdec.backends.base import Backend, BackendOptions
from specdec.errors import SpecdecError

VOCAB_FILE = "specdec_vocab.json"


def read_vocab_map(folder: str | Path) -> dict | None:
    """The vocabulary map stored with a model folder or export, or None when it has the full vocabulary."""
    path = Path(folder).expanduser() / VOCAB_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        mapping = [int(t) for t in data["draft_to_target"]]
        size = int(data["target_vocab_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SpecdecError(f"{path}: not a valid vocabulary map ({exc})") from None
    if len(set(mapping)) != len(mapping) or not all(0 <= t < size for t in mapping):
        raise SpecdecError(f"{path}: draft_to_target must list distinct target ids below {size}")
    return {"draft_to_target": mapping, "target_vocab_size": size}


def write_vocab_map(folder: str | Path, draft_to_target: list[int], target_vocab_size: int) -> None:
    data = {"target_vocab_size": target_vocab_size, "draft_to_target": [int(t) for t in draft_to_target]}
    (Path(folder) / VOCAB_FILE).write_text(json.dumps(data) + "\n")


def scatter_to_target(logits: torch.Tensor, columns: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Draft-vocabulary logits [..., V_draft] -> target logits [..., V]: column `columns[i]` [V_draft]
    gets draft id i, every other target token -inf (the draft proposes zero probability there)."""
    out = logits.new_full((*logits.shape[:-1], vocab_size), float("-inf"))
    out[..., columns] = logits
    return out


class MappedVocabBackend(Backend):
    """A draft backend over a reduced vocabulary, seen by the loop in target ids."""

    name = "mapped_vocab"
    Options = BackendOptions

    def __init__(self, inner: Backend, draft_to_target: list[int], target_vocab_size: int):
        if inner.vocab_size != len(draft_to_target) + 1:
            raise SpecdecError(
                f"the draft has {inner.vocab_size} vocabulary rows but its map lists {len(draft_to_target)} "
                "tokens (+1 for all others)"
            )
        self.inner = inner
        self.vocab_size = target_vocab_size
        self.max_length = inner.max_length
        self.device = inner.device
        self.draft_to_target = torch.tensor(draft_to_target, dtype=torch.long)  # [V_draft]
        self.target_to_draft = torch.full((target_vocab_size,), len(draft_to_target), dtype=torch.long)  # [V]
        self.target_to_draft[self.draft_to_target] = torch.arange(len(draft_to_target))
        self._columns = self.draft_to_target.to(inner.device)  # [V_draft], where the draft's logits land

    @classmethod
    def load(cls, model: str, options: BackendOptions) -> MappedVocabBackend:
        raise SpecdecError("a mapped-vocabulary backend wraps a loaded backend; see load_backend")

    forward_calls = property(lambda self: self.inner.forward_calls)
    forward_seconds = property(lambda self: self.inner.forward_seconds)
    committed_len = property(lambda self: self.inner.committed_len)
    pending_len = property(lambda self: self.inner.pending_len)

    def to_target_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V_draft + 1] draft logits -> [..., V] target logits, -inf outside the map."""
        return scatter_to_target(logits[..., : len(self.draft_to_target)], self._columns, self.vocab_size)

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.to_target_logits(self.inner.prefill(self.target_to_draft[input_ids]))

    def forward(self, input_ids, position_ids, mask) -> torch.Tensor:
        return self.to_target_logits(self.inner.forward(self.target_to_draft[input_ids], position_ids, mask))

    def commit(self, keep: list[int]) -> None:
        self.inner.commit(keep)

    def op_profile(self, run):
        return self.inner.op_profile(run)

    def reset(self) -> None:
        self.inner.reset()
