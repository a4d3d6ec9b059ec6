"""The fine-tuning path's records in run_dir/openai/: where they live, reading their JSON with a
fix-it message, and SDK objects and timestamps as the JSON they are recorded as."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kokoro_helpers.hosted.errors import OpenAIFTError
from kokoro_helpers.jsonio import read_json
from kokoro_helpers.paths import resolve


def openai_dir(run_dir: str | Path) -> Path:
    return resolve(run_dir) / "openai"


def read_record(path: Path, default: Any = None) -> Any:
    """A JSON record's content (`default` when absent); an unreadable one is an OpenAIFTError saying what to do."""
    try:
        return read_json(path, default)
    except ValueError as exc:
        raise OpenAIFTError(f"{exc}; fix or delete it") from None


def iso_time(ts: int | float | None) -> str | None:
    """A service timestamp (Unix seconds) as UTC ISO 8601; None for none."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds") if ts else None


def as_json_data(obj: Any) -> Any:
    """An SDK object (pydantic) or plain value as JSON-able data."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json", exclude_none=False)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return obj
