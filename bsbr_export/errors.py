"""The one error type that means "the user asked for something we cannot do"."""


class UserError(ValueError):
    """A mistake in what the user asked for: bad config, missing file, wrong shape.

    The message is one line that says what is wrong and how to fix it. The CLI prints
    it to stderr and exits with status 2; any other exception keeps its traceback.
    """


class Busy(UserError):
    """A request a server cannot take now (it holds as many sequences, or state bytes, as
    its limits allow): the same request succeeds once others end. Servers answer it as
    "retry later" (HTTP 429), where any other UserError is the request's own fault (400)."""
