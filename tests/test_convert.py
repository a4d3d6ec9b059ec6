"""Conversion rules: KokoroChat record -> dialogue -> OpenAI chat example, and windows of whole turns."""
from __future__ import annotations

import json

import pytest

from kokoro_helpers.data.convert import (RecordError, TurnTooLong, content_id, id_sort_key, parse_record,
                                    record_id, split_into_windows, to_messages)
from kokoro_helpers.data.tokens import TokenCounter
from kokoro_helpers.data.validate import example_errors

SYSTEM = "あなたは丁寧に話を聴くカウンセラーです。"


def _messages(record_factory, turns, system_prompt=None):
    return to_messages(parse_record(record_factory(turns, eid=1)), system_prompt)


# ---------------------------------------------------------------- parse_record


def test_record_id_rules(record_factory):
    assert record_id(record_factory([("co", "はい")], eid=4)) == 4
    assert record_id({"review_by_client_en": {"evaluation_id": "17"}}) == 17
    assert record_id({"review_by_client_jp": {"評価ID": 23}}) == 23            # jp block alone
    assert record_id({"dialogue": []}, fallback="5012") == 5012               # file stem
    assert record_id({"dialogue": []}, fallback="abc") == "abc"
    rec = {"dialogue": [{"role": "counselor", "utterance": "こんにちは"}]}
    assert record_id(rec) == content_id(rec) and record_id(rec).startswith("sha1:")
    assert sorted([3, "b", 10, "a"], key=id_sort_key) == [3, 10, "a", "b"]


def test_parse_record_reads_topic_score_and_drops_blanks(record_factory):
    rec = record_factory([("co", "こんにちは。"), ("cl", "   "), ("cl", "よろしくお願いします。"),
                          ("co", ""), ("co", "どうぞ。")], eid=9, score=71, topic="School Issues")
    d = parse_record(rec)
    assert d.id == 9 and d.score == 71 and d.topic_en == "School Issues"
    assert d.blank_dropped == 2
    assert d.utterances == [("counselor", "こんにちは。"), ("client", "よろしくお願いします。"),
                            ("counselor", "どうぞ。")]


class _TurnDict(dict):
    """A dict subclass: parse_record checks it turn by turn instead of through its fast path."""


def test_turn_by_turn_checks_agree_with_the_fast_path(record_factory, sample_records):
    recs = sample_records[:10] + [record_factory(
        [("co", "こんにちは。"), ("cl", " "), ("cl", "\u3000"), ("cl", "相談です。"), ("co", ""),
         ("co", "どうぞ。"), ("cl", "\t\n")], eid=77)]
    for rec in recs:
        slow = dict(rec, dialogue=[_TurnDict(t) for t in rec["dialogue"]])
        a, b = parse_record(rec), parse_record(slow)
        assert (a.id, a.utterances, a.blank_dropped) == (b.id, b.utterances, b.blank_dropped)
    assert parse_record(recs[-1]).blank_dropped == 4


@pytest.mark.parametrize("record, reason", [
    (["not", "a", "dict"], "record_not_object"),
    ({"topic": {}}, "missing_dialogue"),
    ({"dialogue": None}, "missing_dialogue"),
    ({"dialogue": "こんにちは"}, "dialogue_not_list"),
    ({"dialogue": []}, "empty_dialogue"),
    ({"dialogue": ["こんにちは"]}, "utterance_not_object"),
    ({"dialogue": [{"role": "therapist", "utterance": "こんにちは"}]}, "unknown_role"),
    ({"dialogue": [{"utterance": "こんにちは"}]}, "unknown_role"),
    ({"dialogue": [{"role": "counselor"}]}, "missing_utterance"),
    ({"dialogue": [{"role": "counselor", "utterance": 3}]}, "missing_utterance"),
    ({"dialogue": [{"role": "client", "utterance": "相談です"}]}, "no_counselor_turn"),
    ({"dialogue": [{"role": "client", "utterance": "相談です"},
                   {"role": "counselor", "utterance": "  "}]}, "no_counselor_turn"),
])
def test_parse_record_rejects_with_reason(record, reason):
    with pytest.raises(RecordError) as err:
        parse_record(record)
    assert err.value.reason == reason


# ---------------------------------------------------------------- to_messages


def test_same_speaker_runs_are_merged_with_newline_and_trailing_client_dropped(record_factory):
    msgs = _messages(record_factory, [
        ("co", "こんにちは。"), ("cl", "実は"), ("cl", "仕事のことで"), ("cl", "悩んでいて。"),
        ("co", "そうなんですね。"), ("co", "詳しく聞かせてください。"),
        ("cl", "ありがとうございます。"), ("cl", "また来ます。")])
    assert msgs == [
        {"role": "assistant", "content": "こんにちは。"},
        {"role": "user", "content": "実は\n仕事のことで\n悩んでいて。"},
        {"role": "assistant", "content": "そうなんですね。\n詳しく聞かせてください。"},
    ]


