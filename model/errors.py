"""The one shape of an error the model side hands to its callers: a stable ``code`` for programs
(the API's error codes, the CLI's messages) and a ``message`` for a person."""

from __future__ import annotations


class CodedError(Exception):
    """An error with a stable ``code`` and a ``message`` a person can act on."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
