"""The one exception type that reaches users as a one-line message."""


class MmsrError(Exception):
    """A user-facing error: bad input, bad option, stage order. Printed as one line, exit 2.

    The message names the file (and field or line) or the option at fault, and what to do.
    """

    exit_code = 2
