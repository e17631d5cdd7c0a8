"""Errors that are the user's to fix: printed as one line, exit code 2."""


class UserError(Exception):
    """Bad input or environment; the message says what is wrong and what to do."""
