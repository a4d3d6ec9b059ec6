"""The chat widget's handlers (plain methods), tested without a browser."""
from __future__ import annotations

import pytest

pytest.importorskip("ipywidgets")

from kokoro_helpers import cards  # noqa: E402
from kokoro_helpers.models.base import FunctionChatModel  # noqa: E402
from kokoro_helpers.models.chat_widget import ChatWidget, available_models  # noqa: E402
from kokoro_helpers.display import chat_html  # noqa: E402

SYSTEM = "あなたは心理カウンセラーです。"


class Recorder:
    """A model that answers with what it was sent (and remembers every context)."""

    def __init__(self, name: str):
        self.name, self.calls = name, []

    def __call__(self, messages, **settings):
        self.calls.append((messages, settings))
        return f"{self.name}: {messages[-1]['content']} ({len(messages)})"


def failing(messages, **settings):
    raise RuntimeError("model exploded")


@pytest.fixture
def models():
    return {"A": Recorder("A"), "B": Recorder("B"), "broken": failing}


def widget(models, **kwargs) -> ChatWidget:
    kwargs.setdefault("system_prompt", SYSTEM)
    return ChatWidget(models=models, **kwargs)


def test_send_appends_an_exchange_and_keeps_the_last_n_turns_as_context(models):
    w = widget(models, history_turns=2, max_new_tokens=7, temperature=0.3)
    assert w.selected == {"a": "A", "b": "B"} and not w.side_by_side
    for i in range(4):
        assert w.send(f"m{i}") == f"A: m{i} ({2 + 2 * min(i, 2)})"
    assert [m["role"] for m in w.history] == ["user", "assistant"] * 4
    assert [m["content"] for m in w.history[::2]] == ["m0", "m1", "m2", "m3"]
    sent, settings = models["A"].calls[-1]
    assert sent[0] == {"role": "system", "content": SYSTEM}
    assert [m["content"] for m in sent[1:]] == ["m1", w.history[3]["content"], "m2", w.history[5]["content"], "m3"]
    assert settings["max_new_tokens"] == 7 and settings["temperature"] == 0.3
    assert w.compare_history == [] and not models["B"].calls
    html = w._chat["a"].value
    assert "相談者" in html and "カウンセラー" in html and "m3" in html


def test_history_turns_zero_sends_only_the_new_message(models):
    w = widget(models, history_turns=0, system_prompt="")
    w.send("one")
    w.send("two")
    assert models["A"].calls[-1][0] == [{"role": "user", "content": "two"}]


def test_send_uses_the_message_box_and_ignores_empty_text(models):
    w = widget(models)
    w._input.value = "  こんにちは  "
    w.on_send_clicked()
    assert w._input.value == "" and w.history[0]["content"] == "こんにちは"
    assert w.send("   ") is None and len(w.history) == 2 and "type a message" in w.status


def test_compare_answers_with_both_models_each_with_its_own_history(models):
    w = widget(models, history_turns=3)
    w.send("first")                              # only A
    a, b = w.compare("second")
    assert w.side_by_side
    assert a == "A: second (4)" and b == "B: second (2)"   # B has not seen the first exchange
    assert [m["content"] for m in w.history[::2]] == ["first", "second"]
    assert [m["content"] for m in w.compare_history[::2]] == ["second"]
    assert w.send("third") == ("A: third (6)", "B: third (4)")   # side by side: send goes to both
    assert "B" in w._chat["b"].value and w._chat["b"].layout.display is None


def test_reset_clears_both_conversations(models):
    w = widget(models)
    w.compare("hello")
    w.reset()
    assert w.history == [] and w.compare_history == []
    assert "reset" in w.status and "hello" not in w._chat["a"].value
    assert w.send("again") == ("A: again (2)", "B: again (2)")


def test_a_failed_reply_leaves_the_conversation_unchanged(models):
    w = widget(models, model="broken")
    w.select("A")
    w.send("ok")
    w.select("broken")
    before = [dict(m) for m in w.history]
    with pytest.raises(RuntimeError, match="exploded"):
        w.send("boom")
    assert w.history == before and "exploded" in w.status and isinstance(w.last_error, RuntimeError)
    w._input.value = "boom again"
    w.on_send_clicked()                          # the button never raises into the frontend
    assert w.history == before and not w._send_btn.disabled


def test_the_picker_selects_models_and_unknown_ones_fail(models):
    w = widget(models, model="B", compare_model="A")
    assert w.selected == {"a": "B", "b": "A"} and w.side_by_side
    w._pick_a.value = "A"                       # what a click in the dropdown does
    assert w.selected["a"] == "A" and "A" in w.status
    extra = Recorder("X")
    w.select(extra)                             # a function becomes a new entry
    assert w.selected["a"] in w.models and w.send("hi")[0].startswith("X: hi")


