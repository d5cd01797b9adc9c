"""Built-in strategies, registered through the plugin manager like any third-party plugin."""

from specdec.hookspecs import hookimpl


@hookimpl
def register_strategies(register):
    from specdec.strategies.chain import ChainStrategy

    register(ChainStrategy)
