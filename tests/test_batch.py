"""Batched decoding (issue 21): each sequence decoded in a batch is token-identical to the same
sequence decoded alone, for every strategy, with prompts of different lengths and rows that finish
and are refilled at different steps."""

import functools
import json
import math
from pathlib import Path

import pytest
import torch

from helpers import load_script, make_decoder
from specdec.bench.prompts import load_questions
from specdec.backends.batched import BatchedPyTorch
from specdec.backends.pytorch import PyTorchBackend
from specdec.decoder import SpeculativeDecoder
from specdec.errors import SpecdecError
from specdec.plugins import get_strategy
from specdec.testing import TableBackend, random_table
from test_eagle3 import target_backend  # noqa: F401 (a fixture)

PROMPTS = [[3, 17, 42], [5, 6, 7, 8, 9, 10, 11, 12, 13], [1], [9, 9, 2, 4, 8], [60, 5, 5, 21, 30, 31], [7, 7]]
STRATEGIES = {
    "ar": ("ar", {}),
    "chain": ("chain", {"k": 3}),
    "chain_adaptive": ("chain", {"k": 2, "adaptive": True}),
    "static_tree": ("static_tree", {"branching": [2, 2, 1]}),
    "gsd": ("gsd", {"prob_threshold": 0.0, "max_depth": 4, "max_nodes": 16}),
    "dyspec": ("dyspec", {"max_nodes": 10, "max_depth": 5, "expand_per_step": 3}),
    "dyspec_threshold": ("dyspec", {"mode": "threshold", "threshold": 0.02, "max_nodes": 12}),
    "hybrid": ("hybrid", {"max_nodes": 10}),
}


def alone_and_batched(decoder, batch_size: int, **generation):
    alone = [decoder.generate(p, **generation).token_ids for p in PROMPTS]
    batched = decoder.generate_batch(PROMPTS, batch_size=batch_size, **generation)
    return alone, [out.token_ids for out in batched], batched


def stopped_early(decoder, batch_size: int, max_new_tokens: int = 20):
    """Each prompt alone (greedy, run once) and all of them batched with stop ids taken from two of
    the outputs, so rows finish at different steps -> (alone, batched, outputs). Alone with the
    stops is the free run cut after its first stop token: a stop id ends greedy decoding there."""
    free = [decoder.generate(p, max_new_tokens=max_new_tokens).token_ids for p in PROMPTS]
    stops = {free[0][8], free[3][15]}
    alone = [next((t[: i + 1] for i, token in enumerate(t) if token in stops), t) for t in free]
    outputs = decoder.generate_batch(PROMPTS, batch_size=batch_size, max_new_tokens=max_new_tokens, stop_token_ids=list(stops))
    return alone, [out.token_ids for out in outputs], outputs


@pytest.mark.parametrize("label, arch", [(label, "llama") for label in STRATEGIES] + [("chain", "gpt2"), ("dyspec", "qwen2")])
def test_greedy_batch_equals_each_sequence_alone(label, arch, models, drafts, monkeypatch):
    from specdec.lockstep import Lockstep

    name, options = STRATEGIES[label]
    draft = drafts(arch, "perturbed") if name != "ar" else None
    decoder = make_decoder(models(arch, 0), draft, name, **options)
    flags, run = [], Lockstep.run  # which proposals run without a coroutine
    monkeypatch.setattr(Lockstep, "run", lambda self, tasks, direct=(): (flags.append(list(direct)), run(self, tasks, direct))[1])
    # 6 prompts through 4 rows: two join when the first rows finish; stop ids taken from two of the
    # outputs end some rows early
    alone, batched, outputs = stopped_early(decoder, 4)
    assert batched == alone
    assert len({len(t) for t in alone}) > 1  # rows really finished at different steps
    assert flags and all(all(step) for step in flags) == (draft is None)  # no draft: no coroutines
    for out in outputs:
        assert out.metrics.new_tokens == len(out.token_ids) and out.metrics.target_forwards == out.metrics.steps + 1


def test_greedy_batch_with_a_reduced_vocabulary_draft_equals_each_sequence_alone(models, drafts):
    from specdec.backends.vocab import MappedVocabBackend
    from tiny_models import tiny_model

    target = PyTorchBackend(models("llama", 0))
    keep = list(range(0, target.vocab_size, 2))  # the draft's rows: every other target token, and one for the rest
    draft = MappedVocabBackend(PyTorchBackend(tiny_model("llama", 1, vocab=len(keep) + 1)), keep, target.vocab_size)
    decoder = SpeculativeDecoder(target, draft, get_strategy("chain").cls(get_strategy("chain").cls.Options(k=3)))
    alone, batched, _ = alone_and_batched(decoder, 3, max_new_tokens=16)
    assert batched == alone


def test_sampled_batch_equals_each_sequence_alone(models, drafts):
    # Each row draws from its own generator, seeded like the sequence alone: the same draws, so each
    # row's output has the distribution the single-sequence loop is checked to have exactly.
    decoder = make_decoder(models("llama", 0), drafts("llama", "perturbed"), "dyspec", max_nodes=8)
    alone, batched, _ = alone_and_batched(decoder, 3, max_new_tokens=16, temperature=0.8, seed=0)
    assert batched == alone  # exact distribution: test_sampled_rows_of_a_batch_have_exactly_the_targets_distribution
    other = decoder.generate_batch(PROMPTS, batch_size=3, max_new_tokens=16, temperature=0.8, seed=99)
    assert [o.token_ids for o in other] != batched  # negative control: another seed, other samples


