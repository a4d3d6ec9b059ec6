"""Local LoRA inference: load base + adapter, generate (one, batched, streamed), merge and export.

The seeds' LoRA guide, as one module that 03_eval, 04_local_lora_inference, the chat widget, the
OpenAI-compatible server and the saved-models tool all share:

    lm = load("lora-tiny", run_dir="runs/default")      # a card name / model_id, a card file,
                                                        # an adapter folder, or a model folder
    lm.generate([{"role": "user", "content": "最近眠れなくて…"}], max_new_tokens=64)
    lm.batch_generate(list_of_conversations, temperature=0)          # left padding, sorted
    for delta in lm.stream(messages): print(delta, end="")           # token by token
    lm.add_adapter("runs/other/models/lora-b", name="b"); lm.set_adapter("b")
    lm.export_merged("runs/default/exports/lora-tiny-merged")        # merge_and_unload

and the plain functions other modules call: ``load_model(card_or_path, base_only=False) ->
(model, tokenizer)``, ``batch_generate(model, tokenizer, list_of_messages, max_new_tokens=...,
temperature=..., top_p=..., seed=...) -> list[str]``, ``chat_local(card, messages, max_tokens=...,
temperature=...)``, ``stream_generate(...)``, ``merge_and_export(...)``.

What it guarantees:

- **Loading.** The base comes from the card (``base_model``; ``embedded:tiny`` is built by
  :mod:`kokoro_helpers.local.tiny_model`) or from the adapter's ``adapter_config.json``; bf16 (fp16
  where bf16 is missing) with ``device_map="auto"`` on a GPU, fp32 on the CPU; eval mode. The
  tokenizer saved next to the adapter (with its chat template) is the one used. A missing
  folder, a base that does not match the adapter, or a corrupt adapter file raise
  :class:`ModelNotFoundError`, :class:`BaseModelMismatchError` or :class:`CorruptAdapterError`
  with a message that says what to do.
- **Generation.** Messages go through the chat template with the generation prompt; greedy at
  ``temperature=0``, otherwise sampling with ``temperature``/``top_p`` from ``seed`` (other
  sampling defaults of the model's ``generation_config``, e.g. Qwen's ``top_k`` and
  ``repetition_penalty``, still apply when sampling); generation stops at the end-of-turn token
  (the template's, e.g. ``<|im_end|>``). A conversation longer
  than the model's context loses its oldest turns first, never silently (a warning, and
  ``Generation.dropped_messages``).
- **Batches.** Left padding with attention masks (position ids follow the mask), prompts sorted
  by length so padding stays small, results in input order; on a CUDA out-of-memory error the
  batch is halved and retried (a warning says so) instead of the run being lost.
"""
from __future__ import annotations

import json
import math
import os
import queue
import shutil
import threading
import time
import warnings
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from kokoro_helpers import cards
from kokoro_helpers.paths import portable, project_root, resolve
from kokoro_helpers.local.precision import device_and_dtype

DEFAULT_RUN_DIR = "runs/default"
BASE_ADAPTER = "base"              # the pseudo-adapter name that means "adapter off, the base model"
ROLES = ("system", "user", "assistant")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")
# end-of-turn markers of common chat templates; used when present in the tokenizer's added vocab
KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")
Messages = Sequence[Mapping[str, Any]]


# =============================================================================== errors

class ModelLoadError(Exception):
    """Base of the loading errors below; the message says what to do."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """No such card, adapter folder, model folder or weights file."""


class BaseModelMismatchError(ModelLoadError, ValueError):
    """The adapter was trained on another base model than the one it is being put on."""


class CorruptAdapterError(ModelLoadError, ValueError):
    """The adapter's config or weights file cannot be read."""


class GenerationOOMError(RuntimeError):
    """Out of GPU memory even with one prompt per batch."""


# =============================================================================== sources

@dataclass
class ModelSource:
    """What to load, resolved from a card name, a card, a card file or a folder (nothing loaded)."""

    name: str                         # the model's name (card model_id, or the folder's name)
    kind: str                         # "adapter" | "model" (a full model: a base, or a merged export)
    model_path: str                   # adapter: the base to load; model: the model itself (folder or Hub id)
    base_model: str | None = None     # the base as recorded (card base_model, e.g. "embedded:tiny")
    adapter_dir: Path | None = None
    card: dict[str, Any] | None = None
    card_path: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def tokenizer_dir(self) -> str:
        """Where the tokenizer comes from: the adapter folder when it holds tokenizer files."""
        if self.adapter_dir is not None and _has_tokenizer(self.adapter_dir):
            return str(self.adapter_dir)
        return self.model_path


def _has_tokenizer(folder: Path) -> bool:
    return any((Path(folder) / f).is_file() for f in TOKENIZER_FILES)


def _looks_like_card_file(source: Any) -> bool:
    return isinstance(source, (str, Path)) and str(source).endswith(".json") and Path(str(source)).is_file()


def _existing_dir(text: str | Path) -> Path | None:
    """A folder given relative to the cwd or to the project root (or absolute), if it exists."""
    p = Path(text).expanduser()
    for cand in ((p,) if p.is_absolute() else (p, resolve(p))):
        if cand.is_dir():
            return cand.resolve()
    return None


def _read_adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelNotFoundError(f"{folder} has no {ADAPTER_CONFIG}: it is not a peft adapter folder "
                                 "(re-run 02_finetune Part B to write the adapter)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptAdapterError(f"{path} is corrupt ({exc}): copy the adapter folder again or re-run "
                                  "02_finetune Part B to write it") from exc
    if not isinstance(config, dict):
        raise CorruptAdapterError(f"{path} is not a JSON object: copy the adapter folder again or re-run 02")
    return config


def _resolve_base(name: str, progress: bool = False) -> str:
    """A loadable base: ``embedded:tiny`` built if needed, a folder as an absolute path, else a Hub id."""
    from kokoro_helpers.local.tiny_model import resolve_base_model
    return resolve_base_model(str(name), progress=progress)


def _is_tiny_build(path: str | None) -> bool:
    return bool(path) and Path(str(path)).name.startswith("tiny-base-")


