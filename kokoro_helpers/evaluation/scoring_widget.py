"""The blind 0–5 scoring widget (ipywidgets), and seeded demo raters that score through it.

``ScoringWidget(items, store_dir, rater, criteria=None)`` shows one candidate reply at a time:
the dialogue so far as a chat, the real counselor's reply behind a toggle, and the reply to
judge — never the model's name — in the rater's own item order (score_store.rater_order).
Each submit goes to the append-only store (score_store.append_record) *before* the widget
moves on; a new widget for the same rater resumes at the first unscored item. The button
handlers are plain methods (``on_submit_clicked`` …), so everything is testable without a
browser, and nothing ever waits for a person: papermill/nbval runs display the widget and go on
(``demo_scores`` fills a seeded, clearly marked demo set so the summary cells have something to
show). What it shares with the chat widget in the browser lives in kokoro_helpers.widget_view.
"""
from __future__ import annotations

import hashlib
import html
import numbers
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from kokoro_helpers import widget_view
from kokoro_helpers.display import chat_html
from kokoro_helpers.evaluation.score_store import (SCORE_MAX, SCORE_MIN, SCORE_VALUES, ScoreError, append_record,
                                                   check_items, check_rater, item_key, now_iso, rater_order,
                                                   read_records, resolve_criteria, store_path, validate_scores)
from kokoro_helpers.paths import resolve

#: Context messages shown open above the reply; earlier ones sit in a collapsed block, so the form
#: fits a 1000-px-high window without scrolling to submit.
CONTEXT_SHOWN = 2
CONTEXT_MAX_PX, REPLY_MAX_PX = 240, 220     # taller texts scroll inside their block
DEMO_COMMENT = "demo"


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
        self.items = check_items(items)
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
