"""Typed errors the scheduler raises for bad requests; the ingress maps them to HTTP 4xx."""
from __future__ import annotations


class SchedulingError(ValueError):
    """A request the scheduler will not take. `code` is the OpenAI-style error code."""

    status = 400
    code = "invalid_request_error"


class RequestTooLong(SchedulingError):
    """Prompt plus max_tokens can never fit in one model actor's KV cache or context."""

    code = "context_length_exceeded"


class RetryLater(SchedulingError):
    """Refused for now, not for what the request is: the ingress adds `Retry-After`."""

    retry_after_s = 1.0

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s


class QueueFull(RetryLater):
    """The admission queue is full; retry later."""

    status = 429
    code = "rate_limit_exceeded"


class DuplicateRequest(SchedulingError):
    code = "duplicate_request_id"


class NoWorker(RetryLater):
    """Every model actor that could serve the request is down; retry later."""

    status = 503
    code = "service_unavailable"
    retry_after_s = 5.0
