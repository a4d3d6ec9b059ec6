"""The OpenAI chat-completions wire protocol of the local server: what a request may ask for
(:class:`Limits`, the request schema), its validation (:func:`parse_chat_request`), and errors in
OpenAI's shape (:class:`APIError`: HTTP status + ``{"error": {message, type, param, code}}``)."""

import math
from dataclasses import dataclass
from typing import Any, Mapping

ROLE_MAP = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
UNSUPPORTED = {"tools": "tool calling", "functions": "function calling", "tool_choice": "tool calling",
               "function_call": "function calling", "audio": "audio output", "prediction": "predicted outputs"}
# sampling fields this server cannot honour: a request that sets them (to anything but their
# no-op value) gets a 400 naming them, instead of a reply that silently ignored them
UNSUPPORTED_SAMPLING = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},),
                        "top_logprobs": (0,), "top_k": (), "min_p": (), "repetition_penalty": (1, 1.0),
                        "best_of": (1,), "web_search_options": ({},), "reasoning_effort": (), "modalities": (["text"],),
                        "logprobs": (False,)}
# accepted and ignored (bookkeeping fields of OpenAI's API that change nothing in the reply)
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
                  "safety_identifier")
SEED_RANGE = (-2**63, 2**64 - 1)             # what torch.manual_seed accepts


@dataclass
class Limits:
    """What one request may ask for; each is a command-line option of ``python -m kokoro_helpers.serve``."""

    max_body_bytes: int = 4 * 1024 * 1024      # --max-body-bytes
    max_messages: int = 2048                   # --max-messages (OpenAI's own limit)
    max_message_chars: int = 200_000           # --max-message-chars
    max_queue: int = 16                        # --max-queue: requests waiting for the model besides the running one
    truncation: str = "disabled"               # --truncation: default when a request does not say ("auto" drops turns)


def _message_schema() -> dict[str, Any]:
    text_part = {"type": "object", "required": ["type", "text"],
                 "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}
    return {"type": "object", "required": ["role"], "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
        "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": text_part}, {"type": "null"}],
                    "description": "text, or a list of text parts (joined)"},
        "name": {"type": "string", "description": "accepted and ignored"}}}


# The request body of POST /v1/chat/completions as OpenAPI (JSON Schema) describes it; the
# endpoint validates by hand (parse_chat_request) so that errors come back in OpenAI's shape.
CHAT_REQUEST_SCHEMA: dict[str, Any] = {
    "title": "ChatCompletionRequest", "type": "object", "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string", "description": "an id of GET /v1/models"},
        "messages": {"type": "array", "minItems": 1, "items": _message_schema(),
                     "description": "the conversation; ends with a user (or system) message"},
        "max_tokens": {"type": "integer", "minimum": 1, "description": "reply length limit (default: --max-tokens)"},
        "max_completion_tokens": {"type": "integer", "minimum": 1, "description": "the same as max_tokens"},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2, "description": "0 = greedy"},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "seed": {"type": "integer", "minimum": -2**63, "maximum": 2**64 - 1,
                 "description": "makes sampling reproducible"},
        "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4},
                           {"type": "null"}]},
        "stream": {"type": "boolean", "default": False, "description": "server-sent events (chat.completion.chunk)"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "n": {"type": "integer", "enum": [1]},
        "response_format": {"type": "object", "properties": {"type": {"type": "string", "enum": ["text"]}}},
        "truncation": {"type": "string", "enum": ["auto", "disabled"],
                       "description": "'auto': drop the oldest turns when the prompt does not fit the context "
                                      "(the reply's 'truncation' field says so); 'disabled' (default): a 400 "
                                      "context_length_exceeded instead"},
        **{k: {"description": "rejected unless it has its no-op value (not supported by this server)"}
           for k in UNSUPPORTED_SAMPLING},
        **{k: {"description": "accepted and ignored"} for k in IGNORED_FIELDS},
    },
}


