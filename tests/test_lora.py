"""Local LoRA data (issue #4): label masking, windows, batching, the resource monitor. Training,
save/load and resume on TRL's SFTTrainer: tests/test_train_lora.py.

Everything runs offline on the CPU with a very small tiny-model recipe (built in seconds into a
temporary cache) and a cut-down copy of the embedded sample's splits, so the whole file takes
well under a minute and a half on 2 cores.
"""
from __future__ import annotations


import pytest

from kokoro_helpers.data.pipeline import prepare_data
from kokoro_helpers.data.tokens import estimate_counter
from kokoro_helpers.local.chat_encoding import IGNORE_INDEX, ChatEncoder, ChatTemplateError
from kokoro_helpers.local.windows import encode_examples, window_example

SYSTEM = "あなたは相談者の話に丁寧に耳を傾ける心理カウンセラーです。"


@pytest.fixture(scope="module")
def tokenizer(base_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(base_dir)


@pytest.fixture(scope="module")
def encoder(tokenizer) -> ChatEncoder:
    return ChatEncoder(tokenizer)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """01_data's real output on the embedded sample (with a system prompt)."""
    run_dir = tmp_path_factory.mktemp("sample-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KOKORO_TIKTOKEN_OFFLINE", "1")
        result = prepare_data(run_dir=str(run_dir), system_prompt=SYSTEM, progress=False, token_counter=estimate_counter())
    return result


def labelled_text(tokenizer, enc) -> str:
    return tokenizer.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])


# ------------------------------------------------------------------------------------ labels

def test_only_assistant_tokens_carry_labels(encoder, tokenizer):
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "assistant", "content": "こんにちは。今日はどうされましたか。"},
        {"role": "user", "content": "最近眠れなくて。"},
        {"role": "assistant", "content": "それはおつらいですね。", "weight": 0},
        {"role": "user", "content": "仕事のことが気になって。"},
        {"role": "assistant", "content": "お仕事のことが頭から離れないのですね。"},
    ]
    enc = encoder.encode(messages)
    assert len(enc.input_ids) == len(enc.labels)
    assert all(lab in (IGNORE_INDEX, tok) for tok, lab in zip(enc.input_ids, enc.labels))
    # exactly the two trained replies, each followed by its end-of-turn token, and nothing else
    assert labelled_text(tokenizer, enc) == ("こんにちは。今日はどうされましたか。<|im_end|>"
                                             "お仕事のことが頭から離れないのですね。<|im_end|>")
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    labelled_eot = [i for i, lab in enumerate(enc.labels) if lab == eot]
    all_eot = [i for i, tok in enumerate(enc.input_ids) if tok == eot]
    assert len(all_eot) == 6 and len(labelled_eot) == 2          # system/user/weight-0 ends are masked
    assert enc.trained_turns == [1, 5]
    # the ids are the real chat-template rendering
    assert tokenizer.decode(enc.input_ids) == tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in messages], tokenize=False)


def test_a_window_with_nothing_to_learn_is_skipped_and_counted(encoder):
    msgs = [{"role": "user", "content": "こんにちは。"}, {"role": "assistant", "content": "はい。", "weight": 0}]
    items, report = encode_examples([{"messages": msgs}], encoder, max_length=256)
    assert items == [] and report.untrained_windows == 1 and report.assistant_turns == 0


def test_labels_on_the_real_sample(encoder, tokenizer, sample):
    for example in sample.examples["train"][:10]:
        msgs = example["messages"]
        enc = encoder.encode(msgs)
        want = "".join(m["content"] + "<|im_end|>" for m in msgs
                       if m["role"] == "assistant" and m.get("weight", 1) != 0)
        assert labelled_text(tokenizer, enc) == want


def test_end_of_turn_is_detected_and_templates_checked(tokenizer):
    assert ChatEncoder(tokenizer).end_of_turn == "<|im_end|>"

    class NoTemplate:
        chat_template = None
        name_or_path = "x"

    with pytest.raises(ChatTemplateError, match="chat template"):
        ChatEncoder(NoTemplate())


QWEN25_STYLE = (  # Qwen2.5-Instruct's template without its tool-calling branches
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3_STYLE = (
    "{{- bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
ALTERNATING_ONLY = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}")


def test_other_templates_label_exactly_the_replies(base_dir):
    from transformers import AutoTokenizer

    convo = [{"role": "assistant", "content": "こんにちは。 "}, {"role": "user", "content": "眠れません。"},
             {"role": "assistant", "content": "  それはおつらいですね。"}]
    qwen = AutoTokenizer.from_pretrained(base_dir)
    qwen.chat_template = QWEN25_STYLE                   # adds a default system prompt, accepts assistant first
    enc = ChatEncoder(qwen).encode(convo)
    assert labelled_text(qwen, enc) == "こんにちは。 <|im_end|>  それはおつらいですね。<|im_end|>"
    assert qwen.decode(enc.input_ids).startswith("<|im_start|>system\nYou are Qwen")

    llama = AutoTokenizer.from_pretrained(base_dir)
    llama.add_special_tokens({"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>",
                                                            "<|end_header_id|>", "<|eot_id|>"]})
    llama.bos_token = "<|begin_of_text|>"
    llama.chat_template = LLAMA3_STYLE                  # trims content, ends turns with <|eot_id|>
    encoder = ChatEncoder(llama)
    assert encoder.end_of_turn == "<|eot_id|>"
    enc = encoder.encode(convo)
    assert labelled_text(llama, enc) == "こんにちは。<|eot_id|>それはおつらいですね。<|eot_id|>"
    assert enc.input_ids[0] == llama.convert_tokens_to_ids("<|begin_of_text|>")

    strict = AutoTokenizer.from_pretrained(base_dir)
    strict.chat_template = ALTERNATING_ONLY
    with pytest.raises(ChatTemplateError, match="system_prompt"):
        ChatEncoder(strict).encode(convo)


