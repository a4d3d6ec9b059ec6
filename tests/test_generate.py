"""Local inference (kokoro_helpers.local): loading, errors, batched vs per-prompt greedy,
streaming, adapter switching, merge export, the OOM fallback.

Adapters are made with peft directly on the embedded tiny model (random LoRA weights, so an
adapter visibly changes the outputs), in temporary folders. The tiny base itself comes from the
project's cache (building it takes a minute on 2 cores; it is built once and reused).
"""
from __future__ import annotations

import json
import shutil
import threading
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from kokoro_helpers import cards  # noqa: E402
from kokoro_helpers.local import demo, export, loading, prompts, sources  # noqa: E402
from kokoro_helpers.local import generate as gen  # noqa: E402
from kokoro_helpers.local import model as local_model  # noqa: E402
from kokoro_helpers.local.tiny_model import EMBEDDED_TINY, build_tiny_model, load_tiny_model  # noqa: E402

SYSTEM = "あなたは心理カウンセラーです。"


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: a 1 M-parameter model gains nothing from two, and loses a lot when the
    other core is busy (the threads wait for each other at every tiny operation)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_path() -> Path:
    return build_tiny_model(progress=False)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {"a": export.init_adapter(root / "lora-a", seed=1), "b": export.init_adapter(root / "lora-b", seed=2)}


@pytest.fixture(scope="module")
def lm(adapters) -> local_model.LocalModel:
    model = loading.load(adapters["a"], device="cpu")
    model.add_adapter(adapters["b"], name="b")
    return model


@pytest.fixture(scope="module")
def contexts(tmp_path_factory) -> list[list[dict[str, str]]]:
    """Counselor-turn contexts of the embedded sample's held-out dialogues (01_data into a temp run)."""
    from kokoro_helpers.data.pipeline import prepare_data
    from kokoro_helpers.data.tokens import estimate_counter

    run = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KOKORO_TIKTOKEN_OFFLINE", "1")
        prepare_data("embedded", run_dir=run, token_counter=estimate_counter(), progress=False)
    return demo.sample_contexts(run, n=12, seed=3)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


def next_logits(model, sequences: list[list[int]], pad_id: int):
    """Logits of the next token after each sequence, left-padded in one batch (positions from the mask)."""
    ids, mask = gen._left_pad(sequences, pad_id, "cpu")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1, :].float()


def model_logits(model, ids: list[int]):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


# --------------------------------------------------------------------------- batched == per prompt

def test_batched_greedy_matches_per_prompt(lm, contexts):
    settings = dict(max_new_tokens=24, min_new_tokens=24, temperature=0.0)
    batched = lm.batch_generate(contexts, batch_size=4, return_details=True, **settings)
    single = [lm.generate(c, return_details=True, **settings) for c in contexts]
    lengths = {len(prompts.encode_prompt(lm.tokenizer, c)) for c in contexts}
    assert len(lengths) > 4, "the prompts should differ in length so that padding is exercised"
    pad = lm.tokenizer.pad_token_id
    for k, (b, s) in enumerate(zip(batched, single)):
        assert b.prompt_tokens == s.prompt_tokens
        if b.token_ids == s.token_ids:
            assert b.text == s.text
            continue
        # a floating-point near-tie flipped a token: up to it the outputs agree and the two
        # computations' logits at the flip are the same within a tight tolerance
        first = next(i for i, (x, y) in enumerate(zip(b.token_ids, s.token_ids)) if x != y)
        prompt = prompts.encode_prompt(lm.tokenizer, contexts[k])
        prefix = prompt + s.token_ids[:first]
        with lm.using(None):
            alone = next_logits(lm.model, [prefix], pad)[0]
            padded = next_logits(lm.model, [prefix, prompt[:5]], pad)[0]
        assert torch.allclose(alone, padded, atol=1e-4, rtol=1e-4), f"prompt {k}: logits differ at token {first}"
        top2 = torch.topk(alone, 2).values
        assert float(top2[0] - top2[1]) < 1e-3, f"prompt {k}: token {first} flipped without a near-tie"


