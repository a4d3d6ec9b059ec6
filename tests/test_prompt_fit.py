"""Prompt fitting (prompts.fit_messages): linear in the conversation's length, whole turns cut
from the oldest, the system prompt kept, and an error instead of a cut when truncation is off."""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from kokoro_helpers.local import prompts, weights  # noqa: E402
from kokoro_helpers.local.tiny_model import build_tiny_model  # noqa: E402

SYSTEM = "あなたは心理カウンセラーです。"


@pytest.fixture(scope="module")
def tokenizer():
    return weights.load_tokenizer(build_tiny_model(progress=False))


class CountingTokenizer:
    """The real tokenizer, counting every call that renders or tokenizes (and how much text)."""

    def __init__(self, tok):
        self.tok, self.calls, self.chars = tok, 0, 0

    def __call__(self, text, **kw):
        self.calls += 1
        self.chars += sum(map(len, text)) if isinstance(text, list) else len(text)
        return self.tok(text, **kw)

    def apply_chat_template(self, *a, **kw):
        self.calls += 1
        return self.tok.apply_chat_template(*a, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def conversation(turns: int, last: str = "最後の質問です。") -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": SYSTEM}]
    for i in range(turns):
        msgs += [{"role": "user", "content": f"相談{i}です。"}, {"role": "assistant", "content": f"返答{i}です。"}]
    return msgs + [{"role": "user", "content": last}]


@pytest.mark.parametrize("turns", [50, 500, 5000])
def test_fitting_makes_a_constant_number_of_tokenizer_calls(tokenizer, turns):
    counting = CountingTokenizer(tokenizer)
    full_chars = len(prompts.render_prompt(tokenizer, conversation(turns)))
    fitted = prompts.fit_messages(counting, conversation(turns), 300)
    assert counting.calls <= 8                          # not one re-encoding per dropped message
    assert counting.chars <= 3 * full_chars             # and each character tokenized a bounded number of times
    assert len(fitted.ids) <= 300 and fitted.dropped > 0 and fitted.cut_tokens == 0
    assert fitted.full_tokens > 300 and fitted.truncated


def test_whole_turns_go_from_the_oldest_and_the_system_prompt_stays(tokenizer):
    msgs = conversation(40)
    fitted = prompts.fit_messages(tokenizer, msgs, 200)
    kept = tokenizer.decode(fitted.ids)
    assert fitted.dropped % 2 == 0                       # user + assistant pairs
    assert kept.startswith("<|im_start|>system\n" + SYSTEM)
    assert "最後の質問です。" in kept and "相談0です" not in kept
    first_kept = fitted.dropped // 2
    assert f"相談{first_kept}です" in kept and f"返答{first_kept - 1}です" not in kept
    # the kept prompt is exactly what encoding the kept messages gives, and nothing more could fit
    kept_msgs = [msgs[0]] + msgs[1 + fitted.dropped:]
    assert fitted.ids == prompts.encode_prompt(tokenizer, kept_msgs)
    one_more = [msgs[0]] + msgs[1 + fitted.dropped - 2:]
    assert len(prompts.encode_prompt(tokenizer, one_more)) > 200 - 12    # at most about one turn of room left


def test_no_truncation_raises_context_length_error(tokenizer):
    msgs = conversation(40)
    full = len(prompts.encode_prompt(tokenizer, msgs))
    with pytest.raises(prompts.ContextLengthError) as info:
        prompts.fit_messages(tokenizer, msgs, 100, truncate=False)
    assert info.value.prompt_tokens == full and info.value.max_prompt_tokens == 100
    fitted = prompts.fit_messages(tokenizer, msgs, full, truncate=False)      # fits exactly: untouched
    assert not fitted.truncated and len(fitted.ids) == full


def test_a_last_message_too_long_alone_is_cut_from_the_left(tokenizer):
    msgs = conversation(3, last="とても長い相談です。" * 200)
    fitted = prompts.fit_messages(tokenizer, msgs, 64)
    assert len(fitted.ids) == 64 and fitted.cut_tokens > 0 and fitted.dropped == 6
    assert prompts.fit_prompt(tokenizer, msgs, 64) == (fitted.ids, 6)
