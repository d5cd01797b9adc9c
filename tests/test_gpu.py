"""The PyTorch backend on a CUDA GPU (every test marked `gpu`: skipped without one).

- Greedy output of every built-in strategy is the target's own greedy decoding, on the demo pair in
  float32, bfloat16 and float16, and with both models replayed as CUDA graphs (float32, bfloat16);
  each row of a batch decodes as its sequence alone, with and without graphs.
- A tree forward equals per-path forwards; sampled output follows the target's distribution exactly
  (every outcome enumerated); a target step does not wait for the GPU before its verdict; forwards are
  timed with CUDA events.

Half precision: a tree forward and a one-token forward may round differently, so where the target's
top two logits lie within rounding of each other either token is its greedy choice. There the check
is: outputs agree up to their first difference, and that difference is at such a near-tie (a top-two
margin of at most TIE[dtype] logits); past it the two outputs are no longer comparable.
"""

from __future__ import annotations

import copy
import functools
import math
from pathlib import Path

import pytest
import torch

import specdec.decoder
from enumeration import enumerate_outcomes
from helpers import make_decoder
from specdec.backends.graphs import BUCKETS
from specdec.backends.pytorch import DTYPES, PyTorchBackend, PyTorchOptions
from specdec.decode import speculative_decode
from specdec.models import load_tokenizer
from specdec.plugins import strategies
from specdec.sampling import Warp, warp_probs
from specdec.stopping import Stopper
from specdec.tree import ancestor_mask, depths_from_parents
from test_auto_budget import REALISTIC
from test_backend_pytorch import PARENTS, path_to, tree_forward
from tiny_models import ARCHS

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
# logits; tree and one-token forwards of the demo target differed by 1.4e-5 (float32) and 1 ulp at ~10
# (0.0078 float16, 0.0625 bfloat16) on a CPU
TIE = {"float32": 1e-3, "float16": 0.0625, "bfloat16": 0.5}
PROMPTS = ["def fibonacci(n):\n", "import os\n\n\nclass Config:\n    def __init__(self"]
NEW_TOKENS = 96
GRAPH_CONTEXT = 256  # fixed_context of the CUDA-graph backends: a prompt, 96 new tokens and 64 slots of headroom
GREEDY = {  # label -> (strategy, options): every built-in strategy, with fixed and auto budgets
    "ar": ("ar", {}),
    "chain": ("chain", {"k": 4}),
    "chain_adaptive": ("chain", {"k": 3, "adaptive": True}),
    "chain_auto": ("chain", {"k": "auto"}),
    "static_tree": ("static_tree", {}),
    "gsd": ("gsd", {}),
    "dyspec": ("dyspec", {}),
    "dyspec_threshold": ("dyspec", {"mode": "threshold"}),
    "dyspec_auto": ("dyspec", {"max_nodes": "auto"}),
    "hybrid": ("hybrid", {}),
    "hybrid_auto": ("hybrid", {"max_nodes": "auto"}),
}


@pytest.fixture(autouse=True)
def hand_made_costs(monkeypatch):
    """`auto` budgets plan with fixed costs: measuring them would only slow the tests down."""
    monkeypatch.setattr(specdec.decoder, "measured_costs", lambda target, draft: REALISTIC)


@functools.cache
def demo(dtype: str) -> tuple[PyTorchBackend, PyTorchBackend]:
    """The demo target and draft, loaded onto the GPU through the backend's options."""
    options = PyTorchOptions(device=DEVICE, dtype=dtype)
    return PyTorchBackend.load(str(DEMO / "target"), options), PyTorchBackend.load(str(DEMO / "draft"), options)


@functools.cache
def prompt_ids(index: int) -> list[int]:
    return load_tokenizer(str(DEMO / "target"))(PROMPTS[index])["input_ids"]


def demo_decoder(dtype: str, name: str, **options):
    target, draft = demo(dtype)
    return make_decoder(target.model, draft.model if name != "ar" else None, name, **options)


