"""The blind-scoring store: criteria, raters, each rater's item order, and the append-only
per-rater JSONL file that never loses a score.

Criteria keys are short ASCII identifiers (CSV columns, plot labels — no CJK font needed);
their labels, shown to raters, may be Japanese. Presets: ``default`` (the seeds' 正確性・関連性・
専門性) and ``kokorochat`` (turn-level items of KokoroChat's client review).

Items come in an order shuffled per rater (seeded by the rater name, so a resumed session sees
the same order). Each score is one JSON line ``{item_id, model, rater, scores{criterion: 0..5},
comment, time}`` appended to ``store_dir/<rater>.jsonl`` and fsynced before the caller moves on,
so a killed kernel loses nothing. Scoring an item again appends another line: the history is
kept and the latest line wins when reading. A torn last line (a power cut mid-append) is
skipped with a warning when read and never glued to the next record.
"""
from __future__ import annotations

import hashlib
import json
import numbers
import os
import random
import re
import unicodedata
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from kokoro_helpers.data.schema import CRITERIA as KOKOROCHAT_CRITERIA
from kokoro_helpers.jsonio import read_jsonl
from kokoro_helpers.paths import resolve

SCORE_MIN, SCORE_MAX = 0, 5
SCORE_VALUES = tuple(range(SCORE_MIN, SCORE_MAX + 1))

CRITERIA_PRESETS: dict[str, dict[str, str]] = {
    "default": {"accuracy": "正確性", "relevance": "関連性", "expertise": "専門性"},
    # Turn-level items of KokoroChat's client review (schema.CRITERIA keys and Japanese labels):
    # the ones a single counselor reply can be judged on.
    "kokorochat": {k: KOKOROCHAT_CRITERIA[k] for k in (
        "showed_acceptance_and_empathy",            # 受容・共感
        "provided_acknowledgment_and_affirmation",  # 肯定・承認
        "asked_effective_questions",                # 的確な質問による会話の促進
        "offered_actionable_suggestions",           # 次の行動につながる提案
    )},
}
CRITERIA_PRESETS["seeds"] = CRITERIA_PRESETS["default"]

DEMO_PREFIX = "demo-"   # rater names reserved for demo_scores()
STORE_SUFFIX = ".jsonl"
#: Columns of load_scores() that are not criteria.
META_COLUMNS = ("item_id", "model", "rater", "comment", "time", "demo", "split")
_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
_RATER_RE = re.compile(r"\w[\w.-]{0,63}")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)),
                     *(f"lpt{i}" for i in range(1, 10))}


class ScoreError(ValueError):
    """A submitted score that cannot be recorded (out of range, not an integer, unknown or
    missing criterion, nothing left to score). The message says what to change."""


# --------------------------------------------------------------------------- criteria, raters

def resolve_criteria(criteria: str | Sequence[str] | Mapping[str, str] | None = None) -> dict[str, str]:
    """Criteria as ``{key: label}``.

    ``None`` → the seeds' default (accuracy 正確性, relevance 関連性, expertise 専門性); a preset
    name (``"default"``/``"seeds"``, ``"kokorochat"``); a list of keys (labels looked up in the
    presets and in schema.CRITERIA, else the key itself); or a ``{key: label}`` mapping. Keys must
    be ASCII identifiers (they become CSV columns and plot labels)."""
    if criteria is None:
        criteria = "default"
    if isinstance(criteria, str):
        if criteria not in CRITERIA_PRESETS:
            raise ValueError(f"unknown criteria preset {criteria!r}: use one of "
                             f"{sorted(CRITERIA_PRESETS)}, a list of keys or a {{key: label}} mapping")
        out = dict(CRITERIA_PRESETS[criteria])
    elif isinstance(criteria, Mapping):
        out = {str(k): str(v) for k, v in criteria.items()}
    else:
        known = {k: v for preset in CRITERIA_PRESETS.values() for k, v in preset.items()}
        known.update({k: v for k, v in KOKOROCHAT_CRITERIA.items() if k not in known})
        out = {}
        for key in criteria:
            key = str(key)
            out[key] = known.get(key, key)
    if not out:
        raise ValueError("criteria is empty: give at least one criterion")
    bad = [k for k in out if not _KEY_RE.fullmatch(k) or k in META_COLUMNS]
    if bad:
        raise ValueError(f"criterion keys must be ASCII identifiers (letter first, then letters, digits, _), "
                         f"not one of {META_COLUMNS}: {bad}. Put Japanese text in the label: {{'empathy': '受容・共感'}}")
    return out


