"""Plugin hook specifications. Implement them with `@specdec.hookimpl` in a module that your
distribution exposes under the entry-point group `specdec`."""

import pluggy

hookspec = pluggy.HookspecMarker("specdec")
hookimpl = pluggy.HookimplMarker("specdec")


@hookspec
def register_strategies(register):
    """Register draft-structure strategies.

    Call ``register(StrategyClass)`` once per class; the class subclasses
    ``specdec.strategies.base.Strategy`` and sets ``name`` (the config's ``strategy.name``) and
    ``Options`` (a ``StrategyOptions`` pydantic model, the only source of its defaults).
    """


@hookspec
def register_backends(register):
    """Register execution backends.

    Call ``register(BackendClass)`` once per class; the class subclasses
    ``specdec.backends.base.Backend`` and sets ``name`` (the config's ``backend``) and ``Options``
    (a ``BackendOptions`` pydantic model).
    """


@hookspec
def register_commands(cli):
    """Add commands to the ``specdec`` command line: ``cli`` is its ``click.Group``."""
