"""A loaded local model: one base with zero or more LoRA adapters switched by name, their tokenizers,
and generation / export through whichever adapter is active (built by
:func:`kokoro_helpers.local.loading.load`).

    lm.generate([{"role": "user", "content": "最近眠れなくて…"}], max_new_tokens=64)
    lm.batch_generate(list_of_conversations, temperature=0)          # left padding, sorted
    for delta in lm.stream(messages): print(delta, end="")           # token by token
    lm.add_adapter("runs/other/models/lora-b", name="b"); lm.set_adapter("b")
    lm.export_merged("runs/default/exports/lora-tiny-merged")        # merge_and_unload
"""
from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from kokoro_helpers.local.export import merge_and_export
from kokoro_helpers.local.generate import batch_generate, generate, stream_generate
from kokoro_helpers.local.prompts import Messages, context_length, end_of_turn_ids
from kokoro_helpers.local.sources import ModelSource, is_tiny_build, resolve_source
from kokoro_helpers.local.weights import put_adapter
from kokoro_helpers.paths import DEFAULT_RUN_DIR, portable

BASE_ADAPTER = "base"              # the pseudo-adapter name that means "adapter off, the base model"


@dataclass
class AdapterInfo:
    """One adapter loaded on the shared base."""

    name: str
    path: Path
    source: ModelSource
    tokenizer: Any