def test_client_first_dialogue_and_system_prompt(record_factory):
    msgs = _messages(record_factory, [("cl", "相談があります。"), ("co", "どうぞ。"),
                                      ("cl", "眠れません。"), ("co", "それはつらいですね。")], SYSTEM)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[0] == {"role": "system", "content": SYSTEM}
    assert _messages(record_factory, [("cl", "a"), ("co", "b")], None)[0]["role"] == "user"
    assert _messages(record_factory, [("cl", "a"), ("co", "b")], "")[0]["role"] == "user"


def test_blank_between_same_speaker_utterances_merges_them(record_factory):
    msgs = _messages(record_factory, [("co", "はじめまして。"), ("cl", " "), ("co", "どうぞ。")])
    assert msgs == [{"role": "assistant", "content": "はじめまして。\nどうぞ。"}]


def test_to_messages_does_not_mutate_the_dialogue(record_factory):
    d = parse_record(record_factory([("co", "a"), ("co", "b"), ("cl", "c")], eid=2))
    before = list(d.utterances)
    to_messages(d, SYSTEM)
    to_messages(d, SYSTEM)
    assert d.utterances == before


def test_every_sample_example_alternates_and_keeps_all_counselor_text(sample_records):
    for rec in sample_records:
        d = parse_record(rec)
        msgs = to_messages(d, SYSTEM)
        assert example_errors({"messages": msgs}) == [], d.id
        body = msgs[1:]
        assert msgs[0]["role"] == "system" and body[-1]["role"] == "assistant"
        assert all(a["role"] != b["role"] for a, b in zip(body, body[1:]))
        # every counselor utterance is in an assistant message, in order, nothing else added
        co = [t for r, t in d.utterances if r == "counselor"]
        assistant = [m["content"] for m in body if m["role"] == "assistant"]
        assert "\n".join(assistant) == "\n".join(co), d.id
        # client text is kept except the trailing client turns
        turns = rec["dialogue"]
        last_co = max(i for i, t in enumerate(turns) if t["role"] == "counselor")
        cl = [t["utterance"] for t in turns[:last_co] if t["role"] == "client"]
        assert "\n".join(m["content"] for m in body if m["role"] == "user") == "\n".join(cl), d.id


# ---------------------------------------------------------------- windows


def _char_counter():
    """One token per character: easy to reason about."""
    return TokenCounter(name="chars", encode=lambda s: list(range(len(s))))


def _long_messages(n_exchanges=24, system=SYSTEM, client_first=False):
    msgs = [{"role": "system", "content": system}] if system else []
    if not client_first:
        msgs.append({"role": "assistant", "content": "こんにちは、今日はどうされましたか。"})
    for i in range(n_exchanges):
        msgs.append({"role": "user", "content": f"相談{i}：" + "もやもや" * (1 + i % 4)})
        msgs.append({"role": "assistant", "content": f"応答{i}：" + "なるほど" * (1 + (i * 7) % 5)})
    return msgs


def _strip_weight(m):
    return {k: v for k, v in m.items() if k != "weight"}


@pytest.mark.parametrize("limit", [100, 140, 260, 400])
@pytest.mark.parametrize("system", [SYSTEM, None])
@pytest.mark.parametrize("client_first", [False, True])
def test_windows_fit_end_on_assistant_and_train_each_turn_once(limit, system, client_first):
    counter = _char_counter()
    msgs = _long_messages(system=system, client_first=client_first)
    assert counter.count_messages(msgs) > limit
    windows = split_into_windows(msgs, limit, counter.message_costs, 3)
    assert len(windows) > 1
    head = 1 if system else 0
    body = msgs[head:]
    trained = []
    for w in windows:
        assert counter.count_messages(w) <= limit
        assert w[-1]["role"] == "assistant" and "weight" not in w[-1]
        assert example_errors({"messages": w}, counter.count_messages(w), limit) == []
        if system:
            assert w[0] == {"role": "system", "content": system}
        wbody = w[head:]
        # a window is a contiguous slice of the original turns, in order
        plain = [_strip_weight(m) for m in wbody]
        starts = [i for i in range(len(body)) if body[i:i + len(plain)] == plain]
        assert starts, "window is not a contiguous slice of the original"
        # context first (assistant weight 0), then the newly trained turns (no weight key)
        weights = [m.get("weight") for m in wbody if m["role"] == "assistant"]
        n_ctx = weights.count(0)
        assert weights == [0] * n_ctx + [None] * (len(weights) - n_ctx)
        assert all("weight" not in m for m in wbody if m["role"] != "assistant")
        trained += [m for m in wbody if m["role"] == "assistant" and "weight" not in m]
    assert trained == [m for m in body if m["role"] == "assistant"]     # each exactly once, in order
    assert all(w is not msgs for w in windows)
    assert all("weight" not in m for m in msgs)                          # the input is untouched