def _base_for_adapter(recorded: list[str], requested: str | None, adapter: Path, allow_mismatch: bool,
                      notes: list[str]) -> str:
    """Pick the base to put the adapter on: ``requested`` if given (checked against what the
    adapter records unless ``allow_mismatch``), else the first recorded one that loads here."""
    from kokoro_helpers.local.tiny_model import EMBEDDED_TINY, is_embedded

    recorded = [r for r in dict.fromkeys(str(r) for r in recorded if r)]
    if requested:
        asked = _identity(requested)
        if recorded and not allow_mismatch and asked not in {_identity(r) for r in recorded}:
            raise BaseModelMismatchError(
                f"the adapter {adapter} was trained on {recorded[0]!r}, not on {requested!r}: a LoRA adapter only "
                f"works on the base it was trained on. Leave base_model unset to use the recorded base, or pass "
                f"allow_base_mismatch=True if {requested!r} is the same model under another name.")
        return _resolve_base(requested)
    if not recorded:
        raise BaseModelMismatchError(
            f"the adapter {adapter} does not say which base model it was trained on (no card, and no "
            f"base_model_name_or_path in {ADAPTER_CONFIG}): pass base_model='<Hub id or folder>'")
    for r in recorded:
        if is_embedded(r):
            path = _resolve_base(r)
            for other in recorded:
                if _is_tiny_build(other) and Path(other).name != Path(path).name:
                    notes.append(f"the adapter was trained on another build of {EMBEDDED_TINY} ({Path(other).name}); "
                                 f"it is put on the current build ({Path(path).name}): re-run 02 if replies look off")
            return path
        local = _existing_dir(r)
        if local is not None:
            return str(local)
    first = recorded[0]
    if _is_tiny_build(first) or any(_is_tiny_build(r) for r in recorded):
        path = _resolve_base(EMBEDDED_TINY)
        notes.append(f"the adapter's base folder {first} is not on this machine; using the current build of "
                     f"{EMBEDDED_TINY} ({Path(path).name})")
        return path
    if Path(first).is_absolute():
        raise ModelNotFoundError(f"the base model folder {first} recorded by the adapter {adapter} does not exist "
                                 "here: pass base_model='<Hub id or folder>' (the same model it was trained on)")
    return first                                     # a Hub id


def _identity(name: str) -> str:
    """A comparable name for a base model: embedded -> its build folder; folders -> absolute path."""
    from kokoro_helpers.local.tiny_model import is_embedded

    text = str(name).strip().rstrip("/")
    if is_embedded(text):
        try:
            return str(Path(_resolve_base(text)).resolve())
        except Exception:  # an unknown embedded name: compare as text
            return text
    local = _existing_dir(text)
    if local is not None:
        return str(local)
    return text


def resolve_source(source: Any, run_dir: str | Path = DEFAULT_RUN_DIR, *, base_model: str | None = None,
                   base_only: bool = False, allow_base_mismatch: bool = False) -> ModelSource:
    """Find what ``source`` names, without loading it.

    ``source`` may be: a card (dict) or a card file (``.json``) of kind ``local_lora``; the name
    (model_id or file name) of a card in ``run_dir/models``; an adapter folder (with
    ``adapter_config.json``); a full model folder (``config.json``: a base, or a merged export);
    ``embedded:tiny``; or a Hub id (a full model, from the local Hugging Face cache when offline).
    ``base_only``: the card's / adapter's base model alone (the baseline of an adapter).
    ``base_model``: put the adapter on this base instead of the recorded one (checked: a
    different base raises :class:`BaseModelMismatchError` unless ``allow_base_mismatch``).
    """
    from kokoro_helpers.local.tiny_model import is_embedded

    card: dict[str, Any] | None = None
    card_path: Path | None = None
    if isinstance(source, Mapping):
        card = dict(source)
    elif _looks_like_card_file(source):
        card_path = Path(str(source)).resolve()
        card = cards.load_card(card_path)
    elif isinstance(source, (str, Path)) and str(source).strip():
        text = str(source).strip()
        folder = None if is_embedded(text) else _existing_dir(text)
        if folder is not None:
            return _source_from_folder(folder, base_model, base_only, allow_base_mismatch)
        if is_embedded(text):
            path = _resolve_base(text)
            return ModelSource(name=text, kind="model", model_path=path, base_model=text)
        try:
            card_path, card = cards.find_card(run_dir, text)
        except cards.CardError:
            card = None
        if card is None:
            if _looks_like_hub_id(text):
                return ModelSource(name=text, kind="model", model_path=text, base_model=text,
                                   notes=[f"{text!r} is neither a card in {cards.models_dir(run_dir)} nor a folder: "
                                          "loading it as a Hub model id (from the local cache when offline)"])
            raise ModelNotFoundError(_not_found_message(text, run_dir))
        card_path = card_path.resolve()
    else:
        raise TypeError(f"a model source is a card name, a card (dict or .json file) or a folder, got {source!r}")
    return _source_from_card(card, card_path, base_model, base_only, allow_base_mismatch)


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(p and not p.startswith(".") for p in parts) and not text.endswith(".json")


def local_cards(run_dir: str | Path = DEFAULT_RUN_DIR) -> list[tuple[Path, dict[str, Any]]]:
    """The ``local_lora`` cards of a run, newest first."""
    return [(p, c) for p, c in cards.list_cards(run_dir) if c.get("kind") == "local_lora"]


def _not_found_message(text: str, run_dir: str | Path) -> str:
    known = [c.get("model_id") for _, c in local_cards(run_dir)]
    listing = (f"local LoRA models in {cards.models_dir(run_dir)}: {', '.join(map(str, known))}" if known else
               f"there is no local LoRA card in {cards.models_dir(run_dir)} yet: train one with 02_finetune "
               "Part B (or `python -m kokoro_helpers.train_lora --params params/default.yaml`)")
    if os.sep in text or text.startswith((".", "~")):
        return (f"the folder {text!r} does not exist (relative paths are tried from the current folder and the "
                f"project root {project_root()}). {listing}")
    return (f"no model named {text!r}: not a card name, a card file or a folder (relative paths are tried from "
            f"the current folder and the project root {project_root()}). {listing}")


def _source_from_card(card: dict[str, Any], card_path: Path | None, base_model: str | None, base_only: bool,
                      allow_mismatch: bool) -> ModelSource:
    name = str(card.get("model_id") or (card_path.stem if card_path else "model"))
    kind = card.get("kind", "openai")
    if kind != "local_lora":
        raise ValueError(f"{name!r} is a {kind!r} model, not a local LoRA adapter: use "
                         "kokoro_helpers.hosted.openai_ft.chat(card, messages) for OpenAI models")
    recorded = [card.get("base_model"), card.get("base_model_path")]
    adapter = cards.adapter_dir(card, card_path)
    if adapter is None and not base_only:
        raise ModelNotFoundError(
            f"the adapter folder of {name!r} ({card.get('adapter_path') or 'no adapter_path in the card'}) does not "
            f"exist: re-run 02_finetune Part B to train it, or copy the folder back next to "
            f"{card_path or 'its card'}")
    if adapter is not None:
        try:
            recorded.append(_read_adapter_config(adapter).get("base_model_name_or_path"))
        except ModelLoadError:
            if not base_only:
                raise
    notes: list[str] = []
    if base_only:
        recorded = [r for r in recorded if r]
        base = _base_for_adapter(recorded, base_model, adapter or Path(name), allow_mismatch, notes)
        return ModelSource(name=f"{card.get('base_model') or base} (base)", kind="model", model_path=base,
                           base_model=card.get("base_model"), adapter_dir=adapter, card=card, card_path=card_path,
                           notes=notes)
    base = _base_for_adapter(recorded, base_model, adapter, allow_mismatch, notes)
    return ModelSource(name=name, kind="adapter", model_path=base, base_model=card.get("base_model") or base,
                       adapter_dir=adapter, card=card, card_path=card_path, notes=notes)


