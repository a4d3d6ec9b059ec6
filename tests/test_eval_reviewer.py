"""Evaluation a reviewer would accept (issue 15): the judge through any OpenAI-compatible endpoint
(failures reported per item, never a crash), judge validity against the clients' own ratings,
score prediction, paired comparisons. Offline only: fake transports through the real openai SDK,
the project's own sample dialogues."""
from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest

from kokoro_helpers.evaluation import evaluate as ev
from kokoro_helpers.models.endpoint import EndpointChatModel
from kokoro_helpers.evaluation import judge as jd
from kokoro_helpers.evaluation import judge_endpoint as je
from kokoro_helpers.evaluation import judge_validity as jv
from kokoro_helpers.evaluation import paired as pr
from kokoro_helpers.evaluation import score_prediction as sp
from kokoro_helpers.evaluation import sessions as sess
from kokoro_helpers.data.schema import CRITERIA


def _completion(text: str, model: str = "judge") -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


def _sdk_client(handler, max_retries: int = 2):
    import httpx2
    import openai
    return openai.OpenAI(api_key="test", base_url="http://judge.local/v1", max_retries=max_retries,
                         http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))


def _items_and_gens():
    items = [{"item_id": f"test:{k:02d}", "split": "test", "reference": f"参考の返答{k}",
              "context": [{"role": "system", "content": "sys"}, {"role": "user", "content": f"相談{k}です"}]}
             for k in range(6)]
    gens = [{"item_id": it["item_id"], "model": "m", "response": f"返答{k}"} for k, it in enumerate(items)]
    return items, gens


# ---- judge through an endpoint: down, non-JSON, counted, retried by the SDK, never a crash ---------

class FlakyJudgeServer:
    """A judge server whose answers depend on the item: 返答0 always 503 (down for it), 返答1 prose
    (not JSON), the rest a valid rubric. Counts every request per item (the SDK's retries show)."""

    def __init__(self, healthy: bool = False):
        self.healthy = healthy
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, request):
        import httpx2
        body = json.loads(request.content)
        prompt = body["messages"][-1]["content"]
        reply = prompt.split("## 候補\n")[1].split("\n")[0]
        with self.lock:
            self.calls[reply] = self.calls.get(reply, 0) + 1
        if reply == "返答0" and not self.healthy:
            return httpx2.Response(503, json={"error": {"message": "overloaded"}}, headers={"retry-after-ms": "1"})
        if reply == "返答1" and not self.healthy:
            return httpx2.Response(200, json=_completion("申し訳ありませんが、採点できません。"))
        return httpx2.Response(200, json=_completion('{"scores": {"accuracy": 4, "relevance": 3, "expertise": 5}}'))


def test_judge_endpoint_failures_are_counted_per_item_and_retried_later(tmp_path):
    items, gens = _items_and_gens()
    server = FlakyJudgeServer()
    client = _sdk_client(server, max_retries=2)
    scores = jd.judge_scores(gens, items, client, "judge", run_dir=tmp_path, progress=False, log=None)
    assert server.calls["返答0"] == 3                       # 1 + the SDK's 2 retries, then given up
    assert server.calls["返答1"] == 2                       # prose: asked once more, then reported
    by_item = scores.groupby("item_id")["parse_error"].first()
    assert by_item["test:00"].startswith("request failed: InternalServerError")
    assert by_item["test:01"] == "no JSON object in the answer"
    assert by_item[["test:02", "test:03", "test:04", "test:05"]].isna().all()
    table = jd.summarize_judge_scores(scores)
    assert table.loc["m", "n_request_failed"] == 1 and table.loc["m", "n_scored"] == 4
    assert table.loc["m", "expertise"] == 5
    # neither the failed request nor the prose was cached: with the server back, only they are asked again
    server.healthy = True
    before = dict(server.calls)
    scores = jd.judge_scores(gens, items, client, "judge", run_dir=tmp_path, progress=False, log=None)
    asked = {k: server.calls[k] - before.get(k, 0) for k in server.calls if server.calls[k] != before.get(k, 0)}
    assert asked == {"返答0": 1, "返答1": 1}
    assert scores["parse_error"].isna().all() and (scores["score"].notna()).all()


