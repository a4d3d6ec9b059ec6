"""One request's generation, run in its own thread, and the two ways its text reaches the client:
collected into one reply (:func:`collect`), or streamed as server-sent events in OpenAI's
``chat.completion.chunk`` format (:func:`sse`, sent by :func:`job_stream`). A client that goes
away, or a server that shuts down, stops the generation at its next token."""

import asyncio
import functools
import json
import threading
import time
from typing import Any

from kokoro_helpers.local.serve_model import ServedModel, generation_error
from kokoro_helpers.local.serve_protocol import APIError, apply_stop


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down: the request was cancelled", None, "server_shutting_down",
                    type="server_error")


class Job:
    """One request's generation in its own thread. It waits for the model (giving up when
    cancelled), streams deltas back through an asyncio queue and stops at the next token once
    ``cancel`` is set: the client went away, or the server is shutting down.

    The app's state counts it: ``pending`` (admitted, not ended), ``jobs`` (to cancel on
    shutdown), ``reply_s`` (a running mean of a reply's time)."""

    def __init__(self, app, model: ServedModel, fitted: Any, adapter: str, settings: dict[str, Any]):
        self.app, self.model, self.fitted, self.adapter, self.settings = app, model, fitted, adapter, settings
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.details: dict[str, Any] = {}

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
        seconds = None
        try:
            with self.model.turn(self.cancel) as ours:
                if not ours:
                    self._post(("cancelled", None))
                    return
                t0 = time.monotonic()
                stream = self.model.stream(self.fitted, self.adapter, self.details, self.cancel, **self.settings)
                try:
                    for delta in stream:
                        self._post(("delta", delta))
                        if self.cancel.is_set():
                            break
                finally:
                    stream.close()
                seconds = time.monotonic() - t0
            self._post(("cancelled", None) if self.app.state.closing.is_set() else ("end", None))
        except Exception as exc:  # reported to the client
            self._post(("error", exc))
        finally:
            try:
                self.loop.call_soon_threadsafe(self._finished, seconds)
            except RuntimeError:
                pass


async def collect(job: Job, request) -> list[str] | None:
    """The reply's text deltas once the generation ends; None when the client went away first
    (its generation is then stopped). A failed or cancelled generation raises :class:`APIError`."""
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
                    return None
                if kind is None:
                    continue
            if kind == "delta":
                parts.append(value)
            elif kind == "error":
                raise generation_error(value)
            elif kind == "cancelled":
                raise _shutting_down()
            else:
                return parts
    finally:
        job.cancel.set()
        if getter is not None:
            getter.cancel()


@functools.cache
def _job_stream_class():
    from starlette.responses import StreamingResponse

    class JobStream(StreamingResponse):
        """An SSE response that cancels its job however it ends (even when the client went away
        before the first event, so that the event generator never ran)."""

        def __init__(self, job: Job, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.job = job

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.job.cancel.set()

    return JobStream


def job_stream(job: Job, *args: Any, **kwargs: Any):
    """A Starlette ``StreamingResponse`` (same arguments) that cancels ``job`` when it ends."""
    return _job_stream_class()(job, *args, **kwargs)


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


async def sse(job: Job, req: dict[str, Any], rid: str, now: int, fingerprint: str,
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
                err = generation_error(value) if kind == "error" else _shutting_down()
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