def _source_from_folder(folder: Path, base_model: str | None, base_only: bool, allow_mismatch: bool) -> ModelSource:
    if (folder / ADAPTER_CONFIG).is_file():
        sibling = folder.with_suffix(".json")           # run_dir/models/<name>/ next to <name>.json
        if sibling.is_file():
            try:
                card = cards.load_card(sibling)
                if card.get("kind") == "local_lora" and cards.adapter_dir(card, sibling) == folder.resolve():
                    return _source_from_card(card, sibling.resolve(), base_model, base_only, allow_mismatch)
            except cards.CardError:
                pass
        config = _read_adapter_config(folder)
        notes: list[str] = []
        base = _base_for_adapter([config.get("base_model_name_or_path")], base_model, folder, allow_mismatch, notes)
        if base_only:
            return ModelSource(name=f"{config.get('base_model_name_or_path')} (base)", kind="model",
                               model_path=base, base_model=config.get("base_model_name_or_path"),
                               adapter_dir=folder, notes=notes)
        return ModelSource(name=folder.name, kind="adapter", model_path=base,
                           base_model=config.get("base_model_name_or_path"), adapter_dir=folder, notes=notes)
    if (folder / "config.json").is_file():
        return ModelSource(name=folder.name, kind="model", model_path=str(folder), base_model=str(folder))
    raise ModelNotFoundError(f"{folder} is neither an adapter folder ({ADAPTER_CONFIG}) nor a model folder "
                             "(config.json): point at run_dir/models/<name>/ or give the card's name")


# =============================================================================== loading

@contextmanager
def _quiet_loading():
    """transformers' loading bars and a peft/transformers deprecation note are not news to the user."""
    from kokoro_helpers.local.tiny_model import quiet_transformers

    with quiet_transformers(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"could not load a tokenizer from {path} ({exc}); the adapter folder should hold "
                                 "the tokenizer files 02_finetune saved with it") from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token           # decoder-only models often ship without a pad token
    return tok


def _load_full_model(path: str, device: str, dtype: Any, what: str):
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    if device.startswith("cuda"):
        kwargs["device_map"] = "auto" if device == "cuda" else {"": device}
    try:
        with _quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ModelNotFoundError(
            f"could not load {what} {path!r} ({exc}). Without network a Hub model must already be in the Hugging "
            "Face cache (HF_HOME): download it where the Hub is reachable (`hf download <id>`), or pass a local "
            "folder.") from exc
    if not device.startswith("cuda"):
        model.to(device)
    model.eval()
    return model


def _check_adapter_files(folder: Path) -> Path:
    """The adapter's weights file, its header read (a corrupt or truncated file fails here)."""
    weights = next((folder / w for w in ADAPTER_WEIGHTS if (folder / w).is_file()), None)
    if weights is None:
        raise ModelNotFoundError(f"{folder} has no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}): the training "
                                 "run did not finish writing it; re-run 02_finetune Part B")
    if weights.suffix == ".safetensors":
        try:
            from safetensors import safe_open
            with safe_open(str(weights), framework="pt") as f:
                keys = list(f.keys())
        except Exception as exc:  # safetensors raises its own SafetensorError, or OSError
            raise CorruptAdapterError(f"{weights} is corrupt or truncated ({exc}): copy the adapter folder again "
                                      "or re-run 02_finetune Part B to write it") from exc
        if not keys:
            raise CorruptAdapterError(f"{weights} holds no tensors: re-run 02_finetune Part B")
    return weights


def _attach_adapter(model, folder: Path, adapter_name: str, base_label: str):
    """PeftModel.from_pretrained / load_adapter with the failure modes turned into clear errors."""
    from peft import PeftModel

    _read_adapter_config(folder)
    _check_adapter_files(folder)
    try:
        with _quiet_loading():
            if hasattr(model, "peft_config"):
                model.load_adapter(str(folder), adapter_name=adapter_name, is_trainable=False)
                return model
            return PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        text = str(exc)
        detail = next((ln.strip() for ln in text.splitlines() if "size mismatch" in ln), text.splitlines()[0] if text else "")
        if "size mismatch" in text or "not found in the base model" in text or "Target module" in text \
                or "target_modules" in text:
            raise BaseModelMismatchError(
                f"the adapter {folder} does not fit the base {base_label}: {detail[:300].rstrip('.')}. It was "
                "trained on another base model: load it with the base recorded in its card / adapter_config.json "
                "(leave base_model unset)") from exc
        raise CorruptAdapterError(f"could not load the adapter {folder} ({text.splitlines()[0][:300] if text else exc!r}): "
                                  "copy the folder again or re-run 02_finetune Part B") from exc
    except Exception as exc:
        if type(exc).__name__ in ("SafetensorError", "HeaderTooLarge", "UnpicklingError", "EOFError"):
            raise CorruptAdapterError(f"the adapter {folder} is corrupt ({exc}): copy the folder again or re-run "
                                      "02_finetune Part B") from exc
        raise


def _check_vocab(model, tokenizer, where: str) -> None:
    emb = model.get_input_embeddings()
    n = getattr(emb, "num_embeddings", None)
    if n is not None and len(tokenizer) > n:
        raise BaseModelMismatchError(
            f"the tokenizer of {where} has {len(tokenizer)} entries but the model's embedding only {n}: the tokenizer "
            "and the base model do not belong together (wrong base_model?)")


@dataclass
class AdapterInfo:
    """One adapter loaded on the shared base."""

    name: str
    path: Path
    source: ModelSource
    tokenizer: Any