def test_judge_endpoint_connection_refused_never_crashes(tmp_path):
    import httpx2
    items, gens = _items_and_gens()

    def down(request):
        raise httpx2.ConnectError("connection refused")

    scores = jd.judge_scores(gens, items, _sdk_client(down, max_retries=0), "judge", run_dir=tmp_path,
                             progress=False, log=None)
    assert scores["score"].isna().all()
    assert scores["parse_error"].str.startswith("request failed: APIConnectionError").all()
    pairs = jd.judge_pairwise(gens + [{**g, "model": "n"} for g in gens], items, _sdk_client(down, max_retries=0),
                              "judge", progress=False, log=None)
    assert (pairs["outcome"] == "invalid").all() and pairs["request_error"].notna().all()


def test_resolve_judge_settings(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("KOKORO_OPENAI_DRY_RUN", raising=False)
    monkeypatch.setattr("kokoro_helpers.hosted.client.load_env", lambda *a, **k: None)
    notes = []
    assert je.resolve_judge(None, log=notes.append) is None and "judge: null" in notes[-1]
    assert je.resolve_judge({"model": "gpt-x"}, log=notes.append) is None and "OPENAI_API_KEY" in notes[-1]
    assert je.resolve_judge(None, "gpt-x", log=notes.append) is None                  # judge_model shorthand
    spec = je.resolve_judge({"model": "qwen", "base_url": "http://127.0.0.1:8001/v1"}, log=None)
    assert spec.model == "qwen" and str(spec.client.base_url).startswith("http://127.0.0.1:8001")
    assert spec.client.api_key == "EMPTY" and not spec.is_fake and not spec.is_openai
    assert je.resolve_judge({"model": "az", "base_url": "https://r.openai.azure.com/openai/v1/",
                             "api_key_env": "AZURE_KEY_NOT_SET"}, log=notes.append) is None
    assert "AZURE_KEY_NOT_SET" in notes[-1]
    monkeypatch.setenv("AZURE_KEY_SET", "k")
    assert je.resolve_judge({"model": "az", "base_url": "https://r.openai.azure.com/openai/v1/",
                             "api_key_env": "AZURE_KEY_SET"}, log=None).client.api_key == "k"
    fake = je.resolve_judge("fake", log=None)
    assert fake.is_fake and "FAKE" in fake.label
    with pytest.raises(je.JudgeConfigError):
        je.resolve_judge({"base_url": "http://x"}, log=None)
    # with a key but KOKORO_OPENAI_DRY_RUN=1 (make test, CI) no OpenAI judge is ever called
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("KOKORO_OPENAI_DRY_RUN", "1")
    assert je.resolve_judge({"model": "gpt-x"}, log=notes.append) is None and "KOKORO_OPENAI_DRY_RUN" in notes[-1]
    assert je.resolve_judge({"model": "q", "base_url": "http://127.0.0.1:8001/v1"}, log=None) is not None
    monkeypatch.delenv("KOKORO_OPENAI_DRY_RUN")
    spec = je.resolve_judge({"model": "gpt-x"}, log=None)
    assert spec.is_openai and spec.client.api_key == "sk-test"
    assert je.batch_runner(spec, "runs/x", "rubric", True, log=None) is not None
    local = je.resolve_judge({"model": "q", "base_url": "http://127.0.0.1:8001/v1"}, log=None)
    assert je.batch_runner(local, "runs/x", "rubric", True, log=notes.append) is None and "OpenAI's" in notes[-1]


# ---- sessions, judge validity ----------------------------------------------------------------------

@pytest.fixture
def sample_run(tmp_path, run):
    """01 on the project's sample dialogues: 39 / 5 / 5 sessions."""
    from kokoro_helpers.paths import SAMPLE_DIR
    run(SAMPLE_DIR, tmp_path / "run")
    return tmp_path / "run"


def test_sessions_carry_their_split_and_the_clients_ratings(sample_run):
    sessions = sess.load_sessions(sample_run)
    splits = json.loads((sample_run / "data" / "splits.json").read_text())
    assert sorted(str(s.id) for s in sessions if s.split == "test") == sorted(str(i) for i in splits["test"])
    s = sessions[0]
    assert set(s.ratings) == {"score", *CRITERIA} and all(v is not None for v in s.ratings.values())
    assert s.text.startswith(("カウンセラー: ", "相談者: "))
    (sample_run / "data" / "splits.json").unlink()
    with pytest.raises(sess.SessionError, match="run 01_data"):
        sess.load_sessions(sample_run)


def test_correlation_and_interval():
    rng = np.random.default_rng(0)
    client = rng.normal(size=60)
    good = client + rng.normal(scale=0.3, size=60)
    c = jv.correlate(good, client)
    assert c["n"] == 60 and c["spearman"] > 0.8 and c["ci_low"] > 0.6 and c["ci_low"] < c["spearman"] < c["ci_high"]
    noise = jv.correlate(rng.normal(size=60), client)
    assert noise["ci_low"] < 0 < noise["ci_high"]
    few = jv.correlate([1, 2, 3], [1, 2, 3])
    assert few["n"] == 3 and math.isnan(few["spearman"]) and math.isnan(few["ci_low"])
    assert math.isnan(jv.correlate([2] * 10, list(range(10)))["spearman"])    # a constant judge


def test_judge_validity_with_a_real_sdk_judge_and_the_fake(sample_run):
    sessions = sess.load_sessions(sample_run)
    test = {str(s.id): s for s in sessions if s.split == "train"}         # 39: enough for a correlation
    calls = []

    def handler(request):
        import httpx2
        body = json.loads(request.content)
        prompt = body["messages"][-1]["content"]
        assert "相談後のアンケート" in prompt and "conversation_ended_well" in prompt
        calls.append(1)
        # a judge that knows the answers for every session but one, which it answers in prose
        sid = next(i for i, s in test.items() if s.text in prompt)
        if sid == min(test):
            return httpx2.Response(200, json=_completion("よい相談でした。"))
        return httpx2.Response(200, json=_completion(json.dumps({"scores": test[sid].ratings})))

    from kokoro_helpers.evaluation.judge_endpoint import JudgeSpec
    spec = JudgeSpec(_sdk_client(handler), "oracle", "oracle @ judge.local")
    result = jv.judge_validity(sessions, spec, split="train", run_dir=sample_run, progress=False, log=None)
    assert result.n_sessions == len(test) == 39
    row = result.table.set_index("criterion").loc["score"]
    assert row["n"] == 38                                       # the prose answer is left out, and counted
    assert any("unreadable" in n for n in result.notes) and len(calls) == 40     # the prose one asked twice
    assert row["spearman"] == pytest.approx(1.0) and row["kendall"] == pytest.approx(1.0)
    assert list(result.table.columns) == jv.COLUMNS and not result.table["judge_is_fake"].any()
    path = jv.write_validity(result, sample_run)
    assert path.name == "judge_validity.csv" and "criterion,n,spearman" in path.read_text().splitlines()[0]
    # the fake: deterministic and labelled
    fake = je.resolve_judge("fake", log=None)
    a = jv.judge_validity(sessions, fake, progress=False, log=None)
    b = jv.judge_validity(sessions, je.resolve_judge("fake", log=None), progress=False, log=None)
    assert a.table.equals(b.table) and a.table["judge_is_fake"].all() and "FAKE" in a.sentence
    assert a.n_sessions == 5                                    # the test split by default
    # too few sessions: a clear message, no correlation
    few = jv.judge_validity(sessions, fake, max_sessions=3, progress=False, log=None)
    assert few.table["spearman"].isna().all() and "need 5" in few.sentence


# ---- score prediction ------------------------------------------------------------------------------

def test_score_prediction_beats_the_mean_when_text_carries_the_score(sample_run, tmp_path):
    """Sessions whose text says how good they were: the baseline must learn it, the mean cannot."""
    rng = np.random.default_rng(1)
    sessions = []
    for k in range(80):
        score = float(rng.integers(20, 100))
        good = int(score // 20)
        lines = [("user", "眠れないんです"), ("assistant", "そうなんですね" * good + "はい" * (5 - good))]
        ratings = {"score": score, **{c: float(min(5, good)) for c in CRITERIA}}
        sessions.append(sess.Session(k, "train" if k < 60 else "test", lines, ratings))
    pred = sp.fit_baseline([s for s in sessions if s.split == "train"])
    report = sp.evaluate_predictor(pred, sessions)
    test = report["score"]["test"]
    assert test["n"] == 20 and test["mae"] < test["mae_of_mean"] and test["spearman"] > 0.5
    assert "better" in sp.verdict_sentence(report)
    out = sp.write_report(report, pred, tmp_path)
    saved = json.loads(out.read_text())
    assert saved["predictor"] == sp.BASELINE_NAME
    assert set(saved["targets"]["score"]["test"]) == {"n", "pearson", "spearman", "mae", "mae_of_mean"}
    folder = sp.save_predictor(pred, tmp_path, report)
    card = json.loads((folder / "card.json").read_text())
    assert card["kind"] == "score_predictor" and card["evaluation_results"]["test"]["score"]["n"] == 20
    loaded = sp.load_predictor(tmp_path)
    texts = [s.text for s in sessions[60:]]
    assert loaded.predict(texts)["score"] == pytest.approx(pred.predict(texts)["score"])
    rated = sp.rate_generations(loaded, [{"item_id": "i", "model": "m", "response": "そうなんですね"}],
                                [{"item_id": "i", "split": "test", "reference": "", "context": [
                                    {"role": "user", "content": "眠れないんです"}]}])
    assert rated.loc["m", "n"] == 1 and 0 <= rated.loc["m", "mean"] <= 100
    with pytest.raises(sp.PredictionError, match="at least"):
        sp.fit_baseline(sessions[:3])
    # one session without a rating: per-target ridges, the unrated session left out of that target only
    sessions[0].ratings["score"] = None
    per_target = sp.fit_baseline([s for s in sessions if s.split == "train"])
    assert type(per_target.models["score"]).__name__ == "RidgeCV"
    again = sp.evaluate_predictor(per_target, sessions)["score"]["test"]
    assert again["n"] == 20 and again["mae"] < again["mae_of_mean"]


# ---- paired comparisons ----------------------------------------------------------------------------

def test_paired_difference_verdicts():
    assert pr.paired_difference([1.0, 1.2, 0.9, 1.1, 1.0])["verdict"] == "better"
    assert pr.paired_difference([-1.0, -1.2, -0.9, -1.1])["verdict"] == "worse"
    assert pr.paired_difference([1.0, -1.0, 0.5, -0.5, 0.1])["verdict"] == "not distinguishable"
    assert pr.paired_difference([-1.0, -1.2, -0.9, -1.1], lower_is_better=True)["verdict"] == "better"
    assert pr.paired_difference([0.0, 0.0, 0.0])["verdict"] == "not distinguishable"
    assert pr.paired_difference([1.0, 2.0])["verdict"] == "too few items"
    r = pr.paired_difference([0.5, 1.5, 1.0, 1.2, 0.8])
    assert r["mean_diff"] == pytest.approx(1.0) and r["ci_low"] < 1.0 < r["ci_high"]


def test_paired_comparisons_on_the_same_items():
    items, _ = _items_and_gens()
    gens = [{"item_id": it["item_id"], "model": "tuned", "response": it["reference"]} for it in items]
    gens += [{"item_id": it["item_id"], "model": "base", "response": "全く別の言葉"} for it in items[:5]]
    per_item = pr.per_item_metrics(gens, items, perplexity={
        "tuned": {"per_item": {it["item_id"]: {"nll": 1.0, "tokens": 3} for it in items}},
        "base": {"per_item": {it["item_id"]: {"nll": 2.0 + 0.1 * k, "tokens": 3} for k, it in enumerate(items)}}})
    table = pr.paired_comparisons(per_item, [("tuned", "base")])
    assert list(table.columns) == pr.COLUMNS
    t = table.set_index("metric")
    assert (t["n"].loc[["chrF", "ROUGE_L_char"]] == 5).all()          # only the items both answered
    assert t.loc["chrF", "verdict"] == "better" and t.loc["ref_nll", "verdict"] == "better"
    assert t.loc["ref_nll", "mean_diff"] < 0
    assert "better on" in pr.verdict_summary(table)

    class R:
        def __init__(self, name, card=None, base_only=False):
            self.name, self.card, self.base_only = name, card, base_only
    card = {"model_id": "lora", "base_model": "tiny"}
    assert pr.default_pairs([R("lora", card), R("tiny (base)", card, True), R("ep")]) == [("lora", "tiny (base)")]
    assert pr.named_pairs([["lora", "ep"]], ["lora", "ep"]) == [("lora", "ep")]
    with pytest.raises(ValueError, match="not evaluated"):
        pr.named_pairs([["lora", "nope"]], ["lora"])


# ---- OpenAI's Batch API: a stateful fake server through the real SDK ------------------------------

class FakeBatchServer:
    """/v1/files, /v1/batches, /v1/batches/{id}, /v1/files/{id}/content as OpenAI serves them: a batch
    goes validating -> in_progress -> `final` over successive polls; output lines come back in
    reverse order (so only custom_id can match them), `fail_ids` land in the error file, and an
    expired batch returns only its first `partial` answers."""

    def __init__(self, answer, final: str = "completed", fail_ids=(), partial: int = 0, state_dir=None):
        self.answer, self.final, self.fail_ids, self.partial = answer, final, set(fail_ids), partial
        self.files: dict[str, str] = {}
        self.batches: dict[str, dict] = {}
        self.polls: dict[str, int] = {}
        self.uploads = self.creates = 0
        self.state_dir = state_dir
        self.state_seen_before_poll = []

    def _batch_json(self, b):
        return {k: v for k, v in b.items() if not k.startswith("_")}

    def __call__(self, request):
        import httpx2
        path, method = request.url.path, request.method
        if method == "POST" and path == "/v1/files":
            body = request.read().decode("utf-8")
            lines = [ln for ln in body.splitlines() if ln.startswith('{"custom_id"')]
            self.uploads += 1
            fid = f"file-in-{self.uploads}"
            self.files[fid] = "\n".join(lines) + "\n"
            return httpx2.Response(200, json={"id": fid, "object": "file", "bytes": len(body), "created_at": 1,
                                              "filename": "in.jsonl", "purpose": "batch", "status": "processed"})
        if method == "POST" and path == "/v1/batches":
            req = json.loads(request.read())
            assert req["endpoint"] == "/v1/chat/completions" and req["completion_window"] == "24h"
            self.creates += 1
            bid = f"batch_{self.creates}"
            self.batches[bid] = {"id": bid, "object": "batch", "endpoint": req["endpoint"], "created_at": 1,
                                 "input_file_id": req["input_file_id"], "completion_window": "24h",
                                 "status": "validating", "output_file_id": None, "error_file_id": None}
            return httpx2.Response(200, json=self._batch_json(self.batches[bid]))
        if method == "GET" and path.startswith("/v1/batches/"):
            bid = path.rsplit("/", 1)[1]
            b = self.batches[bid]
            if self.state_dir is not None:
                self.state_seen_before_poll.append(any(bid in p.read_text() for p in Path(self.state_dir).glob("*.json")))
            n = self.polls[bid] = self.polls.get(bid, 0) + 1
            if n == 1:
                b["status"] = "in_progress"
            elif b["status"] == "in_progress":
                self._finish(b)
            return httpx2.Response(200, json=self._batch_json(b))
        if method == "GET" and path.startswith("/v1/files/") and path.endswith("/content"):
            return httpx2.Response(200, content=self.files[path.split("/")[3]].encode("utf-8"))
        return httpx2.Response(404, json={"error": {"message": f"no route {method} {path}"}})

    def _finish(self, b):
        reqs = [json.loads(ln) for ln in self.files[b["input_file_id"]].splitlines() if ln.strip()]
        ok, bad = [], []
        for k, r in enumerate(reqs):
            if self.final == "expired" and k >= self.partial:
                continue
            if r["custom_id"] in self.fail_ids:
                bad.append({"custom_id": r["custom_id"], "response": {"status_code": 400, "body": {
                    "error": {"message": "invalid request"}}}, "error": None})
                continue
            ok.append({"custom_id": r["custom_id"], "error": None, "response": {"status_code": 200, "body":
                       _completion(self.answer(r["body"]), model=r["body"]["model"])}})
        b["status"] = self.final
        out_id, err_id = f"file-out-{b['id']}", f"file-err-{b['id']}"
        self.files[out_id] = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in reversed(ok))
        self.files[err_id] = "".join(json.dumps(x) + "\n" for x in bad)
        b["output_file_id"], b["error_file_id"] = out_id, (err_id if bad else None)
        b["request_counts"] = {"total": len(reqs), "completed": len(ok), "failed": len(bad)}
        if self.final == "failed":
            b["errors"] = {"object": "list", "data": [{"code": "invalid_file", "message": "bad line 1"}]}


def _rubric_answer(body):
    reply = body["messages"][-1]["content"].split("## 候補\n")[1].split("\n")[0]
    k = int(reply[-1])
    return json.dumps({"scores": {"accuracy": k % 6, "relevance": 3, "expertise": 4}})


def test_judge_batch_is_resumable_and_matched_by_custom_id(tmp_path):
    from kokoro_helpers.hosted.batch import BatchError, BatchRunner
    items, gens = _items_and_gens()
    state_dir = tmp_path / "eval" / "batches"
    server = FakeBatchServer(_rubric_answer, state_dir=state_dir)
    client = _sdk_client(server, max_retries=0)
    # the first kernel gives up waiting (a restart): the batch id is already on disk
    impatient = BatchRunner(client, tmp_path, "judge-rubric", poll_seconds=1, max_wait_s=0, sleep=lambda s: None, log=None)
    with pytest.raises(BatchError, match="still in_progress"):
        jd.judge_scores(gens, items, client, "gpt-judge", run_dir=tmp_path, progress=False, log=None, batch=impatient)
    assert server.state_seen_before_poll == [True]               # written before any waiting
    assert server.uploads == 1 and server.creates == 1
    # a new kernel: the same call resumes the same batch, nothing is submitted again
    runner = BatchRunner(_sdk_client(server, max_retries=0), tmp_path, "judge-rubric", poll_seconds=1,
                         sleep=lambda s: None, log=None)
    scores = jd.judge_scores(gens, items, client, "gpt-judge", run_dir=tmp_path, progress=False, log=None, batch=runner)
    assert server.uploads == 1 and server.creates == 1
    acc = scores[scores["criterion"] == "accuracy"].set_index("item_id")["score"]
    assert acc.to_dict() == {f"test:{k:02d}": k % 6 for k in range(6)}      # reversed output, matched by id
    assert scores["parse_error"].isna().all()
    # cached: a third run asks nobody
    jd.judge_scores(gens, items, client, "gpt-judge", run_dir=tmp_path, progress=False, log=None,
                    batch=BatchRunner(client, tmp_path, "judge-rubric", sleep=lambda s: None, log=None))
    assert server.creates == 1


def test_expired_or_failed_batch_is_a_clear_error_and_keeps_what_came_back(tmp_path):
    from kokoro_helpers.hosted.batch import BatchError, BatchRunner
    items, gens = _items_and_gens()
    server = FakeBatchServer(_rubric_answer, final="expired", partial=4)
    client = _sdk_client(server, max_retries=0)
    runner = BatchRunner(client, tmp_path, "judge-rubric", sleep=lambda s: None, log=None)
    with pytest.raises(BatchError, match="ended 'expired' with 4 of 6 answers.*Re-run to submit a new batch"):
        jd.judge_scores(gens, items, client, "gpt-judge", run_dir=tmp_path, progress=False, log=None, batch=runner)
    assert list((tmp_path / "eval" / "batches").glob("*.expired.ended.json"))
    server.final = "completed"
    scores = jd.judge_scores(gens, items, client, "gpt-judge", run_dir=tmp_path, progress=False, log=None, batch=runner)
    assert server.creates == 2
    second = server.files[server.batches["batch_2"]["input_file_id"]]
    assert len(second.strip().splitlines()) == 2                  # only the two that never came back
    assert scores["score"].notna().all()
    # a failed batch names its errors
    failed = FakeBatchServer(_rubric_answer, final="failed")
    c2 = _sdk_client(failed, max_retries=0)
    with pytest.raises(BatchError, match="ended 'failed' \\(invalid_file: bad line 1\\)"):
        jd.judge_scores(gens, items, c2, "gpt-judge", run_dir=tmp_path / "other", progress=False, log=None,
                        batch=BatchRunner(c2, tmp_path / "other", "judge-rubric", sleep=lambda s: None, log=None))


def test_eval_batch_replies_through_generate_all(tmp_path):
    items, _ = _items_and_gens()
    server = FakeBatchServer(lambda body: "返答:" + body["messages"][-1]["content"], fail_ids={"test:03"})
    client = _sdk_client(server, max_retries=0)
    r = EndpointChatModel(client, "ft:gpt-4o-mini:org:kokoro:abc", batch_run_dir=tmp_path,
                          batch_poll_seconds=0, progress=False, log=None)
    with pytest.raises(ev.GenerationError, match="1 of 6 batch request"):
        ev.generate_all(items, [r], tmp_path, log=None)
    gens = ev.generate_all(items, [r], tmp_path, strict=False, log=None)     # the rest is cached
    assert server.creates == 2
    assert len(gens) == 5 and "test:03" not in set(gens["item_id"])
    assert gens.set_index("item_id").loc["test:02", "response"] == "返答:相談2です"
    assert gens["cached"].all()
    server.fail_ids = set()
    gens = ev.generate_all(items, [r], tmp_path, log=None)
    assert len(gens) == 6 and server.creates == 3
    last = server.files[server.batches["batch_3"]["input_file_id"]].strip().splitlines()
    assert [json.loads(x)["custom_id"] for x in last] == ["test:03"]


# ---- the LLM regressor (sequence-classification head + LoRA), on the tiny model on the CPU ---------

def test_llm_plan():
    from kokoro_helpers.evaluation import score_prediction_llm as spl
    import torch
    if torch.cuda.is_available():
        pytest.skip("the CPU rules are what is tested here")
    assert spl.llm_plan("embedded:tiny").action == "train"
    hub = spl.llm_plan("Qwen/Qwen2.5-0.5B-Instruct")
    assert hub.action == "skip" and "needs a GPU" in hub.describe()
    assert spl.llm_plan("Qwen/Qwen2.5-0.5B-Instruct", "train").action == "train"
    assert spl.llm_plan("embedded:tiny", "off").action == "skip"
    with pytest.raises(ValueError):
        spl.llm_plan("embedded:tiny", "sometimes")


def test_llm_regressor_trains_saves_and_rates_on_the_tiny_model(sample_run, tmp_path):
    from kokoro_helpers.evaluation import score_prediction_llm as spl
    sessions = sess.load_sessions(sample_run)
    train = [s for s in sessions if s.split == "train"]
    pred = spl.fit_llm_regressor(train, "embedded:tiny", targets=["score", "felt_respected"], epochs=1,
                                 learning_rate=1e-3, max_length=128, output_dir=tmp_path / "work")
    assert pred.info["train_sessions"] == 39 and pred.info["truncated_sessions"] > 0      # counted, not silent
    assert math.isfinite(pred.info["train_loss"])
    out = pred.predict([s.text for s in sessions[:3]])
    assert set(out) == {"score", "felt_respected"} and len(out["score"]) == 3
    assert all(0 <= v <= 100 for v in out["score"]) and all(0 <= v <= 5 for v in out["felt_respected"])
    report = sp.evaluate_predictor(pred, sessions)
    assert report["score"]["test"]["n"] == 5
    folder = spl.save_llm_predictor(pred, tmp_path, report)
    card = json.loads((folder / "card.json").read_text())
    assert card["kind"] == "score_predictor_llm" and card["target_scale"] == {"score": 100, "felt_respected": 5}
    assert (folder / "adapter_model.safetensors").is_file()
    from peft import AutoPeftModelForSequenceClassification
    from kokoro_helpers.local.tiny_model import quiet_transformers
    with quiet_transformers():
        again = AutoPeftModelForSequenceClassification.from_pretrained(str(folder), num_labels=2)
    reloaded = spl.LLMScorePredictor(again, pred.tokenizer, pred.targets, pred.train_means, 128, pred.name)
    assert reloaded.predict([sessions[0].text])["score"] == pytest.approx(pred.predict([sessions[0].text])["score"], abs=1e-4)


def test_report_index_shows_validity_prediction_and_paired_verdicts(sample_run):
    from kokoro_helpers.report import index as report
    sessions = sess.load_sessions(sample_run)
    jv.write_validity(jv.judge_validity(sessions, je.resolve_judge("fake", log=None), progress=False, log=None),
                      sample_run)
    pred = sp.fit_baseline([s for s in sessions if s.split == "train"])
    sp.write_report(sp.evaluate_predictor(pred, sessions), pred, sample_run)
    pr.write_paired(pr.paired_comparisons(pr.per_item_metrics(
        [{"item_id": "i1", "model": "a", "response": "x"}], [{"item_id": "i1", "split": "test", "reference": "x",
                                                             "context": []}]), [("a", "b")]), sample_run)
    import pandas as pd
    pd.DataFrame([{"model_a": "lora", "model_b": "base", "metric": "chrF", "n": 16, "mean_diff": 2.5,
                   "ci_low": 0.4, "ci_high": 4.6, "verdict": "better"}]).to_csv(sample_run / "eval" / "paired.csv", index=False)
    html = report.key_figures(sample_run)["03"]
    assert "Judge validity" in html and "FAKE judge" in html and "felt_respected" in html
    assert "Score prediction (tfidf-char-1to3+ridge, test split)" in html and "Overall score on 5 test sessions" in html
    assert "Paired comparisons" in html and "better" in html and "lora" in html
