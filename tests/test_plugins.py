"""Plugin wiring: built-ins and third-party plugins go through one pluggy manager."""

import json

import pytest

from specdec import hookimpl, plugins
from specdec.cli import main
from specdec.errors import SpecdecError
from specdec.strategies.chain import ChainOptions, ChainStrategy

FAKE_PLUGIN = '''
import click
from specdec import hookimpl
from specdec.strategies.chain import ChainStrategy


class EchoChain(ChainStrategy):
    name = "echo_chain"


@hookimpl
def register_strategies(register):
    register(EchoChain)


@hookimpl
def register_commands(cli):
    @cli.command()
    def hello():
        click.echo("hello from a plugin")
'''


@pytest.fixture(autouse=True)
def fresh_plugins():
    plugins.reload_plugins()
    yield
    plugins.reload_plugins()


@pytest.fixture
def fake_distribution(tmp_path, monkeypatch):
    """An installed distribution `fake-specdec-plugin` exposing a module under group `specdec`."""
    (tmp_path / "fake_specdec_plugin.py").write_text(FAKE_PLUGIN)
    info = tmp_path / "fake_specdec_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-specdec-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[specdec]\nfake = fake_specdec_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("SPECDEC_LOAD_PLUGINS", raising=False)


def test_builtins_are_registered_through_the_manager():
    pm = plugins.get_plugin_manager()
    assert {"specdec.strategies", "specdec.backends"} <= {pm.get_name(p) for p in pm.get_plugins()}
    assert plugins.get_strategy("chain").plugin == "specdec.strategies"
    assert plugins.get_backend("pytorch").plugin == "specdec.backends"


def test_entry_point_plugin_adds_a_strategy_and_a_command(fake_distribution, capsys):
    assert plugins.get_strategy("echo_chain").plugin == "fake-specdec-plugin"
    main(["hello"])  # returns on success (exit status 0)
    assert capsys.readouterr().out == "hello from a plugin\n"


@pytest.mark.parametrize("allow, loaded", [("", False), ("other-dist", False), ("fake-specdec-plugin", True)])
def test_allow_list_decides_which_plugins_load(fake_distribution, monkeypatch, allow, loaded):
    monkeypatch.setenv("SPECDEC_LOAD_PLUGINS", allow)
    assert ("echo_chain" in plugins.strategies()) == loaded
    assert "chain" in plugins.strategies()  # built-ins always load


class Duplicate:
    @hookimpl
    def register_strategies(self, register):
        register(ChainStrategy)


class Broken:
    @hookimpl
    def register_strategies(self, register):
        raise RuntimeError("boom")


def test_a_name_registered_twice_names_both_plugins():
    plugins.get_plugin_manager().register(Duplicate(), name="dup-plugin")
    with pytest.raises(SpecdecError, match="strategy 'chain' is registered twice, by 'specdec.strategies' and 'dup-plugin'"):
        plugins.strategies()


def test_a_plugin_raising_in_a_hook_is_named():
    plugins.get_plugin_manager().register(Broken(), name="broken-plugin")
    with pytest.raises(SpecdecError, match="plugin 'broken-plugin' failed in register_strategies: boom"):
        plugins.strategies()


def test_plugin_options_are_validated_by_the_plugins_model(fake_distribution):
    from specdec.config import resolve

    raw = {"target": {"model": "t"}, "draft": {"model": "d"}, "strategy": {"name": "echo_chain", "k": 0}}
    with pytest.raises(SpecdecError, match="strategy.k: Value error, expected a whole number from 1 to 256, or auto"):
        resolve(raw)
    assert resolve({**raw, "strategy": {"name": "echo_chain"}}).strategy.options == ChainOptions()


class Recorder:
    def __init__(self):
        self.events = []

    @hookimpl
    def on_generation_start(self, decoder, prompt_ids):
        self.events.append(("start", list(prompt_ids)))

    @hookimpl
    def on_step(self, stats):
        self.events.append(("step", stats.accepted))

    @hookimpl
    def on_generation_end(self, decoder, output):
        self.events.append(("end", output.metrics.steps))


def test_observers_see_every_generation_and_every_step(models):
    from helpers import make_decoder

    recorder = Recorder()
    plugins.get_plugin_manager().register(recorder, name="recorder")
    out = make_decoder(models("llama", 0), models("llama", 0), "chain", k=3).generate([3, 4, 5], max_new_tokens=21)
    steps = [accepted for kind, accepted in recorder.events if kind == "step"]
    assert recorder.events[0] == ("start", [3, 4, 5]) and recorder.events[-1] == ("end", out.metrics.steps)
    assert len(steps) == out.metrics.steps == 5 and sum(steps) == out.metrics.accepted_tokens


def test_an_observer_raising_is_named(models):
    from helpers import make_decoder

    class Raising:
        @hookimpl
        def on_step(self, stats):
            raise ValueError("bad stats")

    plugins.get_plugin_manager().register(Raising(), name="raising-plugin")
    with pytest.raises(SpecdecError, match="plugin 'raising-plugin' failed in on_step: bad stats"):
        make_decoder(models("llama", 0), models("llama", 0), "chain").generate([3, 4], max_new_tokens=5)


def test_a_plugin_registers_a_backend():
    from specdec.testing import TableBackend

    class NamedTable(TableBackend):
        name = "named_table"

    class BackendPlugin:
        @hookimpl
        def register_backends(self, register):
            register(NamedTable)

    plugins.get_plugin_manager().register(BackendPlugin(), name="backend-plugin")
    component = plugins.get_backend("named_table")
    assert component.cls is NamedTable and component.plugin == "backend-plugin"


def test_every_hookspec_has_a_test_implementing_it():
    import inspect
    from pathlib import Path

    from specdec import hookspecs

    source = Path(__file__).read_text()
    for name, _ in inspect.getmembers(hookspecs, inspect.isfunction):
        assert f"def {name}(" in source, f"hook {name} has no test implementing it"


def test_plugins_command_lists_builtin_and_installed_plugins(fake_distribution, capsys):
    main(["plugins", "--json"])
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["specdec.strategies"]["strategies"] == ["ar", "chain", "dyspec", "gsd", "hybrid", "static_tree"]
    assert rows["specdec.backends"]["hooks"] == ["register_backends"]
    fake = rows["fake-specdec-plugin"]
    assert fake["version"] == "0.1" and fake["hooks"] == ["register_commands", "register_strategies"]
    assert fake["strategies"] == ["echo_chain"]
    main(["plugins"])
    assert "fake-specdec-plugin (fake-specdec-plugin 0.1): hooks register_commands, register_strategies" in capsys.readouterr().out


def test_a_blocked_plugin_is_not_loaded(fake_distribution, monkeypatch):
    monkeypatch.setenv("SPECDEC_BLOCK_PLUGINS", "fake-specdec-plugin")
    assert "echo_chain" not in plugins.strategies()
    assert "fake-specdec-plugin" not in {row["name"] for row in plugins.describe_plugins()}