def test_batches_are_sorted_by_length_and_results_in_input_order(lm, contexts):
    seen: list[list[int]] = []
    out = lm.batch_generate(contexts, batch_size=5, max_new_tokens=4, min_new_tokens=4,
                            on_batch=lambda rows, gens: seen.append(rows))
    lengths = [len(prompts.encode_prompt(lm.tokenizer, c)) for c in contexts]
    order = [i for rows in seen for i in rows]
    assert sorted(order) == list(range(len(contexts)))
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
    assert [len(rows) for rows in seen] == [5, 5, 2]
    assert out == [lm.generate(c, max_new_tokens=4, min_new_tokens=4) for c in contexts]


def test_generation_stops_at_end_of_turn(lm):
    eos = lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert eos in prompts.end_of_turn_ids(lm.model, lm.tokenizer)
    head = lm.model.get_output_embeddings()

    def favour_eos(module, inputs, output):
        output[..., eos] += 1e4
        return output

    handle = head.register_forward_hook(favour_eos)
    try:
        out = lm.generate(user("こんにちは"), max_new_tokens=20, return_details=True)
        assert (out.text, out.token_ids, out.finish_reason, out.completion_tokens) == ("", [], "stop", 1)
        out = lm.generate(user("こんにちは"), max_new_tokens=20, min_new_tokens=5, return_details=True)
        assert out.finish_reason == "stop" and len(out.token_ids) == 5
        d: dict = {}
        assert list(lm.stream(user("こんにちは"), max_new_tokens=20, details=d)) == []
        assert d["finish_reason"] == "stop"
    finally:
        handle.remove()
    out = lm.generate(user("こんにちは"), max_new_tokens=6, min_new_tokens=6, return_details=True)
    assert out.finish_reason == "length" and out.completion_tokens == 6