class APIError(Exception):
    """An error answered as OpenAI does: HTTP status + {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def _content_text(content: Any, i: int) -> str:
    param = f"messages[{i}].content"
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise APIError(400, f"{param}[{j}]: only text parts are supported, got {kind!r}", f"{param}[{j}]",
                               "invalid_type")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, f"{param} must be a string or a list of text parts, got {type(content).__name__}", param,
                   "invalid_type")


def parse_messages(messages: Any, limits: Limits | None = None) -> list[dict[str, str]]:
    """OpenAI chat messages -> [{"role", "content"}] for the chat template (developer -> system)."""
    limits = limits or Limits()
    if messages is None:
        raise APIError(400, "missing required parameter: 'messages'", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise APIError(400, f"'messages' must be an array, got {type(messages).__name__}", "messages", "invalid_type")
    if not messages:
        raise APIError(400, "'messages' must contain at least one message", "messages", "empty_array")
    if len(messages) > limits.max_messages:
        raise APIError(400, f"'messages' has {len(messages)} messages; this server takes at most "
                       f"{limits.max_messages} (--max-messages)", "messages", "array_above_max_length")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise APIError(400, f"messages[{i}] must be an object, got {type(m).__name__}", f"messages[{i}]",
                           "invalid_type")
        role = m.get("role")
        if role not in ROLE_MAP:
            raise APIError(400, f"messages[{i}].role must be one of system, developer, user, assistant; got {role!r}"
                           + (" (tool messages are not supported by this server)" if role in ("tool", "function")
                              else ""), f"messages[{i}].role", "invalid_value")
        text = _content_text(m.get("content"), i)
        if len(text) > limits.max_message_chars:
            raise APIError(400, f"messages[{i}].content has {len(text)} characters; this server takes at most "
                           f"{limits.max_message_chars} per message (--max-message-chars)", f"messages[{i}].content",
                           "string_above_max_length")
        out.append({"role": ROLE_MAP[role], "content": text})
    if out[-1]["role"] == "assistant":
        raise APIError(400, "the last message is the assistant's: end with a user (or system) message to get a "
                       "reply", f"messages[{len(out) - 1}].role", "invalid_value")
    return out


def parse_chat_request(body: Any, models: Mapping[str, str], defaults: Mapping[str, Any],
                       context_length: int | None = None, limits: Limits | None = None) -> dict[str, Any]:
    """Validate a /v1/chat/completions body; returns the generation settings or raises APIError."""
    limits = limits or Limits()
    if not isinstance(body, Mapping):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_type")
    model = body.get("model")
    if model is None:
        raise APIError(400, "missing required parameter: 'model'", "model", "missing_required_parameter")
    if not isinstance(model, str):
        raise APIError(400, f"'model' must be a string, got {type(model).__name__}", "model", "invalid_type")
    if model not in models:
        raise APIError(404, f"the model {model!r} does not exist on this server; available: {', '.join(models)}",
                       "model", "model_not_found")
    messages = parse_messages(body.get("messages"), limits)
    for key, what in UNSUPPORTED.items():
        if body.get(key) not in (None, [], {}):
            raise APIError(400, f"{what} ({key!r}) is not supported by this server", key, "unsupported_parameter")
    sampling = [k for k, noop in UNSUPPORTED_SAMPLING.items() if body.get(k) is not None and body.get(k) not in noop]
    if sampling:
        raise APIError(400, f"{', '.join(map(repr, sampling))}: not supported by this server (it samples with "
                       "temperature, top_p and seed only); leave them out", sampling[0], "unsupported_parameter")
    n = body.get("n", 1)
    if n is not None and (not _is_int(n) or n != 1):
        raise APIError(400, f"'n' must be 1 (one choice per request), got {n!r}", "n", "unsupported_value")
    fmt = body.get("response_format")
    if fmt not in (None, {}) and not (isinstance(fmt, Mapping) and fmt.get("type") == "text"):
        raise APIError(400, "only response_format {'type': 'text'} is supported", "response_format",
                       "unsupported_value")

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = defaults["max_tokens"]
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise APIError(400, f"'{param}' must be a positive integer, got {max_tokens!r}", param, "invalid_value")
    if context_length and max_tokens >= context_length:
        raise APIError(400, f"'{param}'={max_tokens} does not fit the model's context of {context_length} tokens",
                       param, "invalid_value")
    temperature = body.get("temperature")
    if temperature is None:
        temperature = defaults["temperature"]
    elif not _is_number(temperature) or not 0 <= temperature <= 2:
        raise APIError(400, f"'temperature' must be a number between 0 and 2, got {temperature!r}", "temperature",
                       "invalid_value")
    top_p = body.get("top_p")
    if top_p is None:
        top_p = defaults["top_p"]
    elif not _is_number(top_p) or not 0 < top_p <= 1:
        raise APIError(400, f"'top_p' must be a number in (0, 1], got {top_p!r}", "top_p", "invalid_value")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise APIError(400, f"'seed' must be an integer, got {seed!r}", "seed", "invalid_type")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise APIError(400, f"'seed' must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}, got {seed}", "seed",
                       "invalid_value")
    truncation = body.get("truncation", None)
    if truncation is None:
        truncation = limits.truncation
    if truncation not in ("auto", "disabled"):
        raise APIError(400, f"'truncation' must be 'auto' (drop the oldest turns to fit the context) or 'disabled', "
                       f"got {truncation!r}", "truncation", "invalid_value")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise APIError(400, f"'stream' must be a boolean, got {stream!r}", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise APIError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = list(stop)
    else:
        raise APIError(400, "'stop' must be a string or a list of up to 4 strings", "stop", "invalid_type")
    return {"model": model, "adapter": models[model], "messages": messages, "max_new_tokens": int(max_tokens),
            "temperature": float(temperature), "top_p": float(top_p), "seed": seed, "stream": stream,
            "include_usage": bool(options.get("include_usage")), "stop": [s for s in stops if s],
            "truncate": truncation == "auto", "max_tokens_param": param}


def apply_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` cut before the first stop string (and whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
