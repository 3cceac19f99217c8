"""Typed errors the scheduler raises for bad requests; the ingress maps them to HTTP 4xx."""
from __future__ import annotations


class SchedulingError(ValueError):
    """A request the scheduler will not take. `code` is the OpenAI-style error code."""

    status = 400
    code = "invalid_request_error"


class RequestTooLong(SchedulingError):
    """Prompt plus max_tokens can never fit in one model actor's KV cache or context."""

    code = "context_length_exceeded"


class QueueFull(SchedulingError):
    """The admission queue is full; retry later."""

    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DuplicateRequest(SchedulingError):
    code = "duplicate_request_id"


class NoWorker(SchedulingError):
    """Every model actor that could serve the request is down; retry later."""

    status = 503
    code = "service_unavailable"

    def __init__(self, message: str, retry_after_s: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
