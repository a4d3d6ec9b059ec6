"""Chat examples -> token ids + assistant-only labels through the tokenizer's own chat template (issues #4, #10).

- Each example (OpenAI format, ``{"messages": [...]}`` from 01_data) is rendered *once* through
  the tokenizer's own chat template and the whole text is tokenized *once*, so the training ids
  are exactly what the model sees when that text is tokenized at inference (no per-piece
  tokenization: SentencePiece tokenizers would otherwise add a "▁" at every piece's start).
- Labels come from character offsets (a fast tokenizer's ``offset_mapping``): a token is trained
  when its span falls in a trained reply or in the text up to and including the end-of-turn
  token that closes it (``<|im_end|>``, ``<|eot_id|>``, ...), so the model learns to stop.
  System and user turns, role headers, template preambles and assistant turns marked
  ``"weight": 0`` (context) get ``-100``. Each message's content is located by rendering the
  template with a marker in place of each content and checking it against the real rendering,
  so a template that rewrites, moves or drops content fails loudly instead of mislabelling.
- Training renders what generation renders: the same template keyword arguments
  (:func:`kokoro_helpers.local.chat_messages.chat_template_kwargs`) and the same
  ``system_prompt_mode`` (:func:`kokoro_helpers.local.chat_messages.apply_system_prompt_mode`).
  A template that renders an assistant turn differently depending on its position (Qwen3's
  empty think block on the last turn only) is detected; only the last reply of an example can
  then be trained, and an example with earlier trained replies is refused with an explanation.

Long examples become windows of whole turns in :mod:`kokoro_helpers.local.windows`.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Sequence

from kokoro_helpers.local.chat_messages import SYSTEM_PROMPT_MODES, apply_system_prompt_mode, chat_template_kwargs

IGNORE_INDEX = -100
SOURCE_KEY = "_src"    # a message's index in its original example (survives windowing; never rendered)
_MODE_HINT = ("set system_prompt_mode: merge_into_first_user (the system text goes into the first user turn, "
              "or opens the conversation as one) or drop (02's parameter; auto picks for you)")


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot be used for per-turn label masking; says what to do."""


def _marker(i: int) -> str:
    # no whitespace (survives `| trim`), no characters a template would escape
    return f"\u241fKOKORO{i}\u241f"


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


@dataclass
class Layout:
    """One rendering of an example: the text, each message's content span, and the trained spans."""

    text: str
    spans: list[tuple[int, int]]            # content span of each (prepared) message
    ends: list[int]                         # where each message's part ends (after its end of turn)
    trained: list[tuple[int, int]]          # character spans whose tokens are trained
    trained_messages: list[int]             # indices (in the prepared list) of the trained messages
    head: int                               # where message 0's own part begins (after the preamble)


