"""`specdec bench`: sweeps, outputs in every promised format, mismatch detection. No timing is
asserted: speed is measured by running the command, not by tests."""

import json

import pytest

from helpers import load_script
from specdec.bench.methods import Sample, expand_sweeps
from specdec.bench.prompts import load_questions
from specdec.bench.report import summarise
from specdec.cli import main
from specdec.errors import SpecdecError


def test_list_values_sweep_unless_the_key_takes_a_list(repo_mirror, monkeypatch):
    monkeypatch.chdir(repo_mirror)
    runs = expand_sweeps("configs/static_tree.yaml", ["strategy.branching=[3,1]", "generation.max_new_tokens=[8,16]"])
    assert [label for label, _ in runs] == ["generation.max_new_tokens=8", "generation.max_new_tokens=16"]
    assert runs[0][1] == ["strategy.branching=[3,1]", "generation.max_new_tokens=8"]
    nested = expand_sweeps("configs/static_tree.yaml", ["strategy.branching=[[2],[3,1]]"])
    assert [o for _, o in nested] == [["strategy.branching=[2]"], ["strategy.branching=[3, 1]"]]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    questions = [{"question_id": "q1", "category": "code", "turns": ["def add(a, b):\n"]},
                 {"question_id": "q2", "category": "code", "turns": ["import os\n", "def main():\n"]}]
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return path


def test_bench_writes_every_report_and_outputs_match_ar(repo_mirror, monkeypatch, prompts, tmp_path, capsys):
    monkeypatch.chdir(repo_mirror)
    out = tmp_path / "bench"
    main(["bench", "configs/chain.yaml", "configs/dyspec.yaml", "--prompts", str(prompts), "--repeats", "2",
          "--max-new-tokens", "12", "--out", str(out), "-o", "strategy.max_nodes=[4,8]"])
    report = json.loads((out / "report.json").read_text())
    names = [r["name"] for r in report["runs"]]
    assert names == ["ar", "hf", "hf-assisted", "hf-prompt-lookup", "chain",
                     "dyspec [strategy.max_nodes=4]", "dyspec [strategy.max_nodes=8]"]
    assert report["device"].startswith("CPU") and {"torch", "transformers", "specdec"} <= set(report["versions"])
    for run in report["runs"]:
        assert run["outputs_match_ar"] is True and run["tokens_per_second"] > 0
        assert {"speedup_vs_ar", "mean_accepted_length", "target_forwards", "draft_time_share",
                "verify_time_share", "other_time_share"} <= set(run)
    chain = report["runs"][4]
    assert chain["mean_accepted_length"] >= 1 and 0 <= chain["other_time_share"] <= 1
    answers = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(answers) == 7 * 2
    two_turns = next(a for a in answers if a["question_id"] == "q2")
    choice = two_turns["choices"][0]
    assert len(choice["turns"]) == len(choice["new_tokens"]) == len(choice["wall_time"]) == len(choice["accept_lengths"]) == 2
    assert all(0 < n <= 12 for n in choice["new_tokens"])
    assert "| method |" in (out / "report.md").read_text() and "| method |" in capsys.readouterr().out
    by_position = (out / "report.md").read_text().split("acceptance by draft position")[1]
    assert f"| chain | {chain['acceptance_by_depth'][0]:.2f} |" in by_position
    for png in ("speedup.png", "acceptance.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_mismatch_with_ar_is_reported(repo_mirror, monkeypatch, prompts, tmp_path):
    from specdec.bench.runner import BenchSettings, run_bench

    monkeypatch.chdir(repo_mirror)
    result = run_bench(BenchSettings(["configs/chain.yaml"], prompts=str(prompts), baselines=["ar"], repeats=1, max_new_tokens=6))
    broken = result.samples["chain"][0][1][0]
    result.samples["chain"][0][1][0] = Sample(broken.token_ids[:-1] + [broken.token_ids[-1] + 1], broken.seconds, [], broken.metrics)
    chain = summarise(result)["runs"][1]
    assert chain["outputs_match_ar"] is False and chain["mismatched_prompts"] == ["q2"]


def test_bad_prompt_files_give_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "turns": ["x"]}\n{"question_id": 2}\n')
    with pytest.raises(SpecdecError, match=r"bad.jsonl:2: not a Spec-Bench question \(missing `turns`\)"):
        load_questions(bad)
    with pytest.raises(SpecdecError, match="does not exist"):
        load_questions(tmp_path / "nope.jsonl")
    bad.write_text('{"turns": ["x"]}\n["a list"]\n')
    with pytest.raises(SpecdecError, match=r"bad.jsonl:2: .*must be a JSON object"):
        load_questions(bad)
    bad.write_bytes(b'{"turns": ["x"]}\n\xff\xfe\n')
    with pytest.raises(SpecdecError, match=r"bad.jsonl:2: not UTF-8"):
        load_questions(bad)