def test_rows_keep_their_own_cache_across_commits(models):
    # Two rows forwarded together with different query counts give the logits each gets alone.
    backend = PyTorchBackend(models("llama", 0))
    batch = BatchedPyTorch(backend, 2)
    a, b = batch.rows
    a.prefill(torch.tensor([[3, 17, 42, 8]]))
    b.prefill(torch.tensor([[5, 6]]))
    tree_mask = torch.tensor([[[True, False, False], [True, True, False], [True, False, True]]])
    out = batch.forward_rows({0: (torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5, 5]]), tree_mask),
                              1: (torch.tensor([[9]]), torch.tensor([[2]]), torch.ones(1, 1, 1, dtype=torch.bool))})
    backend.prefill(torch.tensor([[3, 17, 42, 8]]))
    want = backend.forward(torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5, 5]]), tree_mask)[0]
    torch.testing.assert_close(out[0], want, rtol=1e-4, atol=1e-4)
    a.commit([0, 2])  # keep 1 and its sibling 3's branch: positions 4 and 5
    backend.commit([0, 2])
    out = batch.forward_rows({0: (torch.tensor([[4]]), torch.tensor([[6]]), torch.ones(1, 1, 1, dtype=torch.bool))})
    want = backend.forward(torch.tensor([[4]]), torch.tensor([[6]]), torch.ones(1, 1, 1, dtype=torch.bool))[0]
    torch.testing.assert_close(out[0], want, rtol=1e-4, atol=1e-4)
    assert (a.committed_len, a.pending_len, b.committed_len, b.pending_len) == (6, 1, 2, 1)


def test_a_batch_starts_its_prompts_shortest_first_and_returns_them_in_order(models, monkeypatch):
    # rows of like length share the batch (its forward reads every row's buffer up to the longest
    # row's entries); the outputs still come back in the given order
    from specdec.batch import BatchLoop

    decoder = make_decoder(models("llama", 0), None, "ar")
    joined = []
    join = BatchLoop.join
    monkeypatch.setattr(BatchLoop, "join", lambda self, request, *a: joined.append(len(request.prompt_ids)) or join(self, request, *a))
    outputs = decoder.generate_batch(PROMPTS, batch_size=2, max_new_tokens=4)
    assert joined == sorted(len(p) for p in PROMPTS) != [len(p) for p in PROMPTS]
    assert [out.token_ids for out in outputs] == [decoder.generate(p, max_new_tokens=4).token_ids for p in PROMPTS]


def test_a_sequence_that_leaves_its_row_drops_its_entries(models):
    # a leaving sequence's entries no longer count for the batch's buffers (which then can shrink):
    # one done at its first token, one that stops after steps, one cancelled
    from specdec.batch import BatchLoop

    decoder = make_decoder(models("llama", 0), None, "ar")
    loop = BatchLoop(decoder, 2)
    at_once = loop.join(decoder.prepare(PROMPTS[1], None, {"max_new_tokens": 1}))
    assert at_once.done and loop.target.rows[0].committed_len == 0
    stopping = loop.join(decoder.prepare(PROMPTS[1], None, {"max_new_tokens": 3}))
    cancelled = loop.join(decoder.prepare(PROMPTS[0], None, {"max_new_tokens": 50}))
    assert [row.committed_len for row in loop.target.rows] == [len(PROMPTS[1]), len(PROMPTS[0])]
    while not stopping.done:
        loop.step()
    assert [row.committed_len for row in loop.target.rows] == [len(PROMPTS[0]) + 2, 0]  # moved down to row 0
    loop.cancel(cancelled)
    assert not loop.running and [row.committed_len for row in loop.target.rows] == [0, 0]


def batches_left_alive(decoder, monkeypatch) -> list:
    """Run `generate_batch` twice with Python's cyclic collector off -> the batched targets and
    drafts it made that are still alive afterwards (weakly referenced: held by nothing else)."""
    import gc
    import weakref

    from specdec import batch

    made, init = [], batch.BatchLoop.__init__

    def remember(loop, *args, **kwargs):
        init(loop, *args, **kwargs)
        made.extend(weakref.ref(rows) for rows in (loop.target, loop.draft_rows) if rows is not None)

    monkeypatch.setattr(batch.BatchLoop, "__init__", remember)
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(2):
            decoder.generate_batch(PROMPTS, batch_size=3, max_new_tokens=6)
        alive = [ref() for ref in made if ref() is not None]
    finally:
        if enabled:
            gc.enable()
    assert len(made) == (4 if decoder.draft is not None else 2)
    return alive


def test_a_batch_frees_its_buffers_when_it_returns(models, drafts, monkeypatch):
    # rows that referred to their batch strongly made a cycle: each generate_batch call left its KV
    # buffers (155 MB at B = 16 on the demo pair) alive until the cyclic collector ran
    decoder = make_decoder(models("llama", 0), drafts("llama", "perturbed"), "chain", k=2)
    assert batches_left_alive(decoder, monkeypatch) == []


def test_batch_refuses_what_it_cannot_run_in_one_line(models, drafts):
    decoder = make_decoder(models("llama", 0), drafts("llama", "same"), "chain")
    with pytest.raises(SpecdecError, match="batch size must be at least 1"):
        decoder.generate_batch(PROMPTS, batch_size=0)
    with pytest.raises(SpecdecError, match="exactly one of prompts or messages"):
        decoder.generate_batch()
    table = SpeculativeDecoder(TableBackend(random_table(1, 100), 100), None, get_strategy("ar").cls(get_strategy("ar").cls.Options()))
    with pytest.raises(SpecdecError, match="runs on a pytorch, onnxruntime or tensorrt target, not table"):
        table.generate_batch(PROMPTS)


