"""The command line: run, --json, config show/schema, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import pytest

from helpers import hf_greedy
from specdec.cli import main


def run_cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
        sys.exit(0)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_run_json_matches_target_greedy(capsys, write_config, models):
    code, out, _ = run_cli(capsys, "run", str(write_config()), "--prompt-ids", "3,17,42", "--json", "--max-new-tokens", "25")
    assert code == 0
    result = json.loads(out)
    assert result["token_ids"] == hf_greedy(models("llama", 0), [3, 17, 42], 25)
    assert result["text"] is None  # the tiny models have no tokenizer
    assert result["metrics"]["new_tokens"] == 25 and result["metrics"]["mean_accepted_length"] >= 1.0


def test_run_prints_tokens_and_a_summary(capsys, write_config):
    code, out, err = run_cli(capsys, "run", str(write_config()), "--prompt-ids", "3,17", "-o", "strategy.k=2")
    assert code == 0
    assert len(out.split()) == 20
    assert "20 tokens in" in err and "mean accepted length" in err
    assert len(err.split("acceptance by draft position ")[1].split()) == 2  # k = 2: positions 1 and 2


def test_config_show_prints_defaults(capsys, write_config):
    code, out, _ = run_cli(capsys, "config", "show", str(write_config()), "-o", "strategy.k=5")
    assert code == 0
    assert "k: 5" in out and "adaptive: false" in out and "attn_implementation: sdpa" in out


def test_config_schema_covers_registered_components(capsys):
    code, out, _ = run_cli(capsys, "config", "schema")
    schema = json.loads(out)
    text = json.dumps(schema)
    assert code == 0 and '"chain"' in text and '"pytorch"' in text and "max_new_tokens" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["-o", "target.model=/nonexistent/model"], "model path '/nonexistent/model' does not exist"),
        (["-o", "strategy.name=nope"], "unknown strategy 'nope'; available: ar, chain, dyspec, gsd, hybrid, static_tree"),
        (["-o", "draft.backend=nope"], "unknown backend 'nope'"),
        (["-o", "strategy.depth=3"], "strategy 'chain' has no option 'depth' (strategy.depth is set with -o); "
                                     "its options: k, adaptive, min_k, max_k"),
        (["-o", "strategy.name=ar"], "strategy 'ar' has no option 'k' (strategy.k is set in "),
        (["-o", "strategy.name=ar"], "To replace the whole section, use -o 'strategy={name: ar}'"),
        (["-o", "strategy.k=[1"], "value is not valid YAML"),
        (["-o", "generation.temperature=hot"], "generation.temperature: Input should be a valid number"),
        (["-o", "draft.model={other_vocab}"], "draft and target vocabularies differ (80 vs 96 tokens)"),
        (["--prompt-ids", ",".join(["1"] * 600)], "the prompt is 600 tokens, longer than the target's context of 512"),
        (["--max-new-tokens", "100000"], "lower max_new_tokens to at most 509"),
        (["--prompt", "hello"], "the target model has no tokenizer; pass token ids"),
        (["--prompt-ids", "1,x"], "'1,x' is not a comma-separated list of integers"),
        (["--prompt-ids", "1000"], "prompt token 1000 is outside the vocabulary (0..95)"),
    ],
)
def test_bad_input_gives_one_clear_line(capsys, write_config, model_dirs, args, message):
    args = [a.format(other_vocab=model_dirs / "other_vocab") for a in args]
    if "--prompt-ids" not in args and "--prompt" not in args:
        args += ["--prompt-ids", "1,2,3"]
    code, out, err = run_cli(capsys, "run", str(write_config()), *args)
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert out == ""


def test_a_truncated_weights_file_is_one_line(capsys, write_config, model_dirs, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dirs / "target", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, out, err = run_cli(capsys, "run", str(write_config(target={"model": str(broken)})), "--prompt-ids", "1,2")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("error: could not load model") and "truncated or corrupt" in err


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", str(tmp_path / "nope.yaml"), "--prompt-ids", "1")
    assert code != 0 and err == f"error: config file '{tmp_path / 'nope.yaml'}' does not exist\n"


def test_usage_error_is_one_line(capsys, write_config):
    code, _, err = run_cli(capsys, "run", str(write_config()))
    assert code == 2 and err == "error: give exactly one of --prompt TEXT, --prompt-ids 1,2,3 or --prompts FILE (see --help)\n"


def test_entry_point_help_does_not_import_torch():
    code = "import sys\nfrom specdec.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "SPECDEC_LOAD_PLUGINS"}  # installed plugins load too
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert "Usage: specdec" in result.stdout and result.stdout.strip().endswith("False")


def test_entry_point_error_has_no_traceback_unless_debug(write_config):
    args = [sys.executable, "-m", "specdec", "run", str(write_config()), "--prompt-ids", "1", "-o", "strategy.name=nope"]
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    debug = subprocess.run(args[:3] + ["--debug"] + args[3:], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_run_streams_text_equal_to_the_json_text(capsys, repo_mirror, monkeypatch):
    monkeypatch.chdir(repo_mirror)
    args = ["run", "configs/quickstart.yaml", "--prompt", "def fib(n):", "--max-new-tokens", "30"]
    _, streamed, _ = run_cli(capsys, *args)
    _, as_json, _ = run_cli(capsys, *args, "--json")
    assert streamed == json.loads(as_json)["text"] + "\n"


def test_unreachable_hub_id_is_one_line(write_config):
    args = [sys.executable, "-m", "specdec", "run", str(write_config()), "--prompt-ids", "1", "-o", "target.model=nobody/nomodel"]
    result = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    assert result.stderr.startswith("error: could not load model 'nobody/nomodel'") and result.stderr.count("\n") == 1
