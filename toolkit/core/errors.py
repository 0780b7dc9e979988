"""User-facing errors: the CLI prints them as one line and exits with code 2 (no traceback)."""


class BedsideError(Exception):
    """A problem with the user's input: say what was wrong and how to fix it, in one line."""

    exit_code = 2


class NothingFitsError(BedsideError):
    """The planner found no candidate within the device budget (exit code 3)."""

    exit_code = 3