class LocalModel:
    """A base model with zero or more LoRA adapters, switched by name, and its tokenizer(s).

    Build it with :func:`load`. ``model`` is a peft ``PeftModel`` when an adapter is loaded,
    else the plain transformers model. ``lock`` serialises generation and adapter switching:
    the widget and the server may share one instance between threads.
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
            tokenizer = _load_tokenizer(src.tokenizer_dir)
            self.model = _attach_adapter(self.model, src.adapter_dir, name, self.base_source.model_path)
            _check_vocab(self.model, tokenizer, str(src.adapter_dir))
            self.model.eval()
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
            "smoke_model": bool((self.base_source.card or {}).get("smoke_model")) or _is_tiny_build(
                self.base_source.model_path),
        }

    def __repr__(self) -> str:
        return (f"LocalModel(active={self.active!r}, adapters={sorted(self.adapters)}, base={self.base_name!r}, "
                f"device={self.device!r}, dtype={str(self.dtype).replace('torch.', '')})")


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
        _read_adapter_config(src.adapter_dir)          # fail on a broken adapter before loading a big base
        _check_adapter_files(src.adapter_dir)
        base_tokenizer = _load_tokenizer(src.model_path) if _base_has_tokenizer(src.model_path) else None
        model = _load_full_model(src.model_path, device, torch_dtype, "the base model")
        base_src = ModelSource(name=str(src.base_model or src.model_path), kind="model", model_path=src.model_path,
                               base_model=src.base_model, card=src.card, card_path=src.card_path)
        adapter_tok = _load_tokenizer(src.tokenizer_dir)
        if base_tokenizer is None or not getattr(base_tokenizer, "chat_template", None):
            base_tokenizer = adapter_tok            # a base without a template: the one trained with
        lm = LocalModel(model, base_tokenizer, base_src, device, torch_dtype)
        name = str(adapter_name or src.name)
        if name == BASE_ADAPTER:
            raise ValueError(f"{BASE_ADAPTER!r} is reserved for the base model: pass another adapter_name")
        lm.model = _attach_adapter(model, src.adapter_dir, name, src.model_path)
        lm.model.eval()
        _check_vocab(lm.model, adapter_tok, str(src.adapter_dir))
        lm.adapters[name] = AdapterInfo(name, src.adapter_dir, src, adapter_tok)
        lm.set_adapter(name)
    else:
        tok_dir = src.model_path
        tokenizer = _load_tokenizer(tok_dir)
        if not getattr(tokenizer, "chat_template", None) and src.adapter_dir is not None:
            tokenizer = _load_tokenizer(src.adapter_dir)  # a base without a template: the one trained with
        model = _load_full_model(src.model_path, device, torch_dtype, "the model")
        _check_vocab(model, tokenizer, src.model_path)
        lm = LocalModel(model, tokenizer, src, device, torch_dtype)
    lm.load_s = time.perf_counter() - t0
    return lm


def _base_has_tokenizer(path: str) -> bool:
    local = Path(path)
    return _has_tokenizer(local) if local.is_dir() else True


def load_model(card_or_path: Any, base_only: bool = False, run_dir: str | Path = DEFAULT_RUN_DIR,
               **kwargs: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``card_or_path`` (a card, card file, card name or folder);
    ``base_only``: the adapter's base model alone (a baseline). The interface 03_eval uses."""
    lm = load(card_or_path, run_dir, base_only=base_only, **kwargs)
    return lm.model, lm.tokenizer


def load_trained_model(adapter_path: str | Path, base_model: str | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """The seeds' name: ``(model, tokenizer)`` of an adapter folder on its (recorded) base."""
    lm = load(adapter_path, base_model=base_model, **kwargs)
    return lm.model, lm.tokenizer


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


# =============================================================================== prompts

def clean_messages(messages: Messages) -> list[dict[str, str]]:
    """``[{"role", "content"}]`` only (training fields such as ``weight`` dropped), validated:
    roles system/user/assistant, text content, at least one message."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"messages[{i}] must be a dict with role and content, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise TypeError(f"messages[{i}].content must be text, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    if not out:
        raise ValueError("messages is empty: give at least one message")
    return out


def render_prompt(tokenizer, messages: Messages) -> str:
    """The conversation through the tokenizer's chat template, ending with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template: use an instruct/chat model, or the tokenizer saved "
                         "with the adapter (02 saves the template it trained with)")
    # the same messages and switches training rendered (system_prompt_mode; Qwen3: no thinking)
    from kokoro_helpers.local.chat_messages import apply_system_prompt_mode, chat_template_kwargs, trained_system_prompt_mode
    msgs = apply_system_prompt_mode(clean_messages(messages), trained_system_prompt_mode(tokenizer))
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                         **chat_template_kwargs(tokenizer))