class ChatEncoder:
    """Renders chat examples with a tokenizer's chat template into ids and assistant-only labels.

    ``end_of_turn``: the token that closes an assistant turn; detected from the template (the
    first special token after an assistant reply) when not given. ``system_prompt_mode``: keep |
    merge_into_first_user | drop | auto (keep when the template renders a system message's text
    as given and in place, else merge_into_first_user); ``self.system_prompt_mode`` is the one used.
    """

    def __init__(self, tokenizer: Any, end_of_turn: str | None = None, system_prompt_mode: str = "keep",
                 template_kwargs: dict[str, Any] | None = None):
        name = getattr(tokenizer, "name_or_path", "?")
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(
                f"the tokenizer of {name!r} has no chat template. Use an "
                "instruct/chat model (e.g. Qwen/Qwen2.5-0.5B-Instruct), or set tokenizer.chat_template to a "
                "Jinja template before training.")
        if not getattr(tokenizer, "is_fast", False):
            raise ChatTemplateError(
                f"the tokenizer of {name!r} is not a fast (Rust) tokenizer, so it cannot give the character "
                "offsets that place labels exactly on the replies. Load it with AutoTokenizer.from_pretrained("
                "..., use_fast=True), or convert it to a tokenizer.json.")
        if system_prompt_mode not in SYSTEM_PROMPT_MODES:
            raise ValueError(f"system_prompt_mode must be one of {', '.join(SYSTEM_PROMPT_MODES)}; "
                             f"got {system_prompt_mode!r}")
        self.tokenizer = tokenizer
        self.name = name
        self.template_kwargs = dict(chat_template_kwargs(tokenizer) if template_kwargs is None else template_kwargs)
        self.system_prompt_mode = system_prompt_mode
        self.end_of_turn = end_of_turn or self._detect_end_of_turn()
        eot_id = tokenizer.convert_tokens_to_ids(self.end_of_turn)
        if eot_id is None or eot_id == getattr(tokenizer, "unk_token_id", object()):
            raise ChatTemplateError(f"end-of-turn token {self.end_of_turn!r} is not in the tokenizer's vocabulary")
        self.end_of_turn_id = int(eot_id)
        self.pad_id = self._pad_id()
        self.position_dependent: str | None = None
        self.reply_prefix = ""
        if system_prompt_mode == "auto":
            self.system_prompt_mode = self._pick_system_prompt_mode()
        self.position_dependent = self._probe_position_dependence()

    # ---------------------------------------------------------------- template handling
    def prepare(self, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The messages as the template gets them (system_prompt_mode applied; extra keys kept)."""
        return apply_system_prompt_mode(messages, self.system_prompt_mode)

    def _apply(self, clean: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                      **self.template_kwargs)
        except Exception as exc:   # jinja's TemplateError, raise_exception(), KeyError ...
            raise ChatTemplateError(self._rejection(clean, exc)) from exc

    def _renders(self, clean: list[dict[str, str]]) -> bool:
        try:
            self.tokenizer.apply_chat_template(clean, tokenize=False, **self.template_kwargs)
            return True
        except Exception:
            return False

    def _rejection(self, clean: list[dict[str, str]], exc: Exception) -> str:
        """The template's own error, with the real cause found by trying the conversation without
        its system message and without its opening assistant turn."""
        roles = "/".join(m["role"] for m in clean[:4])
        text = f"the chat template of {self.name!r} rejected a conversation starting {roles}...: {exc}."
        system = [m for m in clean if m["role"] == "system"]
        rest = [m for m in clean if m["role"] != "system"]
        user_first = rest[next((i for i, m in enumerate(rest) if m["role"] == "user"), len(rest)):]
        causes = []
        if system and user_first and self._renders(user_first) and not self._renders(system + user_first):
            causes.append(f"The template does not accept a system message: {_MODE_HINT}.")
        if rest and rest[0]["role"] == "assistant" and user_first and self._renders(user_first) \
                and not self._renders(rest):
            causes.append("The conversation opens with the counselor (assistant) and this template wants a user "
                          "turn first: give 01_data a system_prompt and set system_prompt_mode: "
                          "merge_into_first_user (the system text then opens the conversation as a user turn), "
                          "or choose a base whose template accepts an assistant turn first (Qwen2.5, "
                          "llm-jp-3, sarashina2.2 do).")
        if not causes:
            causes.append("Check that the conversation alternates user/assistant as this template requires"
                          + (f", or {_MODE_HINT}" if system else "") + ".")
        return " ".join([text] + causes)

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The chat template's text for these messages (system_prompt_mode applied; only role and
        content are passed, with :func:`chat_template_kwargs`)."""
        return self._apply(_clean(self.prepare(messages)), add_generation_prompt)

    def generation_prompt(self, messages: Sequence[dict[str, Any]]) -> str:
        """The text generation starts from: exactly what training put before each trained reply."""
        return self.render(messages, add_generation_prompt=True)

    def _special_tokens(self) -> list[str]:
        tok = self.tokenizer
        names = set(getattr(tok, "all_special_tokens", []) or [])
        added = getattr(tok, "added_tokens_decoder", {}) or {}
        names.update(str(t) for t in added.values() if getattr(t, "special", False))
        return sorted((n for n in names if n), key=len, reverse=True)

    def _detect_end_of_turn(self) -> str:
        skeleton = self._apply([{"role": "user", "content": _marker(0)},
                                {"role": "assistant", "content": _marker(1)}], False)
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

    def _pick_system_prompt_mode(self) -> str:
        """auto: keep when the template renders a system message verbatim and in place."""
        probe = [{"role": "system", "content": "システム。"}, {"role": "user", "content": "相談です。"},
                 {"role": "assistant", "content": "はい。"}, {"role": "user", "content": "続きです。"},
                 {"role": "assistant", "content": "どうぞ。"}]
        self.system_prompt_mode = "keep"
        try:
            self.layout(probe, check_generation=False)
            return "keep"
        except ChatTemplateError:
            return "merge_into_first_user"

    def _probe_position_dependence(self) -> str | None:
        """None, or why the template renders an earlier assistant turn unlike its generation prompt.

        Also sets ``reply_prefix``: text the template puts between the generation prompt and a
        reply's content (Mistral's " "): generation has to produce it, so it is trained too."""
        probe = [{"role": "user", "content": "相談です。"}, {"role": "assistant", "content": "はい。"},
                 {"role": "user", "content": "続きです。"}, {"role": "assistant", "content": "どうぞ。"}]
        try:
            lay = self.layout(probe, check_generation=False)
            prompts = {i: self._apply(_clean(probe[:i]), True) for i in (1, 3)}
        except ChatTemplateError:
            return None          # the shape is refused anyway; examples will say why
        gaps = {}
        for i, prompt in prompts.items():
            start = lay.spans[i][0]
            if lay.text.startswith(prompt) and len(prompt) <= start:
                gaps[i] = lay.text[len(prompt):start]
        if 3 in gaps:
            self.reply_prefix = gaps[3]
        if gaps.get(1) == gaps.get(3) and 3 in gaps:
            return None
        start = lay.spans[1][0]
        return (f"the generation prompt ends with {prompts[1][-40:]!r} but the template renders an earlier "
                f"assistant turn after {lay.text[max(0, start - 40):start]!r} (the last turn alone gets the "
                "generation prompt's form, e.g. Qwen3's empty think block)")

    # ---------------------------------------------------------------- one rendering
    def layout(self, messages: Sequence[dict[str, Any]], check_generation: bool = True) -> Layout:
        """Render once and locate every message's content and the trained character spans."""
        msgs = self.prepare(messages)
        n = len(msgs)
        if n == 0:
            raise ChatTemplateError("an example has no messages")
        for i, m in enumerate(msgs):
            if not isinstance(m.get("content"), str):
                raise ChatTemplateError(f"message {i} has no text content (role {m.get('role')!r})")
        clean = _clean(msgs)
        skeleton = self._apply([{"role": m["role"], "content": _marker(i)} for i, m in enumerate(clean)], False)
        real = self._apply(clean, False)
        gaps: list[str] = []
        pos = 0
        for i in range(n):
            at = skeleton.find(_marker(i), pos)
            if at < 0 or skeleton.count(_marker(i)) != 1:
                raise ChatTemplateError(self._misplaced(clean, skeleton, i))
            gaps.append(skeleton[pos:at])
            pos = at + len(_marker(i))
        gaps.append(skeleton[pos:])
        spans: list[tuple[int, int]] = []
        p = 0
        for i in range(n):
            if not real.startswith(gaps[i], p):
                raise ChatTemplateError(self._rewritten(clean, i))
            p += len(gaps[i])
            c = clean[i]["content"]
            for cand in dict.fromkeys((c, c.strip(), c.rstrip(), c.lstrip(), c.strip("\n"), c.strip(" "))):
                if real.startswith(cand, p) and real.startswith(gaps[i + 1], p + len(cand)):
                    break
            else:
                raise ChatTemplateError(self._rewritten(clean, i))
            spans.append((p, p + len(cand)))
            p += len(cand)
        if p + len(gaps[n]) != len(real):
            raise ChatTemplateError(self._rewritten(clean, n - 1))
        eot = self.end_of_turn
        ends, trained, trained_messages = [], [], []
        for i in range(n):
            limit = spans[i + 1][0] if i + 1 < n else len(real)
            cut = real.find(eot, spans[i][1], limit)
            end = cut + len(eot) if cut >= 0 else spans[i][1]
            ends.append(end)
            if msgs[i]["role"] == "assistant" and msgs[i].get("weight", 1) != 0:
                if cut < 0:
                    raise ChatTemplateError(f"no end-of-turn token {eot!r} after assistant message {i} in the "
                                            f"rendering of {self.name!r}; pass end_of_turn='<token>' explicitly")
                start = spans[i][0] - len(self.reply_prefix)
                if self.reply_prefix and real[start:spans[i][0]] != self.reply_prefix:
                    raise ChatTemplateError(
                        f"the chat template of {self.name!r} does not put {self.reply_prefix!r} before assistant "
                        f"message {i} as its generation prompt does: training and generation would disagree")
                trained.append((start, end))
                trained_messages.append(i)
        if check_generation and trained_messages:
            self._check_generation(clean, real, spans, trained_messages)
        head = _header_start(gaps)
        return Layout(real, spans, ends, trained, trained_messages, head)

    def _check_generation(self, clean, real, spans, trained_messages) -> None:
        if self.position_dependent and trained_messages[:-1]:
            raise ChatTemplateError(
                f"the chat template of {self.name!r} renders an assistant turn differently depending on its "
                f"position: {self.position_dependent}. Training earlier replies in that form would teach "
                "what generation never shows the model, so only the last reply of an example can be trained "
                "(encode_examples does this: one window per reply, earlier exchanges as context), or mark "
                "earlier replies \"weight\": 0, or set tokenizer.chat_template to a position-independent template.")
        last = trained_messages[-1]
        if last == 0:
            return                      # nothing before it but the template's preamble
        prompt = self._apply(clean[:last], True)
        if real[:spans[last][0] - len(self.reply_prefix)] != prompt:
            raise ChatTemplateError(
                f"the chat template of {self.name!r} renders the reply to be trained after "
                f"{real[max(0, spans[last][0] - 40):spans[last][0]]!r}, but the generation prompt ends with "
                f"{prompt[-40:]!r}: training and generation would disagree. Set tokenizer.chat_template to a "
                "template whose generation prompt matches its assistant turns.")

    def _misplaced(self, clean, skeleton, i) -> str:
        role = clean[i]["role"]
        found = skeleton.count(_marker(i))
        if role == "system":
            what = ("does not render the system message's text (it drops it or puts fixed text in its place)"
                    if not found else "moves the system message's text elsewhere (e.g. into the last user turn)"
                    if found == 1 else "renders the system message's text more than once")
            return f"the chat template of {self.name!r} {what}, so its tokens cannot be located: {_MODE_HINT}."
        return (f"the chat template of {self.name!r} does not render each message's content exactly once and in "
                f"order (message {i}, role {role}); per-turn label masking needs a template that does")

    def _rewritten(self, clean, i) -> str:
        role = clean[i]["role"]
        text = (f"the chat template of {self.name!r} changes the text of message {i} (role {role}) or the text "
                "around it depending on the content, so its tokens cannot be located exactly")
        if role == "system":
            return text + f": {_MODE_HINT}."
        return text + ". Set tokenizer.chat_template to a template that renders content verbatim."

    # ---------------------------------------------------------------- tokens
    def _tokenize(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def message_costs(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Tokens each message takes in this rendering (its header, content and end of turn);
        tokens before message 0's header (the template's preamble) and after the last message are
        not counted here: see :meth:`costs`."""
        return self.costs(messages)[0]

    def costs(self, messages: Sequence[dict[str, Any]]) -> tuple[list[int], int, int]:
        """(per-message tokens, overhead tokens, total tokens) of one rendering + tokenization.

        Overhead: the tokens of no message, in every window too: the template's preamble (BOS, a
        default system text) before message 0's header and whatever follows the last turn.

        Costs are per *given* message: under merge_into_first_user the system message's tokens
        count on the message it was merged into (or on an opening user turn: on the system)."""
        lay = self.layout(messages, check_generation=False)
        _, offsets = self._tokenize(lay.text)
        prepared_costs = [0] * len(lay.spans)
        starts = [0] + lay.ends[:-1]
        starts[0] = lay.head
        preamble = 0
        tail_start = lay.ends[-1]
        for s, e in offsets:
            if s < lay.head or (s >= tail_start and s > lay.spans[-1][1]):
                preamble += 1
                continue
            k = bisect.bisect_right(starts, s) - 1
            prepared_costs[min(max(k, 0), len(prepared_costs) - 1)] += 1
        return self._per_given(messages, prepared_costs), preamble, len(offsets)

    def _per_given(self, messages, prepared_costs: list[int]) -> list[int]:
        if self.system_prompt_mode == "keep":
            return prepared_costs
        out = [0] * len(messages)
        idx = [i for i, m in enumerate(messages) if m.get("role") != "system"]
        sys_idx = [i for i, m in enumerate(messages) if m.get("role") == "system"]
        extra = len(prepared_costs) - len(idx)          # an opening user turn made of the system text
        if extra and sys_idx:
            out[sys_idx[0]] += sum(prepared_costs[:extra])
        for j, i in enumerate(idx):
            out[i] += prepared_costs[extra + j]
        return out

    def encode(self, messages: Sequence[dict[str, Any]], source: int = 0, window: int = 0) -> EncodedExample:
        """Token ids and labels of one example (no truncation: may exceed any max_length)."""
        lay = self.layout(messages)
        ids, offsets = self._tokenize(lay.text)
        labels = [IGNORE_INDEX] * len(ids)
        spans = lay.trained
        j = 0
        for t, (s, e) in enumerate(offsets):
            while j < len(spans) and spans[j][1] <= s:
                j += 1
            if j == len(spans):
                break
            a, b = spans[j]
            if (s < b and e > a) or (s == e and a <= s < b):
                labels[t] = ids[t]
        turns = [m.get(SOURCE_KEY, i) for i, m in enumerate(messages)
                 if m["role"] == "assistant" and m.get("weight", 1) != 0]
        return EncodedExample(ids, labels, source, window, turns)


def _clean(messages: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _header_start(gaps: list[str]) -> int:
    """Where message 0's own header begins in the text before it: the longest suffix of that text
    shared with another message's gap (a header) — what precedes it is the template's preamble."""
    first = gaps[0]
    best = 0
    for g in gaps[1:-1]:
        k = 0
        while k < min(len(first), len(g)) and first[-1 - k] == g[-1 - k]:
            k += 1
        best = max(best, k)
    return len(first) - best

