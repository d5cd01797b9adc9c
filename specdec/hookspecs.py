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


@hookspec
def on_generation_start(decoder, prompt_ids):
    """Called before each generation: ``decoder`` is the ``SpeculativeDecoder``, ``prompt_ids`` the
    prompt as token ids."""


@hookspec
def on_step(stats):
    """Called after each verified step with its ``specdec.metrics.StepStats`` (drafted nodes,
    accepted tokens, draft forwards, timings)."""


@hookspec
def on_generation_end(decoder, output):
    """Called after each generation with its ``GenerationOutput`` (token ids, text, metrics)."""
