"""The one way a subcommand gives up: a message for `Error: ...` on stderr, and status 1."""


class CommandError(Exception):
    """What went wrong, in the user's terms (no traceback is shown)."""
