"""What a model name points to, resolved without loading anything: a card name / model_id, a card
(dict or file), an adapter folder, a model folder, ``embedded:tiny`` or a Hub id becomes a
:class:`ModelSource` (the base to load, the adapter folder, the card). A missing folder, a base that
does not match the adapter, or a corrupt adapter config raise the :class:`ModelLoadError` subclasses
below, with a message that says what to do."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from kokoro_helpers import cards
from kokoro_helpers.paths import DEFAULT_RUN_DIR, project_root, resolve

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")


class ModelLoadError(Exception):
    """Base of the loading errors below; the message says what to do."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """No such card, adapter folder, model folder or weights file."""


class BaseModelMismatchError(ModelLoadError, ValueError):
    """The adapter was trained on another base model than the one it is being put on."""


class CorruptAdapterError(ModelLoadError, ValueError):
    """The adapter's config or weights file cannot be read."""


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
        if self.adapter_dir is not None and has_tokenizer(self.adapter_dir):
            return str(self.adapter_dir)
        return self.model_path


def has_tokenizer(folder: Path) -> bool:
    """Whether the folder holds tokenizer files."""
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


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """The adapter folder's ``adapter_config.json``; a missing or corrupt one raises a ModelLoadError."""
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


def resolve_base(name: str, progress: bool = False) -> str:
    """A loadable base: ``embedded:tiny`` built if needed, a folder as an absolute path, else a Hub id."""
    from kokoro_helpers.local.tiny_model import resolve_base_model
    return resolve_base_model(str(name), progress=progress)


def is_tiny_build(path: str | None) -> bool:
    """Whether ``path`` is a build folder of the embedded tiny model (a smoke model)."""
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
        return resolve_base(requested)
    if not recorded:
        raise BaseModelMismatchError(
            f"the adapter {adapter} does not say which base model it was trained on (no card, and no "
            f"base_model_name_or_path in {ADAPTER_CONFIG}): pass base_model='<Hub id or folder>'")
    for r in recorded:
        if is_embedded(r):
            path = resolve_base(r)
            for other in recorded:
                if is_tiny_build(other) and Path(other).name != Path(path).name:
                    notes.append(f"the adapter was trained on another build of {EMBEDDED_TINY} ({Path(other).name}); "
                                 f"it is put on the current build ({Path(path).name}): re-run 02 if replies look off")
            return path
        local = _existing_dir(r)
        if local is not None:
            return str(local)
    first = recorded[0]
    if is_tiny_build(first) or any(is_tiny_build(r) for r in recorded):
        path = resolve_base(EMBEDDED_TINY)
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
            return str(Path(resolve_base(text)).resolve())
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
            path = resolve_base(text)
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
            raise ModelNotFoundError(not_found_message(text, run_dir))
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


def not_found_message(text: str, run_dir: str | Path) -> str:
    """What to say when ``text`` names no model: where names were looked for, and the run's local models."""
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
                         "kokoro_helpers.models.open.open_model(card) for any model")
    recorded = [card.get("base_model"), card.get("base_model_path")]
    adapter = cards.adapter_dir(card, card_path)
    if adapter is None and not base_only:
        raise ModelNotFoundError(
            f"the adapter folder of {name!r} ({card.get('adapter_path') or 'no adapter_path in the card'}) does not "
            f"exist: re-run 02_finetune Part B to train it, or copy the folder back next to "
            f"{card_path or 'its card'}")
    if adapter is not None:
        try:
            recorded.append(read_adapter_config(adapter).get("base_model_name_or_path"))
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
        config = read_adapter_config(folder)
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