def check_rater(rater: str, demo: bool = False) -> str:
    """The rater name, NFC-normalised, if it is safe as a file name; else ValueError.

    Letters (any script), digits, ``_``, ``.`` and ``-``; 1–64 characters; starting with a letter,
    digit or ``_``; not ending with ``.``; not a Windows device name. Names starting with
    ``demo-`` are reserved for ``demo_scores`` (``demo=True``)."""
    if not isinstance(rater, str):
        raise ValueError(f"rater must be a string, got {type(rater).__name__}")
    name = unicodedata.normalize("NFC", rater.strip())
    if (not _RATER_RE.fullmatch(name) or name.endswith(".")
            or name.split(".")[0].lower() in _WINDOWS_RESERVED):
        raise ValueError(f"rater name {rater!r} is not safe as a file name: use 1-64 letters, digits, "
                         f"'_', '.', '-' (no spaces or slashes), e.g. 'tanaka' or 'rater_01'")
    if name.lower().startswith(DEMO_PREFIX) != bool(demo):
        if demo:
            raise ValueError(f"demo rater names must start with {DEMO_PREFIX!r}, got {name!r}")
        raise ValueError(f"rater names starting with {DEMO_PREFIX!r} are reserved for demo_scores(); "
                         f"choose another name than {name!r}")
    return name


def validate_scores(scores: Mapping[str, Any], criteria: Mapping[str, str]) -> dict[str, int]:
    """``{criterion: int 0..5}`` for exactly the given criteria, or ScoreError saying what is wrong."""
    if not isinstance(scores, Mapping):
        raise ScoreError(f"採点は {{項目: 0..5}} の形で渡してください (scores must be a mapping {{criterion: 0..5}}, "
                         f"got {type(scores).__name__})")
    problems = []
    unknown = [k for k in scores if k not in criteria]
    if unknown:
        problems.append(f"未知の評価項目 (unknown criteria) {unknown} (this widget scores {list(criteria)})")
    missing = [k for k in criteria if k not in scores or scores[k] is None]
    if missing:
        problems.append("未採点 — missing scores for " + ", ".join(f"{k} ({criteria[k]})" for k in missing))
    clean: dict[str, int] = {}
    for key in criteria:
        value = scores.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            problems.append(f"{criteria[key]} ({key}) = {value!r} は整数ではありません (is not an integer)")
        elif not SCORE_MIN <= int(value) <= SCORE_MAX:
            problems.append(f"{criteria[key]} ({key}) = {value} は範囲外です (is outside {SCORE_MIN}..{SCORE_MAX})")
        else:
            clean[key] = int(value)
    if problems:
        raise ScoreError("記録されていません (score not recorded): " + "; ".join(problems)
                         + f"。すべての項目に {SCORE_MIN}〜{SCORE_MAX} の整数を選んでください "
                         f"(every criterion needs an integer {SCORE_MIN}..{SCORE_MAX}).")
    return clean


# --------------------------------------------------------------------------- items and order

def item_key(item: Mapping[str, Any]) -> tuple[str, str]:
    """What one scoring unit is: (item_id as text, model)."""
    return str(item["item_id"]), str(item["model"])