def test_one_row_decodes_one_prompt_at_a_time_on_any_target():
    """Batch size 1 (or a single prompt) runs each prompt through the single-sequence loop: a
    target with no batched forward decodes them, equal to `generate`, and streams each block."""
    table = SpeculativeDecoder(TableBackend(random_table(1, 100), 100), None, get_strategy("ar").cls(get_strategy("ar").cls.Options()))
    blocks: list[tuple[int, list[int]]] = []
    outputs = table.generate_batch(PROMPTS, batch_size=1, max_new_tokens=6, on_tokens=lambda i, block: blocks.append((i, block)))
    alone = [table.generate(prompt, max_new_tokens=6).token_ids for prompt in PROMPTS]
    assert [out.token_ids for out in outputs] == alone and all(len(ids) == 6 for ids in alone)
    assert [i for i, _ in blocks] == sorted(i for i, _ in blocks)  # in the given order, one after another
    assert [sum((b for i, b in blocks if i == k), []) for k in range(len(PROMPTS))] == alone
    assert [out.token_ids for out in table.generate_batch(PROMPTS[:1], max_new_tokens=6)] == alone[:1]  # one prompt: one row


def test_run_prompts_and_bench_batch_size_on_the_demo_pair(capsys, tmp_path):
    from test_cli import run_cli

    root = Path(__file__).resolve().parents[1]
    config, prompts = str(root / "configs" / "chain.yaml"), str(tmp_path / "p.jsonl")
    Path(prompts).write_text("".join(json.dumps({"question_id": str(i), "category": "c", "turns": [t]}) + "\n"
                                     for i, t in enumerate(["def add(a, b):", "import os", "class Stack:"])))
    code, out, err = run_cli(capsys, "run", config, "--prompts", prompts, "--batch-size", "4", "--max-new-tokens", "6")
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == len(load_questions(prompts)) and all(len(r["token_ids"]) <= 6 for r in lines)
    assert "tok/s in all), batch size 4" in err
    code, out, err = run_cli(capsys, "bench", config, "--baselines", "ar", "--batch-size", "1,2", "--prompts", prompts,
                             "--max-new-tokens", "6", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "b"))
    assert code == 0, err
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert [(r["name"], r["batch_size"]) for r in report["runs"]] == [("ar", 1), ("ar", 2), ("chain", 1), ("chain", 2)]
    assert all(r["outputs_match_ar"] for r in report["runs"])
    assert all(r["decode_tokens_per_second"] > 0 for r in report["runs"])
    # one repeat: its ratio is the median and both ends of the range; ar's is 1 against itself
    assert all(r["speedup_vs_ar_range"] == [r["speedup_vs_ar"]] * 2 for r in report["runs"])
    assert [r["speedup_vs_ar"] for r in report["runs"][:2]] == [1.0, 1.0]
    assert "| 1.00x | 1.00 to 1.00 |" in (tmp_path / "b" / "report.md").read_text()
    assert "decode tokens/s" in (tmp_path / "b" / "report.md").read_text()
    linux = Path("/proc/stat").exists()
    assert all((r["steal_percent"] is not None) == linux for r in report["runs"])
    assert all(0.0 <= r["steal_percent"] <= 100.0 for r in report["runs"] if linux)
    assert "| CPU steal % |" in (tmp_path / "b" / "report.md").read_text()
    code, _, err = run_cli(capsys, "bench", config, "--batch-size", "2", "--out", str(tmp_path / "c"))
    assert code == 1 and "only the ar baseline" in err and err.count("\n") == 1


def test_a_batched_report_names_the_default_prompt_file():
    """Without --prompts the report names the set it ran (not `None`)."""
    from specdec.bench.batched import markdown

    settings = {"questions": 16, "prompts": None, "chat": False, "max_new_tokens": 8, "batch_sizes": [1], "greedy": True,
                "repeats": 1, "configs": ["c.yaml"], "overrides": []}
    report = {"device": "CPU", "versions": {"specdec": "0"}, "runs": [], "settings": settings}
    assert "16 prompts (first turns) from `benchmarks/prompts/code.jsonl`" in markdown(report)
    assert "from `p.jsonl`" in markdown({**report, "settings": {**settings, "prompts": "p.jsonl"}})


def test_cpu_steal_is_read_from_proc_stat(tmp_path):
    """The hypervisor's steal between two readings of /proc/stat, as a share of all the ticks."""
    from specdec.bench.report import cpu_ticks, steal_percent

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 20 300 5 0 1 4 0 0\ncpu0 50 0 10 150 2 0 1 2 0 0\n")
    before = cpu_ticks(stat)
    assert before == (4, 430)
    stat.write_text("cpu  250 0 30 320 5 0 1 24 0 0\n")
    assert steal_percent(before, cpu_ticks(stat)) == pytest.approx(100 * 20 / 200)
    assert cpu_ticks(tmp_path / "missing") is None and steal_percent(None, before) is None
    assert steal_percent(before, before) is None  # no time between the readings