def test_an_override_that_fits_no_config_is_refused(repo_mirror, monkeypatch, capsys):
    monkeypatch.chdir(repo_mirror)
    with pytest.raises(SystemExit) as info:
        main(["bench", "configs/chain.yaml", "-o", "strategy.max_nodes=[4,8]", "--limit", "1"])
    assert info.value.code == 1
    assert capsys.readouterr().err == "error: override 'strategy.max_nodes=[4,8]' fits none of the configs\n"


@pytest.fixture(scope="module")
def chat_pair(tmp_path_factory):
    """The demo target with a chat template, and a reduced-vocabulary copy of the demo draft."""
    from pathlib import Path

    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specdec.backends.vocab import write_vocab_map
    from specdec.distill.draft import build_draft

    demo = Path(__file__).resolve().parents[1] / "models" / "demo"
    root = tmp_path_factory.mktemp("chat_pair")
    target = root / "target"
    target.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        (target / name).symlink_to(demo / "target" / name)
    tokenizer = AutoTokenizer.from_pretrained(demo / "target")
    tokenizer.chat_template = "{% for m in messages %}# {{ m.role }}: {{ m.content }}<|endoftext|>{% endfor %}# assistant:\n"
    tokenizer.save_pretrained(target)
    vocab = list(range(0, 4096, 3))  # a third of the tokens: many target choices fall outside
    build_draft(AutoModelForCausalLM.from_pretrained(demo / "draft"), [0, 1], vocab).save_pretrained(root / "draft")
    write_vocab_map(root / "draft", vocab, 4096)
    configs = []
    for name, strategy in (("chain", {"name": "chain", "k": 3}), ("ar", {"name": "ar"})):
        data = {"target": {"model": str(target)}, "draft": {"model": str(root / "draft")}, "strategy": strategy}
        configs.append(root / f"{name}.yaml")
        configs[-1].write_text(yaml.safe_dump(data))
    return configs


