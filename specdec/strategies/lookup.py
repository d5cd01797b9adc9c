"""N-gram lookup in the context (prompt and output so far), for the `hybrid` strategy.

`NgramIndex` keeps the start positions of every n-gram of a growing token list, updated
incrementally, so a lookup costs O(matches) instead of a scan of the whole context each step.
`continuation_trie` merges what followed the most recent matches of the context's last n-gram
(the longest n with any match) into a trie {token: {token: ...}}.

Example (n 2): context `a b c a b d x a b`: the tail `a b` occurred at 3 and 0, followed by `d x`
and `c a`: trie {d: {x: {}}, c: {a: {}}}.
"""

from __future__ import annotations


class NgramIndex:
    def __init__(self, min_ngram: int, max_ngram: int):
        self.min_ngram, self.max_ngram = min_ngram, max_ngram
        self.reset()

    def reset(self) -> None:
        self.source: list[int] | None = None
        self.seen = 0  # tokens of `source` whose n-grams (those with a next token) are indexed
        self.starts: dict[tuple[int, ...], list[int]] = {}

    def sync(self, tokens: list[int]) -> None:
        """Index the n-grams that gained a following token; start over for another list."""
        if tokens is not self.source or len(tokens) < self.seen:
            self.reset()
            self.source = tokens
        for end in range(max(self.seen, 1), len(tokens)):  # n-grams ending at end - 1, followed by tokens[end]
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self.starts.setdefault(tuple(tokens[end - n : end]), []).append(end - n)
        self.seen = max(self.seen, len(tokens))

    def continuation_trie(self, tokens: list[int], length: int, max_matches: int) -> dict:
        """What followed the `max_matches` most recent earlier occurrences of the last n-gram."""
        self.sync(tokens)
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            starts = self.starts.get(tuple(tokens[-n:]), [])
            if not starts:
                continue
            trie: dict = {}
            for start in reversed(starts[-max_matches:]):  # most recent first
                node = trie
                for token in tokens[start + n : start + n + length]:
                    node = node.setdefault(token, {})
            return trie
        return {}
