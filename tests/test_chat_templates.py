"""Token-exact training data on real chat templates (issue #10).

The real chat templates of widely used instruct models (tests/fixtures/chat_templates/, source
and licence of each in SOURCES.md) x small stand-in tokenizers built here with the `tokenizers`
library, of the kinds those models use: byte-level BPE (Qwen, Llama 3, Phi-4, granite),
SentencePiece-style with a "▁" prepended to every piece (Llama 2, Mistral, Phi-3, llm-jp-3),
Metaspace prepending only at the very start, and no prefix at all (Gemma).

For every conversation shape 01_data produces (system + counselor first, client first, no
system, ``weight: 0`` context turns, windows), ChatEncoder's ids must be exactly the
tokenization of the whole rendered text, and the labelled tokens exactly those that overlap a
trained reply or the text up to its end-of-turn token, located here independently with
``str.find``. A shape a template refuses must fail with a message that names the cause.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from kokoro_helpers.local.chat_encoding import IGNORE_INDEX, ChatEncoder, ChatTemplateError
from kokoro_helpers.local.chat_messages import apply_system_prompt_mode, chat_template_kwargs
from kokoro_helpers.local.windows import encode_examples, window_example

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"

# template -> (bos, eos, special tokens)
CHATML = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
TEMPLATES = {
    "qwen2.5": (None, "<|im_end|>", CHATML),
    "qwen3": (None, "<|im_end|>", CHATML),
    "llama-3.1": ("<|begin_of_text|>", "<|eot_id|>",
                  ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "gemma-2": ("<bos>", "<eos>", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]),
    "gemma-3": ("<bos>", "<eos>", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]),
    "phi-3.5": ("<s>", "<|endoftext|>", ["<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
    "phi-4": (None, "<|im_end|>", ["<|im_start|>", "<|im_sep|>", "<|im_end|>"]),
    "llm-jp-3": ("<s>", "</s>", ["<s>", "</s>"]),
    "command-r": ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>",
                  ["<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>",
                   "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>"]),
    "granite-3.3": (None, "<|end_of_text|>", ["<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>"]),
    "mistral-v3-tokenizer": ("<s>", "</s>", ["<s>", "</s>", "[INST]", "[/INST]"]),
    "mistral-7b-instruct-v0.2": ("<s>", "</s>", ["<s>", "</s>", "[INST]", "[/INST]"]),
    "olmo-2": ("<|endoftext|>", "<|endoftext|>", ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"]),
}
KINDS = ("byte_level", "sentencepiece_always", "metaspace_first", "no_prefix")

SYSTEM = "あなたは相談者に寄り添う心理カウンセラーです。"
REPLIES = ["こんにちは。今日はどのようなご相談でしょうか。", "それはおつらいですね。 少し詳しく教えてください。",
           "眠れない夜が続くと心も体も疲れますね。", "お仕事のことが頭から離れないのですね。"]
ASKS = ["最近、夜なかなか眠れなくて。", "仕事のことを考えてしまうんです。", "上司との関係がうまくいかなくて。"]


def _corpus() -> list[str]:
    text = REPLIES + ASKS + [SYSTEM, "You are a helpful assistant. Cutting Knowledge Date", "### 指示 応答",
                             "system user assistant model", "以下は、タスクを説明する指示です。"]
    return text * 3


@pytest.fixture(scope="module")
def base_tokenizers():
    """The four kinds of tokenizer, trained once on a few hundred characters (fast)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    out = {}
    for kind in KINDS:
        if kind == "byte_level":
            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        elif kind in ("sentencepiece_always", "metaspace_first"):
            tok = Tokenizer(models.BPE(unk_token="<unk>"))
            scheme = "always" if kind == "sentencepiece_always" else "first"
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
            tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
            trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False, special_tokens=["<unk>"])
        else:  # Gemma-like: spaces become "▁" in the normalizer, nothing is prepended
            tok = Tokenizer(models.BPE(unk_token="<unk>"))
            tok.normalizer = normalizers.Replace(" ", "▁")
            tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
            tok.decoder = decoders.Replace("▁", " ")
            trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False, special_tokens=["<unk>"])
        # every character of the test texts in the vocabulary: no <unk> in the way of offsets
        alphabet = sorted(set("".join(_corpus() + REPLIES + ASKS + [SYSTEM]) + "\n #:、。-"))
        trainer = type(trainer)(**{**_trainer_kwargs(trainer), "initial_alphabet": _alphabet(kind, alphabet)})
        tok.train_from_iterator(_corpus(), trainer)
        out[kind] = tok.to_str()
    return out


