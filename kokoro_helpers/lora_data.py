"""Chat examples -> token ids + labels for local LoRA training, windows of whole turns, batches.

Rules (issue #4):

- Each example (OpenAI format, ``{"messages": [...]}`` from 01_data) is rendered through the
  *tokenizer's own* chat template. Labels are set only on assistant tokens: the reply's content
  and the end-of-turn token that closes it (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for
  Llama 3, ...), so the model learns to stop. System and user turns, the template's role headers,
  and assistant turns marked ``"weight": 0`` (context only) get ``-100``.
- Label spans are computed from per-message rendering, not from ``{% generation %}`` markers
  (few templates have them): the template is rendered once with a marker in place of each
  message's content, which locates every message's text exactly; the result is checked against
  the real rendering, so a template that rewrites content fails loudly instead of mislabelling.
- An example longer than ``max_length`` tokens is split into windows of whole turns with
  :func:`kokoro_helpers.convert.split_into_windows` (message costs measured with this tokenizer);
  earlier exchanges repeat as context with their assistant turns masked, so every assistant turn
  is trained exactly once. Text is never truncated: an exchange that cannot fit even alone is
  dropped, counted and reported (``DataReport.dropped``), and the rest of its dialogue is kept.
- Batches group examples of similar length and pad only to the longest in the batch, on the
  right, so little compute goes to padding (``padding_fraction`` measures what is left) and a
  causal model needs no padding mask.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from .convert import RecordError, split_into_windows

IGNORE_INDEX = -100
_SRC = "_src"          # private key: a message's index in its original example (survives windowing)


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot be used for per-turn label masking; says what to do."""


def _marker(i: int) -> str:
    # no whitespace (survives `| trim`), no characters a template would escape
    return f"\u241fKOKORO{i}\u241f"


@dataclass
class Segment:
    """A piece of rendered text: which message it belongs to and whether its tokens are trained."""

    text: str
    message: int
    trained: bool


@dataclass
class EncodedExample:
    """One training sequence: token ids, labels (-100 = not trained), and where it came from."""

    input_ids: list[int]
    labels: list[int]
    source: int = 0                   # index of the example in its split
    window: int = 0                   # index of the window within that example
    trained_turns: list[int] = field(default_factory=list)   # original message indices trained here

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


