import functools

import pytest

from tiny_models import perturbed_copy, tiny_model


@functools.lru_cache(maxsize=None)
def cached_model(arch: str, seed: int):
    return tiny_model(arch, seed)


@functools.lru_cache(maxsize=None)
def cached_draft(arch: str, kind: str):
    """The drafts the invariants are checked with: "same" (everything accepted), "random"
    (almost nothing accepted) and "perturbed" (partial acceptance)."""
    target = cached_model(arch, 0)
    return {"same": lambda: target, "random": lambda: cached_model(arch, 1),
            "perturbed": lambda: perturbed_copy(target, 0.03, seed=2)}[kind]()


@pytest.fixture
def drafts():
    return cached_draft


@pytest.fixture
def models():
    """models(arch, seed) -> a cached tiny model (do not mutate it)."""
    return cached_model