def _trainer_kwargs(trainer) -> dict:
    return {"vocab_size": trainer.vocab_size, "show_progress": False, "special_tokens": list(trainer.special_tokens)}


def _alphabet(kind: str, chars: list[str]) -> list[str]:
    from tokenizers import pre_tokenizers

    if kind == "byte_level":
        return pre_tokenizers.ByteLevel.alphabet()
    return chars + ["▁"]


_CACHE: dict = {}


def make_tokenizer(base_tokenizers, template: str, kind: str):
    key = (template, kind)
    if key not in _CACHE:
        from tokenizers import AddedToken, Tokenizer
        from transformers import PreTrainedTokenizerFast

        bos, eos, specials = TEMPLATES[template]
        tok = Tokenizer.from_str(base_tokenizers[kind])
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
        kwargs = {"eos_token": eos, "bos_token": bos} if bos else {"eos_token": eos}
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
        hf.chat_template = (FIXTURES / f"{template}.jinja").read_text(encoding="utf-8")
        hf.name_or_path = f"{template}/{kind}"
        _CACHE[key] = hf
    return _CACHE[key]


# ------------------------------------------------------------------------------ shapes

def shape(name: str) -> list[dict]:
    s = {"role": "system", "content": SYSTEM}
    a = [{"role": "assistant", "content": r} for r in REPLIES]
    u = [{"role": "user", "content": q} for q in ASKS]
    return {
        "system_counselor_first": [s, a[0], u[0], a[1], u[1], a[2]],
        "system_client_first": [s, u[0], a[1], u[1], a[2]],
        "no_system_counselor_first": [a[0], u[0], a[1], u[1], a[3]],
        "no_system_client_first": [u[0], a[1], u[1], a[2]],
        "weight0_context": [s, u[0], dict(a[1], weight=0), u[1], a[2]],
    }[name]


SHAPES = ("system_counselor_first", "system_client_first", "no_system_counselor_first",
          "no_system_client_first", "weight0_context")


def expected_refusal(template: str, shape_name: str, mode: str) -> str | None:
    """The cause each template's refusal must name, or None when the shape must encode."""
    has_system = shape_name.startswith("system") or shape_name == "weight0_context"
    counselor_first = "counselor_first" in shape_name
    keeps_system = has_system and mode == "keep"
    if template == "gemma-2":
        if keeps_system:
            return "does not accept a system message"
        if counselor_first and not (has_system and mode == "merge_into_first_user"):
            return "wants a user turn first"
    if template == "gemma-3":       # the system text joins the first turn, which must be the user's
        if counselor_first and not (has_system and mode == "merge_into_first_user"):
            return "wants a user turn first"
    if template == "mistral-7b-instruct-v0.2":
        if keeps_system:
            return "does not accept a system message"
        if counselor_first and not (has_system and mode == "merge_into_first_user"):
            return "wants a user turn first"
    if template in ("mistral-v3-tokenizer", "command-r"):
        if counselor_first and not (has_system and mode == "merge_into_first_user"):
            return "wants a user turn first"
        if template == "mistral-v3-tokenizer" and keeps_system:
            return "(moves|does not render) the system message"
    if template == "llm-jp-3" and keeps_system:
        return "does not render the system message's text"
    if template == "qwen3":
        trained = [m for m in shape(shape_name) if m["role"] == "assistant" and m.get("weight", 1) != 0]
        if len(trained) > 1:
            return "depending on its"
    return None


# ------------------------------------------------------------------------------ checks

