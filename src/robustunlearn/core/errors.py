"""User-facing errors: the CLI prints their message on one line and exits with code 2, no traceback."""


class UserError(Exception):
    """Bad input from the user (an unknown name, a missing path, a malformed config)."""
