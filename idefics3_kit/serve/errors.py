"""Errors a client can cause, in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every module of the server raises ``APIError`` for a bad request; the app turns it into the JSON
body and status. Keeping it free of FastAPI lets the request parsing be tested without a server.
"""

from __future__ import annotations


class APIError(Exception):
    """A request the server refuses: an HTTP status and a message that names the problem."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _default_type(status)
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _default_type(status: int) -> str:
    """OpenAI's error types by status (what its clients map to exception classes)."""
    return {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_exceeded",
            503: "service_unavailable", 504: "timeout"}.get(status, "invalid_request_error" if status < 500
                                                                 else "server_error")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)
