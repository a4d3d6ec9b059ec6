"""03_eval's engine: eval items, cached/concurrent/retried generation, character-level metrics,
reference perplexity, and the LLM judge's both-orders rule.

Everything is offline: data comes from the project's embedded sample (prepare_data) or tiny
invented snippets, models are fakes, the OpenAI SDK talks to an httpx2 MockTransport, and the
perplexity model is a tiny randomly initialised Llama with a tokenizer built here.
"""
from __future__ import annotations

import json
import math
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from kokoro_helpers.evaluation import evaluate as ev
from kokoro_helpers.evaluation import judge as jd
from kokoro_helpers.evaluation import metrics as mt
from kokoro_helpers.cards import new_card, save_card
from kokoro_helpers.data.pipeline import prepare_data
from kokoro_helpers.data.tokens import estimate_counter
from kokoro_helpers.models.base import ChatModel
from kokoro_helpers.models.endpoint import EndpointChatModel
from kokoro_helpers.models.local import LocalChatModel
from kokoro_helpers.models.open import models_from_run


# ------------------------------------------------------------------------------------------------
# fixtures and fakes
# ------------------------------------------------------------------------------------------------

SYSTEM_PROMPT = "あなたは相談者の話に丁寧に耳を傾ける心理カウンセラーです。"   # as params/default.yaml sets one


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory) -> Path:
    """run_dir/data from the embedded sample (built once for the module)."""
    run_dir = tmp_path_factory.mktemp("eval-sample")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KOKORO_TIKTOKEN_OFFLINE", "1")
        prepare_data(run_dir=str(run_dir), system_prompt=SYSTEM_PROMPT, token_counter=estimate_counter(),
                     progress=False)
    return run_dir


@pytest.fixture
def run_dir(sample_run, tmp_path) -> Path:
    """A fresh run_dir of its own (eval/ empty) with the sample's data/."""
    shutil.copytree(sample_run / "data", tmp_path / "data")
    return tmp_path


@pytest.fixture
def items(sample_run):
    return ev.build_eval_items(sample_run, max_eval_items=4, seed=42, log=None)


class CountingResponder(ChatModel):
    """A fake model: replies '<name>:<item_id>' (its batches are keyed by item id) and counts what it was asked."""

    def __init__(self, name="fake", temperature=0.0, fail_after=None, exc=KeyboardInterrupt):
        self.name = name
        self.temperature = temperature
        self.calls = 0
        self.asked: list[str] = []
        self.fail_after = fail_after
        self.exc = exc

    @property
    def settings(self):
        return {"kind": "fake", "temperature": self.temperature}

    def batch(self, conversations, on_result=None, keys=None, **overrides):
        self.calls += 1
        out = []
        for i, key in enumerate(keys):
            if self.fail_after is not None and i >= self.fail_after:
                raise self.exc("stopped")
            self.asked.append(key)
            text = f"{self.name}:{key}"
            out.append(text)
            if on_result:
                on_result(i, text, {"latency_s": 0.0})
        return out


def completion(text, prompt_tokens=7, completion_tokens=3, model="m"):
    """An OpenAI-shaped chat.completion body."""
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


class FakeChatClient:
    """Duck-typed client: `chat.completions.create(**kw)` -> reply(kw) wrapped like the SDK's object."""

    def __init__(self, reply, delay=0.0):
        self.reply = reply
        self.delay = delay
        self.requests: list[dict] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))

    def create(self, **kwargs):
        with self._lock:
            self.requests.append(kwargs)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                time.sleep(self.delay)
            out = self.reply(kwargs)
            if isinstance(out, BaseException):
                raise out
            msg = SimpleNamespace(content=out)
            return SimpleNamespace(choices=[SimpleNamespace(message=msg, finish_reason="stop")], usage=None,
                                   model=kwargs["model"])
        finally:
            with self._lock:
                self.active -= 1


# ------------------------------------------------------------------------------------------------
# §3 metrics against hand-checked cases
# ------------------------------------------------------------------------------------------------

