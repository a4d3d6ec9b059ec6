"""KokoroChat records -> dialogues -> OpenAI chat fine-tuning examples.

Rules (issue #2): client -> user, counselor -> assistant; consecutive utterances of one speaker
merged with a newline; trailing client turns dropped; an optional system prompt; each example
alternates user/assistant after the optional system message and ends on an assistant turn.
An example over the token limit is split into windows of whole turns (`split_into_windows`);
text is never truncated.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from kokoro_helpers.jsonio import content_sha1
from kokoro_helpers.data.schema import ROLE_TO_OPENAI


class RecordError(ValueError):
    """A record that cannot become a dialogue; `reason` is the category counted in stats.json."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Dialogue:
    id: int | str
    utterances: list[tuple[str, str]]          # (role, text) in order, blanks removed
    topic_en: str | None = None
    topic_jp: str | None = None
    score: int | None = None
    blank_dropped: int = 0
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def content_id(obj: Any) -> str:
    """A stable id for a record without an evaluation id: the hash of its canonical JSON."""
    return "sha1:" + content_sha1(obj)[:16]


def record_id(record: dict[str, Any], fallback: str | None = None) -> int | str:
    """The dialogue id: `evaluation_id` (en or jp review), else `fallback` (the file stem), else a content hash."""
    for block, key in (("review_by_client_en", "evaluation_id"), ("review_by_client_jp", "評価ID")):
        review = record.get(block)
        if isinstance(review, dict) and review.get(key) is not None:
            value = review[key]
            try:
                return int(value)
            except (TypeError, ValueError):
                return str(value)
    if fallback is not None:
        return int(fallback) if str(fallback).isdigit() else str(fallback)
    return content_id(record)


def id_sort_key(dialogue_id: int | str) -> tuple[int, int | str]:
    """Ints before strings, each in natural order: the order every result is computed in."""
    return (0, dialogue_id) if isinstance(dialogue_id, int) else (1, str(dialogue_id))


def _score(record: dict[str, Any]) -> int | None:
    for block, key in (("review_by_client_en", "score"), ("review_by_client_jp", "点数")):
        review = record.get(block)
        if isinstance(review, dict) and review.get(key) is not None:
            try:
                return int(review[key])
            except (TypeError, ValueError):
                return None
    return None


def parse_record(record: Any, fallback_id: str | None = None) -> Dialogue:
    """Check one record and return its dialogue, or raise RecordError(reason)."""
    if not isinstance(record, dict):
        raise RecordError("record_not_object", type(record).__name__)
    if "dialogue" not in record or record["dialogue"] is None:
        raise RecordError("missing_dialogue")
    turns = record["dialogue"]
    if not isinstance(turns, list):
        raise RecordError("dialogue_not_list", type(turns).__name__)
    if not turns:
        raise RecordError("empty_dialogue")
    utterances: list[tuple[str, str]] = []
    blanks = 0
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError("utterance_not_object", f"dialogue[{i}]")
        role = turn.get("role")
        if role not in ROLE_TO_OPENAI:
            raise RecordError("unknown_role", f"dialogue[{i}].role={role!r}")
        text = turn.get("utterance")
        if not isinstance(text, str):
            raise RecordError("missing_utterance", f"dialogue[{i}]")
        if not text.strip():
            blanks += 1
            continue
        utterances.append((role, text))
    if not any(role == "counselor" for role, _ in utterances):
        raise RecordError("no_counselor_turn")
    topic = record.get("topic") if isinstance(record.get("topic"), dict) else {}
    return Dialogue(
        id=record_id(record, fallback_id),
        utterances=utterances,
        topic_en=topic.get("main_en"),
        topic_jp=topic.get("main_jp"),
        score=_score(record),
        blank_dropped=blanks,
        raw=record,
    )


def to_messages(dialogue: Dialogue, system_prompt: str | None = None) -> list[dict[str, Any]]:
    """The dialogue as OpenAI chat messages (merged turns, trailing client turns dropped)."""
    merged: list[dict[str, Any]] = []
    for role, text in dialogue.utterances:
        oa_role = ROLE_TO_OPENAI[role]
        if merged and merged[-1]["role"] == oa_role:
            merged[-1]["content"] += "\n" + text
        else:
            merged.append({"role": oa_role, "content": text})
    while merged and merged[-1]["role"] != "assistant":
        merged.pop()
    if system_prompt:
        merged.insert(0, {"role": "system", "content": system_prompt})
    return merged


class TurnTooLong(RecordError):
    def __init__(self, detail: str):
        super().__init__("turn_exceeds_token_limit", detail)


def split_into_windows(
    messages: list[dict[str, Any]],
    limit: int,
    message_costs: Callable[[list[dict[str, Any]]], list[int]] | list[int],
    overhead: int = 3,
    context_fraction: float = 0.25,
) -> list[list[dict[str, Any]]]:
    """Split one example into windows of whole turns that each fit `limit` tokens.

    Each window = [system] + context + new turns and ends on an assistant turn. The context is
    the end of the previous window (whole user+assistant exchanges, up to `context_fraction` of
    the budget), its assistant turns marked `"weight": 0`, so every assistant turn is trained in
    exactly one window. `message_costs` gives each message's tokens: a function (the counter's
    rule, or a local tokenizer's) or the list already computed. `overhead` is the per-example
    extra (reply priming). Raises TurnTooLong
    if a single exchange cannot fit: text is never truncated.
    """
    costs = list(message_costs) if isinstance(message_costs, list) else message_costs(messages)
    if sum(costs) + overhead <= limit:
        return [messages]
    head = 1 if messages and messages[0]["role"] == "system" else 0
    budget = limit - overhead - sum(costs[:head])
    # exchanges: [user?, assistant] groups, each ending on an assistant message
    units: list[list[int]] = []
    current: list[int] = []
    for i in range(head, len(messages)):
        current.append(i)
        if messages[i]["role"] == "assistant":
            units.append(current)
            current = []
    unit_cost = [sum(costs[i] for i in u) for u in units]
    windows: list[list[dict[str, Any]]] = []
    start = 0
    while start < len(units):
        ctx_budget = int(budget * context_fraction) if windows else 0
        ctx: list[int] = []
        ctx_cost = 0
        j = start - 1
        # context never crowds out the next exchange: it only takes room that exchange leaves
        ctx_budget = min(ctx_budget, budget - unit_cost[start])
        while j >= 0 and ctx_cost + unit_cost[j] <= ctx_budget:
            ctx_cost += unit_cost[j]
            ctx = units[j] + ctx
            j -= 1
        end, used = start, ctx_cost
        while end < len(units) and used + unit_cost[end] <= budget:
            used += unit_cost[end]
            end += 1
        if end == start:
            raise TurnTooLong(f"one exchange needs {unit_cost[start]} tokens, the limit leaves {budget}")
        window = [dict(m) for m in messages[:head]]
        for i in ctx:
            m = dict(messages[i])
            if m["role"] == "assistant":
                m["weight"] = 0
            window.append(m)
        for u in units[start:end]:
            window.extend(dict(messages[i]) for i in u)
        windows.append(window)
        start = end
    return windows