def encode_prompt(tokenizer, messages: Messages) -> list[int]:
    """Token ids of :func:`render_prompt` (no special tokens added: the template writes its own)."""
    return list(tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"])


def context_length(model, tokenizer=None) -> int | None:
    """The model's context (max_position_embeddings), when it has one."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else None


class ContextLengthError(ValueError):
    """A prompt that does not fit the model's context (and truncation was not allowed)."""

    def __init__(self, prompt_tokens: int, max_prompt_tokens: int):
        self.prompt_tokens, self.max_prompt_tokens = int(prompt_tokens), int(max_prompt_tokens)
        super().__init__(f"the prompt has {prompt_tokens} tokens but only {max_prompt_tokens} fit the model's context "
                         "next to the reply: shorten the conversation, lower max_tokens, or allow truncation")


@dataclass
class FittedPrompt:
    """A conversation's prompt ids after fitting into the context (see :func:`fit_messages`); the
    generation functions accept it in place of a conversation (already tokenized: no refitting)."""

    ids: list[int]
    dropped: int = 0                   # oldest messages dropped (whole turns)
    cut_tokens: int = 0                # tokens cut from the left when one message alone was too long
    full_tokens: int = 0               # the prompt's length before fitting

    @property
    def truncated(self) -> bool:
        return bool(self.dropped or self.cut_tokens)


def _turn_starts(msgs: list[dict[str, str]]) -> list[int]:
    """Indices where a kept conversation may start: each user message, and the last message."""
    body = [i for i, m in enumerate(msgs) if m["role"] != "system"]
    starts = [i for i in body if msgs[i]["role"] == "user"]
    if body and (not starts or starts[-1] != body[-1]):
        starts.append(body[-1])
    return starts


def fit_messages(tokenizer, messages: Messages, max_prompt_tokens: int | None, *,
                 truncate: bool = True) -> FittedPrompt:
    """Fit a conversation into ``max_prompt_tokens`` in linear time.

    The whole prompt is encoded once; when it is too long and ``truncate`` is true, every
    message's token count is computed once (one batched tokenizer call), whole turns are cut from
    the oldest (a kept conversation starts at a user message; system messages always stay), and
    only the kept prompt (at most about ``max_prompt_tokens`` long) is encoded again to check it,
    dropping one more turn while the count was underestimated. A last message that alone is too
    long is cut from the left. ``truncate=False`` raises :class:`ContextLengthError` instead."""
    msgs = clean_messages(messages)
    ids = encode_prompt(tokenizer, msgs)
    full = len(ids)
    if max_prompt_tokens is None or full <= max_prompt_tokens:
        return FittedPrompt(ids, 0, 0, full)
    if max_prompt_tokens < 1:
        raise ValueError("max_new_tokens leaves no room for the prompt in the model's context: lower max_new_tokens")
    if not truncate:
        raise ContextLengthError(full, max_prompt_tokens)
    counts = [len(x) for x in tokenizer([m["content"] for m in msgs], add_special_tokens=False)["input_ids"]]
    per_message = max(0.0, (full - sum(counts)) / len(msgs))      # the template's tokens around each message
    cost = [c + per_message for c in counts]
    system_cost = sum(c for c, m in zip(cost, msgs) if m["role"] == "system")
    starts = _turn_starts(msgs)
    if not starts:                                  # system messages only: cut from the left
        return FittedPrompt(ids[-max_prompt_tokens:], 0, full - max_prompt_tokens, full)
    # suffix sums of the body's cost: the estimated prompt when the conversation starts at msgs[i]
    suffix = [0.0] * (len(msgs) + 1)
    for i in range(len(msgs) - 1, -1, -1):
        suffix[i] = suffix[i + 1] + (cost[i] if msgs[i]["role"] != "system" else 0.0)
    k = 0
    while k < len(starts) - 1 and system_cost + suffix[starts[k]] > max_prompt_tokens:
        k += 1
    while True:
        first = starts[k]
        kept = [m for i, m in enumerate(msgs) if i >= first or m["role"] == "system"]
        ids = encode_prompt(tokenizer, kept)
        if len(ids) <= max_prompt_tokens or k == len(starts) - 1:
            break
        excess = len(ids) - max_prompt_tokens          # underestimated: drop turns covering the excess
        k += 1
        while k < len(starts) - 1 and suffix[first] - suffix[starts[k]] < excess:
            k += 1
    dropped = len(msgs) - len(kept)
    cut = max(0, len(ids) - max_prompt_tokens)
    if cut:
        ids = ids[-max_prompt_tokens:]
    return FittedPrompt(ids, dropped, cut, full)


def fit_prompt(tokenizer, messages: Messages, max_prompt_tokens: int | None) -> tuple[list[int], int]:
    """(prompt ids, number of messages dropped): :func:`fit_messages` with truncation, for callers
    that warn themselves (nothing is dropped silently)."""
    fitted = fit_messages(tokenizer, messages, max_prompt_tokens)
    return fitted.ids, fitted.dropped


def end_of_turn_ids(model, tokenizer, extra: Iterable[str] = ()) -> list[int]:
    """Token ids that end a reply: the model's/tokenizer's EOS and the template's end-of-turn
    markers present in the tokenizer's added vocabulary (``<|im_end|>``, ``<|eot_id|>``...)."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids += list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    for token in (*extra, *KNOWN_END_OF_TURN):
        if token in added:
            ids.append(added[token])
    return [int(i) for i in dict.fromkeys(ids)]


# =============================================================================== generation

@dataclass
class Generation:
    """One reply and how it came about (``return_details=True``)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str                 # "stop" (end of turn) | "length" (max_new_tokens reached)
    dropped_messages: int = 0          # oldest turns dropped to fit the context


@dataclass
class _Prepared:
    prompts: list[list[int]]
    dropped: list[int]
    stop_ids: list[int]
    pad_id: int
    gen_kwargs: dict[str, Any]
    device: Any


def _model_device(model):
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        import torch
        return torch.device("cpu")


def _check_settings(max_new_tokens: int, temperature: float, top_p: float | None, min_new_tokens: int | None) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if temperature is None or not math.isfinite(float(temperature)) or float(temperature) < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_p is not None and not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if min_new_tokens is not None and not 0 <= int(min_new_tokens) <= max_new_tokens:
        raise ValueError(f"min_new_tokens must be between 0 and max_new_tokens, got {min_new_tokens!r}")


def _prepare(model, tokenizer, conversations: Sequence[Messages], max_new_tokens: int, temperature: float,
             top_p: float | None, min_new_tokens: int | None, stop_tokens: Iterable[str]) -> _Prepared:
    _check_settings(max_new_tokens, temperature, top_p, min_new_tokens)
    limit = context_length(model, tokenizer)
    room = None if limit is None else limit - max_new_tokens
    prompts, dropped = [], []
    for conv in conversations:
        if isinstance(conv, FittedPrompt):          # fitted by the caller (the server, outside the lock)
            if room is not None and len(conv.ids) > room:
                raise ContextLengthError(len(conv.ids), room)
            ids, n = conv.ids, 0
        else:
            ids, n = fit_prompt(tokenizer, conv, room)
        prompts.append(ids)
        dropped.append(n)
    cut = sum(1 for n in dropped if n)
    if cut:
        warnings.warn(f"{cut} conversation(s) longer than the model's context ({limit} tokens, {max_new_tokens} kept "
                      f"for the reply): their oldest turns were dropped ({sum(dropped)} message(s) in all)",
                      stacklevel=3)
    stop_ids = end_of_turn_ids(model, tokenizer, stop_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids[0] if stop_ids else 0)
    kwargs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "eos_token_id": stop_ids or None,
                              "pad_token_id": pad_id}
    if float(temperature) > 0:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p if top_p is not None else 1.0))
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if min_new_tokens:
        kwargs["min_new_tokens"] = int(min_new_tokens)
    return _Prepared(prompts, dropped, stop_ids, pad_id, kwargs, _model_device(model))


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device):
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _finish(tokenizer, new_ids: Sequence[int], stop_ids: Sequence[int], pad_id: int, prompt_len: int,
            dropped: int) -> Generation:
    """Cut a generated row at its first end-of-turn token; decode without special tokens."""
    out: list[int] = []
    reason = "length"
    stops = set(stop_ids)
    for t in new_ids:
        if t in stops:
            reason = "stop"
            break
        out.append(int(t))
    text = tokenizer.decode(out, skip_special_tokens=True).strip()
    return Generation(text=text, token_ids=out, prompt_tokens=prompt_len,
                      completion_tokens=len(out) + (1 if reason == "stop" else 0), finish_reason=reason,
                      dropped_messages=dropped)


def _is_oom(exc: BaseException) -> bool:
    """torch's out-of-memory error, or any error accelerate would lower the batch size for."""
    import torch
    from accelerate.utils.memory import should_reduce_batch_size

    return isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or should_reduce_batch_size(exc)