def test_lcs_and_rouge_l_by_hand():
    # CLRS's example: LCS("ABCBDAB", "BDCABA") = 4 ("BCBA")
    assert mt.lcs_length("ABCBDAB", "BDCABA") == 4
    # hyp 今日は雨 (4 chars), ref 今日は晴れ (5 chars): LCS = 今日は = 3
    # P = 3/4, R = 3/5, F = 2PR/(P+R) = 0.9/1.35 = 2/3
    r = mt.rouge_l("今日は雨", "今日は晴れ")
    assert r["precision"] == pytest.approx(3 / 4)
    assert r["recall"] == pytest.approx(3 / 5)
    assert r["f"] == pytest.approx(2 / 3)
    # whitespace and line breaks are not characters here
    assert mt.rouge_l("今日は 雨\n", "今日は雨")["f"] == pytest.approx(1.0)
    assert mt.rouge_l("あいう", "かきく")["f"] == 0.0
    assert mt.rouge_l("", "かきく")["f"] == 0.0


def test_rouge_l_agrees_with_rouge_score_when_installed():
    rs = pytest.importorskip("rouge_score.rouge_scorer", reason="rouge-score not installed (optional cross-check)")

    class CharTokenizer:
        def tokenize(self, text):
            return [c for c in text if not c.isspace()]

    scorer = rs.RougeScorer(["rougeL"], tokenizer=CharTokenizer())
    for hyp, ref in [("今日は雨", "今日は晴れ"), ("ありがとうございます", "ございますありがとう")]:
        assert mt.rouge_l(hyp, ref)["f"] == pytest.approx(scorer.score(ref, hyp)["rougeL"].fmeasure)


def test_distinct_n_by_hand():
    texts = ["ああい", "あい"]
    # unigrams: あ あ い | あ い -> 5 in all, 2 distinct -> 0.4
    assert mt.distinct_n(texts, 1) == pytest.approx(2 / 5)
    # bigrams: ああ あい | あい -> 3 in all (none across texts), 2 distinct -> 2/3
    assert mt.distinct_n(texts, 2) == pytest.approx(2 / 3)
    assert math.isnan(mt.distinct_n(["あ"], 2))          # no bigram at all: undefined, not 0


def test_chrf_and_bleu_identity_disjoint_and_by_hand():
    same = ["今日はいい天気ですね"]
    assert mt.chrf(same, same) == pytest.approx(100.0)
    assert mt.bleu_char(same, same) == pytest.approx(100.0)
    assert mt.chrf(["あいうえお"], ["かきくけこ"]) == pytest.approx(0.0)
    assert mt.bleu_char(["あいうえお"], ["かきくけこ"]) == pytest.approx(0.0)
    # chrF("ab" vs "abc"): 1-grams P=2/2 R=2/3, 2-grams P=1/1 R=1/2, no hyp 3..6-grams (not counted)
    # mean P = 1, mean R = 7/12, F(β=2) = 5PR/(4P+R) = (35/12)/(55/12) = 35/55
    assert mt.chrf(["ab"], ["abc"]) == pytest.approx(100 * 35 / 55, abs=1e-2)
    # BLEU(あいうえお vs あいうえおか): every 1..4-gram precision 1, brevity penalty exp(1 - 6/5)
    assert mt.bleu_char(["あいうえお"], ["あいうえおか"]) == pytest.approx(100 * math.exp(1 - 6 / 5), abs=1e-2)
    # the char tokenizer ignores spaces
    assert mt.bleu_char(["今日は いい天気"], ["今日はいい天気"]) == pytest.approx(100.0)


def _toy_items():
    ctx = [{"role": "user", "content": "こんにちは"}]
    return [{"item_id": "test:a", "split": "test", "context": ctx, "reference": "今日は晴れ"},
            {"item_id": "valid:b", "split": "valid", "context": ctx, "reference": "ああい"}]