def check_exact(encoder: ChatEncoder, tokenizer, messages: list[dict]) -> None:
    enc = encoder.encode(messages)
    prepared = apply_system_prompt_mode(messages, encoder.system_prompt_mode)
    text = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in prepared],
                                         tokenize=False, **chat_template_kwargs(tokenizer))
    whole = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc.input_ids == list(whole["input_ids"]), "ids differ from tokenizing the whole rendered text"
    # the trained spans, located independently: from the end of the generation prompt of the
    # conversation before each trained reply (what the model is given at inference) up to and
    # including the first end-of-turn token after the reply's content
    clean = [{"role": m["role"], "content": m["content"]} for m in prepared]
    spans, pos = [], 0
    for i, m in enumerate(prepared):
        c = m["content"]
        hit = text.find(c, pos)
        if hit < 0:
            c = c.strip()
            hit = text.find(c, pos)
        assert hit >= 0, f"{m['role']} content not in the rendering"
        end = hit + len(c)
        if m["role"] == "assistant" and m.get("weight", 1) != 0:
            if i:
                prompt = tokenizer.apply_chat_template(clean[:i], tokenize=False, add_generation_prompt=True,
                                                       **chat_template_kwargs(tokenizer))
                assert text.startswith(prompt) and len(prompt) <= hit, "generation prompt is not the training prefix"
                # what generation must produce after its prompt: the text up to the content is
                # only the reply prefix (" " for Mistral), or the prompt lacks the assistant
                # header because the template adds it only after a message (granite, system only)
                start = max(len(prompt), hit - len(encoder.reply_prefix))
                assert text[start:hit] == encoder.reply_prefix
            else:
                start = hit - len(encoder.reply_prefix)
            eot = text.find(encoder.end_of_turn, end)
            assert eot >= 0
            spans.append((start, eot + len(encoder.end_of_turn)))
        pos = end
    want = set()
    for t, (s, e) in enumerate(whole["offset_mapping"]):
        if any((s < b and e > a) or (s == e and a <= s < b) for a, b in spans):
            want.add(t)
    got = {t for t, lab in enumerate(enc.labels) if lab != IGNORE_INDEX}
    assert got == want, f"labelled {sorted(got - want)} extra, {sorted(want - got)} missing"
    assert all(enc.labels[t] == enc.input_ids[t] for t in got)
    # every trained reply is covered whole, with its end-of-turn token, and nothing of the prompt
    offsets = whole["offset_mapping"]
    for a, b in spans:
        inside = [t for t in got if offsets[t][1] > a and offsets[t][0] < b]
        assert min(offsets[t][0] for t in inside) <= a and max(offsets[t][1] for t in inside) >= b
        assert enc.input_ids[max(inside)] == encoder.end_of_turn_id
    assert text.count(encoder.end_of_turn) >= len(spans)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_every_shape_is_token_exact_or_refused_with_its_cause(base_tokenizers, template, kind):
    tokenizer = make_tokenizer(base_tokenizers, template, kind)
    for mode in ("keep", "merge_into_first_user", "drop"):
        encoder = ChatEncoder(tokenizer, system_prompt_mode=mode)
        for name in SHAPES:
            messages = shape(name)
            cause = expected_refusal(template, name, mode)
            if cause is None:
                check_exact(encoder, tokenizer, messages)
            else:
                with pytest.raises(ChatTemplateError, match=cause) as info:
                    encoder.encode(messages)
                msg = str(info.value)
                if "system" in cause:
                    assert "system_prompt_mode" in msg and "merge_into_first_user" in msg
                if "user turn first" in cause:
                    assert "merge_into_first_user" in msg


