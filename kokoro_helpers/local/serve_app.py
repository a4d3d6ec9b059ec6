"""The FastAPI app of the local OpenAI-compatible server: its routes (``/health``, ``/v1/models``,
``/v1/chat/completions``), authentication, admission (queue limit, shutdown), OpenAI-shaped error
answers, and the browser guards (Content-Type, Host names, CORS)."""

import hmac
import json
import math
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

from kokoro_helpers.local.model import BASE_ADAPTER, LocalModel
from kokoro_helpers.paths import DEFAULT_RUN_DIR
from kokoro_helpers.local.serve_jobs import Job, collect, job_stream, sse
from kokoro_helpers.local.serve_model import ServedModel
from kokoro_helpers.local.serve_protocol import (CHAT_REQUEST_SCHEMA, IGNORED_FIELDS, APIError, Limits, apply_stop,
                                                 error_body, parse_chat_request)

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def create_app(model: ServedModel | LocalModel | Any, *, run_dir: str | Path = DEFAULT_RUN_DIR,
               served_name: str | None = None, max_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0,
               api_key: str | None = None, limits: Limits | None = None,
               allowed_hosts: list[str] | tuple[str, ...] | None = None,
               cors_origins: list[str] | tuple[str, ...] | None = None, **load_kwargs: Any):
    """The FastAPI app serving ``model`` (a :class:`~kokoro_helpers.local.model.LocalModel`, a
    :class:`~kokoro_helpers.local.serve_model.ServedModel`, or anything
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

    served = ServedModel.of(model, run_dir, **load_kwargs)
    limits = limits or Limits()
    models = served.models(served_name)
    defaults = {"max_tokens": int(max_tokens), "temperature": float(temperature), "top_p": float(top_p)}
    created = int(time.time())
    ctx = served.context_length
    fingerprint = served.fingerprint
    hosts = {h.lower().strip("[]") for h in (*LOOPBACK_NAMES, *(allowed_hosts or ()))}

    app = FastAPI(title="kokoro_helpers OpenAI-compatible server", version="1",
                  description="Chat completions from a local LoRA model (kokoro_helpers.local.serve). Request fields "
                              f"accepted and ignored: {', '.join(IGNORED_FIELDS)}.",
                  docs_url=None if api_key else "/docs", redoc_url=None,
                  openapi_url=None if api_key else "/openapi.json")
    app.state.model = served.lm
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
                "device": served.device, "dtype": served.dtype, "base_model": served.base_name,
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
             "root": served.base_id if adapter != BASE_ADAPTER else mid,
             "parent": served.base_id if adapter != BASE_ADAPTER else None} for mid, adapter in models.items()]}

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
        fitted = await run_in_threadpool(served.fit, req)   # a worker thread, without the model's lock
        admit()
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        settings = {k: req[k] for k in ("max_new_tokens", "temperature", "top_p", "seed")}
        truncation = ({"dropped_messages": fitted.dropped, "cut_tokens": fitted.cut_tokens,
                       "prompt_tokens_before": fitted.full_tokens} if fitted.truncated else None)
        headers = {"X-Prompt-Truncated": "true"} if truncation else {}
        job = Job(app, served, fitted, req["adapter"], settings)
        job.start()
        if req["stream"]:
            return job_stream(job, sse(job, req, rid, now, fingerprint, truncation), media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        parts = await collect(job, request)
        if parts is None:                       # the client went away
            return Response(status_code=499)
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
    step of a shutdown (SIGTERM, :meth:`kokoro_helpers.local.serve.ServerThread.stop`)."""
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

