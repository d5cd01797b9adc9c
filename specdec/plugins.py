"""The plugin manager and the registries of strategies and backends built from it.

Built-in components are registered through the same manager as third-party plugins (entry-point
group `specdec`). `SPECDEC_LOAD_PLUGINS` is an allow-list of distribution names to load (comma
separated; empty loads none); unset, every installed plugin is loaded.
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


@functools.lru_cache(maxsize=None)
def get_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("specdec")
    pm.add_hookspecs(hookspecs)
    for module in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module), name=module)
    _load_entry_points(pm)
    pm.check_pending()
    return pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    allowed = os.environ.get("SPECDEC_LOAD_PLUGINS")
    allow = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
    for ep in entry_points(group="specdec"):
        dist = ep.dist.name if ep.dist else ep.name
        if allow is not None and dist not in allow:
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
        raise SpecdecError(f"unknown {kind} {name!r}; available: {', '.join(sorted(registry))}")
    return registry[name]


def reload_plugins() -> None:
    """Forget loaded plugins (after installing one, or changing SPECDEC_LOAD_PLUGINS)."""
    for cached in (get_plugin_manager, strategies, backends):
        cached.cache_clear()