class ChatEncoder:
    """Renders chat examples with a tokenizer's chat template into ids and assistant-only labels.

    ``end_of_turn``: the token that closes an assistant turn; detected from the template (the
    first special token after an assistant reply) when not given.
    """

    def __init__(self, tokenizer: Any, end_of_turn: str | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(
                f"the tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template. Use an "
                "instruct/chat model (e.g. Qwen/Qwen2.5-0.5B-Instruct), or set tokenizer.chat_template to a "
                "Jinja template before training.")
        self.tokenizer = tokenizer
        self.end_of_turn = end_of_turn or self._detect_end_of_turn()
        eot_id = tokenizer.convert_tokens_to_ids(self.end_of_turn)
        if eot_id is None or eot_id == getattr(tokenizer, "unk_token_id", object()):
            raise ChatTemplateError(f"end-of-turn token {self.end_of_turn!r} is not in the tokenizer's vocabulary")
        self.end_of_turn_id = int(eot_id)
        self.pad_id = self._pad_id()

    # ---------------------------------------------------------------- template handling
    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The chat template's text for these messages (only role and content are passed)."""
        clean = [{"role": m["role"], "content": m["content"]} for m in messages]
        try:
            return self.tokenizer.apply_chat_template(clean, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as exc:   # jinja's TemplateError, raise_exception(), KeyError ...
            roles = "/".join(m["role"] for m in clean[:4])
            raise ChatTemplateError(
                f"the chat template of {getattr(self.tokenizer, 'name_or_path', '?')!r} rejected a conversation "
                f"starting {roles}...: {exc}. KokoroChat conversations often open with the counselor "
                "(assistant); give 01_data a system_prompt, or use a base whose template accepts an "
                "assistant turn first (Qwen2.5, llm-jp-3, sarashina2.2 do).") from exc

    def _special_tokens(self) -> list[str]:
        tok = self.tokenizer
        names = set(getattr(tok, "all_special_tokens", []) or [])
        added = getattr(tok, "added_tokens_decoder", {}) or {}
        names.update(str(t) for t in added.values() if getattr(t, "special", False))
        return sorted((n for n in names if n), key=len, reverse=True)

    def _detect_end_of_turn(self) -> str:
        skeleton = self.render([{"role": "user", "content": _marker(0)},
                                {"role": "assistant", "content": _marker(1)}])
        tail = skeleton.split(_marker(1), 1)[-1]
        found = [(tail.find(s), s) for s in self._special_tokens() if s in tail]
        if not found:
            raise ChatTemplateError(
                "cannot find an end-of-turn token after an assistant reply in the chat template "
                f"(the text after the reply is {tail!r}); pass end_of_turn='<token>' explicitly, or "
                "the model would never learn to stop generating")
        return min(found)[1]

    def _pad_id(self) -> int:
        tok = self.tokenizer
        for cand in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None), self.end_of_turn_id):
            if cand is not None:
                return int(cand)
        return 0   # pad positions are masked out of attention and labels, so any id works

    def segments(self, messages: Sequence[dict[str, Any]]) -> list[Segment]:
        """The rendered example cut into per-message pieces, each marked trained or not.

        Trained: an assistant message's content and its end-of-turn token, unless ``weight`` is 0.
        """
        n = len(messages)
        if n == 0:
            return []
        for i, m in enumerate(messages):
            if not isinstance(m.get("content"), str):
                raise ChatTemplateError(f"message {i} has no text content (role {m.get('role')!r})")
        skeleton = self.render([{"role": m["role"], "content": _marker(i)} for i, m in enumerate(messages)])
        gaps: list[str] = []
        pos = 0
        for i in range(n):
            at = skeleton.find(_marker(i), pos)
            if at < 0 or skeleton.count(_marker(i)) != 1:
                raise ChatTemplateError(
                    "the chat template does not render each message's content exactly once and in order "
                    f"(message {i}); per-turn label masking needs a template that does")
            gaps.append(skeleton[pos:at])
            pos = at + len(_marker(i))
        gaps.append(skeleton[pos:])
        real = self.render(messages)
        contents = [m["content"] for m in messages]
        if "".join(g + c for g, c in zip(gaps, contents + [""])) != real:
            contents = [c.strip() for c in contents]          # templates that `| trim` content
            if "".join(g + c for g, c in zip(gaps, contents + [""])) != real:
                raise ChatTemplateError(
                    f"the chat template of {getattr(self.tokenizer, 'name_or_path', '?')!r} changes message "
                    "content depending on its position (e.g. it strips reasoning from earlier turns), so "
                    "assistant tokens cannot be located exactly. Set tokenizer.chat_template to a "
                    "template that renders content verbatim.")

        def trained(i: int) -> bool:
            m = messages[i]
            return m["role"] == "assistant" and m.get("weight", 1) != 0

        out: list[Segment] = []
        eot = self.end_of_turn

        def close_turn(gap: str, i: int) -> str:
            """After assistant message i: its end-of-turn token belongs to it (and is trained with
            it); the rest of the gap is returned."""
            cut = gap.find(eot)
            if cut < 0:
                raise ChatTemplateError(f"no end-of-turn token {eot!r} after assistant message {i}")
            cut += len(eot)
            out.append(Segment(gap[:cut], i, trained(i)))
            return gap[cut:]

        for i in range(n):
            gap = gaps[i]
            if i > 0 and messages[i - 1]["role"] == "assistant":
                gap = close_turn(gap, i - 1)
            if gap:
                out.append(Segment(gap, i, False))
            out.append(Segment(contents[i], i, trained(i)))
        tail = gaps[n]
        if messages[-1]["role"] == "assistant":
            tail = close_turn(tail, n - 1)
        if tail:
            out.append(Segment(tail, n - 1, False))
        return [s for s in out if s.text]

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return list(self.tokenizer(texts, add_special_tokens=False)["input_ids"])

    def message_costs(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Tokens each message takes in this template (its header, content and end of turn)."""
        segs = self.segments(messages)
        costs = [0] * len(messages)
        for seg, ids in zip(segs, self._tokenize([s.text for s in segs])):
            costs[seg.message] += len(ids)
        return costs

    def encode(self, messages: Sequence[dict[str, Any]], source: int = 0, window: int = 0) -> EncodedExample:
        """Token ids and labels of one example (no truncation: may exceed any max_length)."""
        segs = self.segments(messages)
        ids: list[int] = []
        labels: list[int] = []
        for seg, piece in zip(segs, self._tokenize([s.text for s in segs])):
            ids.extend(piece)
            labels.extend(piece if seg.trained else [IGNORE_INDEX] * len(piece))
        turns = [m.get(_SRC, i) for i, m in enumerate(messages)
                 if m["role"] == "assistant" and m.get("weight", 1) != 0]
        return EncodedExample(ids, labels, source, window, turns)


# ------------------------------------------------------------------------------ windows

@dataclass
class Dropped:
    """An exchange (user turn + assistant reply) that does not fit max_length even alone."""

    source: int
    messages: list[int]     # original message indices
    tokens: int
    reason: str = "exchange_exceeds_max_length"


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

    Returns (windows, dropped). An exchange too long to fit even with only the system message is
    dropped and reported; the dialogue is cut there and the parts before and after it are
    windowed separately, so nothing else is lost. Windows come from ``split_into_windows``.
    """
    msgs = [dict(m, **{_SRC: i}) for i, m in enumerate(messages)]
    costs = encoder.message_costs(msgs)
    if sum(costs) <= max_length:
        return [msgs], []
    head = 1 if msgs and msgs[0]["role"] == "system" else 0
    head_cost = sum(costs[:head])
    parts: list[list[int]] = [[]]
    dropped: list[Dropped] = []
    for unit in _exchanges(msgs, head):
        cost = sum(costs[i] for i in unit)
        if head_cost + cost > max_length:
            dropped.append(Dropped(source, unit, head_cost + cost))
            parts.append([])
        else:
            parts[-1].extend(unit)
    windows: list[list[dict[str, Any]]] = []
    for part in parts:
        if not part:
            continue
        part_msgs = msgs[:head] + [msgs[i] for i in part]
        windows.extend(_fit_windows(part_msgs, encoder, max_length, source, dropped))
    return windows, dropped


def _fit_windows(part: list[dict[str, Any]], encoder: ChatEncoder, max_length: int, source: int,
                 dropped: list[Dropped]) -> list[list[dict[str, Any]]]:
    """split_into_windows, then a check with the real encoding; the limit is lowered by any
    excess (templates can add text at a window's start that per-message costs did not see)."""
    limit = max_length
    for _ in range(4):
        try:
            windows = split_into_windows(part, limit, encoder.message_costs, overhead=0)
        except RecordError as exc:
            idx = [m[_SRC] for m in part if m["role"] != "system"]
            dropped.append(Dropped(source, idx, sum(encoder.message_costs(part)), f"{exc.reason}: {exc}"))
            return []
        excess = max(len(encoder.encode(w)) for w in windows) - max_length
        if excess <= 0:
            return windows
        limit -= excess
    idx = [m[_SRC] for m in part if m["role"] != "system"]
    dropped.append(Dropped(source, idx, sum(encoder.message_costs(part)), "windows_do_not_fit_max_length"))
    return []


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
                "mean_length": round(self.tokens / self.sequences, 1) if self.sequences else 0.0,
                "max_length": self.max_length}

    def summary(self) -> str:
        d = self.as_dict()
        text = (f"{self.split}: {d['examples']} examples -> {d['sequences']} sequences "
                f"({d['windowed_examples']} split into windows), {d['tokens']:,} tokens of which "
                f"{d['trained_tokens']:,} trained (assistant), longest {d['longest']} / max_length {self.max_length}")
        if self.dropped:
            text += (f"; DROPPED {len(self.dropped)} exchange(s) longer than max_length "
                     f"({self.dropped_turns} assistant turn(s) not trained) - raise max_length to keep them")
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
    from tqdm.auto import tqdm

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