def test_the_methods_run_interleaved_a_step_at_a_time_each_leading_once_a_repeat(capsys, tmp_path, monkeypatch):
    """At each B the methods take turns of one slice (a step of the batch), the turns' order
    alternating, so a machine's drift falls on all alike; a repeat runs one such pass per rotation
    of the methods, each leading once. Each row's CPU steal is its own passes' mean."""
    import dataclasses

    import specdec.bench.batched as batched
    from test_cli import run_cli

    created, order, results = [], [], []
    init, advance, result = batched.Pass.__init__, batched.Pass.advance, batched.Pass.result

    def named_init(self, decoder, *args):
        init(self, decoder, *args)
        self.name, self.index = decoder.strategy.name, len(created)
        created.append(self.name)

    def recording_advance(self):
        order.append((self.index, self.name))
        advance(self)

    def recording_result(self):
        results.append(self.name)
        steal = 1.0 if self.name == "ar" else 2.0 + results.count("chain")  # chain: 3, 4, ..., 8
        return dataclasses.replace(result(self), steal=steal)

    monkeypatch.setattr(batched.Pass, "__init__", named_init)
    monkeypatch.setattr(batched.Pass, "advance", recording_advance)
    monkeypatch.setattr(batched.Pass, "result", recording_result)
    config = str(Path(__file__).resolve().parents[1] / "configs" / "chain.yaml")
    code, _, err = run_cli(capsys, "bench", config, "--baselines", "ar", "--batch-size", "2", "--limit", "2",
                           "--max-new-tokens", "6", "--repeats", "3", "--warmup", "0", "--out", str(tmp_path / "b"))
    assert code == 0, err
    assert created == ["ar", "chain", "chain", "ar"] * 3
    first, second = ([name for index, name in order if index == i] for i in (0, 1))
    assert order[:6] == [(0, "ar"), (1, "chain"), (1, "chain"), (0, "ar"), (0, "ar"), (1, "chain")]
    assert len(first) > 3 and len(second) > 3
    assert [step for step in order if step[0] in (2, 3)][:4] == [(2, "chain"), (3, "ar"), (3, "ar"), (2, "chain")]
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert [(r["name"], r["steal_percent"]) for r in report["runs"]] == [("ar", 1.0), ("chain", 5.5)]


def test_a_pass_is_timed_on_its_own_clock_and_passes_that_end_drop_out(monkeypatch):
    """Each pass's time, first-token latency and inter-token gaps count only its own slices;
    the turns alternate their order and skip a pass that has ended."""
    import types

    import specdec.bench.batched as batched

    now, order = [0.0], []
    monkeypatch.setattr(batched.time, "perf_counter", lambda: now[0])

    def decoder(name: str, slices: int, seconds: float):
        def batch_slices(prompts, batch_size, on_tokens, max_new_tokens):
            for index in range(slices):
                order.append(name)
                now[0] += seconds
                on_tokens(0, [index])  # one block a slice
                yield
            return [types.SimpleNamespace(token_ids=list(range(slices)), metrics=types.SimpleNamespace(prefill_seconds=0.0))]
        return types.SimpleNamespace(batch_slices=batch_slices)

    passes = [batched.Pass(decoder("a", 3, 1.0), {"prompts": ["x"]}, 1, 8),
              batched.Pass(decoder("b", 2, 10.0), {"prompts": ["x"]}, 1, 8)]
    batched.interleave(passes)
    assert order == ["a", "b", "b", "a", "a"]
    a, b = (p.result() for p in passes)
    assert (a.tokens_per_second, b.tokens_per_second) == (1.0, 0.1)  # 3 tokens in 3 s; 2 in 20 s
    assert (a.first_token, b.first_token) == ([1.0], [10.0])
    assert (a.gaps, b.gaps) == ([1.0, 1.0], [10.0])


def test_a_batched_speedup_pairs_each_pass_with_ars_and_each_repeat_takes_the_geometric_mean():
    from specdec.bench.batched import BatchRun, repeat_ratios

    def runs(*rates):
        return [BatchRun(rate, rate, [], [], [], []) for rate in rates]

    # two passes a repeat (each method leading once): pass ratios 1.0, 0.5 | 1.0, 4.0
    assert repeat_ratios(runs(10, 20, 30, 40), runs(10, 40, 30, 10), 2) == pytest.approx([0.5 ** 0.5, 2.0])
    assert repeat_ratios(runs(10, 20, 30), runs(10, 40, 30), 1) == [1.0, 0.5, 1.0]
    with pytest.raises(ValueError):
        repeat_ratios(runs(10, 20), runs(10), 1)


@pytest.mark.parametrize("label", ["chain", "dyspec", "gsd"])
def test_greedy_batch_with_an_eagle3_head_equals_each_sequence_alone(label, tmp_path):
    from test_eagle3 import build_head, eagle_target, head_decoder

    name, options = STRATEGIES[label]
    decoder = head_decoder(PyTorchBackend(eagle_target()), build_head(eagle_target(), draft_vocab=40), tmp_path, name, **options)
    alone, batched, _ = alone_and_batched(decoder, 3, max_new_tokens=16)
    assert batched == alone


def joint_calls_per_step(decoder, backend_type, monkeypatch, **generation):
    """Decode PROMPTS in a batch of 4 -> per step, (joint draft calls, each row's draft forwards)."""
    from specdec.batch import BatchLoop

    calls, steps = [], []
    joint = backend_type.forward_many

    def counting(cls, requests):
        calls.append(len(requests))
        return joint(requests)

    def step(self):
        rows = list(self.running.values())
        before, made = [s.metrics.draft_forwards for s in rows], len(calls)
        finished = original(self)
        steps.append((len(calls) - made, [s.metrics.draft_forwards - b for s, b in zip(rows, before)]))
        return finished

    original = BatchLoop.step
    monkeypatch.setattr(backend_type, "forward_many", classmethod(counting))
    monkeypatch.setattr(BatchLoop, "step", step)
    outputs = decoder.generate_batch(PROMPTS, batch_size=4, **generation)
    return steps, outputs


