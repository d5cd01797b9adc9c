"""Stop conditions applied to each block of emitted tokens: EOS (also mid-block), stop strings,
max_new_tokens. A block may overshoot a stop; nothing after the stopping token is emitted."""

from __future__ import annotations

from specdec.errors import SpecdecError


class Stopper:
    def __init__(
        self,
        max_new_tokens: int,
        eos_token_ids: frozenset[int] = frozenset(),
        stop: list[str] | tuple[str, ...] = (),
        tokenizer=None,
    ):
        if stop and tokenizer is None:
            raise SpecdecError("stop strings need a tokenizer; the target model has none")
        self.max_new_tokens = max_new_tokens
        self.eos_token_ids = eos_token_ids
        self.stop = tuple(stop)
        self.tokenizer = tokenizer
        # A byte-level token can carry a fraction of a character: look back generously.
        self._window = 4 * max((len(s) for s in self.stop), default=0) + 4

    def extend(self, generated: list[int], block: list[int]) -> bool:
        """Append `block` to `generated` up to the first stop; return True when generation ends."""
        for token in block:
            generated.append(token)
            if len(generated) >= self.max_new_tokens or token in self.eos_token_ids:
                return True
            if self.stop and self.hits_stop_string(generated):
                return True
        return False

    def hits_stop_string(self, generated: list[int]) -> bool:
        # Checked after every token, so a hit here was completed by the newest token.
        tail = self.tokenizer.decode(generated[-self._window :], skip_special_tokens=False)
        return any(s in tail for s in self.stop)