# ------------------------------------------------------------------------------ batches

def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                           megabatch: int = 50) -> list[list[int]]:
    """Batches of similar length, in a seeded random order that changes each epoch.

    Indices are shuffled, cut into mega-batches of ``batch_size * megabatch``, sorted by length
    inside each, and cut into batches; the batch order is shuffled, with the longest batch first
    (an out-of-memory error shows at step 1, not at the end of an epoch).
    """
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    size = max(1, batch_size * megabatch)
    batches: list[list[int]] = []
    for start in range(0, len(order), size):
        mega = sorted(order[start:start + size], key=lambda i: -lengths[i])
        batches.extend(mega[k:k + batch_size] for k in range(0, len(mega), batch_size))
    rng.shuffle(batches)
    if batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches.insert(0, batches.pop(longest))
    return batches


def random_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches in a seeded random order without grouping by length (the baseline's sampler)."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(n))
    rng.shuffle(order)
    return [order[k:k + batch_size] for k in range(0, n, batch_size)]


def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Deterministic batches for evaluation: longest first, so padding is minimal."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def padding_fraction(lengths: Sequence[int], batches: Iterable[Sequence[int]], pad_to: int | None = None) -> float:
    """Share of the batch tensors' positions that are padding (pad_to: fixed length, else the batch max)."""
    real = padded = 0
    for batch in batches:
        width = pad_to or max(lengths[i] for i in batch)
        real += sum(lengths[i] for i in batch)
        padded += width * len(batch)
    return 1.0 - real / padded if padded else 0.0


def collate(items: Sequence[EncodedExample], pad_id: int, pad_to: int | None = None) -> dict[str, Any]:
    """Right-padded tensors: input_ids, attention_mask, labels (-100 on padding)."""
    import torch

    width = pad_to or max(len(e) for e in items)
    if any(len(e) > width for e in items):
        raise ValueError(f"a sequence of {max(len(e) for e in items)} tokens does not fit pad_to={width}")
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, e in enumerate(items):
        n = len(e)
        ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