@torch.inference_mode()
def plain_logits(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] float32 logits of a plain forward of `ids` (no specdec cache or mask)."""
    return model(torch.tensor([ids], device=model.device), use_cache=False).logits[0].float()


@functools.cache
def reference(dtype: str, index: int) -> tuple[list[int], list[float]]:
    """The target's own greedy decoding of prompt `index` (the `ar` strategy: one token per forward),
    and the margin between the target's top two logits before each of its tokens."""
    prompt = prompt_ids(index)
    tokens = demo_decoder(dtype, "ar").generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids
    top = plain_logits(demo(dtype)[0].model, prompt + tokens)[len(prompt) - 1 : -1].topk(2, dim=-1)  # [n, 2]
    choices, margins = top.indices[:, 0].tolist(), (top.values[:, 0] - top.values[:, 1]).tolist()
    wrong = [i for i, (c, t, m) in enumerate(zip(choices, tokens, margins)) if c != t and m > TIE[dtype]]
    assert not wrong, f"`ar` is not the model's greedy choice at tokens {wrong} ({dtype})"
    return tokens, margins


def assert_same_greedy(got: list[int], want: list[int], margins: list[float], tie: float) -> None:
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if first is None:
        assert len(got) == len(want)
    else:
        assert margins[first] <= tie, (
            f"token {first} differs ({got[first]} vs {want[first]}) where the target's top-two margin is "
            f"{margins[first]:.4g} > {tie} (not a near-tie)"
        )


def test_every_builtin_strategy_is_checked():
    assert {name for name, _ in GREEDY.values()} == set(strategies())


