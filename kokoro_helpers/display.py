"""Showing things in a notebook: chats as chat bubbles, small tables. Pure HTML strings, so they
render in JupyterLab, in papermill's executed notebooks and in nbconvert's HTML alike."""
from __future__ import annotations

import html
from typing import Any, Iterable

from kokoro_helpers.data.schema import SPEAKER_LABEL_JA

CHAT_CSS = (
    "<style>.kchat{font-family:sans-serif;max-width:760px}.kchat .row{display:flex;margin:4px 0}"
    ".kchat .user{justify-content:flex-start}.kchat .assistant{justify-content:flex-end}"
    ".kchat .b{padding:6px 10px;border-radius:10px;max-width:75%;white-space:pre-wrap;line-height:1.4}"
    ".kchat .user .b{background:#eef1f5}.kchat .assistant .b{background:#dff3e4}"
    ".kchat .system .b{background:#fff7d6;max-width:100%;font-size:90%}"
    ".kchat .who{font-size:75%;color:#666;display:block}.kchat .w0{opacity:.6}</style>"
)


def chat_html(messages: Iterable[dict[str, Any]], title: str | None = None) -> str:
    """Messages as a chat: 相談者 (user) on the left, カウンセラー (assistant) on the right.
    Context-only turns (`"weight": 0`) are shown faded."""
    rows = []
    for m in messages:
        role = m.get("role", "?")
        who = SPEAKER_LABEL_JA.get(role, role)
        faded = " w0" if m.get("weight") == 0 else ""
        note = " (文脈のみ・学習対象外)" if faded else ""
        rows.append(f"<div class='row {html.escape(role)}'><div class='b{faded}'><span class='who'>"
                    f"{html.escape(who)}{note}</span>{html.escape(str(m.get('content', '')))}</div></div>")
    head = f"<h4>{html.escape(title)}</h4>" if title else ""
    return CHAT_CSS + f"<div class='kchat'>{head}{''.join(rows)}</div>"


def show_chat(messages: Iterable[dict[str, Any]], title: str | None = None) -> None:
    from IPython.display import HTML, display
    display(HTML(chat_html(messages, title)))