def test_compute_metrics_table(tmp_path):
    items = _toy_items()
    gens = [{"item_id": "test:a", "model": "copy", "response": "今日は晴れ"},
            {"item_id": "valid:b", "model": "copy", "response": "ああい"},
            {"item_id": "test:a", "model": "other", "response": "今日は雨"},
            {"item_id": "valid:b", "model": "other", "response": ""},
            {"item_id": "unknown", "model": "other", "response": "ignored"}]
    ppl = {"copy": {"ref_nll": 1.0, "ref_ppl": math.e, "ref_tokens": 8}}
    df = mt.compute_metrics(gens, items, perplexity=ppl)
    assert list(df.index) == ["copy", "other"]
    copy, other = df.loc["copy"], df.loc["other"]
    assert copy["chrF"] == pytest.approx(100) and copy["BLEU_char"] == pytest.approx(100)
    assert copy["ROUGE_L_char"] == pytest.approx(1.0)
    assert other["ROUGE_L_char"] == pytest.approx((2 / 3 + 0) / 2)   # see test_lcs_and_rouge_l_by_hand
    assert copy["length_chars"] == pytest.approx((5 + 3) / 2)
    assert other["length_chars"] == pytest.approx((4 + 0) / 2) and other["empty_replies"] == 1
    assert other["ref_length_chars"] == pytest.approx(4.0)
    assert other["n_items"] == 2                                        # the unknown item is not counted
    assert copy["ref_ppl"] == pytest.approx(math.e) and math.isnan(other["ref_ppl"])
    # per split, the perplexity is the token-weighted mean of that split's items
    ppl["copy"]["per_item"] = {"test:a": {"nll": 1.0, "tokens": 5}, "valid:b": {"nll": 2.0, "tokens": 3}}
    by_split = mt.compute_metrics(gens, items, by="split", include_reference=True, perplexity=ppl)
    assert by_split.loc[("copy", "valid"), "distinct_1"] == pytest.approx(2 / 3)
    assert by_split.loc[("copy", "valid"), "ref_nll"] == pytest.approx(2.0)
    assert by_split.loc[("copy", "test"), "ref_ppl"] == pytest.approx(math.e)
    assert by_split.loc[("(reference)", "test"), "length_chars"] == 5
    path = mt.write_metrics(df, tmp_path)
    assert path == tmp_path / "eval" / "metrics.csv"
    import pandas as pd
    back = pd.read_csv(path, index_col="model")
    assert list(back.index) == ["copy", "other"] and "chrF" in back.columns


def test_plot_metrics_draws_one_panel_per_metric():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    items = _toy_items()
    gens = [{"item_id": "test:a", "model": "m1", "response": "今日は"}, {"item_id": "test:a", "model": "m2", "response": "雨"}]
    fig = mt.plot_metrics(mt.compute_metrics(gens, items), metrics=["chrF", "length_chars"])
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == ["chrF", "length_chars"]
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# §1 items
# ------------------------------------------------------------------------------------------------

def _examples(run_dir, split):
    return [json.loads(line)["messages"] for line in (run_dir / "data" / f"{split}.jsonl").read_text("utf-8").splitlines()]


def test_items_context_ends_right_before_the_reference(sample_run):
    items = ev.build_eval_items(sample_run, max_eval_items=None, log=None)
    assert {it["split"] for it in items} == {"test", "valid"}
    examples = {s: _examples(sample_run, s) for s in ("test", "valid")}
    for it in items:
        msgs = examples[it["split"]][it["example_index"]]
        j = it["turn_index"]
        assert msgs[j]["role"] == "assistant" and msgs[j]["content"] == it["reference"]
        assert it["context"] == [{"role": m["role"], "content": m["content"]} for m in msgs[:j]]
        assert it["context"][0] == {"role": "system", "content": SYSTEM_PROMPT}   # part of the context
        assert it["context"][-1]["role"] == "user"
        assert it["item_id"] == ev.make_item_id(it["split"], it["context"], it["reference"])
    # every counselor turn after a client turn is an item, once
    expected = sum(1 for s in examples for msgs in examples[s] for j, m in enumerate(msgs)
                   if m["role"] == "assistant" and any(x["role"] == "user" for x in msgs[:j]))
    assert len(items) == expected == len({it["item_id"] for it in items})


def test_items_deterministic_stable_and_nested(sample_run):
    a = ev.build_eval_items(sample_run, max_eval_items=5, seed=42, log=None)
    b = ev.build_eval_items(sample_run, max_eval_items=5, seed=42, log=None)
    assert a == b
    assert sum(it["split"] == "test" for it in a) == 5 and sum(it["split"] == "valid" for it in a) == 5
    bigger = ev.build_eval_items(sample_run, max_eval_items=12, seed=42, log=None)
    assert {it["item_id"] for it in a} <= {it["item_id"] for it in bigger}   # ids don't depend on the cap
    other_seed = ev.build_eval_items(sample_run, max_eval_items=5, seed=7, log=None)
    assert {it["item_id"] for it in other_seed} != {it["item_id"] for it in a}
    only_test = ev.build_eval_items(sample_run, splits=("test",), max_eval_items=5, seed=42, log=None)
    assert only_test == [it for it in a if it["split"] == "test"]


