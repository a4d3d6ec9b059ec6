"""The one interface to a chat model, whichever kind it is: `reply`, `stream`, `batch`, and the `settings`
that identify its replies (03's cache key). One implementation per kind: `LocalChatModel` (transformers + peft,
models/local.py), `EndpointChatModel` (any OpenAI-compatible endpoint: OpenAI, Azure OpenAI, vLLM, the project's
own server; models/endpoint.py), `FunctionChatModel` (a plain function, for demos and tests). `open_model`
(models/open.py) picks the kind from a card, a folder or an endpoint — callers never ask which kind it is."""
from __future__ import annotations

import abc
from typing import Any, Callable, Iterator, Mapping, Sequence

Messages = Sequence[Mapping[str, Any]]
OnResult = Callable[[int, str, dict[str, Any]], None]      # (index, reply, what is known: latency, tokens, ...)
# the generation settings a caller may override per call, by the names the local models use
GENERATION_KEYS = ("max_new_tokens", "temperature", "top_p", "seed")


class ModelError(RuntimeError):
    """A model that cannot be used as asked; the message says why and what to do."""


class ChatModel(abc.ABC):
    """A model that answers conversations ([{"role", "content"}, ...]).

    `name` labels its replies; `kind` is "local" | "endpoint" | "function" (for display only — no caller
    branches on it); `streams` says whether `stream` yields pieces as they are generated (else one piece)."""

    name: str
    kind: str = ""
    streams: bool = False
    system_prompt: str | None = None      # added to conversations that have none (a card's training prompt)

    def prepare(self, messages: Messages) -> list[dict[str, Any]]:
        """The conversation as the model gets it: with this model's system prompt when it has none."""
        return with_system_prompt(messages, self.system_prompt)

    @property
    @abc.abstractmethod
    def settings(self) -> dict[str, Any]:
        """Everything that changes its replies: the weights or endpoint and the generation settings."""

    @abc.abstractmethod
    def batch(self, conversations: Sequence[Messages], on_result: OnResult | None = None,
              keys: Sequence[str] | None = None, **overrides: Any) -> list[str]:
        """One reply per conversation, in order; `on_result(index, reply, meta)` is called as each reply
        arrives, so a caller can keep replies even if the run is interrupted. `keys`: stable ids of the
        conversations, which models with resumable batches (OpenAI's Batch API) name their requests by."""

    def weights(self) -> Any:
        """A context manager giving (model, tokenizer) while this model's weights are usable on this machine
        (token probabilities, e.g. 03's reference perplexity), or None for a model behind an API."""
        return None

    def reply(self, messages: Messages, **overrides: Any) -> str:
        return self.batch([messages], **overrides)[0]

    def stream(self, messages: Messages, **overrides: Any) -> Iterator[str]:
        """The reply in pieces (one piece for models that do not stream)."""
        yield self.reply(messages, **overrides)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def check_overrides(overrides: Mapping[str, Any]) -> None:
    unknown = sorted(set(overrides) - set(GENERATION_KEYS))
    if unknown:
        raise TypeError(f"unknown generation setting(s) {unknown}: use {', '.join(GENERATION_KEYS)}")


class FunctionChatModel(ChatModel):
    """Replies from `fn(messages, max_new_tokens=..., temperature=..., top_p=..., seed=...) -> str`."""

    kind = "function"

    def __init__(self, fn: Callable[..., str], name: str | None = None, **settings: Any):
        check_overrides(settings)
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "function")
        self.defaults = dict(settings)

    @property
    def settings(self) -> dict[str, Any]:
        return {"kind": "function", "function": getattr(self.fn, "__qualname__", self.name), **self.defaults}

    def batch(self, conversations: Sequence[Messages], on_result: OnResult | None = None,
              keys: Sequence[str] | None = None, **overrides: Any) -> list[str]:
        check_overrides(overrides)
        out = []
        for i, messages in enumerate(conversations):
            text = str(self.fn(self.prepare(messages), **{**self.defaults, **overrides}))
            out.append(text)
            if on_result is not None:
                on_result(i, text, {})
        return out


KEEP_MESSAGE_KEYS = ("role", "content", "name")


def clean_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A message as a chat API accepts it: role, content (and name), no training-only keys such as `weight`."""
    return {k: message[k] for k in KEEP_MESSAGE_KEYS if k in message}


def with_system_prompt(messages: Messages, prompt: str | None, *, replace: bool = False) -> list[dict[str, Any]]:
    """`messages` with `prompt` as their system message: added when they have none; `replace=True` drops
    theirs first. A model card's training system prompt is meant to be used this way."""
    msgs = [dict(m) for m in messages]
    if replace:
        msgs = [m for m in msgs if m.get("role") != "system"]
    if prompt and not any(m.get("role") == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": prompt})
    return msgs
