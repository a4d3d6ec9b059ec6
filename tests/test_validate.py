"""Each of OpenAI's chat fine-tuning format checks, and the project's own, on tiny examples."""
from __future__ import annotations

import pytest

from kokoro_helpers.data.validate import OPENAI_CATEGORIES, PROJECT_CATEGORIES, count_errors, example_errors

SYS = {"role": "system", "content": "あなたはカウンセラーです。"}
USER = {"role": "user", "content": "最近、眠れないんです。"}
ASST = {"role": "assistant", "content": "それはおつらいですね。"}


def ex(*messages):
    return {"messages": list(messages)}


@pytest.mark.parametrize("example", [
    ex(USER, ASST),
    ex(SYS, USER, ASST),
    ex(ASST),                                                   # counselor-first dialogue's opening
    ex(SYS, ASST, USER, ASST),
    ex(SYS, USER, {**ASST, "weight": 0}, USER, ASST),           # window context
    ex(USER, {**ASST, "weight": 1}),
    ex({**USER, "name": "client"}, ASST),
])
def test_valid_examples_have_no_errors(example):
    assert example_errors(example) == []
    assert example_errors(example, n_tokens=100, limit=100) == []


@pytest.mark.parametrize("example, category", [
    # OpenAI's categories
    (["not", "a", "dict"], "data_type"),
    ("{\"messages\": []}", "data_type"),
    ({"prompt": "こんにちは", "completion": "はい"}, "missing_messages_list"),
    ({"messages": []}, "missing_messages_list"),
    ({"messages": "こんにちは"}, "missing_messages_list"),
    (ex({"role": "user"}, ASST), "message_missing_key"),
    (ex({"content": "こんにちは"}, ASST), "message_missing_key"),
    (ex(USER, {**ASST, "mood": "calm"}), "message_unrecognized_key"),
    (ex({"role": "counselor", "content": "こんにちは"}, ASST), "unrecognized_role"),
    (ex(USER, {"role": "assistant", "content": ""}), "missing_content"),
    (ex(USER, {"role": "assistant", "content": None}), "missing_content"),
    (ex(USER, {"role": "assistant", "content": ["はい"]}), "missing_content"),
    (ex(SYS, USER), "example_missing_assistant_message"),
    # the project's categories
    (ex(USER, {**ASST, "weight": 2}), "invalid_weight"),
    (ex(USER, {**ASST, "weight": "0"}), "invalid_weight"),
    (ex({**USER, "weight": 0}, ASST), "invalid_weight"),
    (ex(USER, USER, ASST), "not_alternating"),
    (ex(USER, ASST, ASST), "not_alternating"),
    (ex(USER, SYS, ASST), "not_alternating"),
    (ex(SYS, USER, ASST, USER), "not_ending_on_assistant"),
])
def test_each_error_category(example, category):
    errors = example_errors(example)
    assert category in errors
    assert len(errors) == len(set(errors))


def test_every_category_is_covered_by_a_case():
    assert set(OPENAI_CATEGORIES) == {
        "data_type", "missing_messages_list", "message_missing_key", "message_unrecognized_key",
        "unrecognized_role", "missing_content", "example_missing_assistant_message"}
    assert set(PROJECT_CATEGORIES) == {"invalid_weight", "not_alternating", "not_ending_on_assistant",
                                       "too_many_tokens"}


def test_too_many_tokens_only_over_the_limit():
    example = ex(USER, ASST)
    assert example_errors(example, n_tokens=65_536, limit=65_536) == []
    assert example_errors(example, n_tokens=65_537, limit=65_536) == ["too_many_tokens"]
    assert example_errors(example, n_tokens=10**9, limit=None) == []


def test_one_category_per_example_even_if_repeated():
    example = ex({"role": "x", "content": "a"}, {"role": "y", "content": "b"}, ASST)
    assert example_errors(example).count("unrecognized_role") == 1


def test_count_errors_counts_examples_per_category():
    examples = [ex(USER, ASST), ex(USER, USER, ASST), ["bad"], ex(USER, ASST), ex(SYS, USER)]
    counts = count_errors(examples, [10, 10, None, 999, 10], limit=100)
    assert counts["not_alternating"] == 1
    assert counts["data_type"] == 1
    assert counts["too_many_tokens"] == 1
    assert counts["example_missing_assistant_message"] == 1
    assert count_errors([ex(USER, ASST)] * 3) == {}
