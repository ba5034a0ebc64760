"""The one error type the evaluation and training commands turn into a clear message and exit code 2."""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input from the user (files, flags, variant definitions): shown as one line, no traceback."""
