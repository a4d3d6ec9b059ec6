"""A chat model on this machine: a LoRA adapter on its base (transformers + peft), the base alone, or a full
model folder — loaded lazily (a fully cached 03 run never loads it) through `kokoro_helpers.local.loading`'s
cache, so the chat widget, 03 and the saved-models CLI share one copy of a model in memory."""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from kokoro_helpers.jsonio import file_sha256
from kokoro_helpers.local.model import BASE_ADAPTER
from kokoro_helpers.models.base import ChatModel, Messages, ModelError, OnResult, check_overrides
from kokoro_helpers.paths import DEFAULT_RUN_DIR
from kokoro_helpers.progress import tqdm



def _sha256_if_small(path: Path, limit: int = 1 << 30) -> str | None:
    """The file's sha256, or None when it is missing or over `limit` bytes (not worth hashing)."""
    if not path.is_file() or path.stat().st_size > limit:
        return None
    return file_sha256(path)


class LocalChatModel(ChatModel):
    """Replies from a local model: a `local_lora` card (dict, file or name in `run_dir`), an adapter folder,
    a model folder or `embedded:tiny`. `base_only=True`: the adapter's base with the adapter off (a baseline;
    the same loaded weights serve both). `batch` generates in chunks of `batch_size` so each chunk reaches
    `on_result` (03's cache) as soon as it is done. `lm=`: an already loaded LocalModel (or anything with its
    `generate` / `batch_generate` / `stream` methods)."""

    kind = "local"
    streams = True

    def __init__(self, source: Any, *, name: str | None = None, base_only: bool = False,
                 max_new_tokens: int = 256, temperature: float = 0.0, top_p: float | None = None,
                 seed: int | None = None, batch_size: int = 8, lm: Any = None,
                 run_dir: str | Path = DEFAULT_RUN_DIR, cache_tag: str | None = None, progress: bool = True,
                 **generate_kwargs: Any):
        from kokoro_helpers.cards import load_card
        self.card_path: Path | None = None
        self.card: dict[str, Any] | None = None
        if isinstance(source, Mapping):
            self.card = dict(source)
        elif isinstance(source, (str, Path)) and str(source).endswith(".json"):
            self.card_path = Path(source)
            self.card = load_card(self.card_path)
        self.source = source
        self.base_only = bool(base_only)
        if name is None:
            if self.card is not None:
                name = (f"{self.card.get('base_model')} (base)" if self.base_only else str(self.card.get("model_id")))
            else:
                name = Path(str(source)).name or str(source)
        self.name = name
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.top_p = top_p
        self.seed = seed
        self.batch_size = max(1, int(batch_size))
        self.run_dir = run_dir
        self.cache_tag = cache_tag
        self.progress = progress
        self.generate_kwargs = generate_kwargs
        self._lm = lm
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """What identifies the weights: the adapter file's sha256 (a retrained adapter under the same
        name gets new cache keys), else the card's timestamp, else the source's name."""
        if self._fingerprint is None:
            if self.card is not None and self.base_only:
                fp = f"base:{self.card.get('base_fingerprint') or self.card.get('base_model')}"   # by content
            elif self.card is not None:
                from kokoro_helpers.cards import adapter_dir
                folder = adapter_dir(self.card, self.card_path)
                sha = _sha256_if_small(folder / "adapter_model.safetensors") if folder else None
                fp = (f"adapter-sha256:{sha}" if sha
                      else f"card:{self.card.get('model_id')}@{self.card.get('timestamp')}")
            else:
                path = Path(str(self.source))
                weights = next(iter(sorted(path.glob("*.safetensors"))), None) if path.is_dir() else None
                sha = _sha256_if_small(weights) if weights else None
                fp = f"weights-sha256:{sha}" if sha else f"source:{self.source}"
            self._fingerprint = fp
        return self._fingerprint

    @property
    def settings(self) -> dict[str, Any]:
        s: dict[str, Any] = {"kind": "local", "weights": self.fingerprint(), "base_only": self.base_only,
                             "max_new_tokens": self.max_new_tokens, "temperature": self.temperature}
        for key in ("top_p", "seed", "cache_tag"):
            if getattr(self, key) is not None:
                s[key] = getattr(self, key)
        if self.generate_kwargs:
            s["generate_kwargs"] = self.generate_kwargs
        return s

    # ------------------------------------------------------------------ the loaded model
    def local_model(self) -> Any:
        """The loaded LocalModel (loaded on first use; shared through the loader's cache)."""
        if self._lm is None:
            from kokoro_helpers.local.loading import get_model
            source = self.card_path if self.card_path is not None else (self.card or self.source)
            self._lm = get_model(source, self.run_dir)
        return self._lm

    @property
    def adapter(self) -> str | None:
        """The adapter to generate with: "base" (adapter off) for a baseline, else the loaded one."""
        return BASE_ADAPTER if self.base_only else None

    def _kwargs(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        check_overrides(overrides)
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                                  **self.generate_kwargs}
        for key in ("top_p", "seed"):
            if getattr(self, key) is not None:
                kwargs[key] = getattr(self, key)
        kwargs.update({k: v for k, v in overrides.items() if v is not None or k in ("top_p", "seed")})
        return kwargs

    # ------------------------------------------------------------------ the interface
    def reply(self, messages: Messages, **overrides: Any) -> str:
        return _text(self.local_model().generate(self.prepare(messages), adapter=self.adapter,
                                                 **self._kwargs(overrides)), self.name)

    def stream(self, messages: Messages, **overrides: Any) -> Iterator[str]:
        yield from self.local_model().stream(self.prepare(messages), adapter=self.adapter, **self._kwargs(overrides))

    def batch(self, conversations: Sequence[Messages], on_result: OnResult | None = None,
              keys: Sequence[str] | None = None, **overrides: Any) -> list[str]:
        conversations = [self.prepare(m) for m in conversations]
        if not conversations:
            return []
        kwargs = self._kwargs(overrides)
        lm = self.local_model()
        out: list[str] = []
        bar = tqdm(total=len(conversations), desc=f"generate {self.name}", unit="item", disable=not self.progress)
        try:
            for start in range(0, len(conversations), self.batch_size):
                chunk = conversations[start:start + self.batch_size]
                t0 = time.perf_counter()
                replies = list(lm.batch_generate(chunk, adapter=self.adapter, **kwargs))
                took = time.perf_counter() - t0
                if len(replies) != len(chunk):
                    raise ModelError(f"{self.name}: {len(replies)} replies for {len(chunk)} prompts")
                for k, reply in enumerate(replies):
                    text = _text(reply, self.name)
                    out.append(text)
                    if on_result is not None:
                        on_result(start + k, text, {"batch_latency_s": round(took, 3), "batch_size": len(chunk)})
                bar.update(len(chunk))
        finally:
            bar.close()
        return out

    @contextmanager
    def _weights(self) -> Iterator[tuple[Any, Any]]:
        lm = self.local_model()
        with lm.using(self.adapter):
            yield lm.model, lm.tokenizer

    def weights(self) -> Any:
        return self._weights()

    def __repr__(self) -> str:
        return f"LocalChatModel(name={self.name!r}, base_only={self.base_only})"


def _text(reply: Any, name: str) -> str:
    """A reply's text, whether generation returned a string or a Generation (with .text)."""
    text = reply if isinstance(reply, str) else getattr(reply, "text", None)
    if text is None and isinstance(reply, Mapping):
        text = reply.get("text", reply.get("response"))
    if not isinstance(text, str):
        raise ModelError(f"{name}: generation returned {type(reply).__name__}, not text")
    return text
