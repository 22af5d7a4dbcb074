"""The error a user can fix (a file, a folder, an option), which the `freevlm` command prints as one line with exit
code 2 instead of a traceback. It lives below every layer, so that the library raises it and the command (`cli.py`)
and its subcommands (`commands/`) read it without importing each other."""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user gave: printed by the command as one line, exit code 2, no traceback."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named is not there (still a `FileNotFoundError` to library callers)."""
