"""Errors shared by every layer. Errors that mean "the user asked for something we cannot do" (exit code 2, one line)."""


class UserError(ValueError):
    """Bad input, found before any heavy work. The CLI prints it on one line and exits with 2."""