# ------------------------------------------------------------------------------------ windows

def test_windows_cover_every_assistant_turn_exactly_once(encoder, sample):
    max_length = 160
    examples = sample.examples["train"]
    items, report = encode_examples(examples, encoder, max_length)
    assert report.windowed_examples > 10 and report.sequences > len(examples)
    assert all(len(e) <= max_length for e in items)
    dropped = {(d.source, i) for d in report.dropped for i in d.messages}
    for source, example in enumerate(examples):
        msgs = example["messages"]
        assistants = {i for i, m in enumerate(msgs) if m["role"] == "assistant" and m.get("weight", 1) != 0}
        trained = [t for e in items if e.source == source for t in e.trained_turns]
        assert len(trained) == len(set(trained)), f"example {source}: a turn trained twice"
        lost = {i for i in assistants if (source, i) in dropped}
        assert set(trained) | lost == assistants and not set(trained) & lost, f"example {source}"
    assert report.trained_turns + report.dropped_turns == report.assistant_turns


def test_every_window_ends_on_a_trained_assistant_turn(encoder, sample):
    msgs = sample.examples["train"][0]["messages"]
    windows, dropped = window_example(msgs, encoder, 320)
    assert len(windows) > 1 and not dropped
    for w in windows:
        assert w[0]["role"] == "system" and w[-1]["role"] == "assistant" and w[-1].get("weight", 1) != 0
        assert len(encoder.encode(w)) <= 320


def test_an_exchange_that_cannot_fit_is_dropped_and_reported(encoder):
    long_reply = "とても長いお返事です。" * 80
    msgs = [{"role": "system", "content": "短い指示。"},
            {"role": "user", "content": "こんにちは。"}, {"role": "assistant", "content": "こんにちは。"},
            {"role": "user", "content": "質問です。"}, {"role": "assistant", "content": long_reply},
            {"role": "user", "content": "ありがとう。"}, {"role": "assistant", "content": "どういたしまして。"}]
    items, report = encode_examples([{"messages": msgs}], encoder, max_length=64)
    assert len(report.dropped) == 1 and report.dropped[0].messages == [3, 4]
    assert report.dropped[0].tokens > 64
    assert sorted(t for e in items for t in e.trained_turns) == [2, 6]
    assert report.dropped_turns == 1 and "DROPPED 1 exchange" in report.summary()


# ------------------------------------------------------------------------------------ batches

def test_length_grouping_wastes_less_than_fixed_padding(encoder, sample):
    from kokoro_helpers.local.train_callbacks import EpochLengthGroupedSampler

    items, _ = encode_examples(sample.examples["train"], encoder, 512)
    lengths = [len(e) for e in items]

    def batches(epoch: int) -> list[list[int]]:
        sampler = EpochLengthGroupedSampler(lengths, 4, seed=1)
        sampler.set_epoch(epoch)
        order = list(sampler)
        return [order[k:k + 4] for k in range(0, len(order), 4)]

    def padding(groups) -> float:
        real = sum(lengths[i] for b in groups for i in b)
        return 1 - real / sum(max(lengths[i] for i in b) * len(b) for b in groups)

    grouped = batches(0)
    assert sorted(i for b in grouped for i in b) == list(range(len(lengths)))
    assert max(lengths[i] for i in grouped[0]) == max(lengths)           # longest batch first
    assert grouped != batches(1) and grouped == batches(0)              # reshuffled per epoch, deterministically
    fixed = 1 - sum(lengths) / (512 * len(lengths))                     # pad-to-max
    assert padding(grouped) < 0.15 and padding(grouped) < fixed / 2


def test_resource_monitor_shows_and_warns_once(tmp_path):
    from kokoro_helpers.resources import ResourceMonitor

    mon = ResourceMonitor(tmp_path / "not-yet-created", interval=0.0, warn_at=0.0)
    post = mon.postfix()
    assert {"cpu", "ram", "disk"} <= set(post) and all(v.endswith("!") for v in post.values())
    lines = mon.check()
    assert {line.split()[1] for line in lines} >= {"ram", "disk"} and all(l.startswith("WARNING") for l in lines)
    assert mon.check() == []                                   # once, not at every step
    assert ResourceMonitor(tmp_path, warn_at=101.0).check() == []
    quiet_cpu = ResourceMonitor(tmp_path, warn_at=0.0, warn_cpu=False)
    assert "cpu" in quiet_cpu.postfix() and not any(" cpu " in line for line in quiet_cpu.check())