def test_items_skip_weight_zero_and_opening_turns(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    sys_msg = {"role": "system", "content": "あなたはカウンセラーです。"}
    window = [sys_msg,
              {"role": "assistant", "content": "こんにちは。"},                          # opening: no user before
              {"role": "user", "content": "前の窓の相談"},
              {"role": "assistant", "content": "前の窓の返答", "weight": 0},             # context copied from a window
              {"role": "user", "content": "続きです"},
              {"role": "assistant", "content": "本当の返答です"}]
    (data / "test.jsonl").write_text(json.dumps({"messages": window}, ensure_ascii=False) + "\n", "utf-8")
    log = []
    items = ev.build_eval_items(tmp_path, splits=("test",), max_eval_items=None, log=log.append)
    assert [it["reference"] for it in items] == ["本当の返答です"]
    ctx = items[0]["context"]
    assert ctx[-1] == {"role": "user", "content": "続きです"}
    assert {"role": "assistant", "content": "前の窓の返答"} in ctx                 # kept as context, weight dropped
    assert all("weight" not in m for m in ctx)
    assert "weight_0_context_turn 1" in log[0] and "no_user_turn_before 1" in log[0]
    with_opening = ev.build_eval_items(tmp_path, splits=("test",), max_eval_items=None, min_user_turns=0, log=None)
    assert [it["reference"] for it in with_opening] == ["こんにちは。", "本当の返答です"]
    with pytest.raises(ev.EvalError, match="01_data"):
        ev.build_eval_items(tmp_path, splits=("valid",), log=None)


def test_items_round_trip(run_dir, items):
    ev.save_items(items, run_dir)
    assert ev.load_items(run_dir) == items
    table = ev.describe_items(items)
    assert list(table["items"]) == [4, 4]


# ------------------------------------------------------------------------------------------------
# §2 the cache
# ------------------------------------------------------------------------------------------------

def test_second_run_is_all_cache_hits(run_dir, items):
    r = CountingResponder()
    first = ev.generate_all(items, [r], run_dir, log=None)
    assert r.calls == 1 and len(r.asked) == len(items) and not first["cached"].any()
    again = CountingResponder()
    second = ev.generate_all(items, [again], run_dir, log=None)
    assert again.calls == 0                                           # nothing generated
    assert second["cached"].all()
    assert list(second["response"]) == [f"fake:{it['item_id']}" for it in items]
    lines = (run_dir / "eval" / "generations.jsonl").read_text("utf-8").splitlines()
    row = json.loads(lines[0])
    assert len(lines) == len(items)
    assert {"item_id", "model", "response", "split", "settings", "settings_sha"} <= set(row)


def test_changed_settings_regenerate(run_dir, items):
    ev.generate_all(items, [CountingResponder(temperature=0.0)], run_dir, log=None)
    warmer = CountingResponder(temperature=0.7)
    ev.generate_all(items, [warmer], run_dir, log=None)
    assert len(warmer.asked) == len(items)
    back = CountingResponder(temperature=0.0)                           # the old settings are still cached
    ev.generate_all(items, [back], run_dir, log=None)
    assert back.calls == 0


def test_interrupted_run_resumes(run_dir, items):
    with pytest.raises(KeyboardInterrupt):
        ev.generate_all(items, [CountingResponder(fail_after=3)], run_dir, log=None)
    cache = run_dir / "eval" / "cache" / "fake.jsonl"
    assert len(cache.read_text("utf-8").splitlines()) == 3                # what it got is on disk
    with open(cache, "a", encoding="utf-8") as f:
        f.write('{"model": "fake", "item_id": "tor')                      # a kill in the middle of a write
    resumed = CountingResponder()
    log = []
    gens = ev.generate_all(items, [resumed], run_dir, log=log.append)
    assert resumed.asked == [it["item_id"] for it in items[3:]]           # only the missing ones
    assert len(gens) == len(items)
    assert any("unreadable line" in line for line in log)
    assert ev.generation_cache(run_dir, "fake").load().__len__() == len(items)


def test_failing_model_does_not_stop_the_others(run_dir, items):
    broken = CountingResponder(name="broken", fail_after=2, exc=RuntimeError)
    fine = CountingResponder(name="fine")
    with pytest.raises(ev.GenerationError, match="broken") as info:
        ev.generate_all(items, [broken, fine], run_dir, log=None)
    assert set(info.value.failures) == {"broken"}
    assert len(fine.asked) == len(items)
    gens = ev.load_generations(run_dir)
    assert (gens["model"] == "fine").sum() == len(items) and (gens["model"] == "broken").sum() == 2
    frame = ev.generate_all(items, [CountingResponder(name="broken", fail_after=0, exc=RuntimeError)],
                            run_dir, strict=False, log=None)
    assert "broken" in frame.attrs["failures"]


def test_a_model_that_never_calls_on_result_is_cached_too(run_dir, items):
    class Plain(ChatModel):
        name = "plain"
        settings = {"v": 1}

        def batch(self, conversations, on_result=None, keys=None, **overrides):
            return ["はい"] * len(conversations)

    gens = ev.generate_all(items, [Plain()], run_dir, log=None)
    assert (gens["response"] == "はい").all()
    assert len(ev.generation_cache(run_dir, "plain").load()) == len(items)


def test_scoring_items_join(run_dir, items):
    gens = ev.generate_all(items, [CountingResponder()], run_dir, log=None)
    rows = ev.scoring_items(gens, items)
    assert len(rows) == len(items)
    assert set(rows[0]) >= {"item_id", "model", "context", "reference", "response"}


# ------------------------------------------------------------------------------------------------
# §2 concurrency, retries, the OpenAI responder over a fake transport
# ------------------------------------------------------------------------------------------------

def test_concurrency_bound_respected(run_dir, items):
    client = FakeChatClient(lambda kw: "はい", delay=0.03)
    r = EndpointChatModel(client, "m", concurrency=3, progress=False, log=None)
    replies = r.batch([it["context"] for it in items * 2])
    assert replies == ["はい"] * (2 * len(items))
    assert client.max_active == 3                                        # never more, and really concurrent


def test_transient_errors_are_retried_by_the_sdk_and_others_are_not(run_dir, items):
    import httpx2
    calls = []

    def flaky(request):
        calls.append(1)
        if len(calls) == 1:        # rate limited, told to wait 1 ms (the SDK honours retry-after-ms)
            return httpx2.Response(429, headers={"retry-after-ms": "1"}, json={"error": {"message": "slow down"}})
        if len(calls) == 2:
            return httpx2.Response(503, headers={"retry-after-ms": "1"}, json={"error": {"message": "busy"}})
        return httpx2.Response(200, json=completion("ok"))

    r = EndpointChatModel(_mock_openai(flaky), "m", concurrency=1, sdk_max_retries=3, progress=False, log=None)
    assert r.reply([{"role": "user", "content": "x"}]) == "ok" and len(calls) == 3
    bad_calls = []

    def bad_request(request):
        bad_calls.append(1)
        return httpx2.Response(400, json={"error": {"message": "bad request", "type": "invalid_request_error"}})

    import openai
    with pytest.raises(openai.BadRequestError):
        EndpointChatModel(_mock_openai(bad_request), "m", sdk_max_retries=3, progress=False, log=None).reply(
            [{"role": "user", "content": "x"}])
    assert len(bad_calls) == 1                                           # a 400 is not retried


def _mock_openai(handler):
    import httpx2
    import openai
    return openai.OpenAI(api_key="test", base_url="http://fake/v1", max_retries=5,
                         http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))