def check_items(items: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The items as a list of dicts, each checked for {item_id, model, context: [messages], response}
    and unique by (item_id, model); a DataFrame is taken row by row. ValueError saying what is wrong."""
    if hasattr(items, "to_dict") and hasattr(items, "columns"):   # a DataFrame
        items = items.to_dict("records")
    out, seen, dupes = [], set(), []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ValueError(f"item {i} is a {type(item).__name__}, expected a dict "
                             f"{{item_id, model, context, reference, response}}")
        missing = [k for k in ("item_id", "model", "context", "response") if k not in item]
        if missing:
            raise ValueError(f"item {i} lacks {missing}; items are dicts {{item_id, model, context: "
                             f"[messages], reference, response}}")
        if item["item_id"] is None or not str(item["model"]):
            raise ValueError(f"item {i} has an empty item_id or model")
        if not isinstance(item["context"], (list, tuple)):
            raise ValueError(f"item {i} ({item['item_id']}): context must be a list of messages")
        key = item_key(item)
        if key in seen:
            dupes.append(key)
        seen.add(key)
        out.append(dict(item))
    if dupes:
        raise ValueError(f"{len(dupes)} duplicate (item_id, model) pairs in items, e.g. {dupes[:3]}")
    if not out:
        raise ValueError("no items to score")
    return out


def rater_order(items: Iterable[Mapping[str, Any]], rater: str) -> list[tuple[str, str]]:
    """The (item_id, model) keys in the order this rater sees them: sorted, then shuffled by a
    generator seeded from the rater's name (sha256, not Python's salted hash), so the order
    depends only on the set of items and the name — the same in every session."""
    keys = sorted(item_key(it) for it in items)
    seed = int.from_bytes(hashlib.sha256(f"kokoro-scoring|{rater}".encode("utf-8")).digest()[:8], "big")
    random.Random(seed).shuffle(keys)
    return keys


# --------------------------------------------------------------------------- the store

def default_store_dir(run_dir: str | Path) -> Path:
    """``run_dir/eval/human_scores`` (DESIGN.md's contract)."""
    return resolve(run_dir) / "eval" / "human_scores"


def store_path(store_dir: str | Path, rater: str) -> Path:
    return resolve(store_dir) / f"{rater}{STORE_SUFFIX}"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:          # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append_record(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line and make it durable before returning: a single unbuffered write
    (O_APPEND), then ``os.fsync`` of the file (and of the folder when the file is new). A torn
    last line left by a power cut is never glued to the new record: it gets its own line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    is_new = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size:
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    data = b"\n" + data
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if is_new:
        _fsync_dir(path.parent)


def is_record(rec: Any) -> bool:
    """Whether a parsed line is a score record: a dict with item_id, model and a scores dict."""
    return (isinstance(rec, dict) and isinstance(rec.get("scores"), dict)
            and rec.get("item_id") is not None and rec.get("model") is not None)


def read_records(path: str | Path, _warned: set | None = None) -> list[dict[str, Any]]:
    """Every readable record of one rater file, in file (= submit) order. An unreadable line
    (a torn write after a power cut, a hand edit) is skipped with a warning naming it; with
    ``_warned`` (a set the caller keeps) each bad line is warned about once."""
    path = Path(path)
    bad: list[tuple[str, str]] = []    # (where, text): warned below, so the warning points at our caller
    rows = read_jsonl(path, lenient=True, missing_ok=True,
                      on_bad=lambda lineno, line: bad.append((f"{path}:{lineno}", line)))
    out = []
    for i, rec in enumerate(rows, 1):
        if is_record(rec):
            out.append(rec)
        else:                           # valid JSON but not a score record: a hand edit
            bad.append((f"{path} (record {i})", json.dumps(rec, ensure_ascii=False)))
    for where, line in bad:
        if _warned is None or where not in _warned:
            warnings.warn(f"{where}: skipping an unreadable score line "
                          f"(torn write or hand edit): {line[:80]!r}", stacklevel=2)
            if _warned is not None:
                _warned.add(where)
    return out
