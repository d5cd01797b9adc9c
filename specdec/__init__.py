"""specdec: lossless speculative decoding with pluggable strategies and backends.

The names below are imported lazily so that `specdec --help` and config handling do not import
torch.
"""

from specdec.errors import SpecdecError
from specdec.hookspecs import hookimpl

__version__ = "0.1.0"

_LAZY = {
    "load_config": "specdec.config",
    "Config": "specdec.config",
    "SpeculativeDecoder": "specdec.decoder",
    "GenerationOutput": "specdec.decoder",
    "DraftTree": "specdec.tree",
    "Verdict": "specdec.tree",
    "StepStats": "specdec.metrics",
    "GenerationMetrics": "specdec.metrics",
    "Strategy": "specdec.strategies.base",
    "StrategyOptions": "specdec.strategies.base",
    "Backend": "specdec.backends.base",
    "BackendOptions": "specdec.backends.base",
}

__all__ = ["SpecdecError", "hookimpl", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'specdec' has no attribute {name!r}")
