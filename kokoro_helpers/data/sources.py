"""Read KokoroChat records from any `dataset_source`.

Accepted: `embedded` (the project's own sample dialogues), a Hugging Face Hub id
(`UEC-InabaLab/KokoroChat`, via `datasets.load_dataset`), a folder of one-dialogue JSON files
(the GitHub release), a `.json` / `.jsonl` file of records, a `.parquet` file shaped like the
Hub's conversion, or a `.csv` with `question`/`answer` columns (single-turn examples).
A file that cannot be read or parsed becomes a `Reject`, never an exception.
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from kokoro_helpers.paths import SAMPLE_DIR, resolve

try:  # orjson parses UTF-8 bytes ~2x faster than json (the full corpus is 134 MB of JSON)
    from orjson import loads as _loads
except ImportError:  # same results, slower
    _loads = json.loads

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
EMBEDDED = "embedded"


@dataclass
class RawRecord:
    record: Any
    origin: str                 # file name, file:line, or hub:row — for the rejected list
    fallback_id: str | None = None


@dataclass
class Reject:
    origin: str
    reason: str
    detail: str = ""


class SourceError(ValueError):
    """The source itself is unusable (missing path, Hub unreachable): the message says what to do."""


def describe_source(source: str) -> str:
    """What kind of source this is: embedded | hub | folder | json | jsonl | parquet | csv."""
    if source == EMBEDDED:
        return "embedded"
    p = resolve(source)
    if p.is_dir():
        return "folder"
    if p.is_file():
        ext = p.suffix.lower().lstrip(".")
        if ext in ("json", "jsonl", "parquet", "csv"):
            return ext
        raise SourceError(f"{p}: unsupported file type {p.suffix!r}; use .json, .jsonl, .parquet or .csv")
    if HUB_ID.match(source):
        return "hub"
    raise SourceError(
        f"dataset_source {source!r} is neither an existing path nor a Hub id. Give a folder of "
        "KokoroChat JSON files, a .json/.jsonl/.parquet/.csv file, a Hub id such as "
        "UEC-InabaLab/KokoroChat, or 'embedded' for the bundled sample.")


def _read_json_file(path: Path) -> tuple[Any, Reject | None]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, Reject(path.name, "unreadable_file", str(exc))
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
        data = data[3:]
    try:
        return _loads(data), None
    except ValueError as exc:  # orjson also refuses invalid UTF-8 here: tell the two apart
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as bad:
            return None, Reject(path.name, "not_utf8", str(bad))
        return None, Reject(path.name, "invalid_json", str(exc))


def _from_folder(folder: Path, rejects: list[Reject]) -> Iterator[RawRecord]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".json" and p.is_file())
    for path in files:
        obj, rej = _read_json_file(path)
        if rej:
            rejects.append(rej)
        else:
            yield RawRecord(obj, path.name, path.stem)


def _from_json(path: Path, rejects: list[Reject]) -> Iterator[RawRecord]:
    obj, rej = _read_json_file(path)
    if rej:
        raise SourceError(f"{path}: {rej.reason}: {rej.detail}")
    items = obj if isinstance(obj, list) else [obj]
    for i, rec in enumerate(items):
        yield RawRecord(rec, f"{path.name}[{i}]")


def _from_jsonl(path: Path, rejects: list[Reject]) -> Iterator[RawRecord]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            origin = f"{path.name}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                rejects.append(Reject(origin, "not_utf8", str(exc)))
                continue
            if not line.strip():
                continue
            try:
                yield RawRecord(json.loads(line), origin)
            except json.JSONDecodeError as exc:
                rejects.append(Reject(origin, "invalid_json", str(exc)))


def _from_parquet(path: Path, rejects: list[Reject]) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    for i, rec in enumerate(pq.read_table(path).to_pylist()):
        yield RawRecord(rec, f"{path.name}[{i}]")


def _from_csv(path: Path, rejects: list[Reject]) -> Iterator[RawRecord]:
    """The seeds' csv_to_jsonl: each question/answer row is a one-exchange dialogue."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"question", "answer"} - set(reader.fieldnames or [])
        if missing:
            raise SourceError(f"{path}: a CSV source needs the columns question and answer (missing {sorted(missing)})")
        for lineno, row in enumerate(reader, 2):
            q, a = row.get("question") or "", row.get("answer") or ""
            digest = hashlib.sha1(f"{q}\x00{a}".encode("utf-8")).hexdigest()[:16]
            record = {"dialogue": [{"role": "client", "utterance": q},
                                   {"role": "counselor", "utterance": a}]}
            yield RawRecord(record, f"{path.name}:{lineno}", f"csv:{digest}")


def _from_hub(hub_id: str, rejects: list[Reject]) -> Iterator[RawRecord]:
    try:
        from datasets import load_dataset

        dataset = load_dataset(hub_id, split="train")
    except Exception as exc:  # offline, gated, misspelt: say what to do instead
        raise SourceError(
            f"could not load {hub_id!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
            "Check the id and your network, or download the data and point dataset_source at the "
            "folder of JSON files or the .parquet file.") from exc
    for i, rec in enumerate(dataset.to_list() if hasattr(dataset, "to_list") else dataset):
        yield RawRecord(rec, f"{hub_id}[{i}]")


def read_source(source: str) -> tuple[list[RawRecord], list[Reject]]:
    """All records of a source, and the files/lines that could not even be parsed."""
    kind = describe_source(source)
    rejects: list[Reject] = []
    if kind == "embedded":
        records = list(_from_folder(SAMPLE_DIR, rejects))
    elif kind == "hub":
        records = list(_from_hub(source, rejects))
    else:
        reader = {"folder": _from_folder, "json": _from_json, "jsonl": _from_jsonl,
                  "parquet": _from_parquet, "csv": _from_csv}[kind]
        records = list(reader(resolve(source), rejects))
    return records, rejects