@pytest.mark.parametrize("kind", ("byte_level", "sentencepiece_always"))
@pytest.mark.parametrize("template", sorted(t for t in TEMPLATES if t != "qwen3"))
def test_windows_are_token_exact_fit_and_drop_nothing_that_fits(base_tokenizers, template, kind):
    tokenizer = make_tokenizer(base_tokenizers, template, kind)
    encoder = ChatEncoder(tokenizer, system_prompt_mode="auto")
    s = {"role": "system", "content": SYSTEM}
    turns = []
    for i in range(10):
        turns += [{"role": "user", "content": ASKS[i % 3] + f"（{i}）"},
                  {"role": "assistant", "content": REPLIES[i % 4] + f"（{i}）"}]
    messages = [s] + turns
    full = len(encoder.encode(messages))
    one = max(len(encoder.encode([s] + turns[k:k + 2])) for k in range(0, len(turns), 2))
    max_length = max(one + 2, full // 3)
    items, report = encode_examples([{"messages": messages}], encoder, max_length)
    assert report.dropped == [] and report.windowed_examples == 1
    assert sorted(t for e in items for t in e.trained_turns) == list(range(2, len(messages), 2))
    assert all(len(e) <= max_length for e in items)
    windows, dropped = window_example(messages, encoder, max_length)
    assert len(windows) == len(items) and not dropped
    for w in windows:   # each window is token-exact too, context replies untrained
        check_exact(encoder, tokenizer, w)


@pytest.mark.parametrize("template", ["qwen2.5", "llama-3.1", "granite-3.3"])
def test_the_templates_own_preamble_is_counted_so_no_exchange_that_fits_is_dropped(base_tokenizers, template):
    """Without a system message these templates add their own default system text: windows must
    leave room for it in every window, not only the first."""
    tokenizer = make_tokenizer(base_tokenizers, template, "byte_level")
    encoder = ChatEncoder(tokenizer)
    turns = []
    for i in range(12):
        turns += [{"role": "user", "content": ASKS[i % 3]}, {"role": "assistant", "content": REPLIES[i % 4]}]
    preamble = encoder.costs(turns)[1]
    assert preamble > 5                                      # the default system text is there
    one = max(len(encoder.encode(turns[k:k + 2])) for k in range(0, len(turns), 2))
    for max_length in (one, one + 7, 2 * one, 3 * one + 1):
        items, report = encode_examples([{"messages": turns}], encoder, max_length)
        assert report.dropped == [], (max_length, report.summary())
        assert all(len(e) <= max_length for e in items)
        assert sorted(t for e in items for t in e.trained_turns) == list(range(1, len(turns), 2))
    items, report = encode_examples([{"messages": turns}], encoder, one - 1)
    assert report.dropped and all(d.reason == "exchange_exceeds_max_length" for d in report.dropped)
    assert "longer than max_length even alone" in report.summary()


def test_qwen3_trains_what_generation_sees(base_tokenizers):
    tokenizer = make_tokenizer(base_tokenizers, "qwen3", "byte_level")
    encoder = ChatEncoder(tokenizer)
    assert encoder.template_kwargs == {"enable_thinking": False}
    assert encoder.position_dependent and "think" in encoder.position_dependent
    messages = shape("weight0_context")
    enc = encoder.encode(messages)
    text = tokenizer.decode(enc.input_ids)
    prompt = encoder.generation_prompt(messages[:-1])
    assert prompt.endswith("<think>\n\n</think>\n\n") and text.startswith(prompt)
    labelled = tokenizer.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])
    assert labelled == messages[-1]["content"] + "<|im_end|>"
    with pytest.raises(ChatTemplateError, match="only the last reply"):
        encoder.encode(shape("system_client_first"))
    # encode_examples trains every reply anyway: one window per reply, earlier ones as context
    messages = shape("system_client_first") + [{"role": "user", "content": ASKS[2]},
                                               {"role": "assistant", "content": REPLIES[3]}]
    items, report = encode_examples([{"messages": messages}], encoder, max_length=4096)
    assert report.dropped == [] and [e.trained_turns for e in items] == [[2], [4], [6]]
    windows, _ = window_example(messages, encoder, 4096)
    for w in windows:
        check_exact(encoder, tokenizer, w)
        assert w[-1]["content"] == messages[len(w) - 1]["content"] and w[-1].get("weight", 1) != 0


def test_auto_mode_keeps_or_merges_by_what_the_template_does(base_tokenizers):
    picks = {t: ChatEncoder(make_tokenizer(base_tokenizers, t, "byte_level"), system_prompt_mode="auto").system_prompt_mode
             for t in TEMPLATES}
    assert picks["qwen2.5"] == picks["llama-3.1"] == picks["granite-3.3"] == picks["gemma-3"] == "keep"
    assert picks["gemma-2"] == picks["llm-jp-3"] == picks["mistral-v3-tokenizer"] == "merge_into_first_user"


def test_a_slow_tokenizer_or_none_template_fails_loudly(base_tokenizers):
    tok = make_tokenizer(base_tokenizers, "qwen2.5", "byte_level")

    class Slow:
        chat_template = tok.chat_template
        is_fast = False
        name_or_path = "slow"

    with pytest.raises(ChatTemplateError, match="offsets"):
        ChatEncoder(Slow())

    class NoTemplate:
        chat_template = None
        name_or_path = "bare"

    with pytest.raises(ChatTemplateError, match="no chat template"):
        ChatEncoder(NoTemplate())


def test_sentencepiece_replies_carry_no_spurious_prefix(base_tokenizers):
    """The issue's finding: per-piece tokenization put a "▁" at each reply's start that the
    whole text does not have. Whole-text ids make the labelled reply what inference sees."""
    tokenizer = make_tokenizer(base_tokenizers, "llm-jp-3", "sentencepiece_always")
    encoder = ChatEncoder(tokenizer, system_prompt_mode="auto")
    messages = shape("system_client_first")
    enc = encoder.encode(messages)
    text = encoder.render(messages)
    assert enc.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    per_piece = tokenizer(messages[2]["content"], add_special_tokens=False)["input_ids"]
    labelled = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
    assert labelled[:len(per_piece)] != per_piece        # the old way would have trained these ids