def test_sampling_is_reproducible_with_a_seed_and_leaves_the_global_rng_alone(lm):
    msgs = user("最近眠れません。")
    state = torch.get_rng_state()
    one = lm.generate(msgs, max_new_tokens=16, temperature=0.9, top_p=0.9, seed=7)
    two = lm.generate(msgs, max_new_tokens=16, temperature=0.9, top_p=0.9, seed=7)
    assert one == two
    assert torch.equal(state, torch.get_rng_state())
    with pytest.raises(ValueError, match="temperature"):
        lm.generate(msgs, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        lm.generate(msgs, temperature=0.5, top_p=0)
    with pytest.raises(ValueError, match="role"):
        lm.generate([{"role": "tool", "content": "x"}])


def test_stream_joins_to_the_reply_and_stops_when_closed(lm):
    msgs = user("仕事のことで悩んでいます。")
    details: dict = {}
    pieces = list(lm.stream(msgs, max_new_tokens=20, details=details))
    full = lm.generate(msgs, max_new_tokens=20, return_details=True)
    assert "".join(pieces) == full.text
    assert details["completion_tokens"] == full.completion_tokens
    assert details["finish_reason"] == full.finish_reason
    it = lm.stream(msgs, max_new_tokens=200, min_new_tokens=200)
    next(it)
    it.close()                                     # generation thread stopped, lock released
    acquired = []

    def other_thread():
        ok = lm.lock.acquire(timeout=5)
        acquired.append(ok)
        if ok:
            lm.lock.release()

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert acquired == [True]
    assert not any(th.name == "kokoro-stream" for th in threading.enumerate())


def test_long_conversations_lose_their_oldest_turns_with_a_warning(lm):
    msgs = [{"role": "system", "content": SYSTEM}]
    for i in range(6):
        msgs += [{"role": "user", "content": f"相談{i}です。" * 5}, {"role": "assistant", "content": "はい。" * 5}]
    msgs.append({"role": "user", "content": "最後の質問です。"})
    full = len(prompts.encode_prompt(lm.tokenizer, msgs))
    ids, dropped = prompts.fit_prompt(lm.tokenizer, msgs, full - 10)
    assert dropped == 2 and len(ids) <= full - 10
    kept = lm.tokenizer.decode(ids)
    assert SYSTEM in kept and "最後の質問です。" in kept and "相談0です" not in kept
    config = lm.model.config if not hasattr(lm.model, "base_model") else lm.model.base_model.model.config
    limit = config.max_position_embeddings
    config.max_position_embeddings = full + 4
    try:
        with pytest.warns(UserWarning, match="oldest turns were dropped"):
            out = lm.generate(msgs, max_new_tokens=8, return_details=True)
        assert out.dropped_messages >= 2
    finally:
        config.max_position_embeddings = limit


def test_cuda_oom_halves_the_batch_and_retries(lm, contexts, monkeypatch):
    real = gen._run_batch
    sizes: list[int] = []

    def flaky(model, prep, rows):
        sizes.append(len(rows))
        if len(rows) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, prep, rows)

    expected = lm.batch_generate(contexts[:6], batch_size=8, max_new_tokens=4)
    monkeypatch.setattr(gen, "_run_batch", flaky)
    with pytest.warns(UserWarning, match="retrying with batch size"):
        out = lm.batch_generate(contexts[:6], batch_size=8, max_new_tokens=4)
    assert out == expected
    assert sizes[:3] == [6, 4, 2] and set(sizes[3:]) == {2}

    def always(model, prep, rows):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(gen, "_run_batch", always)
    with pytest.raises(gen.GenerationOOMError, match="lower max_new_tokens"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm.batch_generate(contexts[:2], batch_size=2, max_new_tokens=4)


# --------------------------------------------------------------------------- adapters, merge

def test_adapters_switch_by_name_and_base_is_the_plain_model(lm, adapters, tiny_path):
    ids = prompts.encode_prompt(lm.tokenizer, user("こんにちは"))
    assert lm.names == ["lora-a", "b", "base"] and lm.active == "lora-a"
    with lm.using("lora-a"):
        a = model_logits(lm.model, ids)
    with lm.using("b"):
        b = model_logits(lm.model, ids)
    with lm.using("base"):
        base = model_logits(lm.model, ids)
    assert lm.active == "lora-a"                       # `using` restores the active adapter
    plain, _ = load_tiny_model()
    alone_b = loading.load(adapters["b"], device="cpu")
    assert torch.allclose(base, model_logits(plain, ids), atol=1e-5)
    assert torch.allclose(b, model_logits(alone_b.model, ids), atol=1e-5)
    assert not torch.allclose(a, b, atol=1e-3) and not torch.allclose(a, base, atol=1e-3)
    lm.set_adapter("b")
    try:
        assert lm.generate(user("x"), max_new_tokens=5) == lm.generate(user("x"), adapter="b", max_new_tokens=5)
    finally:
        lm.set_adapter("lora-a")
    with pytest.raises(KeyError, match="no adapter named 'zzz'"):
        lm.set_adapter("zzz")
    with pytest.raises(ValueError, match="reserved"):
        lm.add_adapter(adapters["b"], name="base")


def test_merge_export_gives_the_same_logits(lm, tmp_path):
    out = lm.export_merged(tmp_path / "merged", adapter="b")
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    assert not (out / "adapter_config.json").exists()
    merged = loading.load(out, device="cpu")
    assert not merged.adapters and merged.tokenizer.chat_template
    ids = prompts.encode_prompt(lm.tokenizer, user("眠れない夜が続いています。"))
    with lm.using("b"):
        expected = model_logits(lm.model, ids)
    assert torch.allclose(model_logits(merged.model, ids), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        lm.export_merged(out, adapter="b")


# --------------------------------------------------------------------------- cards and sources

def _write_card(run_dir: Path, name: str, adapter: Path) -> Path:
    folder = cards.models_dir(run_dir) / name
    shutil.copytree(adapter, folder)
    card = cards.new_card(kind="local_lora", model_id=name, base_model=EMBEDDED_TINY,
                          training_params={"lora_r": 8}, adapter_path=str(folder), end_of_turn_token="<|im_end|>",
                          smoke_model=True)
    return cards.save_card(cards.card_path(run_dir, name), card)


def test_load_by_card_name_card_file_and_base_only(tmp_path, adapters, tiny_path):
    card_file = _write_card(tmp_path, "lora-card", adapters["a"])
    by_name = loading.load("lora-card", tmp_path, device="cpu")
    info = by_name.describe()
    assert by_name.active == "lora-card" and info["base_model"] == EMBEDDED_TINY
    assert info["tokenizer"].endswith("lora-card") and info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["smoke_model"] is True and not by_name.model.training
    base = loading.load(card_file, base_only=True)
    plain, _ = load_tiny_model()
    ids = prompts.encode_prompt(base.tokenizer, user("こんにちは"))
    assert not hasattr(base.model, "peft_config")
    assert torch.allclose(model_logits(base.model, ids), model_logits(plain, ids), atol=1e-5)
    adapted = loading.load(cards.load_card(card_file))                   # a card dict
    assert hasattr(adapted.model, "peft_config")
    # the model interface's baseline shares the adapter's weights with the adapter off: the base's logits
    from kokoro_helpers.models.open import open_model
    with open_model(card_file, tmp_path, base_only=True).weights() as (model, _):
        assert torch.allclose(model_logits(model, ids), model_logits(plain, ids), atol=1e-5)
    reply = open_model(cards.load_card(card_file), tmp_path, max_new_tokens=5).reply(user("こんにちは"))
    assert reply == adapted.generate(user("こんにちは"), max_new_tokens=5, temperature=0.0)
    assert loading.get_model(card_file) is loading.get_model(card_file)
    loading.clear_cache()


def test_loading_errors_say_what_to_do(tmp_path, adapters, tiny_path):
    with pytest.raises(sources.ModelNotFoundError, match="does not exist"):
        loading.load(tmp_path / "missing-folder")
    with pytest.raises(sources.ModelNotFoundError, match="no local LoRA card"):
        loading.load("no-such-card", tmp_path)
    card_file = _write_card(tmp_path, "gone", adapters["a"])
    shutil.rmtree(cards.models_dir(tmp_path) / "gone")
    with pytest.raises(sources.ModelNotFoundError, match="re-run 02_finetune"):
        loading.load(card_file)
    openai_card = cards.new_card(kind="openai", model_id="ft:gpt-4o-mini:x", base_model="gpt-4o-mini",
                                 training_params={})
    with pytest.raises(ValueError, match="open_model"):
        loading.load(openai_card)

    # a mismatched base: asked for by name, or recorded by the adapter but of another shape
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-base"
    config = LlamaConfig(vocab_size=3072, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_path).save_pretrained(other)
    with pytest.raises(sources.BaseModelMismatchError, match="trained on"):
        loading.load(adapters["a"], base_model=str(other))
    moved = shutil.copytree(adapters["a"], tmp_path / "moved")
    config_file = moved / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()),
                                       "base_model_name_or_path": str(other)}))
    with pytest.raises(sources.BaseModelMismatchError, match="size mismatch"):
        loading.load(moved)

    # corrupt adapter files
    broken = shutil.copytree(adapters["a"], tmp_path / "broken")
    weights = (broken / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(sources.CorruptAdapterError, match="corrupt or truncated"):
        loading.load(broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(sources.CorruptAdapterError):
        loading.load(broken)
    (broken / "adapter_model.safetensors").write_bytes(weights)
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(sources.CorruptAdapterError, match="adapter_config.json is corrupt"):
        loading.load(broken)
    (broken / "adapter_config.json").unlink()
    with pytest.raises(sources.ModelNotFoundError, match="neither an adapter folder"):
        loading.load(broken)


def test_pick_model_falls_back_to_a_labelled_untrained_adapter(tmp_path, adapters):
    notes: list[str] = []
    source, label = demo.pick_model("lora-tiny", tmp_path, log=notes.append)
    assert "UNTRAINED" in label and "02_finetune" in " ".join(notes)
    assert (Path(source) / "adapter_config.json").is_file()
    assert "never trained" in (Path(source) / "README.md").read_text(encoding="utf-8")
    _write_card(tmp_path, "lora-real", adapters["a"])
    source, label = demo.pick_model("lora-tiny", tmp_path, log=notes.append)
    assert "lora-real" in label and Path(source).name == "lora-real.json"
    with pytest.raises(sources.ModelNotFoundError):
        demo.pick_model(None, tmp_path / "empty", fallback=False, log=notes.append)
