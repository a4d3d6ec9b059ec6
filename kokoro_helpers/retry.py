"""Which errors from an OpenAI(-compatible) API are worth retrying — one rule for every caller
(the fine-tuning monitor, the evaluation's generation, the judge)."""
from __future__ import annotations

TRANSIENT_STATUS = (408, 409, 425, 429)


def is_transient_error(exc: BaseException) -> bool:
    """Worth retrying: rate limits (429), timeouts, conflicts, connection errors and server errors
    (5xx), from the openai SDK or any client raising the builtin TimeoutError / ConnectionError."""
    try:
        import openai
        if isinstance(exc, (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                            openai.APIConnectionError)):
            return True
        if isinstance(exc, openai.APIStatusError):
            return exc.status_code in TRANSIENT_STATUS or exc.status_code >= 500
    except ImportError:  # pragma: no cover - openai is a dependency
        pass
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    status = getattr(exc, "status_code", None)
    return isinstance(status, int) and (status in TRANSIENT_STATUS or status >= 500)
