"""The plugin manager and the registries of strategies and backends built from it.

Built-in components are registered through the same manager as third-party plugins (entry-point
group `specdec`). `SPECDEC_LOAD_PLUGINS` is an allow-list of distribution names to load (comma
separated; empty loads none); unset, every installed plugin is loaded. `SPECDEC_BLOCK_PLUGINS`
names distributions never to load.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from importlib.metadata import entry_points

import pluggy

from specdec import hookspecs
from specdec.errors import SpecdecError

BUILTIN_PLUGINS = ("specdec.strategies", "specdec.backends")
# Components of plugin packages kept in this repository, named when they are not installed.
KNOWN_PLUGINS = {"prompt_lookup": ("specdec-prompt-lookup", "./plugins/specdec-prompt-lookup")}


@functools.lru_cache(maxsize=None)
def get_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("specdec")
    pm.add_hookspecs(hookspecs)
    for module in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module), name=module)
    _load_entry_points(pm)
    pm.check_pending()
    return pm


def _names(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    return None if value is None else {name.strip() for name in value.split(",") if name.strip()}


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    allow, block = _names("SPECDEC_LOAD_PLUGINS"), _names("SPECDEC_BLOCK_PLUGINS") or set()
    for ep in entry_points(group="specdec"):
        dist = ep.dist.name if ep.dist else ep.name
        if (allow is not None and dist not in allow) or dist in block:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must name itself
            raise SpecdecError(f"plugin {dist!r} ({ep.value}) failed to load: {exc}") from exc
        pm.register(plugin, name=dist)


@dataclass(frozen=True)
class Component:
    name: str
    cls: type
    plugin: str  # name of the plugin that registered it


def _collect(hook_name: str, kind: str) -> dict[str, Component]:
    pm = get_plugin_manager()
    found: dict[str, Component] = {}
    for impl in getattr(pm.hook, hook_name).get_hookimpls():  # in registration order

        def register(cls, _plugin=impl.plugin_name):
            name = getattr(cls, "name", None)
            if not isinstance(name, str) or not hasattr(cls, "Options"):
                raise SpecdecError(f"plugin {_plugin!r} registered {cls!r} without a `name` and `Options`")
            if name in found:
                raise SpecdecError(
                    f"{kind} {name!r} is registered twice, by {found[name].plugin!r} and {_plugin!r}"
                )
            found[name] = Component(name, cls, _plugin)

        _call(impl, hook_name, register=register)
    return found


def _call(impl, hook_name: str, **kwargs) -> None:
    """Call one plugin's hook; an exception inside it names the plugin."""
    try:
        impl.function(**{name: kwargs[name] for name in impl.argnames})
    except SpecdecError:
        raise
    except Exception as exc:
        raise SpecdecError(f"plugin {impl.plugin_name!r} failed in {hook_name}: {exc}") from exc


def notify(hook_name: str, **kwargs) -> None:
    """Call every plugin's observer hook `hook_name` (on_generation_start, on_step, ...)."""
    for impl in getattr(get_plugin_manager().hook, hook_name).get_hookimpls():
        _call(impl, hook_name, **kwargs)


@functools.lru_cache(maxsize=None)
def strategies() -> dict[str, Component]:
    return _collect("register_strategies", "strategy")


@functools.lru_cache(maxsize=None)
def backends() -> dict[str, Component]:
    return _collect("register_backends", "backend")


def get_strategy(name: str) -> Component:
    return _lookup(strategies(), name, "strategy")


def get_backend(name: str) -> Component:
    return _lookup(backends(), name, "backend")


def _lookup(registry: dict[str, Component], name: str, kind: str) -> Component:
    if name not in registry:
        hint = ""
        if name in KNOWN_PLUGINS:
            package, path = KNOWN_PLUGINS[name]
            hint = f"; it is provided by the plugin package {package} (pip install {path}), which is not loaded"
        raise SpecdecError(f"unknown {kind} {name!r}; available: {', '.join(sorted(registry))}{hint}")
    return registry[name]


def describe_plugins() -> list[dict]:
    """Every loaded plugin: its distribution and version, its hooks, what it registered."""
    from importlib.metadata import PackageNotFoundError, version

    from specdec import __version__

    pm = get_plugin_manager()
    rows = []
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin)
        builtin = name in BUILTIN_PLUGINS
        try:
            dist_version = __version__ if builtin else version(name)
        except PackageNotFoundError:  # registered in code rather than installed
            dist_version = None
        rows.append({
            "name": name, "distribution": "specdec" if builtin else name, "version": dist_version,
            "hooks": sorted(caller.name for caller in pm.get_hookcallers(plugin) or []),
            "strategies": sorted(c.name for c in strategies().values() if c.plugin == name),
            "backends": sorted(c.name for c in backends().values() if c.plugin == name),
        })
    return sorted(rows, key=lambda row: (row["distribution"] != "specdec", row["name"]))


def reload_plugins() -> None:
    """Forget loaded plugins (after installing one, or changing SPECDEC_LOAD_PLUGINS)."""
    for cached in (get_plugin_manager, strategies, backends):
        cached.cache_clear()