@contextmanager
def _seeded(seed: int | None, device):
    """Seed torch's generators inside the block and restore them after (the caller's RNG untouched)."""
    import torch

    if seed is None:
        yield
        return
    devices = [device.index or 0] if getattr(device, "type", "cpu") == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def _run_batch(model, prep: _Prepared, rows: Sequence[int]) -> list[list[int]]:
    import torch

    prompts = [prep.prompts[i] for i in rows]
    ids, mask = _left_pad(prompts, prep.pad_id, prep.device)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*generation flags are not valid.*")
        out = model.generate(input_ids=ids, attention_mask=mask, **prep.gen_kwargs)
    return out[:, ids.shape[1]:].tolist()


def batch_generate(model, tokenizer, conversations: Sequence[Messages], max_new_tokens: int = 256,
                   temperature: float = 0.0, top_p: float | None = None, seed: int | None = None, *,
                   batch_size: int = 8, min_new_tokens: int | None = None, stop_tokens: Iterable[str] = (),
                   return_details: bool = False, progress: bool = False,
                   on_batch: Callable[[list[int], list[Generation]], None] | None = None) -> list[Any]:
    """Replies to many conversations (the seeds' ``batch_generate``), in input order.

    Prompts go through the chat template with the generation prompt, are sorted by length
    (longest first, so an out-of-memory error shows up at once) and generated ``batch_size`` at
    a time with left padding and attention masks; each reply ends at the end-of-turn token.
    ``temperature=0`` is greedy (``top_p`` unused); otherwise sampling, reproducible with
    ``seed`` for the same batch composition. ``min_new_tokens`` forbids the end of turn before
    that many tokens (the benchmark forces equal lengths with it). On a CUDA out-of-memory error
    the batch is halved and retried (down to one prompt) and the smaller size kept.

    Returns the replies' text, or :class:`Generation` objects with ``return_details=True``.
    ``on_batch(indices, generations)`` is called after each batch (progress, caching).
    """
    conversations = list(conversations)
    if not conversations:
        return []
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    prep = _prepare(model, tokenizer, conversations, max_new_tokens, temperature, top_p, min_new_tokens, stop_tokens)
    order = sorted(range(len(conversations)), key=lambda i: -len(prep.prompts[i]))
    results: list[Generation | None] = [None] * len(conversations)
    size = int(batch_size)
    bar = None
    if progress:
        from kokoro_helpers.progress import tqdm
        bar = tqdm(total=len(conversations), desc="generate", unit="prompt")
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with _seeded(seed, prep.device):
            start = 0
            while start < len(order):
                rows = order[start:start + size]
                try:
                    new = _run_batch(model, prep, rows)
                except Exception as exc:
                    if not _is_oom(exc):
                        raise
                    from accelerate.utils.memory import clear_device_cache
                    clear_device_cache(garbage_collection=True)
                    if size == 1:
                        raise GenerationOOMError(
                            f"out of GPU memory generating one prompt of {len(prep.prompts[rows[0]])} tokens with "
                            f"max_new_tokens={max_new_tokens}: lower max_new_tokens, shorten the context, or use a "
                            "smaller base / a GPU with more memory") from exc
                    size = max(1, size // 2)
                    warnings.warn(f"CUDA out of memory at batch size {len(rows)}: retrying with batch size {size}",
                                  stacklevel=2)
                    continue
                done = []
                for row, ids in zip(rows, new):
                    results[row] = _finish(tokenizer, ids, prep.stop_ids, prep.pad_id, len(prep.prompts[row]),
                                           prep.dropped[row])
                    done.append(results[row])
                if on_batch is not None:
                    on_batch(list(rows), done)
                if bar is not None:
                    bar.update(len(rows))
                start += len(rows)
    finally:
        if bar is not None:
            bar.close()
        if was_training:
            model.train()
    final = [r for r in results if r is not None]
    return final if return_details else [r.text for r in final]


def generate(model, tokenizer, messages: Messages, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float | None = None, seed: int | None = None, *, min_new_tokens: int | None = None,
             stop_tokens: Iterable[str] = (), return_details: bool = False) -> Any:
    """One reply to one conversation (a batch of one; the same settings as :func:`batch_generate`)."""
    return batch_generate(model, tokenizer, [messages], max_new_tokens, temperature, top_p, seed, batch_size=1,
                          min_new_tokens=min_new_tokens, stop_tokens=stop_tokens, return_details=return_details)[0]


def per_prompt_generate(model, tokenizer, conversations: Sequence[Messages], **kwargs: Any) -> list[Any]:
    """The seeds' loop: one ``generate`` call per prompt, no padding (the benchmark's baseline)."""
    return [generate(model, tokenizer, conv, **kwargs) for conv in conversations]


# ----------------------------------------------------------------------- streaming

class _DeltaStreamer:
    """A transformers streamer that turns generated ids into text deltas on a queue.

    Unlike ``TextIteratorStreamer`` it does not wait for a space or a CJK ideograph before
    releasing text (Japanese kana would arrive in bursts): every complete character goes out
    at once. Only an incomplete byte sequence (``\\ufffd`` at the end) and trailing whitespace
    (stripped at the end, as the non-streaming reply is) are held back."""

    _END = object()

    def __init__(self, tokenizer, stop_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.ids: list[int] = []
        self.sent = 0                   # characters of the decoded text already sent
        self.prompt_seen = False
        self.stopped = False
        self.queue: "queue.Queue[Any]" = queue.Queue()

    def put(self, value) -> None:
        if not self.prompt_seen:        # generate() first puts the prompt
            self.prompt_seen = True
            return
        if self.stopped:
            return
        for t in value.reshape(-1).tolist():
            if int(t) in self.stop_ids:
                self.stopped = True
                break
            self.ids.append(int(t))
        self._emit(final=False)

    def _emit(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        if not final:
            if text.endswith("\ufffd"):
                return
            text = text.rstrip()
        else:
            text = text.rstrip()
        if len(text) > self.sent:
            self.queue.put(text[self.sent:])
            self.sent = len(text)

    def end(self) -> None:
        self._emit(final=True)
        self.queue.put(self._END)


def stream_generate(model, tokenizer, messages: Messages, max_new_tokens: int = 256, temperature: float = 0.0,
                    top_p: float | None = None, seed: int | None = None, *, min_new_tokens: int | None = None,
                    stop_tokens: Iterable[str] = (), details: dict[str, Any] | None = None,
                    timeout_s: float | None = 600.0, cancel: threading.Event | None = None) -> Iterator[str]:
    """The reply's text, yielded piece by piece as tokens are generated (``model.generate`` runs in a
    thread with a streamer). Joined, the pieces equal :func:`generate`'s reply for the same
    settings. Closing the iterator early stops generation at the next token. ``details``, when
    given, is filled at the end with ``prompt_tokens``, ``completion_tokens``, ``finish_reason``
    and ``dropped_messages``. ``cancel``: an event that, once set (e.g. by a server whose client went
    away), stops generation at the next token as closing does."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    prep = _prepare(model, tokenizer, [messages], max_new_tokens, temperature, top_p, min_new_tokens, stop_tokens)
    streamer = _DeltaStreamer(tokenizer, prep.stop_ids)
    external = cancel
    cancel = threading.Event()
    failure: list[BaseException] = []

    class _Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stop = cancel.is_set() or (external is not None and external.is_set())
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    ids, mask = _left_pad(prep.prompts, prep.pad_id, prep.device)

    def work() -> None:
        try:
            with torch.no_grad(), _seeded(seed, prep.device), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*generation flags are not valid.*")
                model.generate(input_ids=ids, attention_mask=mask, streamer=streamer,
                               stopping_criteria=StoppingCriteriaList([_Cancelled()]), **prep.gen_kwargs)
        except BaseException as exc:  # re-raised in the consumer
            failure.append(exc)
            streamer.queue.put(_DeltaStreamer._END)

    was_training = getattr(model, "training", False)
    model.eval()
    thread = threading.Thread(target=work, name="kokoro-stream", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = streamer.queue.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(f"no token for {timeout_s} s: generation seems stuck") from None
            if item is _DeltaStreamer._END:
                break
            yield item
        if failure:
            raise failure[0]
        if details is not None:
            details.update(prompt_tokens=len(prep.prompts[0]), finish_reason="stop" if streamer.stopped else "length",
                           completion_tokens=len(streamer.ids) + (1 if streamer.stopped else 0),
                           dropped_messages=prep.dropped[0])
    finally:
        cancel.set()
        thread.join()
        if was_training:
            model.train()


# ----------------------------------------------------------------------- chat through a card

def chat_local(card: Any, messages: Messages, max_tokens: int = 512, temperature: float = 0.7,
               top_p: float | None = None, seed: int | None = None, run_dir: str | Path = DEFAULT_RUN_DIR,
               **kwargs: Any) -> str:
    """One reply of a local LoRA model (a card, card file, card name or adapter folder): the
    model is loaded once per process (:func:`get_model`). saved_models and openai_ft.chat call this."""
    lm = get_model(card, run_dir, **kwargs)
    return lm.generate(messages, max_new_tokens=int(max_tokens), temperature=float(temperature), top_p=top_p,
                       seed=seed)


def system_prompt_of(run_dir: str | Path = DEFAULT_RUN_DIR) -> str | None:
    """The system prompt the run's training data starts with (01_data's ``system_prompt``), or None."""
    path = resolve(run_dir) / "data" / "train.jsonl"
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    msgs = json.loads(line).get("messages") or []
                except (json.JSONDecodeError, AttributeError):
                    return None
                first = msgs[0] if msgs else {}
                return first.get("content") if first.get("role") == "system" else None
    return None


# =============================================================================== merge and export

def merge_and_export(source: Any, out_dir: str | Path, run_dir: str | Path = DEFAULT_RUN_DIR, *,
                     base_model: str | None = None, overwrite: bool = False, device: str | None = "cpu",
                     dtype: str | Any = "auto", allow_base_mismatch: bool = False) -> Path:
    """Merge a LoRA adapter into its base (peft ``merge_and_unload``) and save a standalone model
    folder: weights (safetensors), config, generation config, the adapter's tokenizer with its
    chat template, and a README naming the base and the adapter. Loads a fresh copy (on the CPU
    by default), so a model in use is untouched. The folder loads with ``load(out_dir)`` or
    ``AutoModelForCausalLM.from_pretrained`` alone, and is what vLLM serves without ``--enable-lora``.
    """
    from kokoro_helpers.local.tiny_model import portable_tokenizer_files, quiet_transformers

    out = Path(out_dir)
    if not out.is_absolute():
        out = resolve(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty: pass overwrite=True or choose another folder")
    lm = load(source, run_dir, base_model=base_model, device=device, dtype=dtype,
              allow_base_mismatch=allow_base_mismatch)
    if not lm.adapters:
        raise ValueError(f"{source!r} is not an adapter: there is nothing to merge")
    info = lm.adapters[lm.active]
    with _quiet_loading():
        merged = lm.model.merge_and_unload()
    merged.eval()
    if dtype in (None, "auto"):      # merged in the loading precision (fp32 on a CPU), saved in the base's own
        import torch
        try:
            base_cfg = json.loads((Path(str(info.source.model_path)) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            base_cfg = {}
        name = base_cfg.get("dtype") or base_cfg.get("torch_dtype")
        base_dtype = getattr(torch, str(name), None) if name else None
        if isinstance(base_dtype, torch.dtype) and base_dtype.is_floating_point and merged.dtype != base_dtype:
            merged = merged.to(base_dtype)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with quiet_transformers():
            merged.save_pretrained(tmp)
            info.tokenizer.save_pretrained(tmp)
        portable_tokenizer_files(tmp)
        card = info.source.card or {}
        (tmp / "README.md").write_text(
            f"# {info.name} (merged)\n\nThe LoRA adapter `{portable(info.path)}` merged into its base "
            f"`{info.source.base_model or info.source.model_path}` with peft `merge_and_unload` by "
            "kokoro_helpers.local.generate.merge_and_export: a standalone model folder (no peft needed).\n"
            + ("\n> **Smoke model.** The base is the package's embedded tiny model; replies mean nothing.\n"
               if card.get("smoke_model") or _is_tiny_build(info.source.model_path) else ""),
            encoding="utf-8")
        (tmp / "merge_info.json").write_text(json.dumps({
            "adapter": portable(info.path), "adapter_name": info.name,
            "base_model": info.source.base_model, "base_path": portable(info.source.model_path),
            "dtype": str(merged.dtype).replace("torch.", ""), "merged_at": cards.now_iso()}, indent=2) + "\n",
            encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# =============================================================================== demo helpers

def sample_contexts(run_dir: str | Path = DEFAULT_RUN_DIR, n: int | None = 32, seed: int = 42,
                    splits: Sequence[str] = ("test", "valid")) -> list[list[dict[str, str]]]:
    """Prompts from 01_data's held-out files: for each counselor turn that answers a client turn,
    the dialogue before it (system prompt included). ``n`` of them drawn by ``seed`` (all when
    None or fewer exist), in a fixed order. Used by 04's batch demo and the benchmark."""
    import random

    data = resolve(run_dir) / "data"
    found = [data / f"{s}.jsonl" for s in splits if (data / f"{s}.jsonl").is_file()]
    if not found:
        raise FileNotFoundError(f"no {'/'.join(splits)}.jsonl in {data}: run 01_data first "
                                "(notebooks/01_data.ipynb, or kokoro_helpers.data.pipeline.prepare_data)")
    contexts: list[list[dict[str, str]]] = []
    for path in found:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                msgs = clean_messages(json.loads(line)["messages"])
                for i in range(1, len(msgs)):
                    if msgs[i]["role"] == "assistant" and msgs[i - 1]["role"] == "user":
                        contexts.append(msgs[:i])
    if n is not None and len(contexts) > n:
        picked = sorted(random.Random(seed).sample(range(len(contexts)), int(n)))
        contexts = [contexts[i] for i in picked]
    return contexts


def compare_batching(lm: "LocalModel", prompts: Sequence[Messages], batch_size: int = 8,
                     max_new_tokens: int = 48, run_dir: str | Path | None = None):
    """04's demo: the same prompts decoded greedily in batches and one per call.

    Returns (table, batched replies as :class:`Generation`); with ``run_dir`` also writes
    ``run_dir/inference/batching.json`` for the report. One timing each on whatever else the
    machine is doing — a demonstration, labelled so; ``benchmarks/bench_generate.py`` measures
    properly (forced equal lengths, best of several interleaved runs)."""
    import pandas as pd

    from kokoro_helpers.jsonio import write_json_atomic

    greedy = dict(max_new_tokens=max_new_tokens, temperature=0.0)
    lm.batch_generate(prompts[:2], batch_size=2, max_new_tokens=2, temperature=0.0)   # warm-up, untimed
    t0 = time.perf_counter()
    batched = lm.batch_generate(prompts, batch_size=batch_size, return_details=True, **greedy)
    batch_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    looped = [lm.generate(p, return_details=True, **greedy) for p in prompts]
    loop_s = time.perf_counter() - t0
    rows = {}
    for label, out, seconds, calls in ((f"batched ({batch_size} prompts per call)", batched, batch_s,
                                        -(-len(prompts) // batch_size)),
                                       ("one prompt per call", looped, loop_s, len(prompts))):
        tokens = sum(g.completion_tokens for g in out)
        rows[label] = {"calls": calls, "seconds": round(seconds, 3), "new tokens": tokens,
                       "tokens/s": round(tokens / seconds, 1) if seconds else float("nan")}
    same = sum(a.token_ids == b.token_ids for a, b in zip(batched, looped))
    table = pd.DataFrame(rows).T
    table["same replies"] = same
    if run_dir is not None:
        write_json_atomic(resolve(run_dir) / "inference" / "batching.json", {
            "model": lm.name, "device": str(lm.device), "prompts": len(prompts), "batch_size": batch_size,
            "max_new_tokens": max_new_tokens, "modes": rows, "same_replies": same,
            "speedup": round(loop_s / batch_s, 2) if batch_s else None,
            "label": "demo timing (one run, greedy, replies may stop early); benchmarks/bench_generate.py measures"})
    return table, batched


def init_adapter(out_dir: str | Path, base_model: str = "embedded:tiny", *, r: int = 8, lora_alpha: int = 16,
                 target_modules: Any = "all-linear", seed: int = 0, random_init: bool = True,
                 overwrite: bool = True) -> Path:
    """A freshly initialised (UNTRAINED) LoRA adapter on ``base_model``, saved like 02 saves one
    (adapter files + the base's tokenizer + a README saying it is untrained). ``random_init``:
    both LoRA matrices random (the adapter changes the outputs: tests, benchmarks); else peft's
    default (B = 0: the same outputs as the base). For demos and tests when no trained adapter
    exists; its replies mean nothing."""
    import torch
    from peft import LoraConfig, get_peft_model

    from kokoro_helpers.local.tiny_model import portable_tokenizer_files

    out = Path(out_dir)
    if not out.is_absolute():
        out = resolve(out)
    if (out / ADAPTER_CONFIG).is_file() and not overwrite:
        return out
    base_path = _resolve_base(base_model)
    with _quiet_loading():
        tokenizer = _load_tokenizer(base_path)
        model = _load_full_model(base_path, "cpu", torch.float32, "the base model")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            peft_model = get_peft_model(model, LoraConfig(
                r=r, lora_alpha=lora_alpha, target_modules=target_modules, lora_dropout=0.0, bias="none",
                task_type="CAUSAL_LM", init_lora_weights=not random_init))
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        peft_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    portable_tokenizer_files(tmp)
    (tmp / "README.md").write_text(
        f"# Untrained LoRA adapter ({'random' if random_init else 'zero-effect'} initialisation)\n\n"
        f"Made by `kokoro_helpers.local.generate.init_adapter` on `{base_model}` (r={r}, alpha={lora_alpha}, seed={seed}) "
        "for demos and tests. **It was never trained: its replies mean nothing.** Train a real adapter with "
        "02_finetune Part B or `python -m kokoro_helpers.train_lora --params params/default.yaml`.\n",
        encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def pick_model(model_name: str | None = None, run_dir: str | Path = DEFAULT_RUN_DIR, *,
               fallback: bool = True, log: Callable[[str], None] = print) -> tuple[Any, str]:
    """(source, description) of the model 04 works with: the card ``model_name`` (or an adapter
    folder), else the run's newest ``local_lora`` card, else, with ``fallback``, an UNTRAINED
    adapter on the embedded tiny model in ``run_dir/inference/untrained-adapter`` (said loudly),
    so that the notebook still runs before 02's Part B has trained anything."""
    if model_name:
        try:
            src = resolve_source(model_name, run_dir)
            if src.card_path is not None:
                return src.card_path, f"card {src.name!r} ({portable(src.card_path)})"
            return model_name, f"{src.kind} {portable(src.adapter_dir or src.model_path)}"
        except ModelNotFoundError as exc:
            log(f"{model_name!r}: {exc}")
    found = local_cards(run_dir)
    if found:
        path, card = found[0]
        if model_name:
            log(f"using the newest local LoRA card instead: {card['model_id']!r}")
        return path, f"card {card['model_id']!r} ({portable(path)})"
    if not fallback:
        raise ModelNotFoundError(_not_found_message(model_name or "(newest)", run_dir))
    folder = resolve(run_dir) / "inference" / "untrained-adapter"
    log("NO TRAINED ADAPTER in this run: 02_finetune Part B has not written a local_lora card yet. Using a freshly "
        "initialised, UNTRAINED adapter on the embedded tiny model so that the steps below still run; its replies "
        "mean nothing. Train one with 02_finetune (Part B) or `python -m kokoro_helpers.train_lora --params "
        "params/default.yaml`, then run this notebook again.")
    return init_adapter(folder, overwrite=False), f"UNTRAINED adapter {portable(folder)} (fallback)"
