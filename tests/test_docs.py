"""The docs are true: every command, config key and hook is documented; every example runs."""

import inspect
import re
import shlex
from pathlib import Path

import click
import pytest

from specdec import hookspecs, plugins
from specdec.cli import cli, main
from specdec.config import GenerationOptions

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLE_PAGES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def shell_lines(path: Path) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def plugin_hooks(namespace: dict) -> list[str]:
    """Register the example as a plugin with the real hookspecs; pluggy rejects unknown hook
    names and arguments. -> the hooks it implements."""
    import types

    import pluggy

    module = types.ModuleType("example")
    module.__dict__.update(namespace)
    pm = pluggy.PluginManager("specdec")
    pm.add_hookspecs(hookspecs)
    pm.register(module)
    pm.check_pending()
    return [caller.name for caller in pm.get_hookcallers(module) or []]


@pytest.fixture(scope="session")
def pages_set_up() -> set:
    return set()


def command_paths(group: click.Group, prefix: str = "specdec") -> list[str]:
    paths = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            paths += command_paths(command, f"{prefix} {name}")
        else:
            paths.append(f"{prefix} {name}")
    return paths


@pytest.mark.parametrize("command", command_paths(cli))
def test_every_command_has_a_section(command):
    assert f"## {command}\n" in (DOCS / "cli.md").read_text()


def documented_keys() -> set[str]:
    text = "".join((DOCS / page).read_text() for page in ("config.md", "strategies.md", "export.md"))
    return set(re.findall(r"`([a-z_]+)`", text))


def test_every_config_key_is_documented():
    keys = set(GenerationOptions.model_fields)
    for component in [*plugins.strategies().values(), *plugins.backends().values()]:
        if component.plugin.startswith("specdec."):
            keys |= set(component.cls.Options.model_fields)
    assert keys - documented_keys() == set()


def test_every_hook_is_documented_with_its_signature():
    text = (DOCS / "plugins.md").read_text()
    for name, spec in inspect.getmembers(hookspecs, inspect.isfunction):
        signature = ", ".join(inspect.signature(spec).parameters)
        assert f"### {name}({signature})" in text


@pytest.mark.parametrize(
    "page, index",
    [(p, i) for p in EXAMPLE_PAGES for i in range(len(python_blocks(p)))],
    ids=lambda v: v.name if isinstance(v, Path) else str(v),
)
def test_python_examples_run(page, index, repo_mirror, pages_set_up, monkeypatch, capsys):
    monkeypatch.chdir(repo_mirror)
    if page not in pages_set_up:  # the page's own shell setup first, e.g. the export it reads
        pages_set_up.add(page)
        for line in shell_lines(page):
            if line.startswith("specdec export "):
                main(shlex.split(line)[1:])
    namespace: dict = {}
    blocks = python_blocks(page)
    for number, earlier in enumerate(blocks[: index + 1]):  # a page's blocks build on each other
        exec(compile(earlier, f"{page.name}[{number}]", "exec"), namespace)
    source = blocks[index]
    registered = []
    for hook in ("register_strategies", "register_backends"):
        if hook in namespace:
            namespace[hook](registered.append)
    if "register_commands" in namespace:
        group = click.Group("specdec")
        namespace["register_commands"](group)
        registered += list(group.commands)
    hooks = plugin_hooks(namespace)  # a plugin snippet must match the hookspecs exactly
    checks_itself = "\nassert " in source
    later = "".join(blocks[index + 1 :])
    used_later = any(re.search(rf"\b{name}\b", later) for name in re.findall(r"^class (\w+)", source, flags=re.M))
    assert registered or hooks or "decoder" in namespace or checks_itself or used_later, "the example neither decoded, registered nor checked anything"
