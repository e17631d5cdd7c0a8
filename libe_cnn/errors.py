"""Errors that are the user's to fix: printed as one line, exit code 2."""


class UserError(Exception):
    """Bad input or environment; the message says what is wrong and what to do."""


class CannotWrite(Exception):
    """A file of the run could not be written (a full disk, a quota, a read-only mount)."""

    def __init__(self, path, reason: str) -> None:
        super().__init__(f"cannot write {path}: {reason}")


def os_error_in(error: BaseException) -> OSError | None:
    """The OSError behind `error`, if one is in its chain (torch reports a failed write as a RuntimeError)."""
    while error is not None:
        if isinstance(error, OSError):
            return error
        error = error.__cause__ or error.__context__
    return None
