"""Blind manual 0–5 scoring that never loses a score, and its summary.

The widget
    ``ScoringWidget(items, store_dir, rater, criteria=None)`` shows one candidate reply at a time:
    the dialogue so far as a chat, the real counselor's reply behind a toggle, and the reply to
    judge — never the model's name. Items come in an order shuffled per rater (seeded by the rater
    name, so a resumed session sees the same order). Each submit appends one JSON line
    ``{item_id, model, rater, scores{criterion: 0..5}, comment, time}`` to
    ``store_dir/<rater>.jsonl`` and fsyncs it *before* the widget moves on, so a killed kernel
    loses nothing; a new widget for the same rater resumes at the first unscored item. Scoring an
    item again appends another line: the history is kept and the latest line wins when reading.
    The button handlers are plain methods (``on_submit_clicked`` …), so everything is testable
    without a browser, and nothing ever waits for a person: papermill/nbval runs display the
    widget and go on (``demo_scores`` can fill a seeded, clearly marked demo set so the summary
    cells have something to show).

The summary
    ``load_scores`` (latest per rater × item × model) → ``summarize`` (mean, sd, n and a 95 %
    t-interval per model × criterion) → ``plot_distributions`` / ``plot_means`` →
    ``agreement`` (Krippendorff's alpha, ordinal, value domain 0..5, via the ``krippendorff``
    package) → ``export_csv`` → ``write_evaluation_results`` (into each model card's
    ``evaluation_results`` in the seeds' shape: test_evaluation, valid_evaluation, summary,
    timestamp).

Criteria keys are short ASCII identifiers (CSV columns, plot labels — no CJK font needed);
their labels, shown to raters, may be Japanese. Presets: ``default`` (the seeds' 正確性・関連性・
専門性) and ``kokorochat`` (turn-level items of KokoroChat's client review).
"""
from __future__ import annotations

import hashlib
import html
import json
import math
import numbers
import os
import random
import re
import unicodedata
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from kokoro_helpers import widget_view
from kokoro_helpers.display import chat_html
from kokoro_helpers.paths import resolve
from kokoro_helpers.data.schema import CRITERIA as KOKOROCHAT_CRITERIA

SCORE_MIN, SCORE_MAX = 0, 5
SCORE_VALUES = tuple(range(SCORE_MIN, SCORE_MAX + 1))
#: Context messages shown open above the reply; earlier ones sit in a collapsed block, so the form
#: fits a 1000-px-high window without scrolling to submit.
CONTEXT_SHOWN = 2
#: Below this many scores of a model × criterion the summary shows the count and the mean only
#: (no interval, NaN): with one or two scores a t-interval runs far outside 0..5.
MIN_SCORES_FOR_INTERVAL = 5
CONTEXT_MAX_PX, REPLY_MAX_PX = 240, 220     # taller texts scroll inside their block

#: Criteria presets: key -> label shown to raters. "default" is the seeds' three criteria.
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
DEMO_COMMENT = "demo"
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


