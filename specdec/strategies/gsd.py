"""`gsd`: Graph-structured Speculative Decoding (arXiv 2407.16207).

Hypotheses are drafted level by level as a DAG. Each expanded node takes up to `max_out_degree`
children, the draft's most likely tokens; sibling pruning keeps a child only if its probability is
>= `sibling_threshold` x the best sibling's; probability pruning expands only children whose draft
probability is >= `prob_threshold`. A new child whose token and `redundancy_threshold` preceding
tokens repeat an existing node elsewhere becomes an edge to that node instead, so the repeated
n-gram's subtree is drafted once. Before verification the DAG is unrolled into a tree (each
root-to-node path needs its own target KV), breadth first, capped at `max_nodes`.

Example (redundancy_threshold 1): root -> a -> x -> y and root -> b -> x -> y. The second `y`
has the same token and preceding token (x) as the first, so b's x points at the first y:
    root ─ a ─ x ─ y ─ ...
         └ b ─ x ─┘        (unrolled: root ─ a ─ x ─ y ─ ..., root ─ b ─ x ─ y' ─ ...)

Children are a deterministic function of the draft (its top tokens), also under sampling, and are
verified with the `deterministic` rule: pruning and merging look at token probabilities, and
dropping a child after sampling it would bias the output.
"""

from __future__ import annotations

import torch
from pydantic import Field

from specdec.backends.base import Backend
from specdec.strategies.base import DraftContext, Strategy, StrategyOptions, TreeDrafter
from specdec.tree import DraftTree


class GSDOptions(StrategyOptions):
    max_out_degree: int = Field(4, ge=1, le=64, description="children considered per expanded node (k)")
    redundancy_threshold: int = Field(2, ge=0, le=64, description="preceding tokens that must match to merge")
    prob_threshold: float = Field(0.2, ge=0.0, le=1.0, description="expand only children at least this likely")
    sibling_threshold: float = Field(0.3, ge=0.0, le=1.0, description="keep a child >= this x its best sibling")
    max_depth: int = Field(6, ge=1, le=256, description="deepest draft node")
    max_nodes: int = Field(64, ge=1, le=1024, description="draft nodes of the unrolled tree (the root excluded)")
    merge: bool = Field(True, description="merge redundant nodes (off: a plain pruned tree)")


class _Graph:
    """The DAG: node ids are the TreeDrafter's nodes (the tree of first occurrences); `children`
    adds the merged edges."""

    def __init__(self, drafter: TreeDrafter, context: list[int], window: int):
        self.drafter = drafter
        self.context = context  # tokens before the root, for n-gram keys of shallow nodes
        self.window = window
        self.children: list[list[int]] = [[]]
        self.index: dict[tuple[int, ...], int] = {}

    def key(self, parent: int, token: int) -> tuple[int, ...]:
        """`token` and the `window` tokens before it along parent's first-occurrence path."""
        tail: list[int] = []
        node = parent
        while node > 0 and len(tail) < self.window:
            tail.append(self.drafter.tokens[node])
            node = self.drafter.parents[node]
        missing = self.window - len(tail)
        if missing > 0:
            tail += self.context[::-1][:missing]  # root included: it is context[-1]
        return tuple(tail[::-1]) + (token,)

    def reaches(self, start: int, target: int) -> bool:
        stack, seen = [start], set()
        while stack:
            node = stack.pop()
            if node == target:
                return True
            if node not in seen:
                seen.add(node)
                stack.extend(self.children[node])
        return False

    def add(self, parent: int, token: int, merge: bool) -> int | None:
        """Add the child `token` of `parent`; returns the new node, or None when it was merged."""
        key = self.key(parent, token)
        existing = self.index.get(key)
        if merge and existing is not None and not self.reaches(existing, parent):  # no cycles
            self.children[parent].append(existing)
            return None
        node = self.drafter.add(parent, token)
        self.children.append([])
        self.children[parent].append(node)
        self.index.setdefault(key, node)
        return node


class GSDStrategy(Strategy):
    name = "gsd"
    Options = GSDOptions

    def propose(self, draft: Backend, ctx: DraftContext) -> DraftTree:
        opts = self.options
        drafter = TreeDrafter(draft, ctx)
        max_depth = min(opts.max_depth, ctx.max_depth)
        graph = _Graph(drafter, ctx.tokens, opts.redundancy_threshold)
        frontier = [(0, drafter.start())]
        for depth in range(1, max_depth + 1):
            expandable = []
            for node, row in frontier:
                probs = drafter.proposal(node, row)
                top = probs.topk(min(opts.max_out_degree, probs.shape[-1]))
                best = float(top.values[0])
                for prob, token in zip(top.values.tolist(), top.indices.tolist()):
                    if prob < opts.sibling_threshold * best or len(drafter.tokens) > opts.max_nodes:
                        break
                    child = graph.add(node, token, opts.merge)
                    if child is not None and prob >= opts.prob_threshold:
                        expandable.append(child)
            if depth == max_depth or not expandable:
                break
            frontier = list(zip(expandable, drafter.feed(expandable)))  # one draft forward per level
        return unroll(drafter, graph.children, opts.max_nodes, max_depth)


def unroll(drafter: TreeDrafter, children: list[list[int]], max_nodes: int, max_depth: int) -> DraftTree:
    """Breadth-first copy of every root-to-node path of the DAG, at most `max_nodes` + 1 nodes.
    A copy keeps the draft KV of its DAG node only along that node's first-occurrence path."""
    dag_node, parents, depths, merged = [0], [-1], [0], [False]
    for copy in range(max_nodes + 1):
        if copy >= len(dag_node):
            break
        if depths[copy] == max_depth:
            continue
        for child in children[dag_node[copy]]:
            if len(dag_node) == max_nodes + 1:
                break
            dag_node.append(child)
            parents.append(copy)
            depths.append(depths[copy] + 1)
            merged.append(merged[copy] or drafter.parents[child] != dag_node[copy])
    tree = drafter.tree()
    tokens = tree.tokens[dag_node]
    return DraftTree(
        tokens=tokens,
        parents=torch.tensor(parents),
        depths=torch.tensor(depths),
        mode="deterministic",
        draft_kv=[-1 if m else drafter.draft_kv[d] for d, m in zip(dag_node, merged)],
        dag_node=torch.tensor(dag_node),
        merged=merged,
        node_probs_of=lambda: tree.node_probs_of()[dag_node],
    )