def test_available_models_lists_local_cards_their_base_and_openai_only_with_a_key(tmp_path):
    cards.save_card(cards.card_path(tmp_path, "lora-x"), cards.new_card(
        kind="local_lora", model_id="lora-x", base_model="embedded:tiny", training_params={},
        adapter_path=str(tmp_path / "models" / "lora-x")))
    cards.save_card(cards.card_path(tmp_path, "ft"), cards.new_card(
        kind="openai", model_id="ft:gpt-4o-mini:org:x:1", base_model="gpt-4o-mini", training_params={}))
    found = available_models(tmp_path, include_openai=False)
    assert list(found) == ["lora-x (local LoRA)", "embedded:tiny (base of lora-x, adapter off)"]
    assert found["embedded:tiny (base of lora-x, adapter off)"].base_only
    with_key = available_models(tmp_path, include_openai=True)
    assert "ft:gpt-4o-mini:org:x:1 (OpenAI)" in with_key
    w = ChatWidget(run_dir=tmp_path, model="lora-x", include_openai=False, system_prompt=SYSTEM)
    assert w.selected["a"] == "lora-x (local LoRA)"


def test_streaming_a_local_model_fills_the_reply_as_it_comes(tmp_path):
    torch = pytest.importorskip("torch")
    from kokoro_helpers.local.export import init_adapter
    from kokoro_helpers.local.loading import load

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lm = load(init_adapter(tmp_path / "lora-w", seed=4), device="cpu")
        w = ChatWidget(models={"local": lm}, system_prompt=SYSTEM, max_new_tokens=12, temperature=0.0,
                       history_turns=3, stream_refresh_s=0.0)
        renders = []
        real = w._render

        def spy(lane=None):
            renders.append((lane, w.history[-1]["content"] if w.history else None))
            real(lane)

        w._render = spy
        reply = w.send("眠れません。")
        expected = lm.generate([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "眠れません。"}],
                               max_new_tokens=12, temperature=0.0)
        assert reply == expected and w.history[-1]["content"] == expected
        partial = [text for lane, text in renders if lane == "a"]
        assert partial and all(expected.startswith(t) for t in partial)
    finally:
        torch.set_num_threads(before)


def test_static_html_for_exported_notebooks(models):
    w = widget(models)
    w.send("こんにちは")
    bundle = w._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "こんにちは" in bundle["text/html"] and "ChatWidget" in bundle["text/plain"]
    assert chat_html(w.history)                   # the display helper renders the same history
    assert isinstance(FunctionChatModel(models["A"], name="f").reply([{"role": "user", "content": "x"}]), str)


def test_compare_with_base_shares_the_loaded_model(tmp_path):
    torch = pytest.importorskip("torch")
    from kokoro_helpers.local.export import init_adapter
    from kokoro_helpers.local.loading import load

    lm = load(init_adapter(tmp_path / "lora-v", seed=8), device="cpu")
    w = ChatWidget(models={}, model=lm, compare_model="base", system_prompt="", max_new_tokens=6, temperature=0.0)
    assert w.side_by_side and "adapter off" in w.selected["b"] and w.models[w.selected["b"]]._lm is lm
    a, b = w.compare("こんにちは")
    msgs = [{"role": "user", "content": "こんにちは"}]
    assert a == lm.generate(msgs, max_new_tokens=6) and b == lm.generate(msgs, adapter="base", max_new_tokens=6)
    assert torch.get_num_threads() >= 1


def test_switching_the_model_shows_its_own_conversation_under_its_name(models):
    w = widget(models, model="A")
    w.send("for A")
    w._pick_a.value = "B"                        # the picker: a new conversation with B
    assert w.history == [] and "<h4>B</h4>" in w._chat["a"].value and "for A" not in w._chat["a"].value
    w.send("for B")
    sent_to_b = models["B"].calls[-1][0]
    assert [m["content"] for m in sent_to_b] == [SYSTEM, "for B"]        # A's turns are not B's context
    w._pick_a.value = "A"                        # back to A: its conversation again
    assert [m["content"] for m in w.history[::2]] == ["for A"]
    assert "for A" in w._chat["a"].value and "for B" not in w._chat["a"].value
    w.reset()
    assert w.history == [] and [m["content"] for m in w._conversations[("a", "B")][::2]] == ["for B"]


def test_keyboard_send_and_the_reopen_note(models, monkeypatch):
    import IPython.display
    from kokoro_helpers import widget_view
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, raw=False: shown.append(obj))
    w = widget(models, model="A")
    assert widget_view.LIVE_CLASS in w.widget._dom_classes
    assert widget_view.PRIMARY_CLASS in w._send_btn._dom_classes          # what Ctrl/Cmd+Enter presses
    w._ipython_display_()
    live, note = shown
    assert "application/vnd.jupyter.widget-view+json" in live and "chat widget" in live["text/html"]
    assert "このセルを実行するとチャットできます" in note["text/html"] and "keydown" in note["text/html"]
    assert "run this cell to chat" in note["text/html"] and "run this cell to chat" in note["text/plain"]
