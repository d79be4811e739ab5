"""Errors the user can fix: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input or usage: the message names the file or option and what to do."""
