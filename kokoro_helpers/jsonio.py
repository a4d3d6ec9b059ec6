"""Small file helpers every step shares: JSON lines in, durable JSON out, content hashes."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def read_jsonl(path: str | Path) -> list[Any]:
    """The rows of a .jsonl file (blank lines skipped); a ValueError naming the broken line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n} is not valid JSON ({exc.msg}); re-run the step that wrote it") from None
    return rows


def read_json(path: str | Path, default: Any = None) -> Any:
    """A JSON file's content; `default` when it does not exist; a ValueError naming the file when
    it cannot be read or parsed."""
    path = Path(path)
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is unreadable ({exc})") from exc


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically and durably: tmp + fsync + rename, so a crash leaves the old or the
    new file, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
