"""A split of chat examples -> training sequences: windows of whole turns that fit ``max_length``, each
encoded by :class:`kokoro_helpers.local.chat_encoding.ChatEncoder`, and a report of what was dropped.

- An example longer than ``max_length`` tokens is split into windows of whole turns with
  :func:`kokoro_helpers.data.convert.split_into_windows`; costs include the template's own preamble
  (e.g. a default system text) and every window is checked with the real encoding. Earlier
  exchanges repeat as context with their assistant turns masked, so every assistant turn is
  trained exactly once. Text is never truncated: an exchange that cannot fit even alone (with
  the system message and the preamble) is dropped, counted and reported
  (``DataReport.dropped``, reason ``exchange_exceeds_max_length``); nothing that fits is dropped.
- Batching is the trainer's (train_callbacks.EpochLengthGroupedSampler: similar lengths together,
  padded on the right only to the longest in the batch).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from kokoro_helpers.data.convert import RecordError, split_into_windows
from kokoro_helpers.local.chat_encoding import SOURCE_KEY, ChatEncoder, EncodedExample

EXCHANGE_TOO_LONG = "exchange_exceeds_max_length"

@dataclass
class Dropped:
    """An exchange (user turn + assistant reply) that does not fit max_length even alone, or a
    part of an example lost for another reason (``reason`` says which)."""

    source: int
    messages: list[int]     # original message indices
    tokens: int
    reason: str = EXCHANGE_TOO_LONG


def _exchanges(messages: Sequence[dict[str, Any]], head: int) -> list[list[int]]:
    units, current = [], []
    for i in range(head, len(messages)):
        current.append(i)
        if messages[i]["role"] == "assistant":
            units.append(current)
            current = []
    return units


def window_example(messages: Sequence[dict[str, Any]], encoder: ChatEncoder, max_length: int,
                   source: int = 0) -> tuple[list[list[dict[str, Any]]], list[Dropped]]:
    """Windows of whole turns that each encode to at most ``max_length`` tokens.

    Returns (windows, dropped). An exchange too long to fit even with only the system message
    (and the template's preamble) is dropped and reported; the dialogue is cut there and the
    parts before and after it are windowed separately, so nothing else is lost. Windows come
    from ``split_into_windows`` with costs that include the preamble, and each is checked with
    the real encoding; if one is still too long, windows are grown exchange by exchange with the
    real encoding instead.
    """
    msgs = [dict(m, **{SOURCE_KEY: i}) for i, m in enumerate(messages)]
    if encoder.position_dependent:
        return _one_reply_windows(msgs, encoder, max_length, source)
    costs, preamble, total = encoder.costs(msgs)
    if total <= max_length:
        return [msgs], []
    head = 1 if msgs and msgs[0]["role"] == "system" else 0
    fixed = preamble + sum(costs[:head])   # the template's overhead + the system message: in every window
    units = _exchanges(msgs, head)
    parts: list[list[int]] = [[]]
    dropped: list[Dropped] = []
    for unit in units:
        estimate = fixed + sum(costs[i] for i in unit)
        if estimate > max_length - 8:       # near or over the limit: measure exactly
            exact = len(encoder.encode(msgs[:head] + [msgs[i] for i in unit]))
            if exact > max_length:
                dropped.append(Dropped(source, unit, exact))
                parts.append([])
                continue
        parts[-1].extend(unit)
    windows: list[list[dict[str, Any]]] = []
    for part in parts:
        if part:
            windows.extend(_fit_windows(msgs[:head], [msgs[i] for i in part], costs, preamble,
                                        encoder, max_length, source, dropped))
    return windows, dropped


def _one_reply_windows(msgs: list[dict[str, Any]], encoder: ChatEncoder, max_length: int, source: int,
                       context_fraction: float = 0.25) -> tuple[list[list[dict[str, Any]]], list[Dropped]]:
    """For templates that render the last reply unlike earlier ones (Qwen3): one window per trained
    reply, ending on it, as generation sees it; earlier exchanges come first as context (replies
    ``weight: 0``), as many as fit in ``context_fraction`` of max_length. Costs more tokens than
    ordinary windows, but every reply is trained in exactly the form generation produces."""
    head = 1 if msgs and msgs[0]["role"] == "system" else 0
    units = _exchanges(msgs, head)
    costs = encoder.costs(msgs)[0] if len(units) > 1 else [0] * len(msgs)
    windows: list[list[dict[str, Any]]] = []
    dropped: list[Dropped] = []
    for k, unit in enumerate(units):
        if msgs[unit[-1]].get("weight", 1) == 0:
            continue
        ctx: list[int] = []
        budget = int(max_length * context_fraction)
        used = 0
        for j in range(k - 1, -1, -1):
            c = sum(costs[i] for i in units[j])
            if used + c > budget:
                break
            ctx = units[j] + ctx
            used += c
        while True:
            window = [dict(m) for m in msgs[:head]]
            window += [dict(msgs[i], weight=0) if msgs[i]["role"] == "assistant" else dict(msgs[i]) for i in ctx]
            window += [dict(msgs[i]) for i in unit]
            n = len(encoder.encode(window))
            if n <= max_length:
                windows.append(window)
                break
            if not ctx:
                dropped.append(Dropped(source, unit, n))
                break
            ctx = ctx[len(_exchanges([msgs[i] for i in ctx], 0)[0]):]   # drop the oldest context exchange
    return windows, dropped


def _fit_windows(head: list[dict[str, Any]], body: list[dict[str, Any]], costs: list[int], overhead: int,
                 encoder: ChatEncoder, max_length: int, source: int,
                 dropped: list[Dropped]) -> list[list[dict[str, Any]]]:
    """split_into_windows on precomputed costs (+ the preamble as overhead), checked with the real
    encoding; the limit is lowered by any excess, and as a last resort windows are grown one
    exchange at a time with the real encoding (no context), which always succeeds."""
    part = head + body
    part_costs = [costs[m[SOURCE_KEY]] for m in part]
    limit = max_length
    for _ in range(3):
        try:
            windows = split_into_windows(part, limit, part_costs, overhead=overhead)
        except RecordError:
            break
        excess = max(len(encoder.encode(w)) for w in windows) - max_length
        if excess <= 0:
            return windows
        limit -= excess
    units = [[body[i] for i in u] for u in _exchanges(body, 0)]
    out: list[list[dict[str, Any]]] = []
    s = 0
    while s < len(units):
        e = s + 1
        first = len(encoder.encode(head + units[s]))
        if first > max_length:   # only if the estimate missed it above
            dropped.append(Dropped(source, [m[SOURCE_KEY] for m in units[s]], first))
            s += 1
            continue
        while e < len(units) and len(encoder.encode(head + [m for u in units[s:e + 1] for m in u])) <= max_length:
            e += 1
        out.append([dict(m) for m in head] + [dict(m) for u in units[s:e] for m in u])
        s = e
    return out


# ------------------------------------------------------------------------------ a split

@dataclass
class DataReport:
    """What encoding a split did: counts, tokens, and everything dropped (with its reason)."""

    split: str
    examples: int = 0
    sequences: int = 0
    windowed_examples: int = 0
    assistant_turns: int = 0
    trained_turns: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0
    max_length: int = 0
    untrained_windows: int = 0      # windows with nothing to learn (only weight-0 replies): skipped
    dropped: list[Dropped] = field(default_factory=list)

    @property
    def dropped_turns(self) -> int:
        return self.assistant_turns - self.trained_turns

    def as_dict(self) -> dict[str, Any]:
        return {"split": self.split, "examples": self.examples, "sequences": self.sequences,
                "windowed_examples": self.windowed_examples, "assistant_turns": self.assistant_turns,
                "trained_turns": self.trained_turns, "dropped_exchanges": len(self.dropped),
                "dropped_assistant_turns": self.dropped_turns, "tokens": self.tokens,
                "trained_tokens": self.trained_tokens, "longest": self.longest,
                "untrained_windows_skipped": self.untrained_windows,
                "dropped_by_reason": self.dropped_by_reason(),
                "mean_length": round(self.tokens / self.sequences, 1) if self.sequences else 0.0,
                "max_length": self.max_length}

    def dropped_by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.dropped:
            out[d.reason] = out.get(d.reason, 0) + 1
        return out

    def summary(self) -> str:
        d = self.as_dict()
        text = (f"{self.split}: {d['examples']} examples -> {d['sequences']} sequences "
                f"({d['windowed_examples']} split into windows), {d['tokens']:,} tokens of which "
                f"{d['trained_tokens']:,} trained (assistant), longest {d['longest']} / max_length {self.max_length}")
        reasons = self.dropped_by_reason()
        too_long = reasons.pop(EXCHANGE_TOO_LONG, 0)
        if too_long:
            text += (f"; DROPPED {too_long} exchange(s) longer than max_length even alone "
                     f"({self.dropped_turns} assistant turn(s) not trained) - raise max_length to keep them")
        for reason, n in sorted(reasons.items()):
            text += f"; DROPPED {n} part(s) of examples: {reason} (not a length problem)"
        return text


def _messages_of(example: Any) -> list[dict[str, Any]]:
    if isinstance(example, dict) and "messages" in example:
        return example["messages"]
    if isinstance(example, list):
        return example
    raise ValueError(f"an example must be {{'messages': [...]}} or a list of messages, got {type(example).__name__}")


def encode_examples(examples: Iterable[Any], encoder: ChatEncoder, max_length: int,
                    split: str = "train", progress: bool = False) -> tuple[list[EncodedExample], DataReport]:
    """Encode a split: windows where needed, assistant-only labels, and a report of what happened.

    A window with no trained token (its replies are all ``"weight": 0``) is skipped and counted.
    """
    from kokoro_helpers.progress import tqdm

    if max_length < 16:
        raise ValueError(f"max_length={max_length} is too small to hold even one exchange")
    items: list[EncodedExample] = []
    report = DataReport(split=split, max_length=max_length)
    examples = list(examples)
    for source, example in enumerate(tqdm(examples, desc=f"encode {split}", unit="ex",
                                          disable=not progress or len(examples) < 500)):
        messages = _messages_of(example)
        report.examples += 1
        report.assistant_turns += sum(1 for m in messages
                                      if m.get("role") == "assistant" and m.get("weight", 1) != 0)
        windows, dropped = window_example(messages, encoder, max_length, source)
        report.dropped.extend(dropped)
        report.windowed_examples += len(windows) > 1
        for w, window in enumerate(windows):
            enc = encoder.encode(window, source, w)
            if not enc.trained_tokens:
                report.untrained_windows += 1
                continue
            items.append(enc)
            report.trained_turns += len(enc.trained_turns)
    report.sequences = len(items)
    report.tokens = sum(len(e) for e in items)
    report.trained_tokens = sum(e.trained_tokens for e in items)
    report.longest = max((len(e) for e in items), default=0)
    return items, report
