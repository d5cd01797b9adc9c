"""The model's forward is asked how it takes a cache, on every transformers release in the declared range."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from transformers.cache_utils import Cache
from transformers.utils.deprecation import deprecate_kwarg

from specdec.backends.pytorch import PyTorchBackend
from specdec.errors import SpecdecError
from specdec.hf_compat import cache_argument, check_architecture


class _Renamed(torch.nn.Module):
    """A forward that takes its cache under a name no release has used yet."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, kv_store: Cache | None = None, **kwargs):
        raise AssertionError("not called")


class _NoCache(torch.nn.Module):
    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        raise AssertionError("not called")


class _OldSpelling(torch.nn.Module):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        raise AssertionError("not called")


def test_the_cache_argument_is_found_by_its_type_not_its_spelling():
    assert cache_argument(_Renamed()) == "kv_store"
    assert check_architecture(_Renamed()) == "kv_store"


def test_an_unannotated_forward_is_recognised_by_either_known_name():
    assert cache_argument(_OldSpelling()) == "past_key_values"


def test_the_installed_release_names_its_own_argument(models):
    """Whatever this release calls it, the backend passes the cache under that name (5.24: `cache`)."""
    model = models("llama", 0)
    name = cache_argument(model)
    assert name in ("cache", "past_key_values")
    backend = PyTorchBackend(model)
    assert backend.cache_argument == name
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no FutureWarning on the hot path, whatever the filters say
        backend.prefill(torch.tensor([[1, 2, 3]]))
        backend.forward(torch.tensor([[4]]), torch.tensor([[3]]), torch.ones(1, 1, 1, dtype=torch.bool))
    assert backend._cache.layers[0].get_seq_length() == 4


def test_a_model_that_cannot_take_a_tree_mask_is_one_line_naming_class_and_release():
    with pytest.raises(SpecdecError) as err:
        check_architecture(_NoCache())
    message = str(err.value)
    assert "\n" not in message
    assert "_NoCache" in message and f"transformers {transformers.__version__}" in message
    assert "position_ids" in message and "Cache" in message


def test_an_announced_argument_removal_fails_the_suite():
    """pyproject's filterwarnings turn transformers' deprecation notice into an error (docs/compatibility.md)."""

    @deprecate_kwarg("old", "99.0.0", new_name="new")
    def takes(new=None):
        return new

    with pytest.raises(FutureWarning, match="`old` is deprecated"):
        takes(old=1)
