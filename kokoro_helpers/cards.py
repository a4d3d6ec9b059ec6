"""Model cards: run_dir/models/<name>.json, one per fine-tuned model (OpenAI or local LoRA).

A card keeps the fields of the seeds' model-info files — model_id, timestamp, base_model,
training_params, evaluation_results, usage_instructions — and adds `kind` ("openai" |
"local_lora") with what that kind needs. Cards are written atomically (tmp + fsync + rename),
so a crash never leaves half a card, and updated in place as a job progresses.
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kokoro_helpers.jsonio import write_json_atomic
from kokoro_helpers.paths import resolve

KINDS = ("openai", "local_lora")
BASE_FIELDS = ("model_id", "timestamp", "base_model", "training_params", "evaluation_results",
               "usage_instructions", "kind")


class CardError(ValueError):
    """A missing, unreadable or malformed card; the message names the file."""


def models_dir(run_dir: str | Path) -> Path:
    return resolve(run_dir) / "models"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def slugify(text: str) -> str:
    """A file-name-safe card name: `ft:gpt-4o-mini-2024-07-18:org:kokoro-chat:abc` -> `ft-gpt-4o-mini-...-abc`."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return slug or "model"


def new_card(kind: str, model_id: str, base_model: str, training_params: dict[str, Any],
             usage_instructions: str = "", **extra: Any) -> dict[str, Any]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    card = {"model_id": model_id, "timestamp": now_iso(), "base_model": base_model,
            "training_params": training_params, "evaluation_results": {},
            "usage_instructions": usage_instructions, "kind": kind}
    card.update(extra)
    return card


def save_card(path: str | Path, card: dict[str, Any]) -> Path:
    """Write the card atomically and durably (a killed process leaves the old or the new card)."""
    missing = [f for f in BASE_FIELDS if f not in card]
    if missing:
        raise CardError(f"card is missing fields {missing}")
    return write_json_atomic(path, card)


def card_path(run_dir: str | Path, name: str) -> Path:
    return models_dir(run_dir) / f"{slugify(name)}.json"


def load_card(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CardError(f"model card not found: {path}")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CardError(f"model card {path} is corrupt ({exc}); fix or delete it") from exc
    if not isinstance(card, dict) or "model_id" not in card:
        raise CardError(f"model card {path} has no model_id")
    card.setdefault("kind", "openai")  # the seeds' model-info files were all OpenAI models
    return card


def update_card(path: str | Path, **fields: Any) -> dict[str, Any]:
    """Load, merge `fields` (dicts merged one level deep), save; returns the new card."""
    card = load_card(path)
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(card.get(key), dict):
            card[key] = {**card[key], **value}
        else:
            card[key] = value
    save_card(path, card)
    return card


def adapter_dir(card: dict[str, Any], card_path: str | Path | None = None) -> Path | None:
    """The adapter folder of a ``local_lora`` card: ``adapter_path`` as absolute, relative to the
    project root, or relative to the card's folder; else ``<models>/<card file name>/``.
    None if none of these exists."""
    candidates: list[Path] = []
    raw = card.get("adapter_path")
    if raw:
        p = Path(str(raw)).expanduser()
        if p.is_absolute():
            candidates.append(p)
        else:
            candidates += [resolve(p)] + ([Path(card_path).parent / p] if card_path else []) + [p]
    if card_path is not None:
        candidates.append(Path(card_path).with_suffix(""))
    return next((c.resolve() for c in candidates if c.is_dir()), None)


def list_cards(run_dir: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every readable card of the run, newest first (corrupt ones are skipped, not fatal)."""
    folder = models_dir(run_dir)
    out = []
    for path in folder.glob("*.json") if folder.is_dir() else []:
        try:
            out.append((path, load_card(path)))
        except CardError:
            continue
    out.sort(key=lambda pc: str(pc[1].get("timestamp", "")), reverse=True)
    return out


def find_card(run_dir: str | Path, model_id: str) -> tuple[Path, dict[str, Any]]:
    """The card whose model_id (or file name) is `model_id`."""
    for path, card in list_cards(run_dir):
        if card.get("model_id") == model_id or path.stem == model_id:
            return path, card
    raise CardError(f"no model card for {model_id!r} in {models_dir(run_dir)} (list them with --list)")
