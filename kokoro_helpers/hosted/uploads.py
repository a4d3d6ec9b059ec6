"""Uploading a training file once per content.

`run_dir/openai/uploads.json` maps a file's sha256 to its upload. The entry is written *pending*
before the bytes are sent, and completed with the file id when the answer comes. A pending entry
(an answer lost, a kernel killed mid-upload) is reconciled against the service's file list —
purpose, filename (which carries the sha256's first 12 hex digits), and bytes — before the file is
uploaded again. The upload itself runs with the client's retries off: after a transient error the
list is checked first, so a lost answer never becomes a second copy.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Callable

from kokoro_helpers.cards import now_iso
from kokoro_helpers.jsonio import read_json, write_json_atomic
from kokoro_helpers.hosted.errors import LookupFailedError, OpenAIFTError, SERVICE, explain
from kokoro_helpers.hosted.jobs import without_retries
from kokoro_helpers.retry import is_transient_error

PURPOSE = "fine-tune"
UPLOAD_ATTEMPTS = 3


def ledger_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "openai" / "uploads.json"


def _ledger(run_dir: str | Path) -> dict[str, Any]:
    try:
        return read_json(ledger_path(run_dir), {}) or {}
    except ValueError as exc:
        raise OpenAIFTError(f"{exc}; fix or delete it (it only maps file hashes to upload ids)") from None


def _save(run_dir: str | Path, sha: str, entry: dict[str, Any]) -> None:
    ledger = _ledger(run_dir)
    ledger[sha] = entry
    write_json_atomic(ledger_path(run_dir), ledger)


def upload_name(path: Path, sha: str) -> str:
    """The name the file is uploaded under: `train.<sha256[:12]>.jsonl` (so the file list shows the hash)."""
    return f"{path.stem}.{sha[:12]}{path.suffix}"


def find_upload(client: Any, name: str, size: int, provider: str = "openai") -> Any | None:
    """A file already at the service with this purpose, name and size (every page); None if none.
    A list that cannot be read raises LookupFailedError (never "absent")."""
    try:
        page = client.files.list(purpose=PURPOSE)
        found = [f for f in page if getattr(f, "filename", None) == name and int(getattr(f, "bytes", -1) or -1) == size
                 and getattr(f, "purpose", PURPOSE) == PURPOSE and getattr(f, "status", "processed") != "error"]
    except Exception as exc:  # noqa: BLE001
        raise LookupFailedError(
            f"{name} may already be uploaded (an earlier answer was lost), but {SERVICE.get(provider, 'OpenAI')}'s "
            f"file list could not be read: {explain(exc, provider, 'listing files')} Nothing is uploaded twice: "
            "run the cell again later.", getattr(exc, "status_code", None)) from exc
    return min(found, key=lambda f: getattr(f, "created_at", 0) or 0) if found else None


def upload_once(client: Any, path: str | Path, run_dir: str | Path, verify: bool = True,
                log: Callable[[str], None] = print, provider: str = "openai",
                sleep: Callable[[float], None] = time.sleep) -> str:
    """The file id of `path`'s content at the service: reused from uploads.json (and, with `verify`,
    checked to still exist), or found in the file list when an earlier upload's answer was lost,
    else uploaded now — recorded pending before sending, completed right after."""
    import openai
    path = Path(path)
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    name = upload_name(path, sha)
    known = _ledger(run_dir).get(sha) or {}
    if known.get("file_id"):
        if not verify:
            return known["file_id"]
        try:
            client.files.retrieve(known["file_id"])
            log(f"{path.name}: same content already uploaded as {known['file_id']} (not uploaded again)")
            return known["file_id"]
        except openai.NotFoundError:
            log(f"{path.name}: {known['file_id']} no longer exists at {SERVICE.get(provider, 'OpenAI')}; uploading again")
            known = {}
    if known.get("status") == "pending":
        found = find_upload(client, known.get("filename", name), int(known.get("bytes", len(data))), provider)
        if found is not None:
            _save(run_dir, sha, {**known, "file_id": found.id, "status": "uploaded", "reconciled_at": now_iso()})
            log(f"{path.name}: an earlier upload whose answer was lost is {found.id}; not uploaded again")
            return found.id
    entry = {"status": "pending", "filename": name, "bytes": len(data), "purpose": PURPOSE, "sha256": sha,
             "provider": provider, "since": now_iso()}
    _save(run_dir, sha, entry)
    create = without_retries(client).files.create
    last: BaseException | None = None
    for attempt in range(1, UPLOAD_ATTEMPTS + 1):
        try:
            fobj = create(file=(name, data), purpose=PURPOSE)
            break
        except Exception as exc:  # noqa: BLE001
            if not is_transient_error(exc):
                raise
            last = exc
            # a 429 was rejected before anything was stored; anything else may have been stored, and a
            # just-stored file can take a moment to show in the list: wait, then look
            if attempt < UPLOAD_ATTEMPTS or getattr(exc, "status_code", None) != 429:
                sleep(2.0 * 2 ** (attempt - 1))
            found = None if getattr(exc, "status_code", None) == 429 else find_upload(client, name, len(data), provider)
            if found is not None:
                fobj = found
                log(f"{path.name}: the upload's answer was lost, but the file is there ({found.id})")
                break
    else:
        raise explain(last, provider, f"uploading {path.name}") from last
    _save(run_dir, sha, {**entry, "file_id": fobj.id, "status": "uploaded", "uploaded_at": now_iso()})
    log(f"{path.name}: uploaded as {fobj.id} ({len(data):,} bytes)")
    return fobj.id
