"""Built-in strategies, registered through the plugin manager like any third-party plugin."""

from specdec.hookspecs import hookimpl


@hookimpl
def register_strategies(register):
    from specdec.strategies.autoregressive import AutoregressiveStrategy
    from specdec.strategies.chain import ChainStrategy
    from specdec.strategies.dyspec import DySpecStrategy
    from specdec.strategies.gsd import GSDStrategy
    from specdec.strategies.hybrid import HybridStrategy
    from specdec.strategies.static_tree import StaticTreeStrategy

    for strategy in (AutoregressiveStrategy, ChainStrategy, StaticTreeStrategy, GSDStrategy, DySpecStrategy, HybridStrategy):
        register(strategy)
