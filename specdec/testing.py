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


def random_table(seed: int, vocab: int, scale: float = 1.5, context: int | None = 1) -> LogitsFn:
    """Pseudo-random logits for each (position, last `context` tokens): a position-dependent
    Markov table when context is 1, every prefix distinct when context is None."""
    cache: dict[tuple[int, ...], torch.Tensor] = {}

    def logits(prefix: tuple[int, ...]) -> torch.Tensor:
        key = (len(prefix),) + (prefix if context is None else prefix[-context:])
        if key not in cache:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + hash(key) % 1_000_003)
            cache[key] = torch.randn(vocab, generator=gen, dtype=torch.float64) * scale
        return cache[key]

    return logits


def table_greedy(logits: LogitsFn, prompt: list[int], new_tokens: int) -> list[int]:
    """The table model's own greedy decoding."""
    tokens = list(prompt)
    for _ in range(new_tokens):
        tokens.append(int(logits(tuple(tokens)).argmax()))
    return tokens[len(prompt):]


def reduced_vocab_draft(logits: LogitsFn, draft_to_target: list[int], vocab: int) -> Backend:
    """A draft over a reduced vocabulary, as `specdec distill` makes them: the table model `logits`
    (in target ids) seen through draft rows `draft_to_target` plus one catch-all input row, wrapped
    by MappedVocabBackend so that the loop talks to it in target ids."""
    from specdec.backends.vocab import MappedVocabBackend

    to_target = list(draft_to_target) + [-1]  # the catch-all row reads as token -1

    def draft_logits(prefix: tuple[int, ...]) -> torch.Tensor:
        full = logits(tuple(to_target[t] for t in prefix))  # [vocab]
        return torch.cat([full[list(draft_to_target)], full.new_zeros(1)])  # [len(map) + 1]

    return MappedVocabBackend(TableBackend(draft_logits, len(draft_to_target) + 1), list(draft_to_target), vocab)


def _decoder(strategy, target: LogitsFn, draft: LogitsFn, vocab: int, draft_vocab: list[int] | None = None):
    from specdec.config import GenerationOptions
    from specdec.decoder import SpeculativeDecoder

    draft_backend = None
    if strategy.needs_draft:
        draft_backend = TableBackend(draft, vocab) if draft_vocab is None else reduced_vocab_draft(draft, draft_vocab, vocab)
    return SpeculativeDecoder(TableBackend(target, vocab), draft_backend, strategy, GenerationOptions())


def check_greedy_lossless(make_strategy: Callable, vocab: int = 6, new_tokens: int = 120, prompts: int = 3,
                          draft_vocab: list[int] | None = None) -> None:
    """Greedy output must equal the target's own greedy decoding, with a draft equal to the target
    (everything accepted) and a different one. `make_strategy()` returns a fresh Strategy.
    `draft_vocab` (target ids) restricts the draft to a reduced vocabulary.
    Raises AssertionError naming the first difference."""
    target = random_table(101, vocab)
    for draft_name, draft in (("same", target), ("different", random_table(202, vocab))):
        for seed in range(prompts):
            prompt = torch.randint(0, vocab, (5,), generator=torch.Generator().manual_seed(seed)).tolist()
            decoder = _decoder(make_strategy(), target, draft, vocab, draft_vocab)
            got = decoder.generate(prompt, max_new_tokens=new_tokens).token_ids
            want = table_greedy(target, prompt, new_tokens)
            if got != want:
                first = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
                raise AssertionError(f"greedy output differs from the target's at token {first} ({draft_name} draft, prompt {prompt})")


def check_sampling_lossless(make_strategy: Callable, samples: int = 12_000, vocab: int = 4, length: int = 3,
                            temperature: float = 1.0, delta: float = 1e-6, draft_vocab: list[int] | None = None) -> float:
    """Sample `samples` generations of `length` tokens through the whole loop and compare the joint
    distribution of those tokens with the target's exact one (`draft_vocab`: a reduced draft
    vocabulary, in target ids). Returns the total variation; raises AssertionError when it exceeds
    a bound that holds with probability 1 - delta."""
    import itertools
    import math
    from collections import Counter

    from specdec.sampling import Warp, warp_probs

    target, draft, prompt = random_table(21, vocab), random_table(22, vocab), (1, 2)
    decoder = _decoder(make_strategy(), target, draft, vocab, draft_vocab)
    counts = Counter(
        tuple(decoder.generate(list(prompt), max_new_tokens=length, temperature=temperature, seed=seed).token_ids)
        for seed in range(samples)
    )
    exact = {}
    for seq in itertools.product(range(vocab), repeat=length):
        prob = 1.0
        for j in range(length):
            prob *= float(warp_probs(target(prompt + seq[:j]), Warp(temperature))[seq[j]])
        exact[seq] = prob
    tv = 0.5 * sum(abs(counts[s] / samples - p) for s, p in exact.items())
    # E[TV] <= 1/2 sum sqrt(p(1-p)/N); one sample moves TV by <= 1/N (McDiarmid).
    bound = 0.5 * sum(math.sqrt(p * (1 - p) / samples) for p in exact.values()) + math.sqrt(math.log(1 / delta) / (2 * samples))
    if tv > bound:
        raise AssertionError(f"sampled distribution is off: total variation {tv:.4f} > bound {bound:.4f}")
    return tv