def test_openai_responder_over_fake_transport(run_dir, items):
    import httpx2
    seen = []
    lock = threading.Lock()

    def handler(request: httpx2.Request):
        assert request.url.path == "/v1/chat/completions"
        body = json.loads(request.content)
        with lock:
            seen.append(body)
            n = len(seen)
        if n == 1:
            return httpx2.Response(429, headers={"retry-after-ms": "1"},
                                   json={"error": {"message": "slow down", "type": "rate_limit"}})
        if n == 2:
            return httpx2.Response(500, headers={"retry-after-ms": "1"}, json={"error": {"message": "oops"}})
        last = body["messages"][-1]["content"]
        return httpx2.Response(200, json=completion(f"返答:{last[:5]}", prompt_tokens=11, completion_tokens=4,
                                                    model=body["model"]))

    client = _mock_openai(handler)
    r = EndpointChatModel(client, "ft:gpt-4o-mini:org:kokoro:abc", max_tokens=64, concurrency=2,
                          sdk_max_retries=2, progress=False, log=None)
    gens = ev.generate_all(items, [r], run_dir, log=None)
    assert len(seen) == len(items) + 2                                   # the 429 and the 500, retried by the SDK
    body = seen[-1]
    assert body["model"] == "ft:gpt-4o-mini:org:kokoro:abc" and body["max_tokens"] == 64
    assert body["temperature"] == 0.0 and body["messages"][0]["role"] == "system"
    assert all(set(m) <= {"role", "content", "name"} for b in seen for m in b["messages"])
    assert (gens["prompt_tokens"] == 11).all() and (gens["completion_tokens"] == 4).all()
    assert (gens["finish_reason"] == "stop").all()
    assert r.settings["base_url"].startswith("http://fake/v1")
    # unauthorised is not transient: no retry, a clear failure, the run goes on
    calls = []

    def unauthorised(request):
        calls.append(1)
        return httpx2.Response(401, json={"error": {"message": "bad key"}})

    r401 = EndpointChatModel(_mock_openai(unauthorised), "other", concurrency=1, sdk_max_retries=2,
                             progress=False, log=None)
    with pytest.raises(ev.GenerationError, match="AuthenticationError"):
        ev.generate_all(items, [r401], run_dir, log=None)
    assert len(calls) == 1


