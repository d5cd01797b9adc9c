"""The fixed-shape path of the pytorch backend (specdec.backends.graphs), run eagerly on a CPU: the
same inputs, padding, slot writes and whole-buffer masks that CUDA graphs replay on a GPU
(tests/test_gpu.py replays them there).

- every strategy's greedy output is the target's own, with both models at fixed shapes, and sampled
  output has exactly the target's distribution (every outcome enumerated);
- query lengths are rounded up to buckets; padding entries leave no trace in later forwards;
- a forward too close to the end of the buffer to pad runs at its own length;
- with CUDA's graph API faked, every bucket is captured after the prompt and every step forward
  is a replay; a failed capture is one line;
- in a batch, forwards run at (row, query) buckets over one fixed buffer: each row decodes as its
  sequence alone (greedy), a row's samples follow the target exactly, and with the graph API faked
  every batched step forward is a replay;
- `cuda_graphs` without a CUDA device is refused in one line, before any weights load;
- the GPU bench configs that measure the graphs (docs/gpu.md) load, with graphs where named.
"""

import contextlib
from pathlib import Path

import pytest
import torch

from helpers import hf_greedy, make_decoder
import specdec.batch
from specdec.backends.batched import BatchedPyTorch
from specdec.backends.graphs import BUCKETS, HEADROOM, FixedShapes, row_buckets
from specdec.backends.pytorch import PyTorchBackend, PyTorchOptions
from specdec.config import load_config
from specdec.errors import SpecdecError
from specdec.tree import ancestor_mask, depths_from_parents
from test_backend_pytorch import PARENTS, path_to, reference_logits
from test_cli import run_cli
from test_gpu import SAMPLED, assert_sampled_exactly
from test_batch import STRATEGIES as BATCH_STRATEGIES
from test_batch import batched_row_distribution, exact_first_tokens, stopped_early, tiny_pair
from test_strategies_greedy import NEW_TOKENS, PROMPT, STRATEGIES

CONTEXT = 288  # slots: the prompt, 205 new tokens and the 64 slots of headroom, with room to pad most trees


@pytest.fixture(scope="module")
def reference():
    from conftest import cached_model

    return hf_greedy(cached_model("llama", 0), PROMPT, NEW_TOKENS)


@pytest.mark.parametrize("label", list(STRATEGIES))
def test_greedy_output_is_the_targets_own_at_fixed_shapes(label, models, drafts, reference):
    name, options = STRATEGIES[label]
    decoder = make_decoder(models("llama", 0), drafts("llama", "perturbed"), name, fixed_context=CONTEXT, **options)
    out = decoder.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    assert out.token_ids == reference
    used = set(decoder.target.fixed.shapes) | set(decoder.draft.fixed.shapes)
    assert used <= {(1, b) for b in BUCKETS} and len(used) >= 2, used


@pytest.mark.parametrize("label", list(SAMPLED))
def test_sampled_output_follows_the_target_exactly_at_fixed_shapes(label, models, drafts):
    assert_sampled_exactly(models("llama", 0), drafts("llama", "random"), label, fixed_context=128)


class FakeCuda:
    """CUDA's graph API on a CPU, for the capture and replay orchestration: a capture records which
    bucket's forward it saw (its body still runs, like the warm-up); a replay re-runs that forward
    and writes its logits into the captured output tensor, as a real replay writes the same address."""

    def __init__(self, monkeypatch, fail: str | None = None):
        self.capturing, self.fail = None, fail
        call = FixedShapes._call

        def recording_call(fixed, shape, logits_to_keep=0):
            if self.capturing is not None:
                self.capturing.forward = (fixed, shape)
            return call(fixed, shape, logits_to_keep)

        class Graph:
            forward = None

            def replay(graph):
                fixed, shape = graph.forward
                shape.logits.copy_(call(fixed, shape))

        @contextlib.contextmanager
        def capture(graph, pool=None, stream=None):
            if self.fail:
                raise RuntimeError(self.fail)
            self.capturing = graph
            yield
            self.capturing = None

        stream = type("Stream", (), {"wait_stream": lambda self, other: None})
        monkeypatch.setattr(FixedShapes, "_call", recording_call)
        for name, value in {"CUDAGraph": Graph, "graph": capture, "Stream": lambda device: stream(),
                            "current_stream": lambda device: stream(), "stream": lambda s: contextlib.nullcontext(),
                            "graph_pool_handle": lambda: ("pool",),
                            "device": lambda d: contextlib.nullcontext()}.items():
            monkeypatch.setattr(torch.cuda, name, value)


