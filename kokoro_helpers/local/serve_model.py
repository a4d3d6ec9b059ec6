"""The model as the server sees it: the one place the server touches a loaded model.

:class:`ServedModel` loads it, names what it serves, fits prompts into its context (token
counting), takes its turn on it and streams a reply, and says in OpenAI's error shape why a
generation failed. The app, the generation jobs and the CLI go through it only, so that another
model behind the same few methods serves unchanged."""

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from kokoro_helpers.local.loading import load
from kokoro_helpers.local.model import BASE_ADAPTER, LocalModel
from kokoro_helpers.local.prompts import ContextLengthError, FittedPrompt, context_length, fit_messages
from kokoro_helpers.local.sources import ModelLoadError, ModelSource, read_adapter_config, resolve_source
from kokoro_helpers.paths import DEFAULT_RUN_DIR
from kokoro_helpers.local.serve_protocol import APIError

LOAD_ERRORS = (ModelLoadError, ValueError, OSError)    # what a model that cannot be served raises on load


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


def generation_error(exc: BaseException) -> APIError:
    """What the client is told when a generation raised ``exc``."""
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), "messages", "context_length_exceeded")
    if isinstance(exc, (ValueError, TypeError)):
        return APIError(400, f"{type(exc).__name__}: {exc}", None, "invalid_value")
    return APIError(500, f"generation failed: {type(exc).__name__}: {exc}")


def adapter_source(lm_or_source: LocalModel | Any, run_dir: str | Path = DEFAULT_RUN_DIR) -> "ModelSource | None":
    """The adapter a loaded model serves (its active one; None when the base is active), or the
    source a card name, card or folder names."""
    if isinstance(lm_or_source, LocalModel):
        info = lm_or_source.adapters.get(lm_or_source.active)
        return info.source if info is not None else None
    return resolve_source(lm_or_source, run_dir)


def lora_rank(adapter_dir: Path) -> int:
    """The LoRA rank ``r`` an adapter folder records (8 when it records none)."""
    return int(read_adapter_config(adapter_dir).get("r", 8) or 8)


class ServedModel:
    """A loaded :class:`~kokoro_helpers.local.model.LocalModel` behind the few calls the server makes."""

    def __init__(self, lm: LocalModel):
        self.lm = lm
        self.context_length: int | None = context_length(lm.model, lm.tokenizer)
        self.device = str(lm.device)
        self.dtype = str(lm.dtype).replace("torch.", "")
        self.fingerprint = f"kokoro-{self.device}-{self.dtype}"

    @classmethod
    def of(cls, model: "ServedModel | LocalModel | Any", run_dir: str | Path = DEFAULT_RUN_DIR,
           **load_kwargs: Any) -> "ServedModel":
        """``model`` as served: a ServedModel as it is, a LocalModel wrapped, anything else loaded
        with :func:`~kokoro_helpers.local.loading.load` (a card name in ``run_dir``, a card, a folder)."""
        if isinstance(model, ServedModel):
            return model
        return cls(model if isinstance(model, LocalModel) else load(model, run_dir, **load_kwargs))

    @classmethod
    def load(cls, source: Any, run_dir: str | Path = DEFAULT_RUN_DIR, *, adapters: Iterable[tuple[str, str]] = (),
             **load_kwargs: Any) -> "ServedModel":
        """Load ``source`` and put each (name, path) of ``adapters`` on the same base; raises one of
        :data:`LOAD_ERRORS` when that cannot be done."""
        lm = load(source, run_dir, **load_kwargs)
        for name, path in adapters:
            lm.add_adapter(path, name=name, run_dir=run_dir)
        return cls(lm)

    # ----------------------------------------------------------------- what is served
    @property
    def base_name(self) -> str:
        return self.lm.base_name

    @property
    def base_id(self) -> str:
        return base_model_id(self.lm)

    def models(self, served_name: str | None = None) -> dict[str, str]:
        """See :func:`served_models`."""
        return served_models(self.lm, served_name)

    def describe(self) -> dict[str, Any]:
        return self.lm.describe()

    # ----------------------------------------------------------------- generation
    def fit(self, req: dict[str, Any]) -> "FittedPrompt":
        """The prompt of a parsed request, fitted into the context next to its reply. Runs without
        the model's lock (only the tokenizer), linear in the conversation's length."""
        ctx = self.context_length
        room = None if ctx is None else ctx - req["max_new_tokens"]
        info = self.lm.adapters.get(req["adapter"])
        tokenizer = info.tokenizer if info is not None else self.lm.base_tokenizer
        try:
            return fit_messages(tokenizer, req["messages"], room, truncate=req["truncate"])
        except ContextLengthError as exc:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, your messages "
                           f"resulted in {exc.prompt_tokens} tokens (and {req['max_new_tokens']} are kept for the "
                           "completion). Please reduce the length of the messages or of "
                           f"'{req['max_tokens_param']}', or send \"truncation\": \"auto\" to drop the oldest turns.",
                           "messages", "context_length_exceeded") from None
        except (ValueError, TypeError) as exc:
            raise APIError(400, str(exc), "messages", "invalid_value") from None

    @contextmanager
    def turn(self, cancel: threading.Event) -> Iterator[bool]:
        """Wait for the model (one generation at a time, the chat widget included); the block gets
        False when ``cancel`` was set before the model was free, and the model is held until it ends."""
        lock = self.lm.lock
        while not lock.acquire(timeout=0.05):
            if cancel.is_set():
                yield False
                return
        try:
            yield not cancel.is_set()
        finally:
            lock.release()

    def stream(self, fitted: "FittedPrompt", adapter: str, details: dict[str, Any], cancel: threading.Event,
               **settings: Any) -> Iterator[str]:
        """The reply's text deltas (call it inside :meth:`turn`); ``details`` gets the finish
        reason and token counts; ``cancel`` stops it at the next token."""
        return self.lm.stream(fitted, adapter=adapter, details=details, cancel=cancel, **settings)
