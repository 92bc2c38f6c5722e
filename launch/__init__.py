"""Launchers and the `unison` command line."""
