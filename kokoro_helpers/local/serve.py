"""An OpenAI-compatible HTTP server for a local LoRA model (FastAPI + uvicorn).

    python -m kokoro_helpers.serve --model lora-tiny                       # a card of runs/default
    python -m kokoro_helpers.serve --model runs/default/models/lora-tiny --port 8000
    python -m kokoro_helpers.serve --model lora-tiny --adapter other=runs/x/models/lora-b   # two adapters

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` (non-streaming,
and ``"stream": true`` as server-sent events in OpenAI's ``chat.completion.chunk`` format,
ending with ``data: [DONE]``). The official client works unchanged::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="EMPTY")
    client.chat.completions.create(model="lora-tiny", messages=[{"role": "user", "content": "..."}])

and 03_eval evaluates through it (``extra_endpoints=[{"base_url": ..., "model": "lora-tiny"}]``).
A malformed request gets a 4xx with an OpenAI-style body ``{"error": {"message", "type",
"param", "code"}}``. One model instance answers one request at a time (requests queue; past
``--max-queue`` waiting ones: 429 with ``Retry-After``); for high-throughput serving use vLLM's
OpenAI-compatible server on the same adapter folder (:func:`vllm_command`).

- **No request stalls the model.** The prompt is fitted into the context before the model's lock
  is taken, in linear time; one that does not fit gets 400 ``context_length_exceeded`` unless the
  request sends ``"truncation": "auto"`` (or the server runs with ``--truncation auto``): then the
  oldest turns go and the reply's ``truncation`` field (and ``X-Prompt-Truncated``) say so. A
  client that disconnects, streaming or not, stops its generation at the next token; SIGTERM
  cancels running generations and exits within seconds.
- **Limits** (:class:`Limits`, each a CLI option): body size, messages per request, characters
  per message, ``max_tokens`` against the context, queue length.
- **Browser safety.** Only ``application/json`` bodies (415 otherwise), only loopback Host names
  (plus ``--host``/``--allowed-hosts``: a guard against DNS rebinding), no CORS unless
  ``--cors-origin``. The server binds to 127.0.0.1 by default and has no authentication unless
  ``--api-key-env VAR`` names an environment variable holding a key (compared in constant time;
  ``/docs`` and ``/openapi.json`` then need it too).
- Sampling fields it cannot honour (``presence_penalty``, ``frequency_penalty``, ``logit_bias``,
  ``logprobs``...) get a 400 naming them unless they hold their no-op value; ``user``,
  ``metadata``, ``store``... are accepted and ignored.
"""

import argparse
import asyncio
import hmac
import json
import math
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from kokoro_helpers.local import loading, prompts, sources
from kokoro_helpers.local.model import BASE_ADAPTER, LocalModel
from kokoro_helpers.local.sources import DEFAULT_RUN_DIR
from kokoro_helpers.paths import portable

LOOPBACK = "127.0.0.1"
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
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
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


# =============================================================================== errors

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


# =============================================================================== request parsing

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


# =============================================================================== the app

def served_models(lm: LocalModel, served_name: str | None = None) -> dict[str, str]:
    """{model id a client sends: adapter name in ``lm`` ("base" = adapter off)}."""
    names: dict[str, str] = {}
    adapters = list(lm.adapters)
    for i, name in enumerate(adapters):
        names[served_name if (i == 0 and served_name) else name] = name
    base_id = base_model_id(lm)
    if not adapters and served_name:
        base_id = served_name
    names.setdefault(base_id, BASE_ADAPTER)
    return names


def base_model_id(lm: LocalModel) -> str:
    """The id the base model is served under: its recorded name (a folder's last part)."""
    base = str(lm.base_source.base_model or lm.base_source.model_path)
    return Path(base).name if (os.sep in base and Path(base).is_absolute()) else base


