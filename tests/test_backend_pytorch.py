"""The backend contract: a tree forward equals per-path sequential forwards, at a non-zero
committed offset, and commit/rollback keep exactly the chosen entries; both with a growing KV buffer
and at fixed shapes (FIXED: the CUDA-graph path of specdec.backends.graphs, run eagerly here)."""

import pytest
import torch

from specdec.backends.pytorch import PyTorchBackend
from specdec.tree import ancestor_mask, depths_from_parents
from tiny_models import ARCHS, VOCAB

PARENTS = torch.tensor([-1, 0, 0, 1, 1, 2, 3, 3, 5])
FIXED = [None, 96]  # fixed_context of the backend: a growing buffer, or fixed shapes over 96 slots


def reference_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


def path_to(node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = int(PARENTS[node])
    return path[::-1]


def tree_forward(model, fixed_context: int | None = None) -> tuple[torch.Tensor, list[list[int]]]:
    """A random prompt, then one forward of the PARENTS tree of random tokens -> its logits [N, V]
    and, per node, the token sequence (prompt + its path) a plain forward must agree with."""
    backend = PyTorchBackend(model, fixed_context)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, VOCAB, (11,), generator=gen).tolist()
    tokens = torch.randint(0, VOCAB, (len(PARENTS),), generator=gen)
    backend.prefill(torch.tensor([prompt]))
    positions = backend.committed_len + depths_from_parents(PARENTS)
    logits = backend.forward(tokens[None], positions[None], ancestor_mask(PARENTS)[None])[0]
    return logits, [prompt + tokens[path_to(node)].tolist() for node in range(len(PARENTS))]


@pytest.mark.parametrize("fixed_context", FIXED)
@pytest.mark.parametrize("arch", ARCHS)
def test_tree_forward_matches_sequential_paths(arch, fixed_context, models):
    model = models(arch, 0)
    logits, paths = tree_forward(model, fixed_context)
    for node, ids in enumerate(paths):
        torch.testing.assert_close(logits[node], reference_logits(model, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fixed_context", FIXED)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_commit_keeps_path_and_later_forwards_see_it(arch, fixed_context, models):
    model = models(arch, 0)
    backend = PyTorchBackend(model, fixed_context)
    prompt = list(range(3, 20))
    tokens = torch.arange(40, 40 + len(PARENTS))
    backend.prefill(torch.tensor([prompt]))
    start = backend.committed_len
    backend.forward(tokens[None], (start + depths_from_parents(PARENTS))[None], ancestor_mask(PARENTS)[None])
    path = path_to(8)  # 0 -> 2 -> 5 -> 8: not a prefix of the pending entries
    backend.commit(path)
    assert backend.committed_len == start + len(path) and backend.pending_len == 0
    # A two-level draft on top: pending entries from two forwards, then a rollback.
    nxt = torch.tensor([[7, 9]])
    first = backend.forward(nxt[:, :1], torch.tensor([[backend.committed_len]]), torch.ones(1, 1, 1, dtype=torch.bool))
    second = backend.forward(nxt[:, 1:], torch.tensor([[backend.committed_len + 1]]), torch.ones(1, 1, 2, dtype=torch.bool))
    history = prompt + tokens[path].tolist()
    torch.testing.assert_close(first[0, 0], reference_logits(model, history + [7]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second[0, 0], reference_logits(model, history + [7, 9]), atol=1e-5, rtol=1e-5)
    backend.rollback()
    assert backend.pending_len == 0 and backend.committed_len == len(history)
    again = backend.forward(torch.tensor([[5]]), torch.tensor([[len(history)]]), torch.ones(1, 1, 1, dtype=torch.bool))
    torch.testing.assert_close(again[0, 0], reference_logits(model, history + [5]), atol=1e-5, rtol=1e-5)


def test_cache_grows_past_its_first_allocation(models):
    model = models("llama", 0)
    backend = PyTorchBackend(model)
    prompt = [t % VOCAB for t in range(300)]  # more than the initial capacity of 256
    backend.prefill(torch.tensor([prompt[:200]]))
    logits = backend.forward(torch.tensor([prompt[200:]]), torch.arange(200, 300)[None], torch.ones(100, 100, dtype=torch.bool).tril()[None])
    backend.commit(list(range(100)))
    torch.testing.assert_close(logits[0, -1], reference_logits(model, prompt), atol=1e-5, rtol=1e-5)
    assert backend.committed_len == 300
