"""An interactive chat in JupyterLab (ipywidgets): talk to a local LoRA model (or an OpenAI one).

    chat = ChatWidget(run_dir="runs/default", model="lora-tiny", history_turns=3)
    chat.display()                          # message box + 送信 (send), the chat, a model picker
    chat.send("最近眠れなくて…")              # the handlers are plain methods: usable without a browser
    chat.compare("仕事がつらいです")           # side by side: two models answer the same message
    chat.reset()

- The conversation is shown as a chat (相談者 on the left, カウンセラー on the right, via
  :func:`kokoro_helpers.display.chat_html`); the model sees the system prompt, the last
  ``history_turns`` exchanges (the seed kept 3) and the new message.
- Every model is a :class:`kokoro_helpers.models.base.ChatModel` (chosen by
  :func:`kokoro_helpers.models.open.open_model`): local models and endpoints stream their reply into the
  chat as it is generated; OpenAI's key is read from the environment or ``.env``.
- The model picker lists the run's ``local_lora`` cards (and each adapter's base, adapter off,
  as a baseline), plus its OpenAI fine-tuned models when ``OPENAI_API_KEY`` is set.
- Side by side: two pickers; each model keeps its own conversation. Switching a picker to
  another model shows that model's conversation (a new one the first time), under its name.
- Ctrl/Cmd+Enter in the message box sends. A saved notebook opened again shows "run this cell
  to chat" where the widget was (see :mod:`kokoro_helpers.widget_view`).
- Nothing waits for a person: building and displaying the widget returns at once, so
  papermill, nbval and ``make report`` run straight through.
"""
from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from kokoro_helpers import widget_view
from kokoro_helpers.display import chat_html
from kokoro_helpers.models.base import ChatModel
from kokoro_helpers.local.model import BASE_ADAPTER
from kokoro_helpers.models.local import LocalChatModel
from kokoro_helpers.models.open import open_model
from kokoro_helpers.paths import DEFAULT_RUN_DIR

LANES = ("a", "b")
RUN_TO_CHAT = ("このセルを実行するとチャットできます", "run this cell to chat")


# =============================================================================== models

def available_models(run_dir: str | Path = DEFAULT_RUN_DIR, include_openai: bool | None = None,
                     include_base: bool = True) -> dict[str, ChatModel]:
    """{label: ChatModel} for the picker: every ``local_lora`` card of the run (newest first) and,
    with ``include_base``, its base model with the adapter off; the run's OpenAI fine-tuned models
    when ``include_openai`` (default: when OPENAI_API_KEY is set)."""
    from kokoro_helpers import cards

    if include_openai is None:
        from kokoro_helpers.hosted.client import has_api_key
        include_openai = has_api_key()
    models: dict[str, ChatModel] = {}
    bases: dict[str, ChatModel] = {}
    for path, card in cards.list_cards(run_dir):
        kind = card.get("kind")
        if kind == "local_lora" and card.get("model_id"):
            models[f"{card['model_id']} (local LoRA)"] = open_model(path, run_dir, log=None)
            base = str(card.get("base_model") or "base")
            label = f"{base} (base of {card['model_id']}, adapter off)"
            if include_base and not any(b.startswith(f"{base} (base of") for b in bases):
                bases[label] = open_model(path, run_dir, base_only=True, log=None)
        elif kind == "openai" and include_openai and card.get("model_id"):
            try:
                models[f"{card['model_id']} (OpenAI)"] = open_model(path, run_dir, log=None)
            except Exception:  # noqa: BLE001 - e.g. an Azure fine-tune not deployed yet: not offered
                continue
    models.update(bases)
    return models


def _label(model: ChatModel) -> str:
    return model.name if model.kind == "function" else f"{model.name} ({model.kind})"


# =============================================================================== the widget

