"""User-facing errors: the CLI prints their message on one line and exits with code 2, no traceback."""


class UserError(Exception):
    """Bad input from the user (an unknown name, a missing path, a malformed config)."""


class SettingsError(UserError, ValueError):
    """A setting a library rejected when it was used (an optimizer's option value, say): a user
    error for the CLI, and still a ValueError for code that calls the library directly."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its repr when the message is empty), for one-line errors."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else repr(error)