def _check_items(items: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
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


def read_records(path: str | Path, _warned: set | None = None) -> list[dict[str, Any]]:
    """Every readable record of one rater file, in file (= submit) order. An unreadable line
    (a torn write after a power cut, a hand edit) is skipped with a warning naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                ok = (isinstance(rec, dict) and isinstance(rec.get("scores"), dict)
                      and rec.get("item_id") is not None and rec.get("model") is not None)
            except json.JSONDecodeError:
                ok = False
            if not ok:
                if _warned is None or (str(path), lineno) not in _warned:
                    warnings.warn(f"{path}:{lineno}: skipping an unreadable score line "
                                  f"(torn write or hand edit): {line[:80]!r}", stacklevel=2)
                    if _warned is not None:
                        _warned.add((str(path), lineno))
                continue
            out.append(rec)
    return out


# --------------------------------------------------------------------------- the widget

class ScoringWidget:
    """Blind 0–5 scoring of candidate replies by one rater; see the module docstring.

    >>> w = ScoringWidget(items, "runs/default/eval/human_scores", rater="tanaka")
    >>> w                      # in a notebook: the widget (never waits for anyone)
    >>> w.submit({"accuracy": 4, "relevance": 5, "expertise": 3}, comment="丁寧")

    ``position`` is the index of the current item in this rater's ``order`` (``n_items`` when
    every item is scored). Navigation: ``submit`` records and moves to the next unscored item
    (wrapping to the start, so skipped items come back); ``skip`` moves one item forward without
    recording (past the last item: to the first unscored one); ``back`` moves one item back, and
    the controls show the rater's latest scores for an item already scored (submitting again
    appends a new line: history kept, latest wins).
    """

    def __init__(self, items: Iterable[Mapping[str, Any]], store_dir: str | Path, rater: str,
                 criteria: str | Sequence[str] | Mapping[str, str] | None = None, *,
                 show_reference: bool = False, demo: bool = False):
        self.rater = check_rater(rater, demo=demo)
        self.criteria = resolve_criteria(criteria)
        self.items = _check_items(items)
        self._by_key = {item_key(it): it for it in self.items}
        self.order = rater_order(self.items, self.rater)
        self.store_dir = resolve(store_dir)
        self.path = store_path(self.store_dir, self.rater)
        self._warned: set = set()
        self._latest: dict[tuple[str, str], dict[str, Any]] = {}
        self._reload()
        self._position = self._first_unscored(start=0)
        self._show_reference = bool(show_reference)
        self.message = ""
        self._build_ui()
        self._render()

    # ---- state
    @property
    def position(self) -> int:
        """Index of the current item in ``order``; ``n_items`` when every item is scored."""
        return self._position

    @property
    def n_items(self) -> int:
        return len(self.order)

    @property
    def n_scored(self) -> int:
        return len(self._latest)

    @property
    def done(self) -> bool:
        """True when every item is scored and nothing is shown (position == n_items)."""
        return self._position >= self.n_items

    @property
    def progress(self) -> str:
        """``"k / N"``: items this rater has scored, of all items."""
        return f"{self.n_scored} / {self.n_items}"

    @property
    def current_key(self) -> tuple[str, str] | None:
        return None if self.done else self.order[self._position]

    @property
    def current(self) -> dict[str, Any] | None:
        """The item shown now (with its model: for code, never displayed), or None when done."""
        key = self.current_key
        return None if key is None else self._by_key[key]

    def is_scored(self, key: tuple[str, str]) -> bool:
        return key in self._latest

    def latest(self, key: tuple[str, str] | None = None) -> dict[str, Any] | None:
        """This rater's latest record for an item (default: the current one), or None."""
        key = self.current_key if key is None else key
        return self._latest.get(key)

    def history(self, key: tuple[str, str] | None = None) -> list[dict[str, Any]]:
        """Every record this rater submitted for an item (default: the current one), oldest first."""
        key = self.current_key if key is None else key
        return [r for r in read_records(self.path, self._warned) if (str(r["item_id"]), str(r["model"])) == key]

    def _reload(self) -> None:
        """Re-read this rater's file (another widget for the same rater may have written to it)."""
        latest = {}
        for rec in read_records(self.path, self._warned):
            key = (str(rec["item_id"]), str(rec["model"]))
            if key in self._by_key:
                latest[key] = rec
        self._latest = latest

    def _first_unscored(self, start: int) -> int:
        n = self.n_items
        for step in range(n):
            i = (start + step) % n
            if self.order[i] not in self._latest:
                return i
        return n

    # ---- actions (plain methods: the buttons call these)
    def submit(self, scores: Mapping[str, Any], comment: str = "") -> dict[str, Any]:
        """Record scores for the current item, durably, then move to the next unscored item.

        Raises ScoreError (a ValueError) — and records nothing, and stays put — for a score
        outside 0..5, a non-integer, an unknown or a missing criterion, or when every item is
        scored already. Returns the record written."""
        if self.done:
            raise ScoreError(f"すべて採点済みです (every item is scored, {self.progress}): 戻る (back) で修正できます "
                             "(use back() to revise one)")
        clean = validate_scores(scores, self.criteria)
        if comment is None:
            comment = ""
        if not isinstance(comment, str):
            raise ScoreError(f"コメントは文字列にしてください (comment must be text, got {type(comment).__name__})")
        item = self.current
        item_id = item["item_id"]     # JSON-safe even when items came from a DataFrame (numpy ints)
        item_id = int(item_id) if isinstance(item_id, numbers.Integral) else str(item_id)
        record = {"item_id": item_id, "model": str(item["model"]), "rater": self.rater,
                  "scores": clean, "comment": comment, "time": now_iso()}
        append_record(self.path, record)          # flushed and fsync'd: only now move on
        done_pos = self._position
        self._reload()
        self._latest[self.order[done_pos]] = record
        self._position = self._first_unscored(start=done_pos + 1)
        self._render(message=f"保存しました (saved): item {done_pos + 1} / {self.n_items}")
        return record

    def skip(self) -> int:
        """Move one item forward without recording; past the last item, to the first unscored
        item (or to the end when every item is scored). Returns the new position."""
        if self.done:
            self._render(message="すべて採点済みです。戻る (back) で修正できます (all scored: use back to revise)")
            return self._position
        self._reload()
        nxt = self._position + 1
        self._position = nxt if nxt < self.n_items else self._first_unscored(start=0)
        self._render()
        return self._position

    def back(self) -> int:
        """Move one item back (stays at 0). Returns the new position."""
        self._position = max(0, self._position - 1)
        self._reload()
        self._render()
        return self._position

    def go_to(self, position: int) -> int:
        """Show the item at ``position`` (0..n_items-1) of this rater's order."""
        if not 0 <= int(position) < self.n_items:
            raise ValueError(f"position must be in 0..{self.n_items - 1}, got {position}")
        self._position = int(position)
        self._reload()
        self._render()
        return self._position

    # ---- the ipywidgets view
    def _build_ui(self) -> None:
        import ipywidgets as W

        self._header = W.HTML()
        self._context = W.HTML()
        self._ref_toggle = W.ToggleButton(value=self._show_reference, description="参照応答 (reference)",
                                          tooltip="実際のカウンセラーの応答を表示 / show the real counselor's reply",
                                          icon="eye", layout=W.Layout(width="auto", min_width="220px"))
        self._ref_toggle.observe(self.on_reference_toggled, names="value")
        self._reference = W.HTML()
        self._response = W.HTML()
        self._controls = {}
        rows = []
        for key, label in self.criteria.items():
            control = widget_view.ScoreButtons(SCORE_VALUES, tooltip=f"{label} ({key}): 0 = 最低 (worst) … "
                                               f"{SCORE_MAX} = 最高 (best); もう一度押すと取り消し (click again to clear)")
            self._controls[key] = control
            rows.append(W.HBox([W.HTML(f"<b>{html.escape(label)}</b> <small>({html.escape(key)})</small>",
                                       layout=W.Layout(width="260px")), control.widget]))
        self._comment = W.Textarea(placeholder="コメント（任意） / comment (optional)",
                                   layout=W.Layout(width="90%", height="56px"))
        self._submit_btn = W.Button(description="送信 (submit)", button_style="primary", icon="check",
                                    tooltip="Ctrl/Cmd+Enter", layout=W.Layout(width="auto"))
        self._back_btn = W.Button(description="戻る (back)", icon="arrow-left")
        self._skip_btn = W.Button(description="スキップ (skip)", icon="forward")
        self._submit_btn.on_click(self.on_submit_clicked)
        self._back_btn.on_click(self.on_back_clicked)
        self._skip_btn.on_click(self.on_skip_clicked)
        self._message = W.HTML()
        self.widget = W.VBox([
            self._header, self._context, self._ref_toggle, self._reference, self._response,
            W.HTML(f"<small>0 = 最低 (worst) … {SCORE_MAX} = 最高 (best)</small>"), *rows, self._comment,
            W.HBox([self._back_btn, self._skip_btn, self._submit_btn,
                    W.HTML("<small style='color:#666'>Ctrl/Cmd+Enter: 送信 (submit)</small>")]), self._message])
        widget_view.mark_live(self.widget, self._submit_btn)

    def _render(self, message: str = "", error: bool = False) -> None:
        n = self.n_items
        item = self.current
        self._header.value = (f"<b>項目 {min(self._position + 1, n)} / {n}</b> ・ 採点済み (scored) "
                              f"{self.progress} ・ 評価者 (rater) {html.escape(self.rater)}")
        finished = item is None
        for c in (*self._controls.values(), self._comment, self._submit_btn, self._skip_btn):
            c.disabled = finished
        self._back_btn.disabled = self._position == 0
        if finished:
            self._context.value = ("<p><b>すべて採点しました (every item is scored).</b> "
                                   "ありがとうございました。戻る (back) で修正できます。</p>")
            self._reference.value = self._response.value = ""
            for c in self._controls.values():
                c.value = None
            self._comment.value = ""
        else:
            self._context.value = context_html(item["context"])
            ref = item.get("reference")
            self._reference.value = chat_html([{"role": "assistant", "content": ref}],
                                              title="参照応答: 実際のカウンセラー (reference)") if ref else \
                "<p><i>参照応答なし (no reference)</i></p>"
            self._response.value = _scrolling(chat_html([{"role": "assistant", "content": item["response"]}],
                                                        title="評価する応答 (reply to score)"), REPLY_MAX_PX)
            prev = self._latest.get(self.current_key)
            for key, c in self._controls.items():
                value = (prev or {}).get("scores", {}).get(key)
                c.value = value if value in SCORE_VALUES else None
            self._comment.value = (prev or {}).get("comment", "") or ""
            if prev and not message:
                message = "採点済みの項目です。送信すると上書き記録されます (already scored: submitting again records a new score; history kept)."
        self._reference.layout.display = None if self._show_reference else "none"
        self._set_message(message, error)

    def _set_message(self, message: str, error: bool = False) -> None:
        self.message = message
        color = "#b00020" if error else "#2e7d32"
        self._message.value = f"<span style='color:{color}'>{html.escape(message)}</span>" if message else ""

    def on_submit_clicked(self, _button: Any = None) -> bool:
        """The submit button: scores from the controls, comment from the box. A refused score or
        a failed write is shown in the message area (nothing is recorded, the item stays).
        Returns True when the score was saved."""
        scores = {k: c.value for k, c in self._controls.items() if c.value is not None}
        try:
            self.submit(scores, comment=self._comment.value)
        except ScoreError as exc:
            self._set_message(str(exc), error=True)
            return False
        except OSError as exc:
            self._set_message(f"保存できませんでした — NOT saved ({exc}); ディスクを確認してもう一度送信してください "
                              "(check the disk and submit again)",
                              error=True)
            return False
        return True

    def on_back_clicked(self, _button: Any = None) -> None:
        self.back()

    def on_skip_clicked(self, _button: Any = None) -> None:
        self.skip()

    def on_reference_toggled(self, change: Any = None) -> None:
        """The reference toggle (also callable as ``toggle_reference``)."""
        value = change["new"] if isinstance(change, Mapping) else getattr(change, "new", change)
        self.toggle_reference(bool(value) if value is not None else None)

    def toggle_reference(self, show: bool | None = None) -> bool:
        """Show/hide the reference reply (None flips it). Returns whether it is shown."""
        self._show_reference = (not self._show_reference) if show is None else bool(show)
        if self._ref_toggle.value != self._show_reference:
            self._ref_toggle.value = self._show_reference   # re-enters via observe; idempotent
        self._reference.layout.display = None if self._show_reference else "none"
        return self._show_reference

    # ---- display
    def __repr__(self) -> str:
        state = "finished" if self.done else f"item {self._position + 1} / {self.n_items}"
        return (f"ScoringWidget(rater={self.rater!r}, {state}, scored {self.progress}, "
                f"criteria={list(self.criteria)}, store={str(self.path)!r})")

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None, **kwargs: Any) -> dict:
        """The live widget in Jupyter; a static line in exported HTML (papermill/nbconvert
        outputs carry no widget state)."""
        bundle = dict(self.widget._repr_mimebundle_(include=include, exclude=exclude, **kwargs) or {})
        bundle["text/plain"] = repr(self)
        bundle["text/html"] = widget_view.fallback_html(
            "採点ウィジェット (scoring widget)",
            f"<p>評価者 (rater) {html.escape(self.rater)}: 採点済み (scored) {self.progress}</p>")
        return bundle

    def _ipython_display_(self) -> None:
        """The widget, and the note that stands in for it once the notebook is saved and reopened."""
        widget_view.show(self, *RUN_TO_SCORE)

    def display(self) -> None:
        from IPython.display import display
        display(self)


