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
"param", "code"}}``. One model instance answers one request at a time (a lock; requests queue);
for high-throughput serving use vLLM's OpenAI-compatible server on the same adapter folder
(:func:`vllm_command`). The server binds to 127.0.0.1 by default and has no authentication
unless ``--api-key-env VAR`` names an environment variable holding a key.
"""

import argparse
import asyncio
import json
import math
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

from . import generate as gen
from .generate import BASE_ADAPTER, DEFAULT_RUN_DIR, LocalModel
from .paths import portable

LOOPBACK = "127.0.0.1"
ROLE_MAP = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
UNSUPPORTED = {"tools": "tool calling", "functions": "function calling", "tool_choice": "tool calling",
               "function_call": "function calling", "audio": "audio output", "prediction": "predicted outputs"}


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


def parse_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI chat messages -> [{"role", "content"}] for the chat template (developer -> system)."""
    if messages is None:
        raise APIError(400, "missing required parameter: 'messages'", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise APIError(400, f"'messages' must be an array, got {type(messages).__name__}", "messages", "invalid_type")
    if not messages:
        raise APIError(400, "'messages' must contain at least one message", "messages", "empty_array")
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
        out.append({"role": ROLE_MAP[role], "content": _content_text(m.get("content"), i)})
    if out[-1]["role"] == "assistant":
        raise APIError(400, "the last message is the assistant's: end with a user (or system) message to get a "
                       "reply", f"messages[{len(out) - 1}].role", "invalid_value")
    return out


def parse_chat_request(body: Any, models: Mapping[str, str], defaults: Mapping[str, Any],
                       context_length: int | None = None) -> dict[str, Any]:
    """Validate a /v1/chat/completions body; returns the generation settings or raises APIError."""
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
    messages = parse_messages(body.get("messages"))
    for key, what in UNSUPPORTED.items():
        if body.get(key) not in (None, [], {}):
            raise APIError(400, f"{what} ({key!r}) is not supported by this server", key, "unsupported_parameter")
    n = body.get("n", 1)
    if n is not None and (not _is_int(n) or n != 1):
        raise APIError(400, f"'n' must be 1 (one choice per request), got {n!r}", "n", "unsupported_value")
    if body.get("logprobs"):
        raise APIError(400, "logprobs are not supported by this server", "logprobs", "unsupported_parameter")
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
            "include_usage": bool(options.get("include_usage")), "stop": [s for s in stops if s]}


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
               **load_kwargs: Any):
    """The FastAPI app serving ``model`` (a :class:`~kokoro_helpers.generate.LocalModel`, or anything
    :func:`~kokoro_helpers.generate.load` accepts: a card name in ``run_dir``, a card, a folder).

    ``max_tokens``/``temperature``/``top_p``: defaults for requests that omit them (OpenAI's
    defaults are temperature 1 and top_p 1). ``api_key``: when given, requests must send
    ``Authorization: Bearer <api_key>``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    lm = model if isinstance(model, LocalModel) else gen.load(model, run_dir, **load_kwargs)
    models = served_models(lm, served_name)
    defaults = {"max_tokens": int(max_tokens), "temperature": float(temperature), "top_p": float(top_p)}
    created = int(time.time())
    ctx = gen.context_length(lm.model, lm.tokenizer)
    fingerprint = f"kokoro-{lm.device}-{str(lm.dtype).replace('torch.', '')}"

    app = FastAPI(title="kokoro_helpers OpenAI-compatible server", version="1",
                  description="Chat completions from a local LoRA model (kokoro_helpers.serve).")
    app.state.model = lm
    app.state.models = models

    def error_response(exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, "invalid_request_error", None, code), status_code=exc.status_code)

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
        if header != f"Bearer {api_key}":
            raise APIError(401, "invalid or missing API key (Authorization: Bearer ...)", None, "invalid_api_key",
                           type="authentication_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(models), "device": str(lm.device),
                "dtype": str(lm.dtype).replace("torch.", ""), "base_model": lm.base_name,
                "context_length": ctx}

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

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON ({exc})", None, "invalid_json") from None
        if body is None:
            raise APIError(400, "the request body is empty: send a JSON object with model and messages", None,
                           "invalid_json")
        req = parse_chat_request(body, models, defaults, ctx)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        settings = {k: req[k] for k in ("max_new_tokens", "temperature", "top_p", "seed")}
        if req["stream"]:
            return StreamingResponse(_sse(lm, req, settings, rid, now, fingerprint), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        def run():
            out = lm.batch_generate([req["messages"]], adapter=req["adapter"], return_details=True, batch_size=1,
                                    **settings)[0]
            return out

        try:
            out = await run_in_threadpool(run)
        except (ValueError, TypeError) as exc:
            raise APIError(400, str(exc), "messages", "invalid_value") from None
        text, stopped = apply_stop(out.text, req["stop"])
        finish = "stop" if stopped else out.finish_reason
        return {
            "id": rid, "object": "chat.completion", "created": now, "model": req["model"],
            "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                      "total_tokens": out.prompt_tokens + out.completion_tokens},
        }

    return app


def _chunk(rid: str, now: int, model: str, fingerprint: str, delta: dict, finish: "str | None" = None,
           usage: dict[str, int] | None = None, choices: bool = True) -> str:
    data: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model,
                            "system_fingerprint": fingerprint,
                            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
                            if choices else []}
    if usage is not None:
        data["usage"] = usage
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _sse(lm: LocalModel, req: dict[str, Any], settings: dict[str, Any], rid: str, now: int, fingerprint: str):
    """Server-sent events: the role chunk, content deltas, the finish chunk, [usage], [DONE].

    Generation runs in its own thread (it holds the model's lock from start to end); deltas come
    back through an asyncio queue. A client that goes away stops generation at the next token."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    details: dict[str, Any] = {}

    def post(item: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:   # the loop is gone (server shutting down)
            cancel.set()

    def worker() -> None:
        try:
            stream = lm.stream(req["messages"], adapter=req["adapter"], details=details, **settings)
            try:
                for delta in stream:
                    if cancel.is_set():
                        break
                    post(("delta", delta))
            finally:
                stream.close()
            post(("end", None))
        except Exception as exc:  # reported to the client as an error event
            post(("error", exc))

    model = req["model"]
    threading.Thread(target=worker, name="kokoro-serve-stream", daemon=True).start()
    stops = req["stop"]
    hold = max((len(s) for s in stops), default=1) - 1
    buffer, sent_stop = "", False
    try:
        yield _chunk(rid, now, model, fingerprint, {"role": "assistant", "content": ""})
        while True:
            kind, value = await q.get()
            if kind == "error":
                status = 400 if isinstance(value, (ValueError, TypeError)) else 500
                err = APIError(status, f"{type(value).__name__}: {value}")
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
                        cancel.set()
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
        cancel.set()


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
        self.config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off")
        self.server = uvicorn.Server(self.config)
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
        """Ask uvicorn to exit, wait for it, and close the socket (idempotent)."""
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


def serve_in_thread(model: LocalModel | Any, host: str = LOOPBACK, port: int = 0, **app_kwargs: Any) -> ServerThread:
    """Start the server for ``model`` in a background thread; returns the started ServerThread."""
    return ServerThread(create_app(model, **app_kwargs), host=host, port=port).start()


def vllm_command(lm_or_source: LocalModel | Any, run_dir: str | Path = DEFAULT_RUN_DIR, port: int = 8000,
                 name: str | None = None) -> str:
    """The vLLM command serving the same adapter folder (high-throughput, batched, OpenAI-compatible)."""
    lm_src = lm_or_source.adapters[lm_or_source.active].source if (
        isinstance(lm_or_source, LocalModel) and lm_or_source.active in lm_or_source.adapters) else (
        gen.resolve_source(lm_or_source, run_dir) if not isinstance(lm_or_source, LocalModel) else None)
    if lm_src is None or lm_src.adapter_dir is None:
        raise ValueError("vllm_command needs an adapter (a local_lora card or an adapter folder)")
    base = str(lm_src.base_model or lm_src.model_path)
    if base.startswith("embedded:"):
        base = portable(lm_src.model_path)
    rank = int(gen._read_adapter_config(lm_src.adapter_dir).get("r", 8) or 8)
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
    ap.add_argument("--log-level", default="info", help="uvicorn log level (default: %(default)s)")
    args = ap.parse_args(argv)

    import uvicorn

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            print(f"error: --api-key-env {args.api_key_env}: that environment variable is not set", file=sys.stderr)
            return 2
    try:
        lm = gen.load(args.model, args.run_dir, base_model=args.base_model, device=args.device, dtype=args.dtype)
        for name, path in _parse_adapters(args.adapter):
            lm.add_adapter(path, name=name, run_dir=args.run_dir)
    except (gen.ModelLoadError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    app = create_app(lm, served_name=args.served_name, max_tokens=args.max_tokens, temperature=args.temperature,
                     top_p=args.top_p, api_key=api_key)
    if args.host not in (LOOPBACK, "localhost", "::1") and api_key is None:
        print(f"warning: binding to {args.host} exposes the model to the network without authentication "
              "(use --api-key-env VAR, or keep the default 127.0.0.1)", file=sys.stderr)
    info = lm.describe()
    port_text = args.port if args.port else "a free port"
    print(f"serving {', '.join(app.state.models)} ({info['device']}, {info['dtype']}) on http://{args.host}:"
          f"{port_text}/v1 — OpenAI(base_url='http://{args.host}:{port_text}/v1', api_key='EMPTY')", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