def create_app(model: LocalModel | Any, *, run_dir: str | Path = DEFAULT_RUN_DIR, served_name: str | None = None,
               max_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0, api_key: str | None = None,
               limits: Limits | None = None, allowed_hosts: list[str] | tuple[str, ...] | None = None,
               cors_origins: list[str] | tuple[str, ...] | None = None, **load_kwargs: Any):
    """The FastAPI app serving ``model`` (a :class:`~kokoro_helpers.local.model.LocalModel`, or anything
    :func:`~kokoro_helpers.local.loading.load` accepts: a card name in ``run_dir``, a card, a folder).

    ``max_tokens``/``temperature``/``top_p``: defaults for requests that omit them (OpenAI's
    defaults are temperature 1 and top_p 1). ``api_key``: when given, requests must send
    ``Authorization: Bearer <api_key>`` (``/docs`` and ``/openapi.json`` too). ``limits``: see
    :class:`Limits`. ``allowed_hosts``: the Host names accepted besides the loopback names
    (``"*"``: any; a guard against DNS rebinding). ``cors_origins``: browser origins allowed to call
    the API (none by default: a web page cannot read the answers)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    lm = model if isinstance(model, LocalModel) else loading.load(model, run_dir, **load_kwargs)
    limits = limits or Limits()
    models = served_models(lm, served_name)
    defaults = {"max_tokens": int(max_tokens), "temperature": float(temperature), "top_p": float(top_p)}
    created = int(time.time())
    ctx = prompts.context_length(lm.model, lm.tokenizer)
    fingerprint = f"kokoro-{lm.device}-{str(lm.dtype).replace('torch.', '')}"
    hosts = {h.lower().strip("[]") for h in (*LOOPBACK_NAMES, *(allowed_hosts or ()))}

    app = FastAPI(title="kokoro_helpers OpenAI-compatible server", version="1",
                  description="Chat completions from a local LoRA model (kokoro_helpers.local.serve). Request fields "
                              f"accepted and ignored: {', '.join(IGNORED_FIELDS)}.",
                  docs_url=None if api_key else "/docs", redoc_url=None,
                  openapi_url=None if api_key else "/openapi.json")
    app.state.model = lm
    app.state.models = models
    app.state.limits = limits
    app.state.closing = threading.Event()
    app.state.jobs = set()
    app.state.pending = 0                 # admitted chat requests whose generation has not ended
    app.state.reply_s = 1.0               # a running mean of a reply's time (for retry-after)

    def error_response(exc: APIError, headers: Mapping[str, str] | None = None) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=dict(headers or {}))

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc, getattr(exc, "headers", None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, "invalid_request_error", None, code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse(error_body(str(exc), "invalid_request_error"), status_code=400)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not hmac.compare_digest(header.encode("utf-8", "surrogateescape"), f"Bearer {api_key}".encode()):
            raise APIError(401, "invalid or missing API key (send the header Authorization: Bearer <key>)", None,
                           "invalid_api_key", type="authentication_error")

    @app.get("/health")
    async def health():
        return {"status": "closing" if app.state.closing.is_set() else "ok", "models": list(models),
                "device": str(lm.device), "dtype": str(lm.dtype).replace("torch.", ""), "base_model": lm.base_name,
                "context_length": ctx, "queue": app.state.pending}

    if api_key:
        from fastapi.openapi.docs import get_swagger_ui_html

        @app.get("/openapi.json", include_in_schema=False)
        async def openapi_behind_key(request: Request):
            check_auth(request)
            return JSONResponse(app.openapi())

        @app.get("/docs", include_in_schema=False)
        async def docs_behind_key(request: Request):
            check_auth(request)
            return get_swagger_ui_html(openapi_url="/openapi.json", title=app.title)

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [
            {"id": mid, "object": "model", "created": created, "owned_by": "kokoro-helpers",
             "root": base_model_id(lm) if adapter != BASE_ADAPTER else mid,
             "parent": base_model_id(lm) if adapter != BASE_ADAPTER else None} for mid, adapter in models.items()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        check_auth(request)
        if model_id not in models:
            raise APIError(404, f"the model {model_id!r} does not exist on this server", "model", "model_not_found")
        return {"id": model_id, "object": "model", "created": created, "owned_by": "kokoro-helpers"}

    async def read_body(request: Request) -> Any:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise APIError(415, f"the request body must be sent as Content-Type: application/json, got "
                           f"{kind or 'none'!r}", None, "unsupported_media_type")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise APIError(413, f"the request body has {declared} bytes; this server takes at most "
                           f"{limits.max_body_bytes} (--max-body-bytes)", None, "request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise APIError(413, f"the request body is over {limits.max_body_bytes} bytes (--max-body-bytes)",
                               None, "request_too_large")
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw:
            raise APIError(400, "the request body is empty: send a JSON object with model and messages", None,
                           "invalid_json")
        try:
            return json.loads(raw)
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply", None, "invalid_json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON ({exc})", None, "invalid_json") from None

    def tokenizer_for(adapter: str):
        info = lm.adapters.get(adapter)
        return info.tokenizer if info is not None else lm.base_tokenizer

    def fit(req: dict[str, Any]) -> prompts.FittedPrompt:
        """Runs in a worker thread, without the model's lock: linear in the conversation's length."""
        room = None if ctx is None else ctx - req["max_new_tokens"]
        try:
            return prompts.fit_messages(tokenizer_for(req["adapter"]), req["messages"], room, truncate=req["truncate"])
        except prompts.ContextLengthError as exc:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, your messages "
                           f"resulted in {exc.prompt_tokens} tokens (and {req['max_new_tokens']} are kept for the "
                           "completion). Please reduce the length of the messages or of "
                           f"'{req['max_tokens_param']}', or send \"truncation\": \"auto\" to drop the oldest turns.",
                           "messages", "context_length_exceeded") from None
        except (ValueError, TypeError) as exc:
            raise APIError(400, str(exc), "messages", "invalid_value") from None

    def admit() -> None:
        if app.state.closing.is_set():
            exc = APIError(503, "the server is shutting down", None, "server_shutting_down", type="server_error")
            raise exc
        if app.state.pending > limits.max_queue:
            wait = max(1, math.ceil(app.state.reply_s * app.state.pending))
            exc = APIError(429, f"the server is busy: {app.state.pending} requests are waiting for the model "
                           f"(--max-queue {limits.max_queue}); retry in about {wait} s", None, "rate_limit_exceeded",
                           type="rate_limit_error")
            exc.headers = {"Retry-After": str(wait)}
            raise exc

    @app.post("/v1/chat/completions", openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": CHAT_REQUEST_SCHEMA}}}})
    async def chat_completions(request: Request):
        check_auth(request)
        body = await read_body(request)
        req = parse_chat_request(body, models, defaults, ctx, limits)
        admit()
        fitted = await run_in_threadpool(fit, req)
        admit()
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        settings = {k: req[k] for k in ("max_new_tokens", "temperature", "top_p", "seed")}
        truncation = ({"dropped_messages": fitted.dropped, "cut_tokens": fitted.cut_tokens,
                       "prompt_tokens_before": fitted.full_tokens} if fitted.truncated else None)
        headers = {"X-Prompt-Truncated": "true"} if truncation else {}
        job = _Job(app, lm, fitted, req["adapter"], settings)
        job.start()
        if req["stream"]:
            return _JobStream(job, _sse(job, req, rid, now, fingerprint, truncation), media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        parts: list[str] = []
        checked = time.monotonic()
        getter: asyncio.Future | None = None
        try:
            while True:
                if getter is None:
                    getter = asyncio.ensure_future(job.queue.get())
                done, _ = await asyncio.wait({getter}, timeout=0.2)
                kind = value = None
                if getter in done:
                    kind, value = getter.result()
                    getter = None
                if kind is None or time.monotonic() - checked > 0.2:
                    checked = time.monotonic()
                    if await request.is_disconnected():     # nobody waits for this reply: stop generating it
                        job.cancel.set()
                        return Response(status_code=499)
                    if kind is None:
                        continue
                if kind == "delta":
                    parts.append(value)
                elif kind == "error":
                    raise _generation_error(value)
                elif kind == "cancelled":
                    raise APIError(503, "the server is shutting down: the request was cancelled", None,
                                   "server_shutting_down", type="server_error")
                else:
                    break
        finally:
            job.cancel.set()
            if getter is not None:
                getter.cancel()
        text, stopped = apply_stop("".join(parts), req["stop"])
        details = job.details
        finish = "stop" if stopped else details.get("finish_reason", "stop")
        p, c = details.get("prompt_tokens", len(fitted.ids)), details.get("completion_tokens", 0)
        out = {
            "id": rid, "object": "chat.completion", "created": now, "model": req["model"],
            "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
        }
        if truncation:
            out["truncation"] = truncation
        return JSONResponse(out, headers=headers)

    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"], max_age=600)
    app.add_middleware(_HostGuard, hosts=hosts)
    return app


def close_app(app) -> None:
    """Stop every generation of ``app`` at its next token and refuse new requests (503): the first
    step of a shutdown (SIGTERM, :meth:`ServerThread.stop`)."""
    state = getattr(app, "state", None)
    if state is None or not hasattr(state, "closing"):
        return
    state.closing.set()
    for job in list(state.jobs):
        job.cancel.set()


class _HostGuard:
    """Refuse requests whose Host header is not an allowed name (DNS rebinding: a web page whose
    domain resolves to 127.0.0.1 would otherwise reach the model). Pure ASGI: streams untouched."""

    def __init__(self, app, hosts: set[str]):
        self.app, self.hosts = app, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and "*" not in self.hosts:
            raw = dict(scope.get("headers") or {}).get(b"host", b"").decode("latin-1").lower()
            host = raw.rsplit("]", 1)[0].lstrip("[") if raw.startswith("[") else raw.split(":")[0]
            if host not in self.hosts:
                from starlette.responses import JSONResponse
                body = error_body(f"the Host header {raw!r} is not allowed: this server answers "
                                  f"{', '.join(sorted(self.hosts))} (add a name with --allowed-hosts)",
                                  "invalid_request_error", None, "invalid_host")
                await JSONResponse(body, status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _job_stream_class():
    from starlette.responses import StreamingResponse

    class JobStream(StreamingResponse):
        """An SSE response that cancels its job however it ends (even when the client went away
        before the first event, so that the event generator never ran)."""

        def __init__(self, job: "_Job", *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.job = job

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.job.cancel.set()

    return JobStream


def _JobStream(job: "_Job", *args: Any, **kwargs: Any):
    global _JOB_STREAM
    if _JOB_STREAM is None:
        _JOB_STREAM = _job_stream_class()
    return _JOB_STREAM(job, *args, **kwargs)


_JOB_STREAM = None


def _generation_error(exc: BaseException) -> APIError:
    if isinstance(exc, prompts.ContextLengthError):
        return APIError(400, str(exc), "messages", "context_length_exceeded")
    if isinstance(exc, (ValueError, TypeError)):
        return APIError(400, f"{type(exc).__name__}: {exc}", None, "invalid_value")
    return APIError(500, f"generation failed: {type(exc).__name__}: {exc}")


class _Job:
    """One request's generation in its own thread. It waits for the model's lock (giving up when
    cancelled), streams deltas back through an asyncio queue and stops at the next token once
    ``cancel`` is set: the client went away, or the server is shutting down."""

    def __init__(self, app, lm: LocalModel, fitted: "prompts.FittedPrompt", adapter: str, settings: dict[str, Any]):
        self.app, self.lm, self.fitted, self.adapter, self.settings = app, lm, fitted, adapter, settings
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.details: dict[str, Any] = {}
        self.started = False                  # generation began (the lock was taken)
        self.deltas = 0

    def start(self) -> None:
        self.app.state.pending += 1
        self.app.state.jobs.add(self)
        if self.app.state.closing.is_set():
            self.cancel.set()
        threading.Thread(target=self._work, name="kokoro-serve-job", daemon=True).start()

    def _post(self, item: tuple[str, Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:   # the loop is gone (server shut down)
            self.cancel.set()

    def _finished(self, seconds: float | None) -> None:
        state = self.app.state
        state.pending -= 1
        state.jobs.discard(self)
        if seconds is not None:
            state.reply_s = 0.8 * state.reply_s + 0.2 * seconds

    def _work(self) -> None:
        t0, seconds = time.monotonic(), None
        try:
            lock = self.lm.lock
            while not lock.acquire(timeout=0.05):
                if self.cancel.is_set():
                    self._post(("cancelled", None))
                    return
            try:
                if self.cancel.is_set():
                    self._post(("cancelled", None))
                    return
                self.started, t0 = True, time.monotonic()
                stream = self.lm.stream(self.fitted, adapter=self.adapter, details=self.details, cancel=self.cancel,
                                        **self.settings)
                try:
                    for delta in stream:
                        self.deltas += 1
                        self._post(("delta", delta))
                        if self.cancel.is_set():
                            break
                finally:
                    stream.close()
                seconds = time.monotonic() - t0
            finally:
                lock.release()
            self._post(("cancelled", None) if self.app.state.closing.is_set() else ("end", None))
        except Exception as exc:  # reported to the client
            self._post(("error", exc))
        finally:
            try:
                self.loop.call_soon_threadsafe(self._finished, seconds)
            except RuntimeError:
                pass


def _chunk(rid: str, now: int, model: str, fingerprint: str, delta: dict, finish: "str | None" = None,
           usage: dict[str, int] | None = None, choices: bool = True, extra: dict[str, Any] | None = None) -> str:
    data: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model,
                            "system_fingerprint": fingerprint,
                            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
                            if choices else []}
    if usage is not None:
        data["usage"] = usage
    if extra:
        data.update(extra)
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _sse(job: _Job, req: dict[str, Any], rid: str, now: int, fingerprint: str,
               truncation: dict[str, Any] | None = None):
    """Server-sent events: the role chunk, content deltas, the finish chunk, [usage], [DONE].

    Generation runs in the job's thread; a client that goes away (Starlette cancels this
    generator) stops it at the next token."""
    model = req["model"]
    stops = req["stop"]
    hold = max((len(s) for s in stops), default=1) - 1
    buffer, sent_stop = "", False
    details = job.details
    try:
        yield _chunk(rid, now, model, fingerprint, {"role": "assistant", "content": ""},
                     extra={"truncation": truncation} if truncation else None)
        while True:
            kind, value = await job.queue.get()
            if kind in ("error", "cancelled"):
                err = _generation_error(value) if kind == "error" else APIError(
                    503, "the server is shutting down: the request was cancelled", None, "server_shutting_down",
                    type="server_error")
                yield f"data: {json.dumps(err.body(), ensure_ascii=False)}\n\n"
                break
            if kind == "delta":
                buffer += value
                if stops:
                    cut, found = apply_stop(buffer, stops)
                    if found:
                        if cut:
                            yield _chunk(rid, now, model, fingerprint, {"content": cut})
                        sent_stop = True
                        job.cancel.set()
                        kind = "end"
                    else:
                        ready = buffer[:len(buffer) - hold] if hold else buffer
                        if ready:
                            yield _chunk(rid, now, model, fingerprint, {"content": ready})
                            buffer = buffer[len(ready):]
                        continue
                else:
                    yield _chunk(rid, now, model, fingerprint, {"content": buffer})
                    buffer = ""
                    continue
            if kind == "end":
                if buffer and not sent_stop:
                    yield _chunk(rid, now, model, fingerprint, {"content": buffer})
                finish = "stop" if sent_stop else details.get("finish_reason", "stop")
                yield _chunk(rid, now, model, fingerprint, {}, finish)
                if req["include_usage"]:
                    p, c = details.get("prompt_tokens", 0), details.get("completion_tokens", 0)
                    yield _chunk(rid, now, model, fingerprint, {}, usage={
                        "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}, choices=False)
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel.set()


# =============================================================================== running it

class ServerThread:
    """Run an app with uvicorn in a background thread (notebooks, tests): a free loopback port by
    default, started and stopped cleanly.

        with ServerThread(create_app(lm)) as server:
            client = OpenAI(base_url=server.base_url, api_key="EMPTY")
    """

    def __init__(self, app, host: str = LOOPBACK, port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.app, self.host = app, host
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, int(port)))
        self.port = self.sock.getsockname()[1]
        self.config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off",
                                     timeout_graceful_shutdown=5)
        self.server = _server(self.config)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as ``base_url``."""
        return f"{self.url}/v1"

    def start(self, timeout_s: float = 30.0) -> "ServerThread":
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name=f"kokoro-serve-{self.port}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"the server on {self.url} stopped during start-up (see the log above)")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the server on {self.url} did not start within {timeout_s} s")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Cancel running generations, ask uvicorn to exit, wait for it, and close the socket (idempotent)."""
        close_app(self.app)
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout_s)
            if self.thread.is_alive():
                self.server.force_exit = True
                self.thread.join(timeout_s)
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "ServerThread":
        return self.start() if self.thread is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _server(config):
    """A uvicorn Server that, on SIGTERM/SIGINT (or :meth:`ServerThread.stop`), first stops every
    generation at its next token and refuses new requests, so shutting down takes seconds."""
    import uvicorn

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            close_app(config.app)
            super().handle_exit(sig, frame)

    return _Server(config)


def serve_in_thread(model: LocalModel | Any, host: str = LOOPBACK, port: int = 0, **app_kwargs: Any) -> ServerThread:
    """Start the server for ``model`` in a background thread; returns the started ServerThread.
    A non-wildcard ``host`` is added to the Host names the server answers."""
    if host not in ("0.0.0.0", "::", "") and "allowed_hosts" not in app_kwargs:
        app_kwargs["allowed_hosts"] = [host]
    return ServerThread(create_app(model, **app_kwargs), host=host, port=port).start()


def vllm_command(lm_or_source: LocalModel | Any, run_dir: str | Path = DEFAULT_RUN_DIR, port: int = 8000,
                 name: str | None = None) -> str:
    """The vLLM command serving the same adapter folder (high-throughput, batched, OpenAI-compatible)."""
    lm_src = lm_or_source.adapters[lm_or_source.active].source if (
        isinstance(lm_or_source, LocalModel) and lm_or_source.active in lm_or_source.adapters) else (
        sources.resolve_source(lm_or_source, run_dir) if not isinstance(lm_or_source, LocalModel) else None)
    if lm_src is None or lm_src.adapter_dir is None:
        raise ValueError("vllm_command needs an adapter (a local_lora card or an adapter folder)")
    base = str(lm_src.base_model or lm_src.model_path)
    if base.startswith("embedded:"):
        base = portable(lm_src.model_path)
    rank = int(sources.read_adapter_config(lm_src.adapter_dir).get("r", 8) or 8)
    max_rank = 8
    while max_rank < rank:                 # vLLM accepts 8, 16, 32, 64, ... as --max-lora-rank
        max_rank *= 2
    adapter = portable(lm_src.adapter_dir)
    name = name or lm_src.name
    return (f"vllm serve {base} --enable-lora --lora-modules {name}={adapter} --max-lora-rank {max_rank} "
            f"--host 127.0.0.1 --port {port}")


def _parse_adapters(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        if "=" not in item:
            raise SystemExit(f"error: --adapter needs NAME=PATH (or NAME=card-name), got {item!r}")
        name, path = item.split("=", 1)
        out.append((name.strip(), path.strip()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m kokoro_helpers.serve",
        description="Serve a local LoRA model (card name, card file or adapter folder) with an OpenAI-compatible API.")
    ap.add_argument("--model", required=True, help="a local_lora card name of --run-dir, a card file, an adapter "
                                                   "folder, or a model folder")
    ap.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help="where card names are looked up (default: %(default)s)")
    ap.add_argument("--host", default=LOOPBACK, help="address to bind (default: %(default)s, this machine only)")
    ap.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0 picks a free one)")
    ap.add_argument("--served-name", help="the model id clients send (default: the card's model_id)")
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                    help="serve another adapter on the same base under NAME (repeatable)")
    ap.add_argument("--base-model", help="put the adapter on this base (checked against the recorded one)")
    ap.add_argument("--max-tokens", type=int, default=256, help="default max_tokens of a request (default: %(default)s)")
    ap.add_argument("--temperature", type=float, default=1.0, help="default temperature (default: %(default)s, as OpenAI)")
    ap.add_argument("--top-p", type=float, default=1.0, help="default top_p (default: %(default)s)")
    ap.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    ap.add_argument("--dtype", default="auto", help="auto | fp32 | bf16 | fp16 (default: auto = bf16/fp16 on GPU, fp32 on CPU)")
    ap.add_argument("--api-key-env", help="name of an environment variable holding a key clients must send")
    ap.add_argument("--allowed-hosts", default="", metavar="NAMES",
                    help="comma-separated Host names accepted besides localhost/127.0.0.1/::1 and --host ('*': any)")
    ap.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                    help="a browser origin allowed to call the API, e.g. http://localhost:3000 (repeatable; "
                         "default: none)")
    d = Limits()
    ap.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="largest request body (default: "
                                                                               "%(default)s)")
    ap.add_argument("--max-messages", type=int, default=d.max_messages, help="most messages in a request "
                                                                           "(default: %(default)s)")
    ap.add_argument("--max-message-chars", type=int, default=d.max_message_chars,
                    help="most characters in one message (default: %(default)s)")
    ap.add_argument("--max-queue", type=int, default=d.max_queue,
                    help="requests that may wait for the model; more get 429 with Retry-After (default: %(default)s)")
    ap.add_argument("--truncation", choices=("disabled", "auto"), default=d.truncation,
                    help="a prompt longer than the context: 'disabled' answers 400 context_length_exceeded, 'auto' "
                         "drops the oldest turns (a request's own \"truncation\" field wins; default: %(default)s)")
    ap.add_argument("--shutdown-timeout", type=float, default=5.0,
                    help="seconds in-flight requests get on SIGTERM before they are cancelled (default: %(default)s)")
    ap.add_argument("--log-level", default="info", help="uvicorn log level (default: %(default)s)")
    args = ap.parse_args(argv)

    import uvicorn

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            print(f"error: --api-key-env {args.api_key_env}: that environment variable is not set", file=sys.stderr)
            return 2
    for name, value in (("--max-body-bytes", args.max_body_bytes), ("--max-messages", args.max_messages),
                        ("--max-message-chars", args.max_message_chars)):
        if value < 1:
            print(f"error: {name} must be at least 1, got {value}", file=sys.stderr)
            return 2
    if args.max_queue < 0:
        print(f"error: --max-queue must be 0 or more, got {args.max_queue}", file=sys.stderr)
        return 2
    limits = Limits(max_body_bytes=args.max_body_bytes, max_messages=args.max_messages,
                    max_message_chars=args.max_message_chars, max_queue=args.max_queue, truncation=args.truncation)
    hosts = [h.strip() for h in args.allowed_hosts.split(",") if h.strip()]
    if args.host not in ("0.0.0.0", "::", ""):
        hosts.append(args.host)
    elif not hosts:
        print(f"note: bound to {args.host}, this server answers only requests whose Host is a loopback name; "
              "pass --allowed-hosts NAME,... with the names clients use (or '*')", file=sys.stderr)
    try:
        lm = loading.load(args.model, args.run_dir, base_model=args.base_model, device=args.device, dtype=args.dtype)
        for name, path in _parse_adapters(args.adapter):
            lm.add_adapter(path, name=name, run_dir=args.run_dir)
    except (sources.ModelLoadError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    app = create_app(lm, served_name=args.served_name, max_tokens=args.max_tokens, temperature=args.temperature,
                     top_p=args.top_p, api_key=api_key, limits=limits, allowed_hosts=hosts,
                     cors_origins=args.cors_origin)
    if args.host not in (LOOPBACK, "localhost", "::1") and api_key is None:
        print(f"warning: binding to {args.host} exposes the model to the network without authentication "
              "(use --api-key-env VAR, or keep the default 127.0.0.1)", file=sys.stderr)
    print(banner(app, args.host, args.port, args.api_key_env if api_key else None, lm.describe()), flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout)
    _server(config).run()
    return 0


def banner(app, host: str, port: int, key_env: str | None, info: Mapping[str, Any]) -> str:
    """What the CLI prints at start: the models, and how a client connects (with the key, if any)."""
    port_text = port if port else "PORT"
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port_text}/v1"
    key = f"os.environ['{key_env}']" if key_env else "'EMPTY'"
    lines = [f"serving {', '.join(app.state.models)} ({info['device']}, {info['dtype']}) on {url}",
             f"  OpenAI(base_url='{url}', api_key={key})"]
    if key_env:
        lines.append(f'  curl -H "Authorization: Bearer ${key_env}" {url}/models   (the key is required, also for '
                     "/docs and /openapi.json)")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