class ChatWidget:
    """A chat with one model, or two side by side. See the module docstring.

    ``models``: {label: ChatModel | function | LocalModel | source}; default
    :func:`available_models` of ``run_dir``. ``model`` / ``compare_model``: a label of
    ``models``, or anything :func:`kokoro_helpers.models.open.open_model` accepts (a card name, a
    folder, an endpoint, a LocalModel, a function). ``history_turns``: exchanges (user + reply) kept as context.
    ``system_prompt``: default the one the run's training data starts with.
    """

    def __init__(self, run_dir: str | Path = DEFAULT_RUN_DIR, model: Any = None, compare_model: Any = None,
                 models: Mapping[str, Any] | None = None, history_turns: int = 3, system_prompt: str | None = None,
                 max_new_tokens: int = 128, temperature: float = 0.7, top_p: float | None = 0.9,
                 seed: int | None = None, stream: bool = True, side_by_side: bool | None = None,
                 include_openai: bool | None = None, stream_refresh_s: float = 0.05):
        if int(history_turns) < 0:
            raise ValueError(f"history_turns must be >= 0, got {history_turns!r}")
        self.run_dir = run_dir
        self.history_turns = int(history_turns)
        if system_prompt is None:
            from kokoro_helpers.local.demo import system_prompt_of
            system_prompt = system_prompt_of(run_dir)
        self.system_prompt = system_prompt or None
        self.settings = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature),
                         "top_p": top_p, "seed": seed}
        self.stream_enabled = bool(stream)
        self.stream_refresh_s = float(stream_refresh_s)
        raw = dict(models) if models is not None else available_models(run_dir, include_openai)
        self.models: dict[str, ChatModel] = {label: open_model(m, run_dir, name=label, log=None)
                                             for label, m in raw.items()}
        self.histories: dict[str, list[dict[str, str]]] = {lane: [] for lane in LANES}
        self._conversations: dict[tuple[str, str | None], list[dict[str, str]]] = {}   # (lane, model label)
        self.selected: dict[str, str | None] = {"a": None, "b": None}
        self.status = ""
        self.last_error: BaseException | None = None
        self.last_timing: dict[str, float] = {}
        self._build_ui()
        self.select(model, compare_model)
        self.side_by_side = bool(compare_model is not None) if side_by_side is None else bool(side_by_side)
        self._render()

    # ----------------------------------------------------------------- state
    @property
    def history(self) -> list[dict[str, str]]:
        """The conversation with the (first) model: user and assistant messages, oldest first."""
        return self.histories["a"]

    @property
    def compare_history(self) -> list[dict[str, str]]:
        """The conversation of the second model in side-by-side mode."""
        return self.histories["b"]

    @property
    def side_by_side(self) -> bool:
        return self._side.value

    @side_by_side.setter
    def side_by_side(self, value: bool) -> None:
        self._side.value = bool(value)

    def _label_for(self, value: Any, partner: str | None = None) -> str | None:
        """The picker label for ``value``: a label, a card name ("lora-tiny" -> "lora-tiny (local
        LoRA)"), ``"base"`` (the base of ``partner``, a local model, with its adapter off), or a
        new entry for a function / LocalModel / folder."""
        if value is None:
            return None
        if isinstance(value, str) and value in self.models:
            return value
        if isinstance(value, str) and value == BASE_ADAPTER:
            return self._base_of(partner)
        if isinstance(value, str):
            for label, m in self.models.items():
                if label.startswith(f"{value} (") and m.kind != "function":
                    return label
        same = self._registry_entry_of(value)
        if same is not None:
            return same
        cm = open_model(value, self.run_dir, log=None)
        label = _label(cm)
        self.models[label] = cm
        self._refresh_options()
        return label

    def _registry_entry_of(self, value: Any) -> str | None:
        """For a LocalModel whose active adapter is a card already in the picker: that entry (and
        its base entry) now use the loaded model instead of loading it a second time."""
        from kokoro_helpers.local.model import LocalModel

        if not isinstance(value, LocalModel) or value.active not in value.adapters:
            return None
        card_path = value.adapters[value.active].source.card_path
        if card_path is None:
            return None
        found = None
        for label, m in self.models.items():
            if isinstance(m, LocalChatModel) and m._lm is None and m.card_path is not None and \
                    m.card_path.resolve() == Path(card_path).resolve():
                m._lm = value
                if not m.base_only:
                    found = found or label
        return found

    def _base_of(self, label: str | None) -> str:
        """A picker entry for the base model of the local model ``label`` (sharing its weights)."""
        model = self.models.get(label) if label else None
        if not isinstance(model, LocalChatModel) or model.base_only:
            found = next((lb for lb, m in self.models.items() if getattr(m, "base_only", False)), None)
            if found is None:
                raise KeyError(f"'base' にはローカルのアダプターが必要です ('base' needs a local adapter to switch "
                               f"off); choose from: {', '.join(self.models) or 'none'}")
            return found
        for lb, m in self.models.items():           # the registry's entry for this adapter's base
            if isinstance(m, LocalChatModel) and m.base_only and m.source == model.source:
                return lb
        lm = model._lm
        base = lm.base_name if lm is not None else "base"
        entry = LocalChatModel(model.source, name=f"{base} (base)", base_only=True, lm=lm, run_dir=model.run_dir)
        entry_label = f"{Path(base).name if Path(base).is_absolute() else base} (base of {label}, adapter off)"
        self.models.setdefault(entry_label, entry)
        self._refresh_options()
        return entry_label

    def select(self, model: Any = None, compare_model: Any = None) -> None:
        """Choose the model (and the second model of side-by-side mode). None keeps the current
        choice (the first model in the picker when nothing is chosen yet)."""
        a = self._label_for(model) if model is not None else (self.selected["a"] or next(iter(self.models), None))
        b = self._label_for(compare_model, a) if compare_model is not None else self.selected["b"]
        if b is None:
            b = next((lb for lb in self.models if lb != a), a)
        self._choose(a=a, b=b)
        self._syncing = True
        try:
            self._pick_a.value = a
            self._pick_b.value = b
        finally:
            self._syncing = False
        self._render()

    def _choose(self, **labels: str | None) -> None:
        """Select models by lane; each (lane, model) keeps its own conversation, so switching
        the model shows that model's conversation (a new one the first time) under its name."""
        for lane, label in labels.items():
            previous = self.selected.get(lane)
            self._conversations[(lane, previous)] = self.histories[lane]
            self.selected[lane] = label
            self.histories[lane] = self._conversations.setdefault((lane, label), [] if previous != label
                                                                  else self.histories[lane])

    def context(self, text: str, lane: str = "a") -> list[dict[str, str]]:
        """What the model is sent for ``text``: system prompt, the last ``history_turns``
        exchanges of this lane's conversation, and the new user message."""
        past = self.histories[lane]
        keep = past[-2 * self.history_turns:] if self.history_turns else []
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [dict(m) for m in keep] + [{"role": "user", "content": text}]

    # ----------------------------------------------------------------- handlers (plain methods)
    def send(self, text: str | None = None) -> Any:
        """Send ``text`` (default: the message box) to the model; in side-by-side mode to both
        (see :meth:`compare`). Returns the reply (a tuple of two in side-by-side mode). The
        message box is cleared. A failed reply leaves the conversation as it was and re-raises."""
        text = self._take_input(text)
        if text is None:
            return None
        if self.side_by_side:
            return self._ask_lanes(text, LANES)
        return self._ask_lanes(text, ("a",))[0]

    def compare(self, text: str | None = None) -> tuple[str, str]:
        """Both models answer the same message, each with its own conversation; switches the
        view to side by side. Returns (reply of the first model, reply of the second)."""
        text = self._take_input(text)
        if text is None:
            return None  # type: ignore[return-value]
        if not self.side_by_side:
            self.side_by_side = True
        a, b = self._ask_lanes(text, LANES)
        return a, b

    def reset(self) -> None:
        """Forget the conversations shown (the models stay loaded)."""
        for lane in LANES:
            self.histories[lane].clear()
        self.last_error = None
        self._set_status("会話をリセットしました (conversation reset)")
        self._render()

    # ----------------------------------------------------------------- internals
    def _take_input(self, text: str | None) -> str | None:
        if text is None:
            text = self._input.value
        text = str(text).strip()
        if not text:
            self._set_status("メッセージを入力してください (type a message first)", error=True)
            return None
        self._input.value = ""
        return text

    def _ask_lanes(self, text: str, lanes: Sequence[str]) -> tuple[str, ...]:
        if not self.models:
            raise RuntimeError("話す相手のモデルがありません (no model to talk to): train a local LoRA adapter with "
                               "02_finetune (Part B), or pass models={label: function or folder}")
        replies = []
        for lane in lanes:
            label = self.selected[lane]
            if label is None:
                raise RuntimeError("先にモデルを選んでください (choose a model in the picker first)")
            model = self.models[label]
            context = self.context(text, lane)
            history = self.histories[lane]
            history.append({"role": "user", "content": text})
            history.append({"role": "assistant", "content": ""})
            self._render()
            t0 = time.perf_counter()
            try:
                reply = self._generate(model, context, lane)
            except BaseException as exc:
                del history[-2:]                     # the conversation stays as it was
                self.last_error = exc
                self._set_status(f"{label}: {type(exc).__name__}: {exc}", error=True)
                self._render()
                raise
            history[-1]["content"] = reply
            self.last_timing[lane] = time.perf_counter() - t0
            replies.append(reply)
        self.last_error = None
        self._set_status(" ・ ".join(f"{self.selected[lane]}: {self.last_timing[lane]:.1f} s" for lane in lanes))
        self._render()
        return tuple(replies)

    def _generate(self, model: ChatModel, context: list[dict[str, str]], lane: str) -> str:
        settings = dict(self.settings)
        if not (self.stream_enabled and model.streams):
            return model.reply(context, **settings)
        text, last = "", 0.0
        for piece in model.stream(context, **settings):
            text += piece
            self.histories[lane][-1]["content"] = text
            now = time.perf_counter()
            if now - last >= self.stream_refresh_s:
                self._render(lane)
                last = now
        return text

    # ----------------------------------------------------------------- the view
    def _build_ui(self) -> None:
        import ipywidgets as W

        options = list(self.models)
        self._pick_a = W.Dropdown(options=options, description="モデル", layout=W.Layout(width="48%"))
        self._pick_b = W.Dropdown(options=options, description="比較", layout=W.Layout(width="48%"))
        self._side = W.Checkbox(value=False, description="並べて比較 (side by side)", indent=False)
        self._input = W.Textarea(placeholder="相談者としてメッセージを入力 (type as the client)…",
                                 layout=W.Layout(width="100%", height="64px"))
        self._send_btn = W.Button(description="送信 (send)", button_style="primary", icon="paper-plane",
                                  tooltip="Ctrl/Cmd+Enter")
        self._reset_btn = W.Button(description="リセット (reset)", icon="refresh")
        self._chat = {lane: W.HTML() for lane in LANES}
        self._status = W.HTML()
        self._send_btn.on_click(self.on_send_clicked)
        self._reset_btn.on_click(self.on_reset_clicked)
        self._pick_a.observe(self.on_pick, names="value")
        self._pick_b.observe(self.on_pick, names="value")
        self._side.observe(self.on_side_toggled, names="value")
        self._syncing = False
        self._panes = W.HBox([self._chat["a"], self._chat["b"]])
        self.widget = W.VBox([
            W.HBox([self._pick_a, self._pick_b]), self._side, self._panes, self._input,
            W.HBox([self._send_btn, self._reset_btn,
                    W.HTML("<small style='color:#666'>Ctrl/Cmd+Enter: 送信 (send)</small>")]), self._status])
        widget_view.mark_live(self.widget, self._send_btn)

    def _refresh_options(self) -> None:
        if not hasattr(self, "_pick_a"):
            return
        self._syncing = True
        try:
            for pick in (self._pick_a, self._pick_b):
                current = pick.value
                pick.options = list(self.models)
                if current in self.models:
                    pick.value = current
        finally:
            self._syncing = False

    def _pane_html(self, lane: str) -> str:
        label = self.selected.get(lane) or "(no model)"
        history = self.histories[lane]
        if not history:
            body = ("<p style='color:#666'><i>まだ会話はありません — メッセージを送ってください "
                    "(no messages yet).</i></p>")
            return f"<div class='kchat'><h4>{html.escape(label)}</h4>{body}</div>"
        return chat_html(history, title=label)

    def _render(self, lane: str | None = None) -> None:
        if not hasattr(self, "_chat"):
            return
        two = self.side_by_side
        for ln in ((lane,) if lane else LANES):
            self._chat[ln].value = self._pane_html(ln)
        self._chat["a"].layout.width = "50%" if two else "100%"
        self._chat["b"].layout.display = None if two else "none"
        self._pick_b.layout.display = None if two else "none"

    def _set_status(self, message: str, error: bool = False) -> None:
        self.status = message
        color = "#b00020" if error else "#555"
        self._status.value = f"<span style='color:{color}'>{html.escape(message)}</span>" if message else ""

    # ----------------------------------------------------------------- widget callbacks
    def on_send_clicked(self, _button: Any = None) -> None:
        """The send button: errors are shown in the status line, not raised into the frontend."""
        self._send_btn.disabled = True
        try:
            self.send()
        except Exception:
            pass                                       # shown by _ask_lanes in the status line
        finally:
            self._send_btn.disabled = False

    def on_reset_clicked(self, _button: Any = None) -> None:
        self.reset()

    def on_pick(self, change: Any = None) -> None:
        if getattr(self, "_syncing", False):
            return
        self._choose(a=self._pick_a.value, b=self._pick_b.value)
        self._set_status(f"モデル (model): {self.selected['a']}"
                         + (f" ・ 比較 (compare): {self.selected['b']}" if self.side_by_side else ""))
        self._render()

    def on_side_toggled(self, change: Any = None) -> None:
        self._render()

    # ----------------------------------------------------------------- display
    def __repr__(self) -> str:
        mode = f"side by side with {self.selected['b']!r}" if self.side_by_side else "single"
        return (f"ChatWidget(model={self.selected['a']!r}, {mode}, {len(self.history) // 2} exchange(s), "
                f"history_turns={self.history_turns})")

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None, **kwargs: Any) -> dict:
        """The live widget in Jupyter; the conversation as static HTML in exported notebooks
        (papermill/nbconvert outputs carry no widget state)."""
        bundle = dict(self.widget._repr_mimebundle_(include=include, exclude=exclude, **kwargs) or {})
        bundle["text/plain"] = repr(self)
        panes = [self._pane_html("a")] + ([self._pane_html("b")] if self.side_by_side else [])
        cells = "".join(f"<td style='vertical-align:top;width:{100 // len(panes)}%'>{p}</td>" for p in panes)
        bundle["text/html"] = widget_view.fallback_html("チャットウィジェット (chat widget)",
                                                        f"<table style='width:100%'><tr>{cells}</tr></table>")
        return bundle

    def _ipython_display_(self) -> None:
        """The widget, and the note that stands in for it once the notebook is saved and reopened."""
        widget_view.show(self, *RUN_TO_CHAT)

    def display(self) -> "ChatWidget":
        """Show the widget (returns at once: nothing waits for input)."""
        from IPython.display import display
        display(self)
        return self
