"""The one exception type escoin raises."""


class EscoinError(ValueError):
    """Any escoin failure: bad arguments (the message names the argument and what was expected)
    or an error reported by the CUDA runtime.

    It subclasses ValueError because most failures are bad values handed in by the caller.
    """
