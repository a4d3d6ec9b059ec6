"""What the scoring and chat widgets share in the browser: a note that stands in for a widget in
a saved notebook, Ctrl/Cmd+Enter, and a 0–5 score row whose choice is unmistakable.

- **Reopened notebooks.** A widget lives in the kernel: a saved notebook opened again (or its
  HTML export) has no widget to show, and JupyterLab writes "Error displaying widget: model not
  found". :func:`show` therefore displays, next to the live widget, a short note ("run this cell
  to score / to chat", in Japanese and English) with a little CSS: while the live widget is on
  the page (it carries the class ``kokoro-live``) the note is hidden; without it the note is
  shown and JupyterLab's error line is hidden. An HTML export (nbconvert/``make report``) and an
  untrusted notebook (no CSS) show the note too, next to the widget's ``text/html`` fallback (a
  static summary: progress, or the conversation) where a frontend renders that instead.
- **Keyboard.** A capture-phase listener sends Ctrl/Cmd+Enter pressed inside a widget to its
  primary button (class ``kokoro-primary``: the chat's send, the scoring form's submit) before
  JupyterLab would run the cell.
- :class:`ScoreButtons`: six buttons 0..5; the chosen one is filled and marked ``✔ n``; clicking
  it again clears the choice.
"""
from __future__ import annotations

import html
from typing import Any, Callable, Sequence

LIVE_CLASS = "kokoro-live"          # on a live widget's outer box
PRIMARY_CLASS = "kokoro-primary"    # the button Ctrl/Cmd+Enter presses
FALLBACK_CLASS = "kokoro-fallback"  # on the text/html fallback (HTML exports)
NOTE_CLASS = "kokoro-offline-note"

_STYLE = f"""<style>
.jp-OutputArea:has(.{LIVE_CLASS}) .{NOTE_CLASS}, .jp-Cell-outputArea:has(.{LIVE_CLASS}) .{NOTE_CLASS}
  {{display: none}}
.jp-OutputArea:has(.{NOTE_CLASS}):not(:has(.{LIVE_CLASS})) .jp-OutputArea-output.jupyter-widgets {{display: none}}
.{NOTE_CLASS} {{border: 1px dashed #999; padding: 6px 10px; color: #333; background: #fafafa}}
</style>"""

_SCRIPT = f"""<script>
(function () {{
  if (window.__kokoroKeys) return;
  window.__kokoroKeys = true;
  window.addEventListener('keydown', function (e) {{
    if (e.key !== 'Enter' || !(e.ctrlKey || e.metaKey) || !e.target || !e.target.closest) return;
    var root = e.target.closest('.{LIVE_CLASS}');
    if (!root) return;
    var button = root.querySelector('button.{PRIMARY_CLASS}');
    e.preventDefault();
    e.stopPropagation();
    if (button && !button.disabled) button.click();
  }}, true);
}})();
</script>"""


def note_html(ja: str, en: str) -> str:
    """The stand-in shown where a widget was: what to do, in both languages."""
    return (f"{_STYLE}<div class='{NOTE_CLASS}'>▶ <b>{html.escape(ja)}</b><br>"
            f"<small>{html.escape(en)}</small></div>{_SCRIPT}")


def fallback_html(title: str, body: str = "") -> str:
    """The widget's ``text/html``: a static summary for frontends that cannot show the widget
    (the note next to it says what to do)."""
    return f"<div class='{FALLBACK_CLASS}'><p><b>{html.escape(title)}</b></p>{body}</div>"


def show(obj: Any, ja: str, en: str) -> None:
    """Display ``obj`` (its ``_repr_mimebundle_``: the live widget + fallbacks) and the note."""
    from IPython.display import display

    display(obj._repr_mimebundle_(), raw=True)
    display({"text/html": note_html(ja, en), "text/plain": f"{ja} ({en})"}, raw=True)


def mark_live(box: Any, primary: Any) -> None:
    """Classes the note's CSS and the keyboard listener look for."""
    box.add_class(LIVE_CLASS)
    primary.add_class(PRIMARY_CLASS)


class ScoreButtons:
    """A 0..``n`` score picker: one button per value. ``value`` is the chosen score or None; the
    chosen button is filled (``primary``) and reads ``✔ n``; clicking it again clears it."""

    def __init__(self, values: Sequence[int], tooltip: str = "", on_change: Callable[[Any], None] | None = None):
        import ipywidgets as W

        self.values = tuple(values)
        self._value: int | None = None
        self._disabled = False
        self._on_change = on_change
        self.buttons = []
        for v in self.values:
            b = W.Button(description=str(v), tooltip=tooltip, layout=W.Layout(width="48px"))
            b.on_click(lambda _b, v=v: self.click(v))
            self.buttons.append(b)
        self.widget = W.HBox(self.buttons)

    def click(self, v: int) -> None:
        """A click on value ``v``: choose it, or clear it when it is already chosen."""
        if not self._disabled:
            self.value = None if self._value == v else v

    @property
    def value(self) -> int | None:
        return self._value

    @value.setter
    def value(self, v: int | None) -> None:
        if v is not None and v not in self.values:
            raise ValueError(f"a score must be one of {list(self.values)} or None, got {v!r}")
        self._value = v
        for value, b in zip(self.values, self.buttons):
            chosen = value == v
            b.button_style = "primary" if chosen else ""
            b.description = f"✔ {value}" if chosen else str(value)
            b.style.font_weight = "bold" if chosen else "normal"
        if self._on_change is not None:
            self._on_change(v)

    @property
    def disabled(self) -> bool:
        return self._disabled

    @disabled.setter
    def disabled(self, flag: bool) -> None:
        self._disabled = bool(flag)
        for b in self.buttons:
            b.disabled = self._disabled
