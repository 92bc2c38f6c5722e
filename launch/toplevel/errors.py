"""Errors shared by every layer; the CLI prints each on one line (exit 2: bad input; exit 1: a peer rank failed)."""


class UserError(ValueError):
    """Bad input, found before any heavy work. The CLI prints it on one line and exits with 2."""


class PeerFailed(RuntimeError):
    """Another rank failed, and this rank stopped because of it; the message names that rank."""