RUN_TO_SCORE = ("このセルを実行すると採点できます（採点は保存済みで、続きから再開します）",
                "run this cell to score: saved scores are kept and scoring resumes where it stopped")


def context_html(context: Sequence[Mapping[str, Any]], shown: int = CONTEXT_SHOWN) -> str:
    """The dialogue so far: the last ``shown`` messages open, earlier ones in a collapsed block."""
    context = list(context)
    early, late = context[:-shown] if shown else context, context[-shown:] if shown else []
    out = ""
    if early:
        out += (f"<details><summary>これまでの会話 — 前の {len(early)} 件を表示 "
                f"(show {len(early)} earlier message(s))</summary>{chat_html(early)}</details>")
    return _scrolling(out + chat_html(late, title=None if early else "これまでの会話 (context)"), CONTEXT_MAX_PX)


def _scrolling(inner: str, max_px: int) -> str:
    """A block at most ``max_px`` high that scrolls inside (long texts keep the form on screen)."""
    return f"<div style='max-height:{int(max_px)}px;overflow-y:auto'>{inner}</div>"


# --------------------------------------------------------------------------- demo scores

def _unit_random(*parts: Any) -> float:
    digest = hashlib.sha256("|".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def demo_scores(items: Iterable[Mapping[str, Any]], store_dir: str | Path,
                raters: Sequence[str] = ("demo-a", "demo-b"), seed: int = 42,
                criteria: str | Sequence[str] | Mapping[str, str] | None = None) -> int:
    """Fill a seeded DEMO set of scores through the widget's own submit path, so unattended
    runs (papermill, nbval, ``make report``) have something to summarise. Clearly marked: rater
    names start with ``demo-`` and every comment is ``"demo"``. Scores depend only on the seed,
    the item, the model, the criterion and the rater (a per-model level, a per-item level, and
    rater noise), so raters roughly agree. Idempotent: raters already finished are left alone.
    Returns the number of scores written."""
    written = 0
    for rater in raters:
        w = ScoringWidget(items, store_dir, rater, criteria, demo=True)
        while not w.done:
            item_id, model = w.current_key
            scores = {}
            for crit in w.criteria:
                level = (3.0 + 2.0 * (_unit_random(seed, "model", model, crit) - 0.5)
                         + 2.0 * (_unit_random(seed, "item", item_id, crit) - 0.5))
                u = _unit_random(seed, "rater", rater, item_id, model, crit)
                noise = -1 if u < 0.1 else (1 if u > 0.9 else 0)
                scores[crit] = int(min(SCORE_MAX, max(SCORE_MIN, round(level) + noise)))
            w.submit(scores, comment=DEMO_COMMENT)
            written += 1
    return written


# --------------------------------------------------------------------------- reading and summary

def load_scores(store_dir: str | Path, items: Iterable[Mapping[str, Any]] | None = None, *,
                include_demo: bool = True, history: bool = False):
    """All scores in ``store_dir/*.jsonl`` as a DataFrame: one row per rater × item × model —
    the latest line wins (file order) — with columns item_id, model, rater, comment, time,
    demo (rater name starts with ``demo-``), split, then one column per criterion.

    ``items`` (optional) supplies each item's ``split`` ("test"/"valid", when items carry one).
    ``history=True`` keeps every line (a ``seq`` column gives the order within a rater's file).
    A missing or empty folder gives an empty frame with those columns."""
    import pandas as pd

    folder = resolve(store_dir)
    split_of = {}
    if items is not None and hasattr(items, "to_dict") and hasattr(items, "columns"):   # a DataFrame
        items = items.to_dict("records")
    for it in items if items is not None else []:
        split_of[str(it["item_id"])] = it.get("split")
    rows: dict[Any, dict[str, Any]] = {}
    criteria: list[str] = []
    files = sorted(folder.glob(f"*{STORE_SUFFIX}")) if folder.is_dir() else []
    for path in files:
        for seq, rec in enumerate(read_records(path)):
            rater = str(rec.get("rater") or path.stem)
            demo = rater.lower().startswith(DEMO_PREFIX)
            if demo and not include_demo:
                continue
            row = {"item_id": str(rec["item_id"]), "model": str(rec["model"]), "rater": rater,
                   "comment": rec.get("comment", "") or "", "time": rec.get("time"), "demo": demo,
                   "split": split_of.get(str(rec["item_id"]))}
            for crit, value in rec["scores"].items():
                if crit not in criteria:
                    criteria.append(crit)
                row[crit] = value
            if history:
                row["seq"] = seq
                rows[(rater, row["item_id"], row["model"], seq)] = row
            else:
                rows.pop((rater, row["item_id"], row["model"]), None)   # keep insertion = latest order
                rows[(rater, row["item_id"], row["model"])] = row
    columns = [*META_COLUMNS, *(["seq"] if history else []), *criteria]
    frame = pd.DataFrame(list(rows.values()), columns=columns)
    for crit in criteria:
        frame[crit] = pd.to_numeric(frame[crit], errors="coerce").astype(float)
    return frame


def criteria_columns(scores_df) -> list[str]:
    """The criterion columns of a load_scores() frame."""
    return [c for c in scores_df.columns if c not in META_COLUMNS and c != "seq"]


@lru_cache(maxsize=256)
def t_critical(confidence: float, df: int) -> float:
    """Two-sided critical value of Student's t (e.g. 2.776 for 95 % and df=4), from scipy."""
    from scipy import stats

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    df = int(df)
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return float(stats.t.ppf(0.5 + confidence / 2, df))


def mean_ci(values: Sequence[float], confidence: float = 0.95,
            min_n: int = MIN_SCORES_FOR_INTERVAL) -> tuple[float, float, float, float]:
    """(mean, sd, ci_low, ci_high) with a t-interval clipped to the score range 0..5. Below
    ``min_n`` values there is no interval (NaN): the count and the mean (sd from 2 values on,
    which pooling needs) only."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return (math.nan,) * 4
    mean = sum(xs) / n
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    if n < int(min_n):
        return mean, sd, math.nan, math.nan
    half = t_critical(confidence, n - 1) * sd / math.sqrt(n)
    return mean, sd, _clip_score(mean - half), _clip_score(mean + half)


def _clip_score(x: float) -> float:
    return min(float(SCORE_MAX), max(float(SCORE_MIN), x))


SUMMARY_COLUMNS = ("criterion", "n", "mean", "sd", "ci_low", "ci_high", "n_raters", "n_items", "n_demo")


def summarize(scores_df, criteria: Sequence[str] | None = None, by: Sequence[str] = ("model",),
              confidence: float = 0.95):
    """Per ``by`` (default model) × criterion: n, mean, sd and a ``confidence`` t-interval
    (ci_low, ci_high, clipped to 0..5), with the number of raters, items and demo scores behind
    each row. Below :data:`MIN_SCORES_FOR_INTERVAL` scores a row has no interval (NaN): the count
    and the mean (and sd) only; ``attrs["min_scores_for_interval"]`` states the number.

    Every score counts as one observation (scores of one item by several raters are not
    independent, so treat the interval as descriptive). ``by=("split", "model")`` splits test
    and valid when load_scores() was given the items."""
    import pandas as pd

    by = list(by)
    columns = [*by, *SUMMARY_COLUMNS]
    missing = [c for c in by if c not in scores_df.columns]
    if missing:
        raise ValueError(f"cannot group by {missing}: not columns of the scores "
                         f"(pass items to load_scores() for 'split')")
    criteria = list(criteria) if criteria is not None else criteria_columns(scores_df)
    unknown = [c for c in criteria if c not in scores_df.columns]
    if unknown:
        raise ValueError(f"no scores for criteria {unknown}; scored criteria: {criteria_columns(scores_df)}")
    out = []
    if len(scores_df):
        for keys, group in scores_df.groupby(by, sort=True, dropna=False):
            keys = keys if isinstance(keys, tuple) else (keys,)
            for crit in criteria:
                sub = group[group[crit].notna()]
                if not len(sub):
                    continue
                mean, sd, lo, hi = mean_ci(sub[crit].astype(float).tolist(), confidence)
                out.append({**dict(zip(by, keys)), "criterion": crit, "n": len(sub), "mean": mean,
                            "sd": sd, "ci_low": lo, "ci_high": hi, "n_raters": sub["rater"].nunique(),
                            "n_items": sub["item_id"].nunique(), "n_demo": int(sub["demo"].sum())})
    frame = pd.DataFrame(out, columns=columns)
    frame.attrs["confidence"] = confidence
    frame.attrs["min_scores_for_interval"] = MIN_SCORES_FOR_INTERVAL
    return frame


def summary_table(summary, digits: int = 2):
    """The summary for people: below ``min_scores_for_interval`` scores a row shows its count and
    mean only (sd and interval "—"); otherwise the interval as one "low–high" column (within 0–5)."""
    import pandas as pd

    if not len(summary):
        return summary
    min_n = summary.attrs.get("min_scores_for_interval", MIN_SCORES_FOR_INTERVAL)
    conf = summary.attrs.get("confidence", 0.95)
    keys = [c for c in summary.columns if c not in SUMMARY_COLUMNS]
    enough = summary["n"] >= min_n
    out = summary[[*keys, "criterion", "n"]].copy()
    out["mean"] = summary["mean"].round(digits)
    out["sd"] = [f"{sd:.{digits}f}" if ok and not math.isnan(sd) else "—" for sd, ok in zip(summary["sd"], enough)]
    out[f"{conf:.0%} CI"] = [f"{lo:.{digits}f}–{hi:.{digits}f}" if ok else f"— (n < {min_n})"
                             for lo, hi, ok in zip(summary["ci_low"], summary["ci_high"], enough)]
    out["raters"] = summary["n_raters"]
    if summary["n_demo"].sum():
        out["demo"] = summary["n_demo"]
    return pd.DataFrame(out).reset_index(drop=True)


def plot_distributions(scores_df, criteria: Sequence[str] | None = None,
                       models: Sequence[str] | None = None, normalize: bool = True):
    """One panel per criterion: how often each score 0..5 was given, one bar colour per model
    (share of that model's scores when ``normalize``). Labels are criterion keys and model names
    (ASCII), so no CJK font is needed. Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt
    import numpy as np

    criteria = list(criteria) if criteria is not None else criteria_columns(scores_df)
    models = list(models) if models is not None else sorted(scores_df["model"].unique()) if len(scores_df) else []
    if not criteria or not models:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no human scores yet", ha="center", va="center")
        return fig
    ncols = min(3, len(criteria))
    nrows = math.ceil(len(criteria) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
    width = 0.8 / len(models)
    x = np.arange(len(SCORE_VALUES))
    for i, crit in enumerate(criteria):
        ax = axes[i // ncols][i % ncols]
        for j, model in enumerate(models):
            values = scores_df.loc[(scores_df["model"] == model) & scores_df[crit].notna(), crit].astype(int)
            counts = np.array([(values == s).sum() for s in SCORE_VALUES], dtype=float)
            if normalize and counts.sum():
                counts /= counts.sum()
            ax.bar(x - 0.4 + width * (j + 0.5), counts, width, label=str(model))
        ax.set_xticks(x, [str(s) for s in SCORE_VALUES])
        ax.set(title=crit, xlabel="score", ylabel="share of scores" if normalize else "scores")
    for k in range(len(criteria), nrows * ncols):
        axes[k // ncols][k % ncols].axis("off")
    axes[0][0].legend(fontsize="small")
    fig.suptitle("Human scores (0-5) by criterion and model")
    fig.tight_layout()
    return fig


def plot_means(summary):
    """Mean score per model × criterion with its confidence interval as error bars (a
    summarize() frame grouped by model). Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt
    import numpy as np

    if not len(summary):
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no human scores yet", ha="center", va="center")
        return fig
    criteria = list(dict.fromkeys(summary["criterion"]))
    models = list(dict.fromkeys(summary["model"]))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(criteria) * max(1, len(models)) / 2), 4))
    width = 0.8 / len(models)
    x = np.arange(len(criteria))
    for j, model in enumerate(models):
        rows = summary[summary["model"] == model].set_index("criterion").reindex(criteria)
        means = rows["mean"].to_numpy(dtype=float)
        err = np.vstack([means - rows["ci_low"].to_numpy(dtype=float),
                         rows["ci_high"].to_numpy(dtype=float) - means])
        ax.bar(x - 0.4 + width * (j + 0.5), means, width, yerr=np.nan_to_num(err), capsize=3, label=str(model))
    conf = summary.attrs.get("confidence", 0.95)
    ax.set_xticks(x, criteria, rotation=20, ha="right")
    ax.set(ylim=(SCORE_MIN, SCORE_MAX), ylabel="mean score (0-5)",
           title=f"Mean human score with {conf:.0%} CI (none below "
                 f"{summary.attrs.get('min_scores_for_interval', MIN_SCORES_FOR_INTERVAL)} scores)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


@dataclass
class Agreement:
    """Krippendorff's alpha for one criterion; ``alpha`` is None with a ``reason`` when it
    cannot be computed."""
    criterion: str
    alpha: float | None
    n_raters: int
    n_units: int          # (item, model) units scored by two or more raters
    reason: str = ""


def agreement(scores_df, criterion: str, raters: Sequence[str] | None = None) -> Agreement:
    """Krippendorff's alpha (ordinal, value domain 0..5, via the ``krippendorff`` package) among
    raters on the (item, model) units two or more of them scored. alpha is None, with the
    reason, when fewer than two raters scored a common unit or all scores are identical."""
    if criterion not in scores_df.columns:
        raise ValueError(f"no scores for criterion {criterion!r}; scored: {criteria_columns(scores_df)}")
    df = scores_df[scores_df[criterion].notna()]
    if raters is not None:
        df = df[df["rater"].isin(list(raters))]
    units = df.groupby(["item_id", "model"])["rater"].nunique()
    shared = units[units >= 2].index
    raters_all = sorted(df["rater"].unique())
    if len(raters_all) < 2:
        return Agreement(criterion, None, len(raters_all), 0,
                         f"needs two or more raters; found {len(raters_all)} ({', '.join(raters_all) or 'none'})")
    if not len(shared):
        return Agreement(criterion, None, len(raters_all), 0,
                         f"{len(raters_all)} raters but no item scored by two of them")
    df = df.set_index(["item_id", "model"]).loc[shared].reset_index()
    matrix = df.pivot_table(index="rater", columns=["item_id", "model"], values=criterion, aggfunc="last")
    values = matrix.to_numpy(dtype=float)
    n_raters, n_units = int(matrix.shape[0]), int(matrix.shape[1])
    present = values[~_isnan(values)]
    if len(set(present.tolist())) < 2:
        return Agreement(criterion, None, n_raters, n_units,
                         f"every shared score is {present[0]:g}: no variation, alpha is undefined")
    try:
        import krippendorff
    except ImportError as exc:
        raise ImportError("agreement() needs the 'krippendorff' package (a project dependency): "
                          "pip install krippendorff") from exc
    try:
        alpha = float(krippendorff.alpha(reliability_data=values, level_of_measurement="ordinal",
                                         value_domain=list(SCORE_VALUES)))
    except (ValueError, ZeroDivisionError) as exc:
        return Agreement(criterion, None, n_raters, n_units, f"krippendorff: {exc}")
    if math.isnan(alpha):
        return Agreement(criterion, None, n_raters, n_units, "alpha is undefined for these scores")
    return Agreement(criterion, alpha, n_raters, n_units)


def _isnan(values):
    import numpy as np
    return np.isnan(values)


def agreement_table(scores_df, criteria: Sequence[str] | None = None, raters: Sequence[str] | None = None):
    """agreement() for every criterion as a DataFrame (criterion, alpha, n_raters, n_units, reason)."""
    import pandas as pd
    criteria = list(criteria) if criteria is not None else criteria_columns(scores_df)
    return pd.DataFrame([asdict(agreement(scores_df, c, raters)) for c in criteria],
                        columns=["criterion", "alpha", "n_raters", "n_units", "reason"])


def _write_csv_atomic(frame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        frame.to_csv(f, index=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def export_csv(scores_df, out_dir: str | Path, *, summary=None, agreement=None,
               prefix: str = "human_") -> dict[str, Path]:
    """Write ``<prefix>scores.csv`` (one row per rater × item × model), ``<prefix>summary.csv``
    and ``<prefix>agreement.csv`` into ``out_dir`` (UTF-8, atomically). The summary and the
    agreement table are computed when not given. Returns {name: path}."""
    out = resolve(out_dir)
    if summary is None:
        summary = summarize(scores_df)
    if agreement is None:
        agreement = agreement_table(scores_df)
    elif isinstance(agreement, (list, tuple)):
        import pandas as pd
        agreement = pd.DataFrame([asdict(a) for a in agreement])
    scores_out = scores_df.copy()
    for crit in criteria_columns(scores_out):     # whole numbers in the CSV: 4, not 4.0
        scores_out[crit] = scores_out[crit].round().astype("Int64")
    return {"scores": _write_csv_atomic(scores_out, out / f"{prefix}scores.csv"),
            "summary": _write_csv_atomic(summary, out / f"{prefix}summary.csv"),
            "agreement": _write_csv_atomic(agreement, out / f"{prefix}agreement.csv")}


# --------------------------------------------------------------------------- into the model cards

def _num(x: Any, digits: int = 4) -> Any:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else round(x, digits)


def _pool(rows, confidence: float) -> dict[str, Any]:
    """Combine summary rows of one criterion (e.g. test and valid) exactly from n, mean, sd."""
    n = int(rows["n"].sum())
    mean = float((rows["n"] * rows["mean"]).sum() / n)
    ss = sum((r.n - 1) * (r.sd ** 2 if r.n > 1 and not math.isnan(r.sd) else 0.0) + r.n * (r.mean - mean) ** 2
             for r in rows.itertuples())
    enough = n >= max(2, MIN_SCORES_FOR_INTERVAL)
    sd = math.sqrt(ss / (n - 1)) if n > 1 else math.nan
    half = t_critical(confidence, n - 1) * sd / math.sqrt(n) if enough else math.nan
    return {"mean": mean, "sd": sd, "n": n, "ci_low": _clip_score(mean - half) if enough else math.nan,
            "ci_high": _clip_score(mean + half) if enough else math.nan,
            "n_raters": int(rows["n_raters"].max()), "n_items": int(rows["n_items"].sum()),
            "n_demo": int(rows["n_demo"].sum())}


def _criteria_block(stats: dict[str, dict[str, Any]], confidence: float) -> dict[str, Any]:
    crit = {c: {"mean": _num(s["mean"]), "sd": _num(s["sd"]), "n": int(s["n"]),
                "ci_low": _num(s["ci_low"]), "ci_high": _num(s["ci_high"]),
                "n_raters": int(s["n_raters"]), "n_items": int(s["n_items"])} for c, s in stats.items()}
    means = [v["mean"] for v in crit.values() if v["mean"] is not None]
    demo = any(int(s.get("n_demo", 0)) for s in stats.values())
    block = {"criteria": crit, "overall_mean": _num(sum(means) / len(means)) if means else None,
             "n_scores": sum(v["n"] for v in crit.values()), "confidence": confidence, "demo": demo}
    if demo:
        block["note"] = "includes DEMO scores (seeded by demo_scores(), not human judgements)"
    return block


def write_evaluation_results(run_dir: str | Path, summary=None, *, agreement=None, metrics=None,
                             metrics_by_split=None,
                             models: Mapping[str, str] | None = None) -> dict[str, dict[str, str]]:
    """Write the human-score summary into each model card's ``evaluation_results`` in the seeds'
    shape ``{test_evaluation, valid_evaluation, summary, timestamp}``.

    ``summary``: a summarize() frame, by ("split", "model") or ("model",). With a split column,
    "test" rows go to ``test_evaluation.human_scores`` and "valid"/"validation" rows to
    ``valid_evaluation.human_scores``; ``summary.human_scores`` always holds all rows pooled
    (exactly, from n, mean, sd). ``agreement``: an agreement_table() frame or a list of
    Agreement, stored as ``summary.human_agreement``. ``metrics``: automatic metrics, a frame
    with a ``model`` column (or model index) or ``{model: {metric: value}}``, stored as
    ``summary.automatic_metrics``; ``metrics_by_split`` (compute_metrics(..., by="split")) goes to
    ``test_evaluation.automatic_metrics`` / ``valid_evaluation.automatic_metrics``. A model with
    metrics but no human scores (yet) still gets its metrics written. ``models`` maps a model name in the scores to a card's
    model_id when they differ. Cards are matched by model_id (or file name) and updated
    atomically; existing keys of evaluation_results written by other steps are kept.

    Returns ``{"written": {model: card path}, "skipped": {model: reason}}`` — e.g. a base model
    or an endpoint that has no card."""
    from kokoro_helpers import cards

    if summary is not None and "model" not in summary.columns:
        raise ValueError("summary needs a 'model' column (summarize(scores_df) groups by model)")
    confidence = float(summary.attrs.get("confidence", 0.95)) if summary is not None else 0.95
    agreement_info = None
    if agreement is not None:
        rows = agreement.to_dict("records") if hasattr(agreement, "to_dict") else [asdict(a) for a in agreement]
        agreement_info = {r["criterion"]: {"alpha": _num(r["alpha"]), "n_raters": int(r["n_raters"]),
                                           "n_units": int(r["n_units"]), "reason": r.get("reason") or ""}
                          for r in rows}
    metrics_of = _metrics_by_model(metrics)
    split_metrics: dict[str, dict[str, dict[str, Any]]] = {}
    if metrics_by_split is not None:
        frame = metrics_by_split if "model" in metrics_by_split.columns else metrics_by_split.reset_index()
        for row in frame.to_dict("records"):
            target = {"test": "test_evaluation", "valid": "valid_evaluation",
                      "validation": "valid_evaluation"}.get(str(row.pop("split", "")))
            model = str(row.pop("model"))
            if target:
                split_metrics.setdefault(model, {})[target] = {
                    k: (_num(v, 6) if isinstance(v, numbers.Number) else v) for k, v in row.items()}
    groups = dict(tuple(summary.groupby("model", sort=True))) if summary is not None else {}
    written, skipped = {}, {}
    for model in sorted(set(groups) | set(metrics_of) | set(split_metrics)):
        group = groups.get(model)
        card_id = (models or {}).get(model, model)
        try:
            path, card = cards.find_card(run_dir, card_id)
        except cards.CardError as exc:
            skipped[model] = str(exc)
            continue
        new: dict[str, dict[str, Any]] = {}
        for target, values in split_metrics.get(model, {}).items():
            new.setdefault(target, {})["automatic_metrics"] = values
        summary_block: dict[str, Any] = {}
        if group is not None and "split" in group.columns:
            for split, sub in group.groupby("split", dropna=True):
                target = {"test": "test_evaluation", "valid": "valid_evaluation",
                          "validation": "valid_evaluation"}.get(str(split))
                if target:
                    stats = {c: _pool(rows, confidence) for c, rows in sub.groupby("criterion", sort=False)}
                    new.setdefault(target, {})["human_scores"] = _criteria_block(stats, confidence)
        if group is not None:
            pooled = {c: _pool(rows, confidence) for c, rows in group.groupby("criterion", sort=False)}
            summary_block["human_scores"] = _criteria_block(pooled, confidence)
        if agreement_info is not None and group is not None:
            summary_block["human_agreement"] = agreement_info
        if model in metrics_of:
            summary_block["automatic_metrics"] = metrics_of[model]
        new["summary"] = summary_block
        old = card.get("evaluation_results")
        old = old if isinstance(old, dict) else ({"previous": old} if old else {})
        merged = dict(old)
        for key in ("test_evaluation", "valid_evaluation", "summary"):
            base = old.get(key) if isinstance(old.get(key), dict) else {}
            merged[key] = {**base, **new.get(key, {})}
        merged["timestamp"] = cards.now_iso()
        cards.update_card(path, evaluation_results=merged)
        written[model] = str(path)
    return {"written": written, "skipped": skipped}


def _metrics_by_model(metrics) -> dict[str, dict[str, Any]]:
    if metrics is None:
        return {}
    if isinstance(metrics, Mapping):
        return {str(m): {k: (_num(v, 6) if isinstance(v, numbers.Number) else v) for k, v in d.items()}
                for m, d in metrics.items()}
    frame = metrics if "model" in metrics.columns else metrics.rename_axis("model").reset_index()
    out = {}
    for row in frame.to_dict("records"):
        model = str(row.pop("model"))
        out[model] = {k: (_num(v, 6) if isinstance(v, numbers.Number) else v) for k, v in row.items()}
    return out


__all__ = [
    "CRITERIA_PRESETS", "SCORE_VALUES", "DEMO_PREFIX", "ScoreError", "ScoringWidget", "Agreement",
    "resolve_criteria", "check_rater", "validate_scores", "rater_order", "item_key",
    "default_store_dir", "store_path", "append_record", "read_records", "load_scores",
    "criteria_columns", "t_critical", "mean_ci", "summarize", "plot_distributions", "plot_means",
    "agreement", "agreement_table", "export_csv", "write_evaluation_results", "demo_scores",
]