def test_context_is_carried_into_later_windows():
    counter = _char_counter()
    windows = split_into_windows(_long_messages(), 260, counter.message_costs, 3)
    assert any(m.get("weight") == 0 for w in windows[1:] for m in w)
    assert not any(m.get("weight") == 0 for m in windows[0])


def test_precomputed_costs_give_the_same_windows():
    counter = _char_counter()
    msgs = _long_messages()
    assert split_into_windows(msgs, 260, counter.message_costs(msgs), 3) == \
        split_into_windows(msgs, 260, counter.message_costs, 3)


def test_context_never_crowds_out_an_exchange_that_fits_alone():
    """Regression: the context carried from the previous window must leave room for the next
    exchange; an exchange that fits the limit on its own is never reported as too long."""
    counter = _char_counter()        # costs: user 'x' 8, assistant 'y' 13, the big exchange 40 + 50
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
            {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
            {"role": "user", "content": "x" * 33}, {"role": "assistant", "content": "y" * 38}]
    windows = split_into_windows(msgs, 103, counter.message_costs, 3)
    assert [w[-1]["content"] for w in windows] == ["y", "y" * 38]
    assert all(counter.count_messages(w) <= 103 for w in windows)
    assert [m for m in windows[-1] if m["role"] == "assistant" and "weight" not in m] == [msgs[-1]]


def test_example_under_the_limit_is_a_single_window():
    counter = _char_counter()
    msgs = _long_messages(3)
    assert split_into_windows(msgs, counter.count_messages(msgs), counter.message_costs, 3) == [msgs]


def test_single_exchange_too_long_raises_and_never_truncates():
    counter = _char_counter()
    msgs = [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": "短い相談です。"}, {"role": "assistant", "content": "はい。"},
            {"role": "user", "content": "とても長い話" * 40}, {"role": "assistant", "content": "そうでしたか。"}]
    with pytest.raises(TurnTooLong) as err:
        split_into_windows(msgs, 120, counter.message_costs, 3)
    assert err.value.reason == "turn_exceeds_token_limit"


def test_prepare_data_rejects_a_dialogue_whose_exchange_exceeds_the_limit(tmp_path, record_factory, run):
    long_text = "長い独白" * 300
    good = [record_factory([("co", f"こんにちは{i}。"), ("cl", "相談です。"), ("co", "どうぞ。")], eid=10 + i)
            for i in range(4)]
    bad = record_factory([("co", "こんにちは。"), ("cl", long_text), ("co", "そうでしたか。")], eid=99)
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in good + [bad]), encoding="utf-8")
    result = run(path, tmp_path / "run", max_example_tokens=200)
    assert result.stats["rejected"] == {"turn_exceeds_token_limit": 1}
    assert result.stats["dialogues_kept"] == 4
    assert 99 not in [i for ids in result.splits.values() for i in ids]
    blob = "".join((tmp_path / "run" / "data" / f"{n}.jsonl").read_text(encoding="utf-8")
                   for n in ("train", "valid", "test"))
    assert "長い独白" not in blob                      # not truncated into some example


def test_prepare_data_windows_the_sample_with_a_small_limit(tmp_path, sample_records, run, counter):
    limit = 400
    result = run("embedded", tmp_path / "run", max_example_tokens=limit, system_prompt=SYSTEM)
    stats = result.stats
    assert stats["windowed_dialogues"] > 0 and stats["format_errors"] == {}
    assert stats["max_example_tokens_seen"] <= limit
    assert stats["rejected"] == {} and stats["dialogues_kept"] == len(sample_records)
    assert sum(stats["examples"].values()) > len(sample_records)
    kept_ids = {i for ids in result.splits.values() for i in ids}
    # all counselor text of every kept dialogue is trained exactly once
    trained: dict[int, list[str]] = {}
    order = {name: ids for name, ids in result.splits.items()}
    for name in ("train", "valid", "test"):
        lines = (tmp_path / "run" / "data" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(lines) == stats["examples"][name] >= stats["splits"][name]
        for line in lines:
            msgs = json.loads(line)["messages"]
            assert counter.count_messages(msgs) <= limit
            assert msgs[0] == {"role": "system", "content": SYSTEM} and msgs[-1]["role"] == "assistant"
        assert order[name] == sorted(order[name])
    for rec in sample_records:
        d = parse_record(rec)
        if d.id not in kept_ids:
            continue
        full = to_messages(d)
        trained[d.id] = [m["content"] for m in full if m["role"] == "assistant"]
    examples = [m for name in ("train", "valid", "test") for ex in result.examples[name] for m in ex["messages"]]
    got = [m["content"] for m in examples if m["role"] == "assistant" and "weight" not in m]
    assert sorted(got) == sorted(c for cs in trained.values() for c in cs)
