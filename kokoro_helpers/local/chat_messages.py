"""What a chat template gets, the same for training and generation: the messages under ``system_prompt_mode``
and the template's keyword arguments (Qwen3's ``enable_thinking=False``).

A template without a system role, or one that moves the system text, is trained and served with the system
message merged into the first user turn (or dropped); the mode training used is saved with the adapter's
tokenizer (:data:`SYSTEM_PROMPT_MODE_KEY`) so generation applies the same one.
"""
from __future__ import annotations

from typing import Any, Sequence

SYSTEM_PROMPT_MODES = ("keep", "merge_into_first_user", "drop", "auto")
# tokenizer_config.json key under which 02 saves the mode training used, so generation applies it too
SYSTEM_PROMPT_MODE_KEY = "kokoro_system_prompt_mode"


def chat_template_kwargs(tokenizer: Any) -> dict[str, Any]:
    """Keyword arguments for ``apply_chat_template`` that training and generation must share.

    Qwen3-style templates take ``enable_thinking``: False renders the generation prompt with the
    same empty think block the template gives the last trained reply (this project trains and
    serves replies without reasoning)."""
    template = getattr(tokenizer, "chat_template", None)
    text = template if isinstance(template, str) else " ".join(map(str, (template or {}).values())) \
        if isinstance(template, dict) else ""
    return {"enable_thinking": False} if "enable_thinking" in text else {}


def apply_system_prompt_mode(messages: Sequence[dict[str, Any]], mode: str = "keep") -> list[dict[str, Any]]:
    """The messages as the chat template gets them under ``system_prompt_mode``.

    keep: unchanged. drop: system messages removed. merge_into_first_user: the system text
    joins the first user message (``system + "\n\n" + user``) when the conversation opens with
    the user, else it becomes an opening user message of its own (templates without a system
    role often also require a user turn first). Extra keys (``weight``) are kept."""
    if mode not in SYSTEM_PROMPT_MODES or mode == "auto":
        raise ValueError(f"system_prompt_mode must be one of keep, merge_into_first_user, drop, auto; got {mode!r}")
    if mode == "keep":
        return list(messages)
    system = [m["content"] for m in messages if m.get("role") == "system"]
    rest = [m for m in messages if m.get("role") != "system"]
    if mode == "drop" or not system:
        return rest
    text = "\n\n".join(system)
    if rest and rest[0].get("role") == "user":
        return [dict(rest[0], content=text + "\n\n" + rest[0]["content"])] + rest[1:]
    return [{"role": "user", "content": text}] + rest


def trained_system_prompt_mode(tokenizer: Any) -> str:
    """The system_prompt_mode an adapter was trained with (saved with its tokenizer; keep if none)."""
    mode = (getattr(tokenizer, "init_kwargs", None) or {}).get(SYSTEM_PROMPT_MODE_KEY) or "keep"
    return mode if mode in SYSTEM_PROMPT_MODES and mode != "auto" else "keep"
