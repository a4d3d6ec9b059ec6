"""Load a local model for inference as a :class:`~kokoro_helpers.local.model.LocalModel` (base +
adapter, from a card name, card, adapter folder, model folder or Hub id), and a small per-process
cache of loaded models.

    lm = load("lora-tiny", run_dir="runs/default")      # a card name / model_id, a card file,
                                                        # an adapter folder, or a model folder

The base comes from the card (``base_model``; ``embedded:tiny`` is built by
:mod:`kokoro_helpers.local.tiny_model`) or from the adapter's ``adapter_config.json``; bf16 (fp16
where bf16 is missing) with ``device_map="auto"`` on a GPU, fp32 on the CPU
(:mod:`kokoro_helpers.local.precision`); eval mode. The tokenizer saved next to the adapter (with
its chat template) is the one used.
"""
from __future__ import annotations

import threading
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

from kokoro_helpers.local.model import BASE_ADAPTER, AdapterInfo, LocalModel
from kokoro_helpers.local.precision import device_and_dtype
from kokoro_helpers.local.sources import ModelSource, has_tokenizer, resolve_source
from kokoro_helpers.local.weights import check_vocab, load_adapted, load_full_model, load_tokenizer
from kokoro_helpers.paths import DEFAULT_RUN_DIR


def load(source: Any, run_dir: str | Path = DEFAULT_RUN_DIR, *, base_model: str | None = None,
         base_only: bool = False, adapter_name: str | None = None, device: str | None = None,
         dtype: str = "auto", allow_base_mismatch: bool = False) -> LocalModel:
    """Load a model for inference (the seeds' ``load_trained_model``), as a :class:`LocalModel`.

    ``source``: a card name / model_id in ``run_dir``, a card (dict or file), an adapter folder,
    a model folder, ``embedded:tiny`` or a Hub id (see :func:`resolve_source`). The base is
    loaded in bf16/fp16 with ``device_map="auto"`` on a GPU and in fp32 on the CPU (``device``,
    ``dtype`` override), in eval mode; the adapter's own tokenizer is used.
    """
    t0 = time.perf_counter()
    src = resolve_source(source, run_dir, base_model=base_model, base_only=base_only,
                         allow_base_mismatch=allow_base_mismatch)
    for note in src.notes:
        warnings.warn(note, stacklevel=2)
    device, torch_dtype = device_and_dtype(device, dtype)
    if src.kind == "adapter":
        name = str(adapter_name or src.name)
        if name == BASE_ADAPTER:
            raise ValueError(f"{BASE_ADAPTER!r} is reserved for the base model: pass another adapter_name")
        model, adapter_tok = load_adapted(src, device, torch_dtype, name)
        base_tokenizer = load_tokenizer(src.model_path) if _base_has_tokenizer(src.model_path) else None
        if base_tokenizer is None or not getattr(base_tokenizer, "chat_template", None):
            base_tokenizer = adapter_tok            # a base without a template: the one trained with
        base_src = ModelSource(name=str(src.base_model or src.model_path), kind="model", model_path=src.model_path,
                               base_model=src.base_model, card=src.card, card_path=src.card_path)
        lm = LocalModel(model, base_tokenizer, base_src, device, torch_dtype)
        lm.adapters[name] = AdapterInfo(name, src.adapter_dir, src, adapter_tok)
        lm.set_adapter(name)
    else:
        tokenizer = load_tokenizer(src.model_path)
        if not getattr(tokenizer, "chat_template", None) and src.adapter_dir is not None:
            tokenizer = load_tokenizer(src.adapter_dir)  # a base without a template: the one trained with
        model = load_full_model(src.model_path, device, torch_dtype, "the model")
        check_vocab(model, tokenizer, src.model_path)
        lm = LocalModel(model, tokenizer, src, device, torch_dtype)
    lm.load_s = time.perf_counter() - t0
    return lm


def _base_has_tokenizer(path: str) -> bool:
    local = Path(path)
    return has_tokenizer(local) if local.is_dir() else True


# ----------------------------------------------------------------------- a small cache of loaded models

_LOADED: "OrderedDict[tuple, LocalModel]" = OrderedDict()
_LOADED_LOCK = threading.Lock()
MAX_CACHED_MODELS = 2


def get_model(source: Any, run_dir: str | Path = DEFAULT_RUN_DIR, **kwargs: Any) -> LocalModel:
    """:func:`load`, remembered: the same source (and settings) returns the same LocalModel
    (the ``MAX_CACHED_MODELS`` most recently used are kept)."""
    src = resolve_source(source, run_dir, base_model=kwargs.get("base_model"),
                         allow_base_mismatch=kwargs.get("allow_base_mismatch", False))
    key = (str(src.adapter_dir), src.model_path, src.kind, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
    with _LOADED_LOCK:
        if key in _LOADED:
            _LOADED.move_to_end(key)
            return _LOADED[key]
    lm = load(source, run_dir, **kwargs)
    with _LOADED_LOCK:
        _LOADED[key] = lm
        while len(_LOADED) > MAX_CACHED_MODELS:
            _LOADED.popitem(last=False)
    return lm


def clear_cache() -> None:
    """Forget the models :func:`get_model` remembers (frees their memory once unreferenced)."""
    with _LOADED_LOCK:
        _LOADED.clear()