@pytest.mark.parametrize("dtype", list(TIE))
@pytest.mark.parametrize("label", list(GREEDY))
def test_greedy_output_is_the_targets_own_on_cuda(label, dtype):
    name, options = GREEDY[label]
    decoder = demo_decoder(dtype, name, **options)
    for index in range(len(PROMPTS)):
        want, margins = reference(dtype, index)
        got = decoder.generate(prompt_ids(index), max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids
        assert_same_greedy(got, want, margins, TIE[dtype])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("label", list(GREEDY))
def test_greedy_output_is_the_targets_own_with_cuda_graphs(label, dtype):
    name, options = GREEDY[label]
    decoder = demo_decoder(dtype, name, fixed_context=GRAPH_CONTEXT, **options)
    for index in range(len(PROMPTS)):
        want, margins = reference(dtype, index)  # without graphs
        got = decoder.generate(prompt_ids(index), max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids
        assert_same_greedy(got, want, margins, TIE[dtype])
    assert decoder.target.fixed.replays > 0 and decoder.target.fixed.capture


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("label", ["ar", "chain", "dyspec", "chain_auto"])
def test_greedy_batch_is_each_sequence_alone_on_cuda(label, graphs):
    """float32: 6 prompts of different lengths through 4 rows (rows join, leave and run padding
    rows, at (rows, Q) buckets replayed as graphs with `graphs`); each row decodes as its sequence
    alone, up to a near-tie (a batch's matrix products may sum in another order)."""
    name, options = GREEDY[label]
    decoder = demo_decoder("float32", name, fixed_context=GRAPH_CONTEXT if graphs else None, **options)
    prompts = [prompt_ids(i % len(PROMPTS))[: 3 + 4 * i] for i in range(6)]
    alone = [decoder.generate(p, max_new_tokens=48, ignore_eos=True).token_ids for p in prompts]
    batched = decoder.generate_batch(prompts, batch_size=4, max_new_tokens=48, ignore_eos=True)
    for prompt, want, got in zip(prompts, alone, batched):
        top = plain_logits(demo("float32")[0].model, prompt + want)[len(prompt) - 1 : -1].topk(2, dim=-1)  # [n, 2]
        assert_same_greedy(got.token_ids, want, (top.values[:, 0] - top.values[:, 1]).tolist(), TIE["float32"])


@pytest.mark.parametrize("fixed_context", [None, 96])
@pytest.mark.parametrize("arch, dtype", [(arch, "float32") for arch in ARCHS] + [("llama", "bfloat16"), ("llama", "float16")])
def test_tree_forward_matches_per_path_forwards_on_cuda(arch, dtype, fixed_context, models):
    model = copy.deepcopy(models(arch, 0)).to(DEVICE, DTYPES[dtype])
    logits, paths = tree_forward(model, fixed_context)  # [N, V]; with fixed_context: a CUDA graph's replay
    assert logits.device == model.device and logits.dtype == torch.float32 and logits.isfinite().all()
    tolerance = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}[dtype]  # a wrong mask: ~7
    for node, ids in enumerate(paths):
        torch.testing.assert_close(logits[node], plain_logits(model, ids)[-1], atol=tolerance, rtol=tolerance)


SAMPLED = {  # small trees: every draw has two candidates (top_k 2), so every outcome can be enumerated
    "chain": ("chain", {"k": 2}),
    "static_tree": ("static_tree", {"branching": [2, 1]}),
    "dyspec": ("dyspec", {"max_nodes": 3, "max_depth": 2, "expand_per_step": 2}),
}


def target_distribution(model, prompt: list[int], length: int, warp: Warp) -> dict[tuple, float]:
    """Exact probability of every first `length` tokens under `warp`, from plain forwards."""
    dist: dict[tuple, float] = {(): 1.0}
    for _ in range(length):
        grown = {}
        for seq, prob in dist.items():
            probs = warp_probs(plain_logits(model, prompt + list(seq))[-1], warp).cpu()
            for token in probs.nonzero().flatten().tolist():
                grown[seq + (token,)] = prob * float(probs[token])
        dist = grown
    return dist


@pytest.mark.parametrize("fixed_context", [None, 128])
@pytest.mark.parametrize("label", list(SAMPLED))
def test_sampled_output_follows_the_target_exactly_on_cuda(label, fixed_context, models, drafts):
    target = copy.deepcopy(models("llama", 0)).to(DEVICE)
    draft = copy.deepcopy(drafts("llama", "random")).to(DEVICE)
    assert_sampled_exactly(target, draft, label, fixed_context)


def assert_sampled_exactly(target, draft, label: str, fixed_context: int | None) -> None:
    """Every outcome of sampling 4 tokens (top_k 2) with SAMPLED[label] has the target's own
    probability (from plain forwards), to 1e-4."""
    name, options = SAMPLED[label]
    decoder = make_decoder(target, draft, name, fixed_context=fixed_context, **options)
    prompt, length, warp = [3, 17, 42], 4, Warp(1.0, top_k=2)

    def generate(rng) -> tuple[int, ...]:
        tokens, _ = speculative_decode(decoder.target, decoder.draft, decoder.strategy, prompt, warp, Stopper(length), rng)
        return tuple(tokens)

    got, want = enumerate_outcomes(generate), target_distribution(target, prompt, length, warp)
    assert math.isclose(sum(got.values()), 1.0, abs_tol=1e-9)
    assert max(abs(got.get(seq, 0.0) - want.get(seq, 0.0)) for seq in got.keys() | want.keys()) < 1e-4


@pytest.mark.parametrize("graphs", [False, True])
def test_a_target_step_waits_for_the_gpu_only_at_the_verdict(graphs):
    target = demo("float32")[0]
    if graphs:
        target = PyTorchBackend(target.model, GRAPH_CONTEXT)
    tokens = torch.arange(10, 10 + len(PARENTS))

    def step() -> torch.Tensor:  # host inputs, as the loop passes them
        positions = target.committed_len + depths_from_parents(PARENTS)
        logits = target.forward(tokens[None], positions[None], ancestor_mask(PARENTS)[None])
        target.commit(path_to(8))
        return logits

    target.reset()
    target.prefill(torch.tensor([prompt_ids(0)]))
    step()  # warm-up: first calls may set up kernels and the cache buffers, and capture the graph
    torch.cuda.set_sync_debug_mode("error")  # any operation that waits for the device raises
    try:
        logits = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert logits.is_cuda and target.committed_len == len(prompt_ids(0)) + 2 * len(path_to(8))
    if graphs:  # every bucket was captured after the prompt; both steps were replays
        assert sorted(target.fixed.shapes) == [(1, b) for b in BUCKETS] and all(s.graph for s in target.fixed.shapes.values())
        assert target.fixed.replays == 2


def test_forwards_are_timed_with_cuda_events():
    decoder = demo_decoder("float32", "chain", k=4)
    out = decoder.generate(prompt_ids(0), max_new_tokens=40, ignore_eos=True)
    metrics = out.metrics
    for backend, in_steps in ((decoder.target, metrics.target_forward_seconds), (decoder.draft, metrics.draft_forward_seconds)):
        seconds = backend.forward_seconds
        assert math.isfinite(seconds) and 0.0 < seconds < metrics.total_seconds  # seconds, not milliseconds
        assert backend.forward_seconds == seconds  # reading again counts nothing twice
        assert math.isclose(in_steps, seconds, rel_tol=1e-6)  # every forward was inside a step
    assert decoder.target.forward_calls == metrics.steps
