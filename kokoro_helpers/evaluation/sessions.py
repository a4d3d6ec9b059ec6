"""Whole sessions with their clients' own ratings, for dialogue-level evaluation (03).

01_data writes only the chat examples; the clients' ratings (`score` 0..100 and the 20 criteria
0..5 of `review_by_client_en`) stay in the source. `load_sessions` reads the source that 01 used
(`run_dir/data/stats.json`'s `source`) again and keeps the dialogues of `splits.json`, each with
its split, so every dialogue-level step (judge validity, score prediction) sees exactly the same
train / valid / test sessions as training did.

    sessions = load_sessions(run_dir)                 # list of Session
    test = [s for s in sessions if s.split == "test"]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from kokoro_helpers.jsonio import read_json
from kokoro_helpers.paths import resolve
from kokoro_helpers.data.schema import CRITERIA, SPEAKER_LABEL_JA

TARGETS = ("score", *CRITERIA)          # what a client rated: the overall score, then the 20 criteria
SCORE_MAX = {"score": 100, **{c: 5 for c in CRITERIA}}


class SessionError(RuntimeError):
    """The sessions cannot be loaded; the message says what to do."""


@dataclass
class Session:
    id: Any
    split: str
    lines: list[tuple[str, str]]                        # (openai role: user | assistant, text)
    ratings: dict[str, float | None] = field(default_factory=dict)   # target -> client's rating

    @property
    def text(self) -> str:
        """The dialogue as 相談者 / カウンセラー lines: what a judge or a predictor reads."""
        return session_text(self.lines)


def session_text(lines: Sequence[tuple[str, str]]) -> str:
    return "\n".join(f"{SPEAKER_LABEL_JA.get(role, role)}: {text}" for role, text in lines)


def messages_to_lines(messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """Chat messages (system left out) as (role, text) lines: a generated session in the same form."""
    return [(m["role"], str(m.get("content", ""))) for m in messages if m.get("role") in ("user", "assistant")]


def _ratings(record: Mapping[str, Any]) -> dict[str, float | None]:
    review = record.get("review_by_client_en") if isinstance(record.get("review_by_client_en"), dict) else {}
    review_jp = record.get("review_by_client_jp") if isinstance(record.get("review_by_client_jp"), dict) else {}
    jp_keys = {"score": "点数", **CRITERIA}
    out: dict[str, float | None] = {}
    for target in TARGETS:
        value = review.get(target, review_jp.get(jp_keys[target]))
        try:
            out[target] = float(value) if value is not None else None
        except (TypeError, ValueError):
            out[target] = None
    return out


def load_sessions(run_dir: str | Path, source: str | None = None) -> list[Session]:
    """Every dialogue of run_dir/data/splits.json with its split and its client's ratings, read
    from `source` (default: the `source` 01_data recorded in stats.json). Raises SessionError when
    01 has not run or the source is no longer where it was."""
    from kokoro_helpers.data.convert import RecordError, parse_record
    from kokoro_helpers.data.sources import SourceError, read_source

    data = resolve(run_dir) / "data"
    splits, stats = data / "splits.json", data / "stats.json"
    if not splits.is_file() or not stats.is_file():
        raise SessionError(f"{data}: splits.json / stats.json not found: run 01_data for this run_dir first")
    split_of = {str(i): name for name, ids in read_json(splits).items() for i in ids}
    source = source or read_json(stats).get("source")
    if not source:
        raise SessionError(f"{stats} records no source: re-run 01_data")
    try:
        raw, _ = read_source(str(source))
    except SourceError as exc:
        raise SessionError(f"cannot re-read 01's source {source!r} for the clients' ratings: {exc}") from exc
    sessions: list[Session] = []
    for item in raw:
        try:
            d = parse_record(item.record, item.fallback_id)
        except RecordError:
            continue
        split = split_of.get(str(d.id))
        if split is None:
            continue
        lines = [("user" if role == "client" else "assistant", text) for role, text in d.utterances]
        sessions.append(Session(d.id, split, lines, _ratings(d.raw)))
    if not sessions:
        raise SessionError(f"none of the dialogues in {splits} were found in {source!r}: "
                           f"was 01_data run on another source?")
    return sessions


def sessions_frame(sessions: Sequence[Session]):
    """One row per session: id, split, chars, and the client's ratings."""
    import pandas as pd
    return pd.DataFrame([{"id": s.id, "split": s.split, "chars": len(s.text), **s.ratings} for s in sessions])
