"""A chat model behind an OpenAI-compatible endpoint: OpenAI itself (a fine-tuned `ft:...` model or a base),
Azure OpenAI (a deployment), vLLM, or the project's own server (`python -m kokoro_helpers.serve`).

Retries are the SDK's own (`max_retries` of the client, or `sdk_max_retries` here): it backs off on 408/409/429,
5xx, timeouts and connection errors and honours Retry-After; an error it gives up on is raised as is. With
`batch_run_dir`, a batch goes through OpenAI's Batch API instead (half price, resumable: hosted/batch.py)."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from kokoro_helpers.concurrency import run_concurrently
from kokoro_helpers.models.base import ChatModel, Messages, ModelError, OnResult, check_overrides, clean_message
from kokoro_helpers.notes import Log

def usage_meta(resp: Any) -> dict[str, Any]:
    """What a chat.completions response says about itself: tokens, finish reason, the model that served it."""
    usage = getattr(resp, "usage", None)
    meta: dict[str, Any] = {"prompt_tokens": getattr(usage, "prompt_tokens", None),
                            "completion_tokens": getattr(usage, "completion_tokens", None)}
    try:
        meta["finish_reason"] = getattr(resp.choices[0], "finish_reason", None)
    except (AttributeError, IndexError, TypeError):
        pass
    served = getattr(resp, "model", None)
    if isinstance(served, str):
        meta["served_model"] = served
    return meta


def completion_text(resp: Any) -> str:
    try:
        content = resp.choices[0].message.content
    except (AttributeError, IndexError, TypeError) as exc:
        raise ModelError(f"the endpoint answered without choices[0].message ({type(resp).__name__})") from exc
    return content or ""


def endpoint_client(base_url: str, api_key_env: str | None = None, max_retries: int = 2,
                    timeout: float = 300.0) -> Any:
    """An `openai.OpenAI` client for an OpenAI-compatible server (vLLM, 04's server). Its key is read
    from the environment variable `api_key_env` when given, else the placeholder "EMPTY" (local
    servers need none; OPENAI_API_KEY is deliberately not sent to a third-party URL)."""
    import openai
    key = os.environ.get(api_key_env, "") if api_key_env else ""
    if api_key_env and not key:
        raise ModelError(f"endpoint {base_url}: environment variable {api_key_env} is not set")
    return openai.OpenAI(base_url=base_url, api_key=key or "EMPTY", max_retries=max_retries, timeout=timeout)


class EndpointChatModel(ChatModel):
    """Replies from `client.chat.completions.create(model=...)`, at most `concurrency` requests at a time.

    `temperature=0` by default so replies are as repeatable as the service allows; `seed` is passed on when
    given. `cache_tag` goes into the settings: change it when the model behind a name changed (an endpoint
    serving a new adapter under the same name)."""

    kind = "endpoint"
    streams = True

    def __init__(self, client: Any, model: str, *, name: str | None = None, max_tokens: int = 256,
                 temperature: float = 0.0, top_p: float | None = None, seed: int | None = None,
                 concurrency: int = 4, sdk_max_retries: int | None = None, timeout: float | None = None,
                 extra_body: Mapping[str, Any] | None = None, cache_tag: str | None = None,
                 progress: bool = True, log: Log = print, batch_run_dir: str | Path | None = None,
                 batch_poll_seconds: float = 30.0):
        if not model:
            raise ModelError("an endpoint model needs a model name")
        if client is None:
            raise ModelError(f"{name or model}: no client (set OPENAI_API_KEY, or give the endpoint's base_url)")
        self._client = client           # a client, or a function making one on first use (see `client`)
        self.model = model
        self.name = name or model
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
        self.top_p = top_p
        self.seed = seed
        self.concurrency = max(1, int(concurrency))
        self.sdk_max_retries = sdk_max_retries
        self.timeout = timeout
        self.extra_body = dict(extra_body or {})
        self.cache_tag = cache_tag
        self.progress = progress
        self.log = log
        self.batch_run_dir = batch_run_dir          # set: batches through OpenAI's Batch API (hosted/batch.py)
        self.batch_poll_seconds = batch_poll_seconds

    @property
    def client(self) -> Any:
        """The API client; made on first use when given as a function, so that choosing a hosted model
        needs no key and the first request is what says which variable to set."""
        if callable(self._client) and not hasattr(self._client, "chat"):
            self._client = self._client()
        return self._client

    @property
    def base_url(self) -> str:
        return str(getattr(self.client, "base_url", "") or "")

    @property
    def settings(self) -> dict[str, Any]:
        s = {"kind": "chat.completions", "model": self.model, "base_url": self.base_url,
             "max_tokens": self.max_tokens, "temperature": self.temperature}
        for key in ("top_p", "seed", "cache_tag"):
            if getattr(self, key) is not None:
                s[key] = getattr(self, key)
        if self.extra_body:
            s["extra_body"] = self.extra_body
        return s

    def api_client(self) -> Any:
        """The client with this model's retry and timeout options."""
        opts: dict[str, Any] = {}
        if self.sdk_max_retries is not None:
            opts["max_retries"] = int(self.sdk_max_retries)
        if self.timeout is not None:
            opts["timeout"] = self.timeout
        if opts and hasattr(self.client, "with_options"):
            return self.client.with_options(**opts)
        return self.client

    def request(self, messages: Messages, **overrides: Any) -> dict[str, Any]:
        """The keyword arguments of one chat.completions.create call."""
        check_overrides(overrides)
        max_tokens = overrides.get("max_new_tokens", self.max_tokens)
        kwargs: dict[str, Any] = {"model": self.model, "messages": [clean_message(m) for m in self.prepare(messages)],
                                  "max_tokens": int(max_tokens),
                                  "temperature": float(overrides.get("temperature", self.temperature))}
        for key in ("top_p", "seed"):
            value = overrides.get(key, getattr(self, key))
            if value is not None:
                kwargs[key] = value
        if self.extra_body:
            kwargs["extra_body"] = dict(self.extra_body)
        return kwargs

    def complete(self, messages: Messages, *, extra: Mapping[str, Any] | None = None,
                 **overrides: Any) -> tuple[str, dict[str, Any]]:
        """(reply, meta) of one request; `extra` adds request fields (e.g. response_format)."""
        kwargs = {**self.request(messages, **overrides), **dict(extra or {})}
        t0 = time.perf_counter()
        resp = self.api_client().chat.completions.create(**kwargs)
        return completion_text(resp), {"latency_s": round(time.perf_counter() - t0, 3), **usage_meta(resp)}

    def reply(self, messages: Messages, **overrides: Any) -> str:
        return self.complete(messages, **overrides)[0]

    def stream(self, messages: Messages, **overrides: Any) -> Iterator[str]:
        kwargs = self.request(messages, **overrides)
        for chunk in self.api_client().chat.completions.create(stream=True, **kwargs):
            choices = getattr(chunk, "choices", None) or []
            piece = getattr(getattr(choices[0], "delta", None), "content", None) if choices else None
            if piece:
                yield piece

    def batch(self, conversations: Sequence[Messages], on_result: OnResult | None = None,
              keys: Sequence[str] | None = None, **overrides: Any) -> list[str]:
        """One reply per conversation. `keys` (stable ids, e.g. 03's item ids) name the requests of a Batch API
        run so an interrupted one resumes instead of being paid twice."""
        conversations = list(conversations)
        if self.batch_run_dir is not None and conversations:
            return self._batch_api(conversations, on_result, keys, overrides)

        def one(messages: Messages) -> tuple[str, dict[str, Any]]:
            return self.complete(messages, **overrides)

        def handed(i: int, value: tuple[str, dict[str, Any]]) -> None:
            if on_result is not None:
                on_result(i, value[0], value[1])

        out = run_concurrently(one, conversations, self.concurrency, handed, self.progress,
                               desc=f"generate {self.name}")
        return [text for text, _ in out]

    def _batch_api(self, conversations: list[Messages], on_result: OnResult | None, keys: Sequence[str] | None,
                   overrides: Mapping[str, Any]) -> list[str]:
        """All replies in one OpenAI batch, resumable (hosted.batch.BatchRunner). Replies are handed to
        `on_result` before any failure is raised."""
        from kokoro_helpers.hosted.batch import BatchError, BatchRunner
        from kokoro_helpers.jsonio import content_sha1
        ids = list(keys) if keys is not None else [f"c-{content_sha1(list(m))[:16]}" for m in conversations]
        if len(ids) != len(conversations) or len(set(ids)) != len(ids):
            raise ModelError(f"{self.name}: the Batch API needs one distinct key per conversation")
        bodies = {}
        for key, messages in zip(ids, conversations):
            body = self.request(messages, **overrides)
            body.update(body.pop("extra_body", None) or {})
            bodies[key] = body
        runner = BatchRunner(self.api_client(), self.batch_run_dir, f"replies-{self.name}",
                             poll_seconds=self.batch_poll_seconds, log=self.log)
        try:
            results = runner.run(bodies)
            failure: BaseException | None = None
        except BatchError as exc:
            results, failure = exc.partial, exc
        out: list[str] = []
        missing = []
        for i, key in enumerate(ids):
            r = results.get(key)
            if r is None or r.text is None:
                missing.append(f"{key}: {r.error if r is not None else 'no result'}")
                out.append("")
                continue
            out.append(r.text)
            if on_result is not None:
                usage = r.usage or {}
                on_result(i, r.text, {"via": "batch", "prompt_tokens": usage.get("prompt_tokens"),
                                      "completion_tokens": usage.get("completion_tokens")})
        if failure is not None:
            raise failure
        if missing:
            raise ModelError(f"{self.name}: {len(missing)} of {len(ids)} batch request(s) failed (first: "
                             f"{missing[0]}); the others are kept: re-run to ask for the rest")
        return out

    def __repr__(self) -> str:
        return f"EndpointChatModel(name={self.name!r}, base_url={self.base_url!r})"
