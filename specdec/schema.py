"""JSON schema of configs, built from the options models of every registered component."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import TypeAdapter, create_model

from specdec import plugins
from specdec.config import DEFAULT_BACKEND, GenerationOptions


def config_schema() -> dict:
    strategy_models = [
        create_model(f"{c.cls.__name__}Config", __base__=c.cls.Options, name=(Literal[name], ...))
        for name, c in sorted(plugins.strategies().items())
    ]
    model_models = [
        create_model(
            f"{c.cls.__name__}ModelConfig",
            __base__=c.cls.Options,
            model=(str, ...),
            backend=(Literal[name], name if name == DEFAULT_BACKEND else ...),
        )
        for name, c in sorted(plugins.backends().items())
    ]
    sections = create_model(
        "SpecdecConfig",
        target=(Union[tuple(model_models)], ...),
        draft=(Union[tuple(model_models)] | None, None),
        strategy=(Union[tuple(strategy_models)], ...),
        generation=(GenerationOptions, GenerationOptions()),
    )
    return TypeAdapter(sections).json_schema()
