"""The one exception type that the CLI turns into a clear message and a non-zero exit."""


class PrunekitError(ValueError):
    """Bad input or an impossible request: the message says what was wrong and how to fix it."""
