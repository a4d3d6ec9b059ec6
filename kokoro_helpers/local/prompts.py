"""Prompts for local generation: validate a conversation, render it through the tokenizer's chat template
(as training rendered it), fit it into the model's context (oldest turns dropped first, never silently),
and the token ids that end a reply."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from kokoro_helpers.local.chat_messages import apply_system_prompt_mode, chat_template_kwargs, trained_system_prompt_mode

ROLES = ("system", "user", "assistant")
# end-of-turn markers of common chat templates; used when present in the tokenizer's added vocab
KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")
Messages = Sequence[Mapping[str, Any]]


def clean_messages(messages: Messages) -> list[dict[str, str]]:
    """``[{"role", "content"}]`` only (training fields such as ``weight`` dropped), validated:
    roles system/user/assistant, text content, at least one message."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"messages[{i}] must be a dict with role and content, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise TypeError(f"messages[{i}].content must be text, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    if not out:
        raise ValueError("messages is empty: give at least one message")
    return out


def render_prompt(tokenizer, messages: Messages) -> str:
    """The conversation through the tokenizer's chat template, ending with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template: use an instruct/chat model, or the tokenizer saved "
                         "with the adapter (02 saves the template it trained with)")
    # the same messages and switches training rendered (system_prompt_mode; Qwen3: no thinking)
    msgs = apply_system_prompt_mode(clean_messages(messages), trained_system_prompt_mode(tokenizer))
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                         **chat_template_kwargs(tokenizer))


def encode_prompt(tokenizer, messages: Messages) -> list[int]:
    """Token ids of :func:`render_prompt` (no special tokens added: the template writes its own)."""
    return list(tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"])


def context_length(model, tokenizer=None) -> int | None:
    """The model's context (max_position_embeddings), when it has one."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else None


class ContextLengthError(ValueError):
    """A prompt that does not fit the model's context (and truncation was not allowed)."""

    def __init__(self, prompt_tokens: int, max_prompt_tokens: int):
        self.prompt_tokens, self.max_prompt_tokens = int(prompt_tokens), int(max_prompt_tokens)
        super().__init__(f"the prompt has {prompt_tokens} tokens but only {max_prompt_tokens} fit the model's context "
                         "next to the reply: shorten the conversation, lower max_tokens, or allow truncation")


@dataclass
class FittedPrompt:
    """A conversation's prompt ids after fitting into the context (see :func:`fit_messages`); the
    generation functions accept it in place of a conversation (already tokenized: no refitting)."""

    ids: list[int]
    dropped: int = 0                   # oldest messages dropped (whole turns)
    cut_tokens: int = 0                # tokens cut from the left when one message alone was too long
    full_tokens: int = 0               # the prompt's length before fitting

    @property
    def truncated(self) -> bool:
        return bool(self.dropped or self.cut_tokens)


def _turn_starts(msgs: list[dict[str, str]]) -> list[int]:
    """Indices where a kept conversation may start: each user message, and the last message."""
    body = [i for i, m in enumerate(msgs) if m["role"] != "system"]
    starts = [i for i in body if msgs[i]["role"] == "user"]
    if body and (not starts or starts[-1] != body[-1]):
        starts.append(body[-1])
    return starts


def fit_messages(tokenizer, messages: Messages, max_prompt_tokens: int | None, *,
                 truncate: bool = True) -> FittedPrompt:
    """Fit a conversation into ``max_prompt_tokens`` in linear time.

    The whole prompt is encoded once; when it is too long and ``truncate`` is true, every
    message's token count is computed once (one batched tokenizer call), whole turns are cut from
    the oldest (a kept conversation starts at a user message; system messages always stay), and
    only the kept prompt (at most about ``max_prompt_tokens`` long) is encoded again to check it,
    dropping one more turn while the count was underestimated. A last message that alone is too
    long is cut from the left. ``truncate=False`` raises :class:`ContextLengthError` instead."""
    msgs = clean_messages(messages)
    ids = encode_prompt(tokenizer, msgs)
    full = len(ids)
    if max_prompt_tokens is None or full <= max_prompt_tokens:
        return FittedPrompt(ids, 0, 0, full)
    if max_prompt_tokens < 1:
        raise ValueError("max_new_tokens leaves no room for the prompt in the model's context: lower max_new_tokens")
    if not truncate:
        raise ContextLengthError(full, max_prompt_tokens)
    counts = [len(x) for x in tokenizer([m["content"] for m in msgs], add_special_tokens=False)["input_ids"]]
    per_message = max(0.0, (full - sum(counts)) / len(msgs))      # the template's tokens around each message
    cost = [c + per_message for c in counts]
    system_cost = sum(c for c, m in zip(cost, msgs) if m["role"] == "system")
    starts = _turn_starts(msgs)
    if not starts:                                  # system messages only: cut from the left
        return FittedPrompt(ids[-max_prompt_tokens:], 0, full - max_prompt_tokens, full)
    # suffix sums of the body's cost: the estimated prompt when the conversation starts at msgs[i]
    suffix = [0.0] * (len(msgs) + 1)
    for i in range(len(msgs) - 1, -1, -1):
        suffix[i] = suffix[i + 1] + (cost[i] if msgs[i]["role"] != "system" else 0.0)
    k = 0
    while k < len(starts) - 1 and system_cost + suffix[starts[k]] > max_prompt_tokens:
        k += 1
    while True:
        first = starts[k]
        kept = [m for i, m in enumerate(msgs) if i >= first or m["role"] == "system"]
        ids = encode_prompt(tokenizer, kept)
        if len(ids) <= max_prompt_tokens or k == len(starts) - 1:
            break
        excess = len(ids) - max_prompt_tokens          # underestimated: drop turns covering the excess
        k += 1
        while k < len(starts) - 1 and suffix[first] - suffix[starts[k]] < excess:
            k += 1
    dropped = len(msgs) - len(kept)
    cut = max(0, len(ids) - max_prompt_tokens)
    if cut:
        ids = ids[-max_prompt_tokens:]
    return FittedPrompt(ids, dropped, cut, full)


def fit_prompt(tokenizer, messages: Messages, max_prompt_tokens: int | None) -> tuple[list[int], int]:
    """(prompt ids, number of messages dropped): :func:`fit_messages` with truncation, for callers
    that warn themselves (nothing is dropped silently)."""
    fitted = fit_messages(tokenizer, messages, max_prompt_tokens)
    return fitted.ids, fitted.dropped


def end_of_turn_ids(model, tokenizer, extra: Iterable[str] = ()) -> list[int]:
    """Token ids that end a reply: the model's/tokenizer's EOS and the template's end-of-turn
    markers present in the tokenizer's added vocabulary (``<|im_end|>``, ``<|eot_id|>``...)."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids += list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    for token in (*extra, *KNOWN_END_OF_TURN):
        if token in added:
            ids.append(added[token])
    return [int(i) for i in dict.fromkeys(ids)]