@pytest.mark.parametrize("draft_kind", ["model", "eagle3"])
def test_a_batch_runs_its_draft_forwards_of_a_round_as_one_call(draft_kind, models, drafts, tmp_path, monkeypatch):
    from specdec.backends.batched import Row
    from specdec.backends.eagle3 import Eagle3Backend

    if draft_kind == "model":
        decoder, backend_type = make_decoder(models("llama", 0), drafts("llama", "perturbed"), "dyspec", max_nodes=8), Row
    else:
        from test_eagle3 import build_head, eagle_target, head_decoder

        target = eagle_target()
        decoder, backend_type = head_decoder(PyTorchBackend(target), build_head(target), tmp_path, "dyspec", max_nodes=8), Eagle3Backend
    alone = [decoder.generate(p, max_new_tokens=12).token_ids for p in PROMPTS]
    steps, outputs = joint_calls_per_step(decoder, backend_type, monkeypatch, max_new_tokens=12)
    assert [o.token_ids for o in outputs] == alone
    assert all(calls == max(forwards) for calls, forwards in steps)  # one call per round, not per row
    assert sum(sum(forwards) for _, forwards in steps) > 1.5 * sum(calls for calls, _ in steps)  # rows shared calls


# -- onnxruntime targets ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_export(onnx_export):
    pytest.importorskip("onnxruntime", reason="needs the [onnx] extra (onnx, onnxscript, onnxruntime)")
    from conftest import cached_model

    return onnx_export("llama-0", functools.partial(cached_model, "llama", 0))


def onnx_target(folder):
    from specdec.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeOptions

    return OnnxRuntimeBackend.load(str(folder), OnnxRuntimeOptions(prefill_chunk=4))  # prompts span chunks


@pytest.mark.parametrize("label", list(STRATEGIES))
def test_greedy_batch_on_onnxruntime_equals_each_sequence_alone(label, llama_export, drafts):
    name, options = STRATEGIES[label]
    component = get_strategy(name)
    draft = PyTorchBackend(drafts("llama", "perturbed")) if name != "ar" else None
    decoder = SpeculativeDecoder(onnx_target(llama_export), draft, component.cls(component.cls.Options(**options)))
    alone, batched, outputs = stopped_early(decoder, 4)
    assert batched == alone
    assert len({len(t) for t in alone}) > 1
    assert all(out.metrics.new_tokens == len(out.token_ids) for out in outputs)


def test_an_onnxruntime_batch_frees_its_buffers_when_it_returns(llama_export, drafts, monkeypatch):
    chain = get_strategy("chain").cls
    decoder = SpeculativeDecoder(onnx_target(llama_export), PyTorchBackend(drafts("llama", "perturbed")),
                                 chain(chain.Options(k=2)))
    assert batches_left_alive(decoder, monkeypatch) == []


def test_a_batch_beyond_an_engines_profile_or_with_interacting_rows_is_refused_in_one_line(llama_export):
    # a tensorrt engine's verify profile bounds the rows (max_batch); the check is the backend's
    # attribute, here on the onnxruntime backend that shares the batched path with tensorrt
    from specdec.batch import batched_backend

    target = onnx_target(llama_export)
    target.max_batch = 4
    assert len(batched_backend(target, 4).rows) == 4
    with pytest.raises(SpecdecError, match="runs at most 4 rows per forward, not 8; rebuild it with --max-batch 8"):
        batched_backend(target, 8)
    target.rows_interact = "int8 activations"
    with pytest.raises(SpecdecError, match="cannot decode a batch losslessly: int8 activations"):
        batched_backend(target, 2)


@pytest.mark.parametrize("label", ["chain", "dyspec"])
def test_greedy_batch_with_an_eagle3_head_on_onnxruntime_equals_each_sequence_alone(label, target_backend, tmp_path):
    from test_eagle3 import build_head, eagle_target, head_decoder

    name, options = STRATEGIES[label]
    decoder = head_decoder(target_backend("onnxruntime"), build_head(eagle_target()), tmp_path, name, **options)
    alone, batched, _ = alone_and_batched(decoder, 3, max_new_tokens=16)
    assert batched == alone


def test_onnxruntime_rows_keep_their_own_cache(llama_export, models):
    # two rows of different lengths forwarded together give the logits each gets alone on pytorch
    from specdec.batch import batched_backend

    reference = PyTorchBackend(models("llama", 0))
    batch = batched_backend(onnx_target(llama_export), 2)
    prompts = [[3, 17, 42, 8, 60, 5, 9], [5, 6]]
    for row, prompt in zip(batch.rows, prompts):
        row.prefill(torch.tensor([prompt]))
    trees = {0: [11, 12, 13], 1: [14]}
    inputs = {b: (torch.tensor([t]), torch.arange(len(prompts[b]), len(prompts[b]) + len(t))[None],
                  torch.ones(len(t), len(t), dtype=torch.bool).tril_()[None]) for b, t in trees.items()}
    logits = batch.forward_rows(inputs)
    for b, prompt in enumerate(prompts):
        reference.reset()
        want = reference.model(torch.tensor([prompt + trees[b]])).logits[0, len(prompt):]
        assert torch.allclose(logits[b], want, atol=1e-4)


