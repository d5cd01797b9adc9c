"""Draft trees and verdicts: the payloads passed between strategy, verifier and backends.

Glossary (DESIGN.md section 2):
- root: the newest emitted token; node 0 of every draft tree; its KV is not computed yet.
- draft tree: nodes 0..N-1 in topological order (parent index < child index), parents[0] = -1.
  A chain is a tree in which every node has at most one child.
- accepted tokens: draft tokens the verifier kept; bonus token: the one token the target adds
  after the last accepted node. Tokens emitted per step = accepted + 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

Mode = Literal["deterministic", "iid", "without_replacement"]


@dataclass
class DraftTree:
    """Candidate continuations of the root, scored by the target in one forward.

    `draft_probs[i]` is the (warped) proposal distribution that node i's children were drawn from;
    it is needed only for sampling verification in `iid` / `without_replacement` mode.
    `fixed[i]` marks a node chosen without drawing from its parent's proposal (a lookup match); the
    verifier visits a node's fixed children first, each as a point-mass proposal, so the parent's
    `draft_probs` must give them zero probability (they are drawn from what is left).
    `draft_kv[i]` is the index of the draft backend's pending entry that holds node i's KV computed
    with node i's true prefix, or -1 when node i was never fed to the draft that way; it lets the
    loop commit the draft's cache along the accepted path.
    """

    tokens: torch.Tensor  # [N] int64, tokens[0] = root
    parents: torch.Tensor  # [N] int64, parents[0] = -1, parents[i] < i
    depths: torch.Tensor  # [N] int64, depths[0] = 0
    mode: Mode = "deterministic"
    draft_probs: torch.Tensor | None = None  # [N, V] float
    draft_kv: list[int] | None = None  # [N]
    dag_node: torch.Tensor | None = None  # [N] int64 (GSD: DAG node each unrolled node came from)
    merged: list[bool] | None = None  # [N] (GSD: node reached through a merged edge of the DAG)
    fixed: list[bool] | None = None  # [N] node chosen deterministically (hybrid: n-gram lookup), not drawn
    # () -> [N] float: draft probability of each node's token under its parent's proposal (nan for the
    #   root and fixed nodes); what `specdec analyze` bins acceptance by. A callable, so that the decode
    #   step never pays for reading them.
    node_probs_of: Callable[[], torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def depth(self) -> int:
        return int(self.depths.max())

    def children(self) -> list[list[int]]:
        """Children of every node, in node order (= draft order)."""
        kids: list[list[int]] = [[] for _ in range(len(self))]
        for node, parent in enumerate(self.parents.tolist()[1:], start=1):
            kids[parent].append(node)
        return kids


@dataclass
class Verdict:
    """What the verifier kept: `path` runs from the root (inclusive) through the accepted nodes."""

    path: list[int]
    bonus_token: int

    @property
    def num_accepted(self) -> int:
        return len(self.path) - 1


def depths_from_parents(parents: torch.Tensor) -> torch.Tensor:
    """[N] parents (topological order) -> [N] depths."""
    depths = [0] * parents.shape[0]
    for node, parent in enumerate(parents.tolist()[1:], start=1):
        depths[node] = depths[parent] + 1
    return torch.tensor(depths, dtype=torch.long)


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """[N] parents -> [N, N] bool, mask[i, j] = node j is node i or one of its ancestors."""
    n = parents.shape[0]
    mask = torch.eye(n, dtype=torch.bool)
    for node, parent in enumerate(parents.tolist()[1:], start=1):
        mask[node] |= mask[parent]
    return mask


def chain_tree(tokens: list[int], mode: Mode = "deterministic") -> DraftTree:
    """A chain root -> t1 -> t2 ... as a DraftTree."""
    n = len(tokens)
    return DraftTree(
        tokens=torch.tensor(tokens, dtype=torch.long),
        parents=torch.arange(-1, n - 1, dtype=torch.long),
        depths=torch.arange(n, dtype=torch.long),
        mode=mode,
    )


def validate_tree(tree: DraftTree) -> None:
    """Raise ValueError when the tree breaks the invariants the verifier relies on."""
    parents = tree.parents.tolist()
    if not parents or parents[0] != -1:
        raise ValueError("draft tree: parents[0] must be -1 (node 0 is the root)")
    if any(not 0 <= p < i for i, p in enumerate(parents[1:], start=1)):
        raise ValueError("draft tree: nodes must be in topological order (0 <= parent < node)")
    if not torch.equal(tree.depths, depths_from_parents(tree.parents)):
        raise ValueError("draft tree: depths do not match parents")
    if tree.mode != "iid":
        tokens = tree.tokens.tolist()
        for kids in tree.children():
            if len({tokens[k] for k in kids}) != len(kids):
                raise ValueError(f"draft tree: siblings must be distinct in {tree.mode!r} mode")
