"""`static_tree`: a fixed tree shape (SpecInfer / Medusa / Sequoia style), drafted level by level.

The shape is a template of child ranks: rank r is the draft's (r+1)-th most likely child when
greedy, the (r+1)-th sample without replacement when sampling. Each level costs one draft forward.

Example: `branching: [2, 1]` is the template root -> {r0 -> {r0}, r1 -> {r0}}, i.e. the paths
[0], [1], [0, 0], [1, 0]: two candidates for the next token, each followed by its best next token.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from specdec.backends.base import Backend
from specdec.strategies.base import DraftContext, Strategy, StrategyOptions, TreeDrafter
from specdec.tree import DraftTree

MAX_TEMPLATE_NODES = 1024


class StaticTreeOptions(StrategyOptions):
    branching: list[int] | None = Field(
        None, description="children of every node at each depth, e.g. [4, 2, 2, 1] (default when no paths)"
    )
    paths: list[list[int]] | None = Field(
        None, description="explicit Medusa-style paths of child ranks, e.g. [[0], [1], [0, 0]]"
    )

    @model_validator(mode="after")
    def _shape(self):
        if self.branching is not None and self.paths is not None:
            raise ValueError("give either branching or paths, not both")
        if self.paths is None and self.branching is None:
            self.branching = [4, 2, 2, 1]
        if self.branching is not None:
            if not self.branching or min(self.branching) < 1:
                raise ValueError("branching must be a non-empty list of positive counts, e.g. [4, 2, 2, 1]")
        else:
            _check_paths(self.paths)
        if len(template_paths(self)) > MAX_TEMPLATE_NODES:
            raise ValueError(f"the tree has more than {MAX_TEMPLATE_NODES} nodes")
        return self


def _check_paths(paths: list[list[int]]) -> None:
    if not paths or any(not path or min(path) < 0 for path in paths):
        raise ValueError("paths must be a non-empty list of non-empty lists of ranks >= 0, e.g. [[0], [1], [0, 0]]")
    present = {tuple(p) for p in paths}
    for path in present:
        needed = [path[:-1]] if len(path) > 1 else []
        if path[-1] > 0:
            needed.append(path[:-1] + (path[-1] - 1,))  # an elder sibling: ranks are drawn in order
        for need in needed:
            if need not in present:
                raise ValueError(f"paths: {list(path)} needs {list(need)} as well")


def template_paths(options: StaticTreeOptions) -> list[tuple[int, ...]]:
    """Every non-root template node as its path of ranks, in breadth-first (rank) order."""
    if options.paths is not None:
        return sorted({tuple(p) for p in options.paths}, key=lambda p: (len(p), p))
    level: list[tuple[int, ...]] = [()]
    out: list[tuple[int, ...]] = []
    for count in options.branching:
        level = [p + (r,) for p in level for r in range(count)]
        out += level
    return out


class StaticTreeStrategy(Strategy):
    name = "static_tree"
    Options = StaticTreeOptions

    def __init__(self, options: StaticTreeOptions):
        super().__init__(options)
        paths = template_paths(options)
        self.children_count: dict[tuple[int, ...], int] = {}
        for path in paths:
            self.children_count[path[:-1]] = self.children_count.get(path[:-1], 0) + 1
        self.depth = max(len(p) for p in paths)

    def propose(self, draft: Backend, ctx: DraftContext) -> DraftTree:
        drafter = TreeDrafter(draft, ctx)
        depth = min(self.depth, ctx.max_depth)
        frontier = {(): (0, drafter.start())}  # template path -> (tree node, draft distribution [V])
        for level in range(1, depth + 1):
            grown: list[tuple[tuple[int, ...], int]] = []
            for path, (node, probs) in frontier.items():
                kids = drafter.expand(node, probs, self.children_count[path])
                grown += [(path + (rank,), kid) for rank, kid in enumerate(kids)]
            to_feed = [(path, kid) for path, kid in grown if path in self.children_count]
            if level == depth or not to_feed:
                break
            rows = drafter.feed([kid for _, kid in to_feed])  # one draft forward per level
            frontier = {path: (kid, row) for (path, kid), row in zip(to_feed, rows)}
        return drafter.tree()