# ------------------------------------------------------------------------------------------------
# §2 models from the run, local responder
# ------------------------------------------------------------------------------------------------

def _cards(run_dir: Path):
    models = run_dir / "models"
    adapter = models / "lora-a"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"weights v1")
    save_card(models / "lora-a.json", new_card("local_lora", "lora-a", "tiny-base", {}, adapter_path="lora-a"))
    save_card(models / "lora-b.json", new_card("local_lora", "lora-b", "tiny-base", {}))
    save_card(models / "ft-done.json", new_card("openai", "ft:gpt-4o-mini:org:x:1", "gpt-4o-mini", {}, job_id="j1",
                                                status="succeeded"))
    save_card(models / "ft-running.json", new_card("openai", None, "gpt-4o-mini", {}, job_id="j2", status="running"))


def test_models_from_run(run_dir, monkeypatch):
    _cards(run_dir)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    from kokoro_helpers.hosted import client as hosted_client
    monkeypatch.setattr(hosted_client, "has_api_key", lambda provider="openai": False)
    log = []
    rs = models_from_run(run_dir, extra_endpoints=[{"base_url": "http://127.0.0.1:9/v1", "model": "served"}],
                            progress=False, log=log.append)
    names = [r.name for r in rs]
    assert sorted(names) == sorted(["lora-a", "lora-b", "tiny-base (base)", "served @ http://127.0.0.1:9/v1"])
    assert any("no model yet" in line and "j2" in line for line in log)
    assert any("ft:gpt-4o-mini:org:x:1" in line and "OPENAI_API_KEY" in line for line in log)
    lora_a = next(r for r in rs if r.name == "lora-a")
    assert lora_a.settings["weights"].startswith("adapter-sha256:")     # a retrained adapter -> new cache keys
    with_client = models_from_run(run_dir, include_base=False, client=FakeChatClient(lambda kw: "x"),
                                  progress=False, log=None)
    assert sorted(r.name for r in with_client) == ["ft:gpt-4o-mini:org:x:1", "lora-a", "lora-b"]