def test_chat_bench_with_a_reduced_vocabulary_draft(chat_pair, prompts, tmp_path):
    out = tmp_path / "bench"
    main(["bench", *map(str, chat_pair), "--chat", "--prompts", str(prompts), "--repeats", "1", "--warmup", "0",
          "--max-new-tokens", "10", "--baselines", "ar,hf-assisted", "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    runs = {r["name"]: r for r in report["runs"]}
    assert list(runs) == ["ar", "hf-assisted", "chain", "ar (config)"]  # a config named like a baseline keeps both
    assert all(r["outputs_match_ar"] is True for r in runs.values())
    assert set(runs["chain"]["tau_by_category"]) == {"code"} and runs["chain"]["tau_by_category"]["code"] >= 1
    assert "by category" in (out / "report.md").read_text()
    answers = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    follow_up = next(a for a in answers if a["question_id"] == "q2" and a["model_id"] == "chain")
    assert len(follow_up["choices"][0]["turns"]) == 2


def test_chat_bench_without_a_template_is_one_line(repo_mirror, monkeypatch, prompts, capsys):
    monkeypatch.chdir(repo_mirror)
    with pytest.raises(SystemExit) as info:
        main(["bench", "configs/chain.yaml", "--chat", "--prompts", str(prompts), "--baselines", "ar"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 1 and len(err) == 1 and "no chat template" in err[0]


class FakeLlama:
    """llama_cpp.Llama as the llama-cpp baseline uses it: counts up from the last prompt token."""

    made: list = []

    def __init__(self, model_path, **kwargs):
        self.model_path, self.kwargs, self.calls, self.resets = model_path, kwargs, [], 0
        FakeLlama.made.append(self)

    def reset(self):
        self.resets += 1

    def generate(self, tokens, **kwargs):
        self.calls.append((list(tokens), kwargs))
        token = tokens[-1]
        while True:
            token += 1
            yield token


@pytest.fixture
def fake_llama_cpp(monkeypatch):
    import sys
    import types

    module = types.ModuleType("llama_cpp")
    module.Llama = FakeLlama
    FakeLlama.made = []
    monkeypatch.setitem(sys.modules, "llama_cpp", module)
    return FakeLlama


def test_the_llama_cpp_baseline_decodes_the_gguf_greedily_with_the_same_budget_and_stops(fake_llama_cpp, tmp_path):
    from types import SimpleNamespace

    from specdec.bench.methods import baseline

    reference = SimpleNamespace(target=SimpleNamespace(max_length=4096, eos_token_ids=frozenset({99})))
    config = SimpleNamespace(target=SimpleNamespace(model=str(tmp_path / "m.gguf")))
    method = baseline("llama-cpp", reference, config)
    assert (method.name, method.backend, method.exact) == ("llama-cpp", "llama.cpp", False)
    assert method.generate([5, 6, 7], 4, frozenset()).token_ids == [8, 9, 10, 11]  # the budget
    assert method.generate([90, 95], 10, frozenset({97})).token_ids == [96, 97]  # a stop id, kept as ar keeps it
    assert method.generate([96], 10, frozenset()).token_ids == [97, 98, 99]  # the target's EOS
    llm = fake_llama_cpp.made[0]
    assert llm.model_path == str(tmp_path / "m.gguf") and llm.kwargs["n_ctx"] == 4096
    assert llm.resets == 3  # every prompt is prefilled whole, as for every other method
    prompt, options = llm.calls[0]
    assert prompt == [5, 6, 7] and options["temp"] == 0.0 and options["top_k"] == 1 and options["repeat_penalty"] == 1.0


def test_the_llama_cpp_baseline_refuses_what_it_cannot_run_in_one_line(monkeypatch, tmp_path):
    import sys
    from types import SimpleNamespace

    from specdec.bench.methods import baseline

    reference = SimpleNamespace(target=SimpleNamespace(max_length=4096, eos_token_ids=frozenset()))
    folder = SimpleNamespace(target=SimpleNamespace(model=str(tmp_path)))
    with pytest.raises(SpecdecError, match="runs the first config's target as a .gguf file"):
        baseline("llama-cpp", reference, folder)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # not installed
    gguf_file = SimpleNamespace(target=SimpleNamespace(model=str(tmp_path / "m.gguf")))
    with pytest.raises(SpecdecError, match=r"needs llama-cpp-python: pip install 'specdec\[llamacpp\]'"):
        baseline("llama-cpp", reference, gguf_file)


def test_a_llama_cpp_mismatch_with_ar_is_reported_but_expected(repo_mirror, monkeypatch, prompts, tmp_path):
    from specdec.bench.methods import Method
    from specdec.bench.runner import BenchSettings, run_bench

    monkeypatch.chdir(repo_mirror)
    result = run_bench(BenchSettings(["configs/chain.yaml"], prompts=str(prompts), baselines=["ar"], repeats=1, max_new_tokens=6))
    other = Method("llama-cpp", "-", "llama.cpp", lambda *a: None, exact=False)
    result.methods.append(other)
    result.samples["llama-cpp"] = [[[Sample([1, 2, 3], 0.1, [], None) for _ in turns] for turns in result.samples["ar"][0]]]
    run = summarise(result)["runs"][-1]
    assert run["outputs_match_ar"] is False and run["expected_to_match_ar"] is False
    assert 0 <= run["agreement_with_ar"] < 1 and summarise(result)["runs"][0]["agreement_with_ar"] == 1.0
    assert all(r["expected_to_match_ar"] for r in summarise(result)["runs"][:-1])


def profile_script():
    return load_script("profile_llama_cpp")


def test_the_llama_cpp_profile_script_times_q_tokens_over_c_cached(monkeypatch, capsys):
    """scripts/profile_llama_cpp.py: each forward starts from C cached entries and evaluates Q tokens."""
    import sys
    import types

    evaluated = []

    class Llama:
        def __init__(self, model_path, **kwargs):
            self.n_tokens, self.kwargs = 0, kwargs

        def reset(self):
            self.n_tokens = 0

        def eval(self, tokens):
            evaluated.append((self.n_tokens, len(tokens)))
            self.n_tokens += len(tokens)

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=Llama))
    assert profile_script().main(["m.gguf", "--queries", "1,4", "--contexts", "8", "--threads", "2", "--repeats", "2"]) == 0
    assert evaluated == [(0, 8)] + [(8, 1)] * 3 + [(8, 4)] * 3  # the context once, then a warm-up and 2 repeats per Q
    out = capsys.readouterr().out
    assert "over 8 cached entries" in out and "t(Q)/t(1)" in out


def test_the_llama_cpp_profile_script_without_the_extra_is_one_line(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    assert profile_script().main(["m.gguf"]) == 2
    assert capsys.readouterr().err.strip() == "error: this script needs llama-cpp-python: pip install 'specdec[llamacpp]'"


def test_against_commit_runs_both_checkouts_alternating(monkeypatch, tmp_path, capsys):
    """scripts/against_commit.py, with this checkout as the other too: every repeat runs both, in
    alternating order, and each config's ratio to `ar` is printed per repeat and as medians."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    module = load_script("against_commit")
    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert module.main([str(root), str(root / "configs" / "chain.yaml"), "--repeats", "2", "--limit", "2", "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines[:4]] == [["0", "this"], ["0", "other"], ["1", "other"], ["1", "this"]]
    assert [line.split()[0] for line in lines[4:]] == ["this", "other"] and all("'chain':" in line for line in lines[4:])
    assert not list(tmp_path.glob("against_commit_*.json"))  # the prompt file is removed
