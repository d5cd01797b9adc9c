"""Configs: defaults from each component's options model, overrides, clear errors."""

from pathlib import Path

import pytest

from specdec.config import load_config
from specdec.errors import SpecdecError


def test_defaults_come_from_the_options_models(write_config):
    cfg = load_config(write_config())
    assert cfg.strategy.to_dict() == {"name": "chain", "k": 3, "adaptive": False, "min_k": 1, "max_k": 16}
    assert cfg.target.backend == "pytorch" and cfg.target.options.device == "cpu"
    assert cfg.generation.temperature == 0.0 and cfg.generation.max_new_tokens == 20


def test_dotted_overrides_are_parsed_as_yaml(write_config):
    cfg = load_config(
        write_config(),
        ["strategy.k=6", 'generation.stop=["\\n\\n", "def "]', "generation.temperature=0.5", "target.dtype=bfloat16"],
    )
    assert cfg.strategy.options.k == 6
    assert cfg.generation.stop == ["\n\n", "def "]
    assert cfg.generation.temperature == 0.5
    assert cfg.target.options.dtype == "bfloat16"


def test_relative_model_paths_resolve_next_to_the_config(tmp_path, model_dirs):
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "c.yaml"
    path.write_text(f"target: {{model: ../m/target}}\nstrategy: {{name: chain}}\ndraft: {{model: {model_dirs / 'draft'}}}\n")
    (tmp_path / "m").symlink_to(model_dirs)
    assert load_config(path).target.model == str(tmp_path / "cfg" / "../m/target")


@pytest.mark.parametrize(
    "sections, overrides, message",
    [
        ({}, ["strategy.kk=3"], r"strategy 'chain' has no option 'kk' \(strategy.kk is set with -o\); its options: k, adaptive, min_k, max_k"),
        ({}, ["strategy.k=many"], r"strategy.k: Value error, expected a whole number from 1 to 256, or auto \(got 'many'\)"),
        ({}, ["strategy.k=0"], r"strategy.k: Value error, expected a whole number from 1 to 256, or auto \(got 0\)"),
        ({}, ["strategy.name=nope"], r"strategy.name: unknown strategy 'nope'; available: ar, chain, dyspec, gsd, hybrid, static_tree"),
        ({}, ["target.backend=nope"], r"target.backend: unknown backend 'nope'; available: onnxruntime, pytorch"),
        ({}, ["target.dtype=float8"], r"target.dtype: Input should be 'float32', 'float16', 'bfloat16' or 'auto'"),
        ({}, ["generation.top_p=1.5"], r"generation.top_p: Input should be less than or equal to 1"),
        ({}, ["sampling.x=1"], r"unknown section 'sampling'; allowed: target, draft, strategy, generation"),
        ({"draft": None}, [], r"strategy 'chain' needs a draft model; add a `draft:` section"),
        ({"target": {"backend": "pytorch"}}, [], r"target.model is required"),
        ({}, ["strategy.adaptive=true", "strategy.k=20"], r"adaptive k needs min_k <= k <= max_k"),
    ],
)
def test_bad_configs_name_the_file_and_the_key(write_config, sections, overrides, message):
    path = write_config(**sections)
    with pytest.raises(SpecdecError, match=message) as info:
        load_config(path, overrides)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_malformed_override(write_config):
    with pytest.raises(SpecdecError, match=r"override 'strategy.k' must look like KEY=VALUE, e.g. strategy.k=6"):
        load_config(write_config(), ["strategy.k"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(SpecdecError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("target: [unclosed\n")
    with pytest.raises(SpecdecError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert config.target.model and config.strategy.name
