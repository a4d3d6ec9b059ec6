"""OpenAI's chat fine-tuning format checks (the error categories of its data-preparation
guidance), plus the per-example token limit and this project's turn-order contract."""
from __future__ import annotations

from collections import Counter
from operator import eq, itemgetter
from typing import Any, Iterable

ALLOWED_KEYS = {"role", "content", "name", "function_call", "weight", "tool_calls", "tool_call_id"}
ALLOWED_ROLES = {"system", "user", "assistant", "function", "tool"}
_TURN_ROLES = frozenset(("user", "assistant"))

# OpenAI's categories, in the order its guidance lists them
OPENAI_CATEGORIES = (
    "data_type", "missing_messages_list", "message_missing_key", "message_unrecognized_key",
    "unrecognized_role", "missing_content", "example_missing_assistant_message",
)
# this project's additional checks
PROJECT_CATEGORIES = ("invalid_weight", "not_alternating", "not_ending_on_assistant", "too_many_tokens")


def _plain_roles(messages: list) -> list[str] | None:
    """The roles, when every message is a plain dict of exactly a str "role" in ALLOWED_ROLES and
    a non-empty str "content" (checked at C speed); None means: run the full per-message checks."""
    if set(map(type, messages)) != {dict} or set(map(len, messages)) != {2}:
        return None
    try:
        roles = list(map(itemgetter("role"), messages))
        contents = list(map(itemgetter("content"), messages))
    except KeyError:
        return None
    if (set(map(type, roles)) == {str} and ALLOWED_ROLES.issuperset(roles)
            and set(map(type, contents)) == {str} and all(contents)):
        return roles
    return None


def example_errors(example: Any, n_tokens: int | None = None, limit: int | None = None) -> list[str]:
    """The error categories of one `{"messages": [...]}` example (empty list: valid)."""
    if not isinstance(example, dict):
        return ["data_type"]
    messages = example.get("messages")
    if not messages or not isinstance(messages, list):
        return ["missing_messages_list"]
    errors: list[str] = []
    # fast path: when every message is {"role": allowed str, "content": non-empty str}, the
    # per-message checks below cannot find anything
    plain_roles = _plain_roles(messages)
    for m in (() if plain_roles is not None else messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            errors.append("message_missing_key")
            continue
        if any(k not in ALLOWED_KEYS for k in m):
            errors.append("message_unrecognized_key")
        if m.get("role") not in ALLOWED_ROLES:
            errors.append("unrecognized_role")
        content, function_call = m.get("content"), m.get("function_call")
        if (not content and not function_call) or not isinstance(content, str):
            errors.append("missing_content")
        if "weight" in m and (m["role"] != "assistant" or m["weight"] not in (0, 1)):
            errors.append("invalid_weight")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        errors.append("example_missing_assistant_message")
    roles = plain_roles if plain_roles is not None else [m.get("role") for m in messages if isinstance(m, dict)]
    body = roles[1:] if roles and roles[0] == "system" else roles
    if any(map(eq, body, body[1:])) or (
            not _TURN_ROLES.issuperset(body) if plain_roles is not None   # all str: same test
            else any(r not in ("user", "assistant") for r in body)):
        errors.append("not_alternating")
    if body and body[-1] != "assistant":
        errors.append("not_ending_on_assistant")
    if n_tokens is not None and limit is not None and n_tokens > limit:
        errors.append("too_many_tokens")
    return sorted(set(errors), key=errors.index)


def count_errors(examples: Iterable[Any], token_counts: Iterable[int | None] | None = None,
                 limit: int | None = None) -> Counter:
    """Error category -> number of examples with it, over a whole file."""
    counts: Counter = Counter()
    tokens = iter(token_counts) if token_counts is not None else None
    for ex in examples:
        n = next(tokens) if tokens is not None else None
        counts.update(example_errors(ex, n, limit))
    return counts