class LocalModel:
    """A base model with zero or more LoRA adapters, switched by name, and its tokenizer(s).

    Build it with :func:`kokoro_helpers.local.loading.load`. ``model`` is a peft ``PeftModel`` when an
    adapter is loaded, else the plain transformers model. ``lock`` serialises generation and adapter
    switching: the widget and the server may share one instance between threads.
    """

    def __init__(self, model, tokenizer, source: ModelSource, device: str, dtype: Any, load_s: float = 0.0):
        self.model = model
        self.base_tokenizer = tokenizer
        self.base_source = source
        self.device = device
        self.dtype = dtype
        self.load_s = load_s
        self.adapters: dict[str, AdapterInfo] = {}
        self.active: str = BASE_ADAPTER
        self.lock = threading.RLock()

    # ----------------------------------------------------------------- adapters
    @property
    def name(self) -> str:
        """The active model's name: the adapter's, or the base's."""
        return self.active if self.active != BASE_ADAPTER else self.base_source.name

    @property
    def base_name(self) -> str:
        return str(self.base_source.base_model or self.base_source.model_path)

    @property
    def tokenizer(self):
        """The active adapter's tokenizer (saved with it), else the base's."""
        info = self.adapters.get(self.active)
        return info.tokenizer if info is not None else self.base_tokenizer

    def add_adapter(self, source: Any, name: str | None = None, run_dir: str | Path = DEFAULT_RUN_DIR,
                    activate: bool = False, allow_base_mismatch: bool = False) -> str:
        """Load another adapter onto the same base (peft ``load_adapter``); returns its name.

        The adapter must record the same base as the one loaded (else
        :class:`BaseModelMismatchError`); its own tokenizer is kept for it."""
        src = resolve_source(source, run_dir, base_model=self.base_source.model_path,
                             allow_base_mismatch=allow_base_mismatch)
        if src.kind != "adapter" or src.adapter_dir is None:
            raise ValueError(f"{source!r} is a full model, not an adapter: load it on its own with load()")
        name = str(name or src.name)
        if name == BASE_ADAPTER:
            raise ValueError(f"{BASE_ADAPTER!r} is reserved for the base model: give the adapter another name")
        with self.lock:
            if name in self.adapters:
                if self.adapters[name].path == src.adapter_dir:
                    return name
                raise ValueError(f"an adapter named {name!r} is already loaded (from {self.adapters[name].path}): "
                                 "pass name= to load this one under another name")
            self.model, tokenizer = put_adapter(self.model, src, name, self.base_source.model_path)
            self.adapters[name] = AdapterInfo(name, src.adapter_dir, src, tokenizer)
            for note in src.notes:
                warnings.warn(note, stacklevel=2)
            if activate or len(self.adapters) == 1:
                self.set_adapter(name)
            else:
                self._activate(self.active)          # load_adapter does not change the active one
        return name

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the active adapter; ``None`` or ``"base"``: the base model (adapter off)."""
        with self.lock:
            self._activate(BASE_ADAPTER if name in (None, BASE_ADAPTER) else str(name))

    def _activate(self, name: str) -> None:
        if name != BASE_ADAPTER:
            if name not in self.adapters:
                raise KeyError(f"no adapter named {name!r} is loaded; loaded: {sorted(self.adapters) or 'none'} "
                               f"(and {BASE_ADAPTER!r} for the base model)")
            self.model.set_adapter(name, inference_mode=True)
        self.active = name

    @contextmanager
    def using(self, name: str | None):
        """Generate with adapter ``name`` (``"base"``: adapter off) inside the block, under the lock."""
        with self.lock:
            previous = self.active
            target = previous if name is None else name
            self._activate(target)
            ctx = self.model.disable_adapter() if (target == BASE_ADAPTER and self.adapters) else nullcontext()
            try:
                with ctx:
                    yield self
            finally:
                self._activate(previous)

    @property
    def names(self) -> list[str]:
        """The names a caller may pass as ``adapter=``: every adapter, then ``"base"``."""
        return list(self.adapters) + [BASE_ADAPTER]

    # ----------------------------------------------------------------- generation
    def _card_stops(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Add the end-of-turn token the active adapter's card records (02 writes it) to the stops."""
        info = self.adapters.get(self.active)
        token = ((info.source.card or {}) if info else {}).get("end_of_turn_token")
        if token and "stop_tokens" not in kwargs:
            kwargs = {**kwargs, "stop_tokens": [token]}
        return kwargs

    def generate(self, messages: Messages, adapter: str | None = None, **kwargs: Any) -> str:
        """One reply to a conversation (see :func:`generate` for the settings)."""
        with self.using(adapter):
            return generate(self.model, self.tokenizer, messages, **self._card_stops(kwargs))

    def batch_generate(self, conversations: Sequence[Messages], adapter: str | None = None,
                       **kwargs: Any) -> list[Any]:
        """Replies to many conversations, batched (see :func:`batch_generate`)."""
        with self.using(adapter):
            return batch_generate(self.model, self.tokenizer, conversations, **self._card_stops(kwargs))

    def stream(self, messages: Messages, adapter: str | None = None, **kwargs: Any) -> Iterator[str]:
        """The reply's text as it is generated (see :func:`stream_generate`); holds the lock while
        it runs, so close the iterator (or exhaust it) before the next call from another thread."""
        with self.using(adapter):
            yield from stream_generate(self.model, self.tokenizer, messages, **self._card_stops(kwargs))

    # ----------------------------------------------------------------- export / info
    def export_merged(self, out_dir: str | Path, adapter: str | None = None, overwrite: bool = False) -> Path:
        """Merge an adapter into a fresh copy of the base and save a standalone model folder (the
        loaded model is left as it is). See :func:`merge_and_export`."""
        name = self.active if adapter is None else adapter
        if name == BASE_ADAPTER or name not in self.adapters:
            raise ValueError(f"choose an adapter to merge: one of {sorted(self.adapters) or 'none loaded'}")
        info = self.adapters[name]
        return merge_and_export(info.path, out_dir, base_model=info.source.model_path, overwrite=overwrite,
                                device="cpu", dtype=self.dtype)

    def describe(self) -> dict[str, Any]:
        """What is loaded, from where, on which device and in which precision."""
        import torch

        n_params = sum(p.numel() for p in self.model.parameters())
        lora = sum(p.numel() for n, p in self.model.named_parameters() if "lora_" in n)
        return {
            "model": self.name, "active_adapter": self.active,
            "adapters": {n: portable(i.path) for n, i in self.adapters.items()},
            "base_model": self.base_name, "base_path": portable(self.base_source.model_path),
            "tokenizer": portable(self.adapters[self.active].source.tokenizer_dir
                                   if self.active in self.adapters else self.base_source.tokenizer_dir),
            "device": str(next(self.model.parameters()).device), "dtype": str(self.dtype).replace("torch.", ""),
            "parameters": n_params, "lora_parameters": lora,
            "context_length": context_length(self.model, self.tokenizer),
            "end_of_turn": [self.tokenizer.convert_ids_to_tokens(i) for i in end_of_turn_ids(self.model, self.tokenizer)],
            "threads": torch.get_num_threads(), "load_s": round(self.load_s, 2),
            "smoke_model": bool((self.base_source.card or {}).get("smoke_model")) or is_tiny_build(
                self.base_source.model_path),
        }

    def __repr__(self) -> str:
        return (f"LocalModel(active={self.active!r}, adapters={sorted(self.adapters)}, base={self.base_name!r}, "
                f"device={self.device!r}, dtype={str(self.dtype).replace('torch.', '')})")