def test_local_model_batches_loads_lazily_and_caches(run_dir, items, monkeypatch):
    batches, loads = [], []

    class FakeLocal:
        def batch_generate(self, conversations, adapter=None, max_new_tokens=None, temperature=None, **kw):
            batches.append((len(conversations), adapter))
            assert conversations[0][-1]["role"] == "user" and max_new_tokens == 32
            return [f"返答{len(m)}" for m in conversations]

    from kokoro_helpers.local import loading
    monkeypatch.setattr(loading, "get_model", lambda source, run_dir=None, **kw: loads.append(source) or FakeLocal())
    card = new_card("local_lora", "lora-x", "tiny-base", {})
    r = LocalChatModel(card, max_new_tokens=32, batch_size=3, progress=False)
    base = LocalChatModel(card, base_only=True, max_new_tokens=32, batch_size=3, progress=False)
    gens = ev.generate_all(items, [r, base], run_dir, log=None)
    assert batches == [(3, None), (3, None), (2, None), (3, "base"), (3, "base"), (2, "base")]
    assert len(loads) == 2 and base.name == "tiny-base (base)"          # the base: the same weights, adapter off
    assert gens["response"].str.startswith("返答").all()
    assert (gens["batch_size"] > 0).all()
    again = LocalChatModel(card, max_new_tokens=32, batch_size=3, progress=False)
    ev.generate_all(items, [again], run_dir, log=None)
    assert len(loads) == 2 and len(batches) == 6                         # fully cached: never loaded


# ------------------------------------------------------------------------------------------------
# §3 perplexity of the references with a tiny Llama
# ------------------------------------------------------------------------------------------------

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tiny_lm(sample_run):
    """A character-level tokenizer over the sample's test/valid text and a 1-layer random Llama."""
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = "".join((sample_run / "data" / f"{s}.jsonl").read_text("utf-8") for s in ("test", "valid"))
    chars = sorted(set(text) - set(SPECIAL))
    vocab = {t: i for i, t in enumerate(SPECIAL + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))   # no merges: one token per character
    tok.add_special_tokens(SPECIAL)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", chat_template=TEMPLATE)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaForCausalLM(config).eval(), tokenizer


def test_perplexity_uniform_model_is_vocab_size(tiny_lm, items):
    import torch
    model, tokenizer = tiny_lm
    model = type(model)(model.config).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()                 # every logit 0 -> uniform -> NLL = ln V per token
    out = mt.perplexity_of_references(model, tokenizer, items, progress=False)
    V = model.config.vocab_size
    assert out["ref_nll"] == pytest.approx(math.log(V), abs=1e-5)
    assert out["ref_ppl"] == pytest.approx(V, rel=1e-4)
    # one token per character: exactly the references' characters are scored, nothing of the context
    assert out["ref_tokens"] == sum(len(it["reference"]) for it in items)
    assert out["items"] == len(items) and out["truncated"] == out["skipped"] == 0


def test_perplexity_matches_a_manual_computation(tiny_lm, items):
    import torch
    model, tokenizer = tiny_lm
    it = items[0]
    prompt = tokenizer.apply_chat_template(it["context"], tokenize=False, add_generation_prompt=True)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(it["reference"], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits[0], -1)
    manual = -sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(r)) / len(r)
    one = mt.perplexity_of_references(model, tokenizer, [it], progress=False)
    assert one["ref_nll"] == pytest.approx(manual, abs=1e-5)
    # batching with right padding changes nothing
    single = mt.perplexity_of_references(model, tokenizer, items, batch_size=1, progress=False)
    batched = mt.perplexity_of_references(model, tokenizer, items, batch_size=4, progress=False)
    assert batched["ref_nll"] == pytest.approx(single["ref_nll"], abs=1e-5)
    for k, v in single["per_item"].items():
        assert batched["per_item"][k]["nll"] == pytest.approx(v["nll"], abs=1e-5)
        assert batched["per_item"][k]["tokens"] == v["tokens"]
    # a context too long for max_length is cut from the left, and counted
    short = mt.perplexity_of_references(model, tokenizer, [it], max_length=len(r) + 5, progress=False)
    assert short["truncated"] == 1 and short["ref_tokens"] == len(r)
    assert mt.perplexity_of_references(model, tokenizer, [it], max_length=len(r), progress=False)["skipped"] == 1


# ------------------------------------------------------------------------------------------------
# §4 the LLM judge (fake client)
# ------------------------------------------------------------------------------------------------