@pytest.mark.parametrize("label", ["chain", "dyspec", "gsd"])
def test_every_step_forward_is_a_replay_once_the_prompt_is_in(label, models, drafts, reference, monkeypatch):
    FakeCuda(monkeypatch)
    name, options = STRATEGIES[label]
    decoder = make_decoder(models("llama", 0), drafts("llama", "perturbed"), name, fixed_context=CONTEXT, **options)
    for backend in (decoder.target, decoder.draft):
        backend.fixed.capture = True  # what a CUDA device sets
    out = decoder.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    assert out.token_ids == reference
    for backend in (decoder.target, decoder.draft):
        assert sorted(backend.fixed.shapes) == [(1, b) for b in BUCKETS]
        assert all(s.graph for s in backend.fixed.shapes.values())
        assert backend.fixed.replays == backend.forward_calls > 0  # no step forward ran eagerly


def test_a_forward_that_cannot_be_captured_is_one_line(models, monkeypatch):
    FakeCuda(monkeypatch, fail="operation not permitted when stream is capturing\nmore detail")
    backend = PyTorchBackend(models("llama", 0), fixed_context=128)
    backend.fixed.capture = True
    with pytest.raises(SpecdecError, match=r"^LlamaForCausalLM's forward could not be captured as a CUDA graph "
                       r"\(operation not permitted when stream is capturing\); run it without cuda_graphs$"):
        backend.prefill(torch.tensor([[3, 4, 5]]))
    assert all(shape.graph is None for shape in backend.fixed.shapes.values())


def forward(backend, tokens: list[int], parents: torch.Tensor) -> torch.Tensor:
    positions = backend.committed_len + depths_from_parents(parents)
    return backend.forward(torch.tensor([tokens]), positions[None], ancestor_mask(parents)[None])[0]