def test_an_onnxruntime_prefill_reads_only_its_own_rows_entries(llama_export, models, monkeypatch):
    # a row joining after another row grew the buffers attends over its own entries (one masked
    # sentinel slot when it has none), not over the whole capacity; its logits stay exact
    from specdec.batch import batched_backend

    target = onnx_target(llama_export)
    batch = batched_backend(target, 2)
    batch.rows[0].prefill(torch.tensor([list(range(3, 40))]))  # grows the capacity past 37 slots
    widths = []
    execute = target.execute
    monkeypatch.setattr(target, "execute", lambda inputs, outputs: widths.append(inputs[3].shape[2]) or execute(inputs, outputs))
    prompt = [5, 6, 7, 8, 9, 10]
    logits = batch.rows[1].prefill(torch.tensor([prompt]))
    assert batch.kv[0].shape[2] >= 37 and widths == [1, 4]  # two chunks of 4: past of 1 (sentinel), then 4
    want = PyTorchBackend(models("llama", 0)).model(torch.tensor([prompt])).logits[0, -1]
    assert torch.allclose(logits[0], want, atol=1e-4)


def test_torch_runs_one_thread_around_an_onnxruntime_graph_run_and_gets_its_threads_back(llama_export, monkeypatch):
    # torch's OpenMP workers, woken for the masks or the cache write, would spin beside
    # onnxruntime's threads; the draft's forwards between graph runs keep torch's threads
    from specdec.batch import batched_backend

    target = onnx_target(llama_export)
    batch = batched_backend(target, 2)
    seen, threads = [], torch.get_num_threads
    execute = target.execute
    monkeypatch.setattr(target, "execute", lambda inputs, outputs: seen.append(threads()) or execute(inputs, outputs))
    set_to, set_threads = [], torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: set_to.append(n) or set_threads(n))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # what the caller set, whatever the worker's
    before = threads()  # the worker's count, set back even if the test fails
    try:
        batch.rows[0].prefill(torch.tensor([[3, 17, 42, 8, 60]]))  # two chunks of 4
        batch.forward_rows({0: (torch.tensor([[11]]), torch.tensor([[5]]), torch.ones(1, 1, 1, dtype=torch.bool))})
    finally:
        set_threads(before)
    assert seen == [1, 1, 1] and set_to == [1, 3] * 3  # one thread in each run, the caller's 3 after it


def test_the_onnxruntime_capacity_follows_the_longest_row_and_shrinks_when_it_leaves(llama_export, models):
    # the graph reads every slot of the capacity, so it is the longest row rounded up to FIT_STEP,
    # shrinking when that row's entries are dropped (and it is more than a step over); the remaining row's logits stay exact
    from specdec.backends.batched_onnx import FIT_STEP
    from specdec.batch import batched_backend

    batch = batched_backend(onnx_target(llama_export), 2)
    long, short = list(range(3, 3 + 2 * FIT_STEP + 5)), [5, 6, 7]
    batch.rows[0].prefill(torch.tensor([long]))
    batch.rows[1].prefill(torch.tensor([short]))
    assert batch.kv[0].shape[2] == 3 * FIT_STEP  # len(long) rounded up
    batch.rows[0].reset()  # the long sequence leaves
    logits = batch.forward_rows({1: (torch.tensor([[9]]), torch.tensor([[len(short)]]), torch.ones(1, 1, 1, dtype=torch.bool))})
    assert batch.kv[0].shape[2] == FIT_STEP
    want = PyTorchBackend(models("llama", 0)).model(torch.tensor([short + [9]])).logits[0, -1]
    assert torch.allclose(logits[1][0], want, atol=1e-4)


def test_an_onnxruntime_prompt_of_many_chunks_grows_the_capacity_once(llama_export, models, monkeypatch):
    # each growth copies every row's buffers: a prompt of 2 * FIT_STEP + 5 tokens in chunks of 4 (a
    # growth per chunk before) grows them once; its logits stay exact
    from specdec.backends.batched_onnx import FIT_STEP, BatchedOnnx
    from specdec.batch import batched_backend

    batch = batched_backend(onnx_target(llama_export), 2)
    batch.rows[1].prefill(torch.tensor([[5, 6, 7]]))
    capacities = []
    fit = BatchedOnnx._fit
    monkeypatch.setattr(BatchedOnnx, "_fit", lambda self, needed: fit(self, needed) or capacities.append(self.cache.shape[3]))
    prompt = list(range(3, 3 + 2 * FIT_STEP + 5))
    logits = batch.rows[0].prefill(torch.tensor([prompt]))
    assert capacities == [3 * FIT_STEP]  # len(prompt) rounded up, in one growth
    want = PyTorchBackend(models("llama", 0)).model(torch.tensor([prompt])).logits[0, -1]
    assert torch.allclose(logits[0], want, atol=1e-4)


@pytest.mark.parametrize("long_row", [1, 0])
def test_onnxruntime_rows_of_very_different_lengths_run_as_two_groups(long_row, llama_export, models, monkeypatch):
    # one run would read every row at the long row's capacity; split, the long row reads its
    # buffers in place and the short ones a copy of their first FIT_STEP slots (gathered where
    # the long row sits between them, sliced where it comes first).
    # Either way each row's logits are those it gets alone; where the split cannot pay (a run's
    # fixed cost measured as infinite), one run
    from specdec.backends.batched_onnx import FIT_STEP
    from specdec.batch import batched_backend

    target = onnx_target(llama_export)
    reference = PyTorchBackend(models("llama", 0))
    prompts = [[5, 6, 7], [8, 9], [10]]
    prompts.insert(long_row, [(7 * i) % 90 + 3 for i in range(3 * FIT_STEP)])
    trees = {0: [11, 12], 1: [13], 2: [14, 15, 16], 3: [17]}
    inputs = {b: (torch.tensor([t]), torch.arange(len(prompts[b]), len(prompts[b]) + len(t))[None],
                  torch.ones(len(t), len(t), dtype=torch.bool).tril_()[None]) for b, t in trees.items()}
    runs = []  # (rows, past slots) of each graph run
    execute = target.execute
    monkeypatch.setattr(target, "execute", lambda inputs, outputs: runs.append(tuple(inputs[3].shape[::2])) or execute(inputs, outputs))
    for call_slots, want_runs in [(0.0, [(1, 4 * FIT_STEP), (3, FIT_STEP)]), (math.inf, [(4, 4 * FIT_STEP)])]:
        target.call_slots = call_slots
        batch = batched_backend(target, 4)
        for row, prompt in zip(batch.rows, prompts):
            row.prefill(torch.tensor([prompt]))
        runs.clear()
        logits = batch.forward_rows(inputs)
        assert runs == want_runs
        for b, prompt in enumerate(prompts):
            want = reference.model(torch.tensor([prompt + trees[b]])).logits[0, len(prompt):]
            assert torch.allclose(logits[b], want, atol=1e-4)


