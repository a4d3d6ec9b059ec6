"""An OpenAI-compatible HTTP server for a local LoRA model (FastAPI + uvicorn): running it (the
command line, :func:`serve_in_thread`, :class:`ServerThread`) and the vLLM equivalent (:func:`vllm_command`).

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
- **Limits** (:class:`~kokoro_helpers.local.serve_protocol.Limits`, each a CLI option): body size, messages per request, characters
  per message, ``max_tokens`` against the context, queue length.
- **Browser safety.** Only ``application/json`` bodies (415 otherwise), only loopback Host names
  (plus ``--host``/``--allowed-hosts``: a guard against DNS rebinding), no CORS unless
  ``--cors-origin``. The server binds to 127.0.0.1 by default and has no authentication unless
  ``--api-key-env VAR`` names an environment variable holding a key (compared in constant time;
  ``/docs`` and ``/openapi.json`` then need it too).
- Sampling fields it cannot honour (``presence_penalty``, ``frequency_penalty``, ``logit_bias``,
  ``logprobs``...) get a 400 naming them unless they hold their no-op value; ``user``,
  ``metadata``, ``store``... are accepted and ignored.

The parts: ``serve_protocol`` (request validation, OpenAI-shaped errors), ``serve_app`` (the
FastAPI app and its routes), ``serve_jobs`` (a generation in its thread; replies and SSE),
``serve_model`` (``ServedModel``: every call the server makes to the model).
"""

import argparse
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from kokoro_helpers.local.model import LocalModel
from kokoro_helpers.paths import DEFAULT_RUN_DIR
from kokoro_helpers.local.serve_app import close_app, create_app
from kokoro_helpers.local.serve_model import LOAD_ERRORS, ServedModel, adapter_source, lora_rank
from kokoro_helpers.local.serve_protocol import Limits
from kokoro_helpers.paths import portable

LOOPBACK = "127.0.0.1"


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
    lm_src = adapter_source(lm_or_source, run_dir)
    if lm_src is None or lm_src.adapter_dir is None:
        raise ValueError("vllm_command needs an adapter (a local_lora card or an adapter folder)")
    base = str(lm_src.base_model or lm_src.model_path)
    if base.startswith("embedded:"):
        base = portable(lm_src.model_path)
    rank = lora_rank(lm_src.adapter_dir)
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
    adapters = _parse_adapters(args.adapter)
    try:
        served = ServedModel.load(args.model, args.run_dir, adapters=adapters, base_model=args.base_model,
                                  device=args.device, dtype=args.dtype)
    except LOAD_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    app = create_app(served, served_name=args.served_name, max_tokens=args.max_tokens, temperature=args.temperature,
                     top_p=args.top_p, api_key=api_key, limits=limits, allowed_hosts=hosts,
                     cors_origins=args.cors_origin)
    if args.host not in (LOOPBACK, "localhost", "::1") and api_key is None:
        print(f"warning: binding to {args.host} exposes the model to the network without authentication "
              "(use --api-key-env VAR, or keep the default 127.0.0.1)", file=sys.stderr)
    print(banner(app, args.host, args.port, args.api_key_env if api_key else None, served.describe()), flush=True)
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
