"""The embedded tiny base model: deterministic build, its tokenizer and chat template, the cache.

Builds use a small recipe (seconds) in a temporary cache ($KOKORO_CACHE); the default recipe is
exercised by the notebook and the benchmark.
"""
from __future__ import annotations

import json

import pytest

from kokoro_helpers.local import tiny_model as tm

SMALL = tm.TinyRecipe(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                      warmup_steps=3, warmup_batch_size=2, warmup_seq_len=64)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KOKORO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_builds_identically_twice(tmp_path):
    from safetensors.torch import load_file

    a = tm.build_tiny_model(SMALL, root=tmp_path / "a", progress=False)
    b = tm.build_tiny_model(SMALL, root=tmp_path / "b", progress=False)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and len(wa) > 5
    for key in wa:
        assert wa[key].equal(wb[key]), key
    for name in ("tokenizer.json", "config.json", "chat_template.jinja"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    info = json.loads((a / "recipe.json").read_text())
    assert info["fingerprint"] == SMALL.fingerprint()
    assert a.name == b.name == f"tiny-base-{SMALL.fingerprint()[:12]}"


def test_cached_build_is_reused_and_labelled_a_smoke_model(cache):
    first = tm.build_tiny_model(SMALL, progress=False)
    assert first.parent == cache
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert tm.build_tiny_model(SMALL, progress=False) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    readme = (first / "README.md").read_text(encoding="utf-8")
    assert "smoke model" in readme.lower() and "mean nothing" in readme
    assert not list(cache.glob("*.tmp-*")), "no half-built folder is left behind"


def test_tokenizer_chat_template_and_special_tokens(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tm.build_tiny_model(SMALL, root=tmp_path, progress=False)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.eos_token == tm.IM_END and tok.pad_token == tm.PAD
    assert [tok.convert_tokens_to_ids(t) for t in tm.SPECIAL_TOKENS] == [0, 1, 2, 3]
    messages = [{"role": "system", "content": "カウンセラーです。"}, {"role": "user", "content": "眠れません。"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nカウンセラーです。<|im_end|>\n<|im_start|>user\n眠れません。<|im_end|>\n<|im_start|>assistant\n"
    assert not tok.apply_chat_template(messages, tokenize=False).endswith("assistant\n")
    with pytest.raises(Exception, match="unknown role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    # byte-level BPE: any text, including characters never seen in training, round-trips
    odd = "未知の字😀 ＡＢＣ 123"
    assert tok.decode(tok(odd, add_special_tokens=False)["input_ids"]) == odd
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id


def test_default_recipe_is_about_one_million_parameters():
    r = tm.DEFAULT_RECIPE
    emb = r.vocab_size * r.hidden_size
    kv = r.hidden_size // r.num_attention_heads * r.num_key_value_heads
    layer = 2 * r.hidden_size * r.hidden_size + 2 * r.hidden_size * kv + 3 * r.hidden_size * r.intermediate_size
    total = emb + r.num_hidden_layers * layer
    assert 0.8e6 < total < 2e6


def test_resolve_base_model(cache, tmp_path):
    folder = tm.model_dir(tm.DEFAULT_RECIPE)
    folder.mkdir(parents=True)
    (folder / "recipe.json").write_text("{}")          # a complete build is found, not rebuilt
    assert tm.resolve_base_model(tm.EMBEDDED_TINY, progress=False) == str(folder)
    with pytest.raises(ValueError, match="embedded:tiny"):
        tm.resolve_base_model("embedded:huge")
    assert tm.resolve_base_model(str(tmp_path)) == str(tmp_path)
    assert tm.resolve_base_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
