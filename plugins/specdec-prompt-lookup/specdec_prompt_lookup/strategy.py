"""The `prompt_lookup` strategy: draft without a draft model by finding the context's last n-gram earlier in
the prompt and output, and proposing what followed it (as transformers' prompt lookup decoding
does). When several earlier matches continue differently, their continuations form a tree.

Example (max_ngram 2): context `a b c a b d ... a b`; the tail `a b` occurred twice, followed by
`c a` and `d ...`, so the draft tree is root -> {c -> a, d -> ...}.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from specdec.strategies.base import DraftContext, Strategy, StrategyOptions
from specdec.tree import DraftTree


class PromptLookupOptions(StrategyOptions):
    max_ngram: int = Field(3, ge=1, le=64, description="longest n-gram to look up")
    min_ngram: int = Field(1, ge=1, le=64, description="shortest n-gram to look up")
    num_tokens: int = Field(10, ge=1, le=256, description="continuation tokens proposed per match")
    max_matches: int = Field(4, ge=1, le=64, description="most recent matches turned into branches")

    @model_validator(mode="after")
    def _ngram_range(self):
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"min_ngram ({self.min_ngram}) is larger than max_ngram ({self.max_ngram})")
        return self


class PromptLookupStrategy(Strategy):
    name = "prompt_lookup"
    Options = PromptLookupOptions
    needs_draft = False

    def propose(self, draft, ctx: DraftContext) -> DraftTree:
        opts = self.options
        length = min(opts.num_tokens, ctx.max_depth)
        tokens, parents = [ctx.tokens[-1]], [-1]
        children: list[dict[int, int]] = [{}]  # node -> {token: child}: siblings stay distinct
        for continuation in continuations(ctx.tokens, opts, length):
            node = 0
            for token in continuation:
                if token not in children[node]:
                    tokens.append(token)
                    parents.append(node)
                    children.append({})
                    children[node][token] = len(tokens) - 1
                node = children[node][token]
        depths = [0] * len(tokens)
        for node in range(1, len(tokens)):
            depths[node] = depths[parents[node]] + 1
        return DraftTree(torch.tensor(tokens), torch.tensor(parents), torch.tensor(depths), mode="deterministic")


def continuations(context: list[int], opts: PromptLookupOptions, length: int) -> list[list[int]]:
    """What followed the most recent earlier occurrences of the context's last n-gram, for the
    longest n that has any."""
    for n in range(min(opts.max_ngram, len(context) - 1), opts.min_ngram - 1, -1):
        tail = context[-n:]
        found = []
        for start in range(len(context) - n - 1, -1, -1):  # most recent first, the tail excluded
            if context[start : start + n] == tail:
                found.append(context[start + n : start + n + length])
                if len(found) == opts.max_matches:
                    break
        if found:
            return found
    return []