def test_padding_entries_leave_no_trace(models):
    """A 3-node tree runs as 4 queries: the padding's KV lands after the tree's, then is hidden from
    and overwritten by the next forwards."""
    model = models("llama", 0)
    backend = PyTorchBackend(model, fixed_context=64)
    prompt = list(range(5, 17))
    backend.prefill(torch.tensor([prompt]))
    forward(backend, [30, 31, 32], torch.tensor([-1, 0, 0]))
    assert list(backend.fixed.shapes) == [(1, 4)]
    backend.commit([0, 2])
    history = prompt + [30, 32]
    for token in (7, 8):
        logits = forward(backend, [token], torch.tensor([-1]))
        torch.testing.assert_close(logits[0], reference_logits(model, history + [token]), atol=1e-5, rtol=1e-5)
        backend.commit([0])
        history.append(token)
    logits = forward(backend, [9, 10, 11, 12, 13], torch.tensor([-1, 0, 1, 2, 3]))  # a chain: bucket 8
    torch.testing.assert_close(logits[-1], reference_logits(model, history + [9, 10, 11, 12, 13]), atol=1e-5, rtol=1e-5)
    assert sorted(backend.fixed.shapes) == [(1, 1), (1, 4), (1, 8)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_a_fixed_shape_forward_depends_only_on_its_tensors(arch, models):
    """A replayed graph sees none of the Python state of the call it was captured from: only the
    bucket's tensors and the KV buffer. The cache lengths transformers may read are such state, so
    the output must not change when they are wrong."""
    model = models(arch, 0)
    backend = PyTorchBackend(model, fixed_context=64)
    prompt = list(range(5, 17))
    backend.prefill(torch.tensor([prompt]))
    for layer in backend._cache.layers:
        layer.length = 3
    logits = forward(backend, [30, 31, 32], torch.tensor([-1, 0, 0]))
    for node, path in enumerate([[30], [30, 31], [30, 32]]):
        torch.testing.assert_close(logits[node], reference_logits(model, prompt + path), atol=1e-5, rtol=1e-5)


def test_a_forward_without_room_to_pad_runs_at_its_own_length(models):
    model = models("llama", 0)
    backend = PyTorchBackend(model, fixed_context=72)
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, model.config.vocab_size, (60,), generator=gen).tolist()
    tokens = torch.randint(0, model.config.vocab_size, (len(PARENTS),), generator=gen)
    backend.prefill(torch.tensor([prompt]))
    logits = forward(backend, tokens.tolist(), PARENTS)  # 60 + 16 slots do not fit in 72
    assert backend.fixed.shapes == {}
    for node in range(len(PARENTS)):
        want = reference_logits(model, prompt + tokens[path_to(node)].tolist())
        torch.testing.assert_close(logits[node], want, atol=1e-5, rtol=1e-5)
    assert backend.max_length == 72 - HEADROOM  # the loop keeps a step's forwards inside the buffer
    with pytest.raises(SpecdecError, match="a forward of 4 tokens after 69 cached entries overflows the 72-slot KV buffer"):
        # a direct caller past the context: 4 queries seeing the 9 pending entries and themselves
        backend.forward(torch.tensor([[1, 2, 3, 4]]), torch.arange(69, 73)[None], torch.ones(1, 4, 13, dtype=torch.bool))


@pytest.mark.parametrize("name, options", [("static_tree", {"branching": [3, 2, 1]}), ("dyspec", {"max_nodes": 24})])
def test_wide_trees_at_the_end_of_the_context_fit_in_the_buffer(name, options, models, drafts):
    """The context stops HEADROOM slots short of the buffer: the last steps' trees and the draft's
    pending entries still fit (they would overflow a buffer the context filled)."""
    prompt = [t % 90 + 3 for t in range(40)]
    decoder = make_decoder(models("llama", 0), drafts("llama", "perturbed"), name, fixed_context=128, **options)
    new_tokens = decoder.target.max_length - len(prompt)  # up to the last position of the context
    out = decoder.generate(prompt, max_new_tokens=new_tokens)
    assert out.token_ids == hf_greedy(models("llama", 0), prompt, new_tokens)


def batches_made(monkeypatch) -> list[BatchedPyTorch]:
    """Every batched pytorch backend (target and draft rows) that the batched loop makes."""
    made = []

    class Recorded(BatchedPyTorch):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(specdec.batch, "BatchedPyTorch", Recorded)
    return made


def test_row_buckets_are_powers_of_two_below_the_rows_and_the_rows():
    assert row_buckets(1) == (1,) and row_buckets(2) == (1, 2)
    assert row_buckets(6) == (1, 2, 4, 6) and row_buckets(8) == (1, 2, 4, 8)


@pytest.mark.parametrize("label", ["ar", "chain", "dyspec", "gsd"])
def test_greedy_batch_at_fixed_shapes_equals_each_sequence_alone(label, models, drafts, monkeypatch):
    """6 prompts through 3 rows (row buckets 1, 2, 3): rows join, leave and skip draft rounds, so
    calls run padding rows past the rows they serve."""
    name, options = BATCH_STRATEGIES[label]
    draft = drafts("llama", "perturbed") if name != "ar" else None
    decoder = make_decoder(models("llama", 0), draft, name, fixed_context=CONTEXT, **options)
    made = batches_made(monkeypatch)
    alone, batched, _ = stopped_early(decoder, 3)
    assert batched == alone
    assert len(made) == (1 if draft is None else 2)
    for batch in made:
        assert {rows for rows, _ in batch.fixed.shapes} == {1, 2, 3}, sorted(batch.fixed.shapes)
        assert {query for _, query in batch.fixed.shapes} <= set(BUCKETS)
        assert batch.buffers()[0].shape[2] == CONTEXT  # one fixed buffer, never grown


