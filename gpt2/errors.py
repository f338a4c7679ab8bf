"""Errors the user can fix; entry points print them as one line instead of a traceback."""


class UserError(Exception):
    """A problem with input, data or environment that the user can fix. Exit status 1."""

    exit_code = 1


class ConfigError(UserError):
    """An invalid flag or flag combination, caught before any expensive work. Exit status 2."""

    exit_code = 2
