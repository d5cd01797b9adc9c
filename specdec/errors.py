"""User-facing errors: one clear line saying what is wrong and how to fix it."""


class SpecdecError(Exception):
    """An error caused by the user's input (config, model path, prompt); the CLI prints it as one
    line without a traceback."""