def test_parse_judge_answers_robustly():
    crit = ["accuracy", "relevance", "expertise"]
    fenced = 'はい。\n```json\n{"scores": {"accuracy": 4, "relevance": "５", "expertise": "3/5"}, "reason": "ok"}\n```'
    assert jd.parse_rubric(fenced, crit) == ({"accuracy": 4, "relevance": 5, "expertise": 3}, None)
    scores, error = jd.parse_rubric('{"accuracy": 7, "relevance": 2}', crit)
    assert scores == {"accuracy": None, "relevance": 2, "expertise": None} and "accuracy" in error
    assert jd.parse_rubric("I cannot judge this.", crit)[1] == "no JSON object in the answer"
    assert jd.parse_verdict('{"winner": "A"}') == "A"
    assert jd.parse_verdict('｛"winner": "候補Ｂ"｝') == "B"                  # full-width, NFKC-normalised
    assert jd.parse_verdict('{"winner": "tie", "reason": "x"}') == "tie"
    assert jd.parse_verdict("B") == "B" and jd.parse_verdict("maybe") is None


def test_combine_verdicts_counts_a_win_only_when_both_orders_agree():
    assert jd.combine_verdicts("A", "B", "x", "y") == "x"        # x first wins, x second wins
    assert jd.combine_verdicts("B", "A", "x", "y") == "y"
    assert jd.combine_verdicts("A", "A", "x", "y") == "inconsistent"  # always the first position
    assert jd.combine_verdicts("tie", "tie", "x", "y") == "tie"
    assert jd.combine_verdicts("A", "tie", "x", "y") == "inconsistent"
    assert jd.combine_verdicts(None, "A", "x", "y") == "invalid"


def _judge_gens():
    items = _toy_items()
    gens = [{"item_id": it["item_id"], "model": m, "response": text}
            for it in items for m, text in (("good", "良い返答です"), ("bad", "だめ"))]
    return items, gens


def _candidates(prompt):
    a = prompt.split("## 候補 A\n")[1].split("\n")[0]
    b = prompt.split("## 候補 B\n")[1].split("\n")[0]
    return a, b


def test_judge_pairwise_both_orders(tmp_path):
    items, gens = _judge_gens()
    fair = FakeChatClient(lambda kw: json.dumps(
        {"winner": "A" if "良い" in _candidates(kw["messages"][-1]["content"])[0] else "B"}))
    comp = jd.judge_pairwise(gens, items, fair, "judge", run_dir=tmp_path, progress=False, log=None)
    assert len(fair.requests) == 2 * len(items)                      # each pair asked in both orders
    assert (comp["outcome"] == "good").all()
    assert all(r["response_format"] == {"type": "json_object"} for r in fair.requests)
    assert all("good" not in r["messages"][-1]["content"] for r in fair.requests)   # names hidden
    summary = jd.summarize_pairwise(comp)
    assert summary.loc[0, ["wins_a", "wins_b", "inconsistent"]].tolist() == [len(items), 0, 0]
    # a judge that always prefers the first position wins nobody anything
    biased = FakeChatClient(lambda kw: '{"winner": "A"}')
    comp = jd.judge_pairwise(gens, items, biased, "judge-biased", progress=False, log=None)
    s = jd.summarize_pairwise(comp).iloc[0]
    assert (s["wins_a"], s["wins_b"], s["inconsistent"]) == (0, 0, len(items))
    # answers are cached: the fair judge is not asked again
    again = FakeChatClient(lambda kw: pytest.fail("asked again"))
    jd.judge_pairwise(gens, items, again, "judge", run_dir=tmp_path, progress=False, log=None)


def test_judge_rubric_scores(tmp_path):
    items, gens = _judge_gens()

    def answer(kw):
        cand = kw["messages"][-1]["content"].split("## 候補\n")[1].split("\n")[0]
        if cand == "だめ":
            return "```json\n{\"scores\": {\"accuracy\": 1, \"relevance\": 9, \"expertise\": 0}}\n```"
        return '{"scores": {"accuracy": 5, "relevance": 4, "expertise": 4}, "reason": "共感的"}'

    client = FakeChatClient(answer)
    scores = jd.judge_scores(gens, items, client, "judge", run_dir=tmp_path, progress=False, log=None)
    assert len(scores) == len(gens) * 3
    table = jd.summarize_judge_scores(scores)
    assert table.loc["good", "accuracy"] == 5 and table.loc["bad", "expertise"] == 0
    assert math.isnan(table.loc["bad", "relevance"])                  # 9 is out of range: not guessed
    assert scores.loc[scores["model"] == "bad", "parse_error"].str.contains("relevance").all()
    with pytest.raises(ev.EvalError, match="OPENAI_API_KEY"):
        jd.judge_scores(gens, items, None, "judge", log=None)
