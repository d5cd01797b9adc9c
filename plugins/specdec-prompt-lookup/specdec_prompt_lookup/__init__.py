"""specdec plugin: the `prompt_lookup` strategy. The strategy module (and torch) is imported only
when strategies are registered, so `specdec --help` stays light."""

from specdec import hookimpl


@hookimpl
def register_strategies(register):
    from specdec_prompt_lookup.strategy import PromptLookupStrategy

    register(PromptLookupStrategy)