# each Hub id family params/kokorochat.yaml may suggest -> the template fixture that stands for it
SUGGESTED_FAMILIES = {"Qwen/Qwen2.5": "qwen2.5", "llm-jp/llm-jp-3": "llm-jp-3", "google/gemma-2": "gemma-2"}


def test_every_base_suggested_in_kokorochat_yaml_works_with_it_as_is(base_tokenizers):
    """Every base params/kokorochat.yaml names (the local_base_model and the ones its comment suggests) has
    its real template here, and with that file's system_prompt and system_prompt_mode the sample's
    conversation shapes encode exactly on it. A base suggested without a tested template fails here."""
    import re

    import yaml

    from kokoro_helpers.paths import resolve

    raw = resolve("params/kokorochat.yaml").read_text(encoding="utf-8")
    params = yaml.safe_load(raw)
    line = next(ln for ln in raw.splitlines() if ln.startswith("local_base_model:"))
    suggested = [b for b in re.findall(r"[\w.-]+/[\w.-]+", line) if not b.startswith("tests/")]
    assert len(suggested) >= 3 and suggested[0] == params["local_base_model"]
    untested = [b for b in suggested if not any(b.startswith(f) for f in SUGGESTED_FAMILIES)]
    assert not untested, f"kokorochat.yaml suggests bases whose templates are not tested: {untested}"
    system = {"role": "system", "content": params["system_prompt"]}
    for base in suggested:
        template = next(t for f, t in SUGGESTED_FAMILIES.items() if base.startswith(f))
        for kind in KINDS:
            tokenizer = make_tokenizer(base_tokenizers, template, kind)
            encoder = ChatEncoder(tokenizer, system_prompt_mode=params["system_prompt_mode"])
            for name in ("system_counselor_first", "system_client_first"):
                messages = [system] + shape(name)[1:]
                check_exact(encoder, tokenizer, messages)


def test_generation_renders_the_system_prompt_as_training_did(base_tokenizers, tmp_path):
    """An adapter trained with system_prompt_mode merge (Gemma-2 has no system role) saves that mode
    with its tokenizer; prompts.render_prompt applies it, so the prompt equals the text training put
    before the reply — and a tokenizer saved without the mode keeps the messages as they are."""
    from transformers import AutoTokenizer

    from kokoro_helpers.local.chat_messages import SYSTEM_PROMPT_MODE_KEY, trained_system_prompt_mode
    from kokoro_helpers.local.prompts import render_prompt

    tokenizer = make_tokenizer(base_tokenizers, "gemma-2", "no_prefix")
    encoder = ChatEncoder(tokenizer, system_prompt_mode="auto")
    assert encoder.system_prompt_mode == "merge_into_first_user"
    context = shape("system_client_first")[:-1]
    assert context[0]["role"] == "system" and context[-1]["role"] == "user"
    with pytest.raises(Exception):                 # the template itself refuses a system message
        render_prompt(tokenizer, context)
    tokenizer.init_kwargs[SYSTEM_PROMPT_MODE_KEY] = encoder.system_prompt_mode
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert trained_system_prompt_mode(reloaded) == "merge_into_first_user"
    assert render_prompt(reloaded, context) == encoder.generation_prompt(context)
    assert context[0]["content"] in render_prompt(reloaded, context)


@pytest.mark.parametrize("kind", KINDS)
def test_reference_nll_scores_the_whole_text_tokenization(base_tokenizers, kind):
    """03's reference perplexity tokenizes prompt + reply as one text (what the model sees), not
    the reply on its own: with a "▁"-prepending tokenizer the reply alone would start with a
    word-start token that the real text does not have."""
    from kokoro_helpers.local.prompts import render_prompt
    from kokoro_helpers.evaluation.metrics import _split_ids

    tokenizer = make_tokenizer(base_tokenizers, "qwen2.5", kind)
    context, reference = shape("system_client_first")[:2], REPLIES[1]
    prompt = render_prompt(tokenizer, context)
    prompt_ids, ref_ids = _split_ids(tokenizer, prompt, reference)
    assert prompt_ids + ref_ids == tokenizer(prompt + reference, add_special_tokens=False)["input_ids"]
    assert ref_ids and tokenizer.decode(ref_ids).strip() == reference.strip()
    alone = tokenizer(reference, add_special_tokens=False)["input_ids"]
    if kind == "sentencepiece_always":
        assert alone != ref_ids            # the per-segment tokenization 03 used to score