def test_sampled_rows_of_a_batch_at_fixed_shapes_have_exactly_the_targets_distribution():
    from specdec.sampling import Warp

    target, draft = tiny_pair()
    decoder = make_decoder(target, draft, "chain", fixed_context=128, k=2)
    prompt, length = [1, 3, 0, 2], 3
    got = batched_row_distribution(decoder, prompt, length, 1.0, 2)
    want = exact_first_tokens(target, prompt, length, Warp(1.0, top_k=2))
    assert sum(got.values()) == pytest.approx(1.0)
    assert max(abs(got.get(s, 0.0) - p) for s, p in want.items()) < 1e-5


def test_every_batched_step_forward_is_a_replay_once_a_prompt_is_in(models, drafts, monkeypatch):
    FakeCuda(monkeypatch)
    decoder = make_decoder(models("llama", 0), drafts("llama", "perturbed"), "dyspec", fixed_context=CONTEXT,
                           **BATCH_STRATEGIES["dyspec"][1])
    for backend in (decoder.target, decoder.draft):
        backend.fixed.capture = True  # what a CUDA device sets
    made = batches_made(monkeypatch)
    runs = {}
    run = FixedShapes.run

    def counted(fixed, *args, **kwargs):
        runs[fixed] = runs.get(fixed, 0) + 1
        return run(fixed, *args, **kwargs)

    monkeypatch.setattr(FixedShapes, "run", counted)
    alone, batched, _ = stopped_early(decoder, 4)
    assert batched == alone
    for batch in made:  # a batch's prefills run eagerly, outside `run`; every step forward replays
        assert sorted(batch.fixed.shapes) == [(rows, b) for rows in (1, 2, 4) for b in BUCKETS]
        assert all(s.graph for s in batch.fixed.shapes.values())
        assert batch.fixed.replays == runs[batch.fixed] > 0


def test_cuda_graphs_need_a_cuda_device(model_dirs, monkeypatch):
    import specdec.backends.pytorch

    monkeypatch.setattr(specdec.backends.pytorch, "AutoModelForCausalLM", None)  # no weights are read
    with pytest.raises(SpecdecError, match=r"^cuda_graphs needs a CUDA device; this backend runs on cpu \(set device: cuda\)$"):
        PyTorchBackend.load(str(model_dirs / "target"), PyTorchOptions(cuda_graphs=True))


def test_cuda_graphs_on_a_cpu_is_one_line_from_the_cli(capsys, write_config):
    code, out, err = run_cli(capsys, "run", str(write_config()), "--prompt-ids", "1,2", "-o", "target.cuda_graphs=true")
    assert code != 0 and out == ""
    assert err.strip().splitlines() == ["error: cuda_graphs needs a CUDA device; this backend runs on cpu (set device: cuda)"]


def test_graph_context_must_leave_room_past_the_largest_bucket():
    with pytest.raises(ValueError, match="greater than or equal to 128"):
        PyTorchOptions(graph_context=100)


GPU_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "gpu").glob("*.yaml"))


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=[p.stem for p in GPU_CONFIGS])
def test_gpu_bench_configs_run_on_cuda_with_graphs_where_named(path):
    config = load_config(path)
    specs = [spec for spec in (config.target, config.draft) if spec is not None]
    assert len(specs) == (1 if config.strategy.name == "ar" else 2)
    for spec in specs:
        assert Path(spec.model).is_dir() and spec.options.device == "cuda"
        assert spec.options.cuda_graphs == path.stem.endswith("_graphs")
