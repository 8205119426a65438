"""The error a handler raises to answer with a status of its choosing."""

from __future__ import annotations


class ApiError(Exception):
    """Raised by a handler to answer with ``status_code`` and a JSON message."""

    def __init__(self, status_code: int, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.headers = headers