def test_a_graph_runs_fixed_cost_is_measured_once_per_backend(llama_export, monkeypatch):
    from specdec.backends.batched_onnx import FIT_STEP
    from specdec.batch import batched_backend

    target = onnx_target(llama_export)
    runs = []
    execute = target.execute
    monkeypatch.setattr(target, "execute", lambda inputs, outputs: runs.append(inputs[3].shape[2]) or execute(inputs, outputs))
    batched_backend(target, 2)  # measured as the batch is made, before any step is timed
    large = min(2048, (target.max_length - 1) // FIT_STEP * FIT_STEP)
    assert target.call_slots > 0 and set(runs) == {FIT_STEP, large}  # one row timed at two capacities
    runs.clear()
    call_slots = target.call_slots
    assert batched_backend(target, 4).measure_call_slots() == call_slots and not runs  # kept for every batch over it


@pytest.mark.parametrize("draft_kind", ["model", "eagle3"])
def test_greedy_batch_split_into_groups_on_onnxruntime_equals_each_sequence_alone(draft_kind, llama_export, drafts,
                                                                                   target_backend, tmp_path, monkeypatch):
    # a long prompt among short ones, every call split where that reads fewer slots (a run's fixed
    # cost taken as nothing): the logits, and an EAGLE-3 head's features, come back in row order
    from specdec.backends.batched_onnx import BatchedOnnx

    splits = []
    groups = BatchedOnnx.groups
    monkeypatch.setattr(BatchedOnnx, "measure_call_slots", lambda self: 0.0)
    monkeypatch.setattr(BatchedOnnx, "groups", lambda self, used: splits.append(len(out := groups(self, used))) or out)
    prompts = [[3, 17, 42], [(7 * i) % 90 + 3 for i in range(110)], [9, 9, 2], [60, 5]]
    if draft_kind == "model":
        component = get_strategy("chain")
        decoder = SpeculativeDecoder(onnx_target(llama_export), PyTorchBackend(drafts("llama", "perturbed")),
                                     component.cls(component.cls.Options(k=3)))
    else:
        from test_eagle3 import build_head, eagle_target, head_decoder

        decoder = head_decoder(target_backend("onnxruntime"), build_head(eagle_target()), tmp_path, "chain", k=3)
    alone = [decoder.generate(p, max_new_tokens=12).token_ids for p in prompts]
    splits.clear()
    batched = [out.token_ids for out in decoder.generate_batch(prompts, batch_size=4, max_new_tokens=12)]
    assert batched == alone
    assert 2 in splits


# -- exact sampling on batched rows -----------------------------------------------------------------

SAMPLED = {"chain": ("chain", {"k": 2}), "static_tree": ("static_tree", {"branching": [2, 1]}),
           "dyspec": ("dyspec", {"max_nodes": 3, "max_depth": 2, "expand_per_step": 2})}


def tiny_pair(vocab: int = 4):
    from tiny_models import tiny_model

    return tiny_model("llama", 0, vocab=vocab), tiny_model("llama", 1, vocab=vocab)


def exact_first_tokens(model, prompt: list[int], length: int, warp) -> dict:
    import itertools

    from specdec.sampling import warp_probs

    vocab, dist = model.config.vocab_size, {}
    with torch.no_grad():
        for seq in itertools.product(range(vocab), repeat=length):
            prob = 1.0
            for j in range(length):
                logits = model(torch.tensor([prompt + list(seq[:j])])).logits[0, -1]
                prob *= float(warp_probs(logits, warp)[seq[j]])
            dist[seq] = prob
    return dist


def batched_row_distribution(decoder, prompt: list[int], length: int, temperature: float, top_k: int) -> dict:
    """{first `length` tokens of the row decoding `prompt`: probability} over every draw sequence of
    that row, decoded in a batch after another row with a fixed seed."""
    from enumeration import enumerate_outcomes
    from specdec.batch import batch_slices, drain

    generation = {"max_new_tokens": length, "temperature": temperature, "top_k": top_k}

    def outcome(rng):
        requests = [decoder.prepare(p, None, {**generation, "seed": 7}) for p in ([2, 1, 3, 3, 0], prompt)]
        requests[1].rng = rng
        return tuple(drain(batch_slices(decoder, requests, 2))[1][0])

    return enumerate_outcomes(outcome)


@pytest.mark.parametrize("label", list(SAMPLED))
def test_sampled_rows_of_a_batch_have_exactly_the_targets_distribution(label):
    from specdec.sampling import Warp

    target, draft = tiny_pair()
    name, options = SAMPLED[label]
    decoder = make_decoder(target, draft, name, **options)
    prompt, length = [1, 3, 0, 2], 3
    got = batched_row_distribution(decoder, prompt, length, 1.0, 2)
    want = exact_first_tokens(target, prompt, length, Warp(1.0, top_k=2))
    assert sum(got.values()) == pytest.approx(1.0)
    assert max(abs(got.get(s, 0.0) - p) for s, p in want.items()) < 1e-5


def test_control_a_batched_row_without_the_residual_is_detected(monkeypatch):
    import specdec.verify
    from specdec.sampling import Warp

    monkeypatch.setattr(specdec.verify, "_reject", lambda residual, draft_probs, token, mode: (residual, draft_probs))
    target, draft = tiny_pair()
    decoder = make_decoder(target, draft, "chain", k=2)
    prompt, length = [1, 3, 0, 2], 3
    got = batched_row_distribution(decoder, prompt, length, 1.0, 2)
    want = exact_first_tokens(target, prompt, length, Warp(1.0, top_k=2))
    assert max(abs(got.get(s, 0.0) - p) for s, p in want.items()) > 1e-3  # 100x the exact checks' tolerance


def test_the_forward_cost_script_times_each_batch_size_at_each_capacity(llama_export, monkeypatch):
    # scripts/batch_forward_cost.py: every (B, C) is timed over buffers of exactly C slots
    script = load_script("batch_forward_cost")
    target = onnx_target(llama_export)
    target.call_slots = math.inf  # a batch of rows measures a run's fixed cost as it is made: not here
    shapes = set()
    execute = target.execute
    monkeypatch.setattr(target, "execute", lambda inputs, outputs: shapes.add((inputs[0].shape[0], inputs[3].shape[2])) or execute(inputs, outputs))
    costs = script.forward_costs({"a": target}, [1, 2], [32, 96], rounds=1)
    assert {key[1:] for key in costs} == shapes == {(1, 32), (1, 96), (2, 32), (2, 96)} and {key[0] for key in costs} == {"a"}
    assert all(seconds > 0 for seconds in costs.values())
    order = []  # two targets take turns within each round
    other = onnx_target(llama_export)
    for name, backend in (("a", target), ("b", other)):
        run = functools.partial(type(backend).execute, backend)
        monkeypatch.setattr(backend, "execute", lambda inputs, outputs, name=name, run=run: order.append(name) or run(inputs, outputs))
    script.forward_costs({"a": target, "b": other}, [1], [32], rounds=2)
    assert order == ["a"] * 6 + ["b"] * 6 + ["a"] * 6 + ["b"] * 6


def test_the_forward_cost_script_times_mixed_rows_in_one_run_and_in_groups(llama_export, monkeypatch):
    # scripts/batch_forward_cost.py --mixed: the same step (its entries dropped after it) in one
    # graph run and in the groups BatchedOnnx.groups chooses, here forced by a fixed cost of nothing
    from specdec.backends.batched_onnx import FIT_STEP, BatchedOnnx

    script = load_script("batch_forward_cost")
    assert script.parse_lengths("100,20x3") == [100, 20, 20, 20]
    target = onnx_target(llama_export)
    monkeypatch.setattr(BatchedOnnx, "measure_call_slots", lambda self: self.backend.call_slots or 0.0)
    runs = []
    execute = target.execute
    monkeypatch.setattr(target, "execute", lambda inputs, outputs: runs.append(tuple(inputs[3].shape[::2])) or execute(inputs, outputs))
    one, grouped, groups = script.mixed_step_costs(target, [3 * FIT_STEP, 5, 5], rounds=2)
    steps = [r for r in runs if r[0] > 1 or r[1] > FIT_STEP]  # past the prefills' one-row runs
    assert one > 0 and grouped > 0 and groups == [([0], None), ([1, 2], FIT_STEP)]
    assert steps.count((3, 4 * FIT_STEP)) == 3 and steps.count((1, 4 * FIT_STEP)) == 3  # one run, then the long row's group, per round


def test_the_prefill_cost_script_alternates_the_prompts_alone_and_joined(monkeypatch):
    # scripts/prefill_cost.py: per round each prompt prefilled alone, then all of them as one sequence
    script = load_script("prefill_cost")
    target, _ = tiny_pair()
    backend = PyTorchBackend(target)
    lengths = []
    prefill = backend.prefill
    monkeypatch.setattr(backend, "prefill", lambda ids: lengths.append(ids.shape[1]) or prefill(ids))
    alone, together = script.prefill_costs(backend, [[1, 2, 3], [0, 1], [3, 2, 1, 0]], rounds=2)
    assert lengths == [3] + [3, 2, 4, 9] * 2  # a warm-up, then two rounds
    assert alone > 0 and together > 0


def test_the_paired_batch_script_interleaves_and_splits_each_methods_steps(capsys, monkeypatch):
    # scripts/paired_batch.py: ar and a config interleaved a step at a time; with --steps each
    # method's full-batch steps are split apart, never pooled
    from specdec import batch, lockstep

    script = load_script("paired_batch")
    monkeypatch.setattr(batch.BatchLoop, "step", batch.BatchLoop.step)  # --steps patches these; undone after the test
    monkeypatch.setattr(lockstep, "model_call", lockstep.model_call)
    config = str(Path(__file__).resolve().parents[1] / "configs" / "chain.yaml")
    assert script.main([config, "--batch-sizes", "2", "--repeats", "2", "--limit", "2", "--max-new-tokens", "6", "--steps"]) == 0
    out = capsys.readouterr().out
    assert "B 2 ar: " in out and f"B 2 {config}: " in out
    steps = [int(line.split()[0]) for line in out.splitlines() if "steps of 2 rows" in line]
    assert len(steps) == 2 and all(count > 0 for count in steps)
