"""The OpenAI fine-tuning path end to end against a fake server: no network, ever.

`FakeOpenAI` (tests/fake_openai.py) answers the endpoints the project uses with OpenAI-shaped JSON
through an httpx2 MockTransport (openai 3.x runs on httpx2). It keeps its state across clients, so a
"kernel restart" is simply a new client (and a new monitor) talking to the same server.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2
import pytest

from kokoro_helpers import cards
from kokoro_helpers.hosted import client as hosted_client
from kokoro_helpers.hosted import openai_ft
from kokoro_helpers.hosted import submit as hosted_submit
from kokoro_helpers.models.open import open_model
from kokoro_helpers.hosted.client import FORCE_DRY_RUN_ENV, describe_mode, has_api_key, make_client, resolve_mode
from kokoro_helpers.hosted.errors import (CostGuardError, DataError, JobEndedError, JobFailedError, MissingKeyError,
                                          OpenAIFTError)
from kokoro_helpers.hosted.job_card import job_cards
from kokoro_helpers.hosted.monitor import monitor
from kokoro_helpers.hosted.preflight import fmt_usd, preflight
from kokoro_helpers.hosted.request import write_job_request
from kokoro_helpers.hosted.results import plot_loss
from kokoro_helpers.hosted.submit import cancel, submit
from kokoro_helpers.data.pipeline import prepare_data
from kokoro_helpers.data.tokens import estimate_counter

from fake_openai import BASE_URL, FakeOpenAI

SECRET = "kokoro-TEST-key-9f8e7d6c5b4a-never-write-me"
BASE_MODEL = "gpt-4o-mini-2024-07-18"


# --- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def _data_once(tmp_path_factory):
    run = tmp_path_factory.mktemp("ft-data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KOKORO_TIKTOKEN_OFFLINE", "1")
        prepare_data(run_dir=str(run), progress=False, token_counter=estimate_counter(),
                     system_prompt="あなたは心理カウンセラーです。")
    return run / "data"


@pytest.fixture
def run_dir(tmp_path, _data_once):
    """A fresh run dir holding 01_data's real output for the embedded sample (copied, not recomputed)."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(_data_once, run / "data")
    return run


@pytest.fixture
def no_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "")       # also shadows any OPENAI_API_KEY in a .env
    monkeypatch.delenv(FORCE_DRY_RUN_ENV, raising=False)


@pytest.fixture
def with_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.delenv(FORCE_DRY_RUN_ENV, raising=False)


class Sleeps(list):
    """A stand-in for time.sleep that records the delays (tests never really sleep)."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def run_ft(run_dir: Path, client: Any, sleep=None, **kwargs: Any) -> openai_ft.FineTuneResult:
    kwargs.setdefault("openai_mode", "submit")
    kwargs.setdefault("submit_kwargs", {"sleep": Sleeps()})
    return openai_ft.finetune(run_dir=str(run_dir), client=client, progress=False, counter=estimate_counter(),
                              poll_seconds=1, monitor_kwargs={"sleep": sleep if sleep is not None else Sleeps()},
                              log=lambda msg: None, **kwargs)


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def assert_key_absent(folder: Path) -> None:
    leaked = [p for p in files_under(folder) if SECRET.encode() in p.read_bytes()]
    assert not leaked, f"the API key was written to {leaked}"


# --- tests --------------------------------------------------------------------------------------------

def test_dry_run_with_key_writes_request_in_method_form_and_sends_nothing(run_dir, with_key, monkeypatch):
    def no_http(*args, **kwargs):
        raise AssertionError("dry run sent an HTTP request")

    monkeypatch.setattr(httpx2.Client, "send", no_http)
    fake = FakeOpenAI()
    result = run_ft(run_dir, fake.client(), openai_mode="dry_run")
    assert result.mode == "dry_run" and result.card_path is None
    assert fake.calls == []
    record = json.loads((run_dir / "openai" / "job_request.json").read_text(encoding="utf-8"))
    request = record["request"]
    assert "hyperparameters" not in request
    assert request["method"] == {"type": "supervised", "supervised": {"hyperparameters": {
        "n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}}}
    assert request["model"] == BASE_MODEL and request["suffix"] == "kokoro-chat" and request["seed"] == 42
    # 39 training examples -> 3 epochs by the heuristic; billed = 3 x train tokens; $3.00 / 1M
    stats = json.loads((run_dir / "data" / "stats.json").read_text(encoding="utf-8"))
    assert record["epochs"] == 3
    assert record["billed_tokens"] == 3 * stats["tokens"]["train"]
    assert record["estimated_cost_usd"] == pytest.approx(record["billed_tokens"] * 3.00 / 1e6)
    assert record["is_estimate"] is True and "estimate" in record["estimate"]["label"]
    assert record["cost_guard"]["passes"] is True
    assert not (run_dir / "models").exists()
    assert_key_absent(run_dir)


def test_whole_flow_429_then_success_card_metrics_and_no_key_written(run_dir, with_key):
    fake = FakeOpenAI(key=SECRET)
    fake.fault("POST", "/files", 429, times=1)            # rate limited once: the SDK retries
    client = make_client(http_client=httpx2.Client(transport=httpx2.MockTransport(fake.handler)),
                                   base_url=BASE_URL, max_retries=2)
    result = run_ft(run_dir, client)
    assert fake.count("POST", "/files") == 3                # 429 + train + valid
    assert fake.count("POST", "/fine_tuning/jobs") == 1
    create = next(b for m, p, b in fake.bodies if p == "/fine_tuning/jobs")
    assert "hyperparameters" not in create and create["method"]["type"] == "supervised"
    assert create["metadata"]["kokoro_request"] == result.request.fingerprint[:32]

    card = result.card
    assert card["status"] == "succeeded" and card["finalized"] is True
    assert card["model_id"].startswith(f"ft:{BASE_MODEL}:org-fake:kokoro-chat:")
    for key in ("model_id", "timestamp", "base_model", "training_params", "evaluation_results", "usage_instructions"):
        assert key in card
    assert card["kind"] == "openai" and card["job_id"].startswith("ftjob-")
    assert set(card["training_params"]) >= {"epochs", "batch_size", "learning_rate_multiplier", "max_samples",
                                            "seed", "data_splits"}
    assert card["training_params"]["epochs"] == 3 and card["training_params"]["data_splits"]["train"] == 39
    assert card["trained_tokens"] == 12_345
    assert card["actual_cost"]["usd"] == pytest.approx(12_345 * 3.00 / 1e6)
    assert card["actual_cost"]["is_estimate"] is False
    assert [c["step_number"] for c in card["checkpoints"]] == [3, 6]
    assert card["file_ids"]["train"] in fake.files and card["file_ids"]["valid"] in fake.files
    assert card["data_sha256"]["train"] == result.preflight.sha256["train"]
    assert card["system_prompt"] == "あなたは心理カウンセラーです。"
    assert [h["status"] for h in card["status_history"]] == ["validating_files", "queued", "running", "succeeded"]
    assert card["model_id"] in card["usage_instructions"]

    metrics = run_dir / card["training_metrics"]["metrics_file"]
    assert metrics.read_text().startswith("step,train_loss")
    assert card["training_metrics"]["steps"] == 6
    assert card["training_metrics"]["final_train_loss"] == pytest.approx(2.0 / 6, abs=1e-4)
    events = [json.loads(line) for line in (run_dir / card["monitor"]["events_file"]).read_text().splitlines()]
    assert len({e["id"] for e in events}) == len(events) == len(fake.events[card["job_id"]])
    assert [e["data"]["step"] for e in events if e["type"] == "metrics"] == list(range(1, 7))

    ledger = json.loads((run_dir / "openai" / "uploads.json").read_text())
    assert {v["file_id"] for v in ledger.values()} == set(card["file_ids"].values())
    request = json.loads((run_dir / "openai" / "job_request.json").read_text())
    assert request["mode"] == "submit" and request["request"]["training_file"] == card["file_ids"]["train"]
    assert not (run_dir / "openai" / "pending_job.json").exists()

    import matplotlib
    matplotlib.use("Agg")
    fig = plot_loss(result.card_path)
    assert fig.axes[0].get_lines()
    assert_key_absent(run_dir)


def test_500s_and_a_timeout_while_polling_are_retried_with_backoff(run_dir, no_key):
    fake = FakeOpenAI()
    fake.fault("GET", r"/fine_tuning/jobs/[^/]+", 500, times=2, retry_ms=None)
    fake.fault("GET", r"/fine_tuning/jobs/[^/]+/events", "timeout", times=1)
    sleeps = Sleeps()
    result = run_ft(run_dir, fake.client(max_retries=0), sleep=sleeps)   # our loop, not the SDK, retries
    assert result.card["status"] == "succeeded"
    assert sleeps.count(1) == 3                              # between the 4 polls
    assert [s for s in sleeps if s != 1] == [2.0, 4.0, 2.0]   # backoff: 500, 500, (reset) timeout


def test_events_beyond_one_page_are_followed_through_the_sdk_pages_and_logged_once(run_dir, no_key):
    fake = FakeOpenAI(total_steps=250)              # 125 loss events per running poll: pages of 100
    result = run_ft(run_dir, fake.client())
    job_id = result.card["job_id"]
    events = [json.loads(line) for line in (run_dir / result.card["monitor"]["events_file"]).read_text().splitlines()]
    assert [e["id"] for e in events] == [e["id"] for e in fake.events[job_id]]     # all, oldest first, once
    polls = fake.count("GET", r"/fine_tuning/jobs/[^/]+")
    assert fake.count("GET", r"/fine_tuning/jobs/[^/]+/events") >= polls + 2     # the running polls paged


def test_failed_job_shows_openai_code_and_message_and_is_not_resubmitted_silently(run_dir, no_key):
    err = {"code": "invalid_training_file", "message": "The file has 3 examples with an unknown role.",
           "param": "training_file"}
    fake = FakeOpenAI(fail_with=err)
    with pytest.raises(JobFailedError) as info:
        run_ft(run_dir, fake.client())
    assert "invalid_training_file" in str(info.value) and "unknown role" in str(info.value)
    assert info.value.code == "invalid_training_file"
    (path, card), = job_cards(run_dir)
    assert card["status"] == "failed" and card["error"]["code"] == "invalid_training_file"
    assert card["model_id"] is None

    with pytest.raises(JobEndedError, match="invalid_training_file"):
        run_ft(run_dir, fake.client())
    assert fake.count("POST", "/fine_tuning/jobs") == 1
    fake.fail_with = None
    result = run_ft(run_dir, fake.client(), new_job=True)
    assert result.card["status"] == "succeeded" and fake.count("POST", "/fine_tuning/jobs") == 2


def test_kernel_restart_mid_monitoring_resumes_the_same_job(run_dir, no_key):
    fake = FakeOpenAI(plan=("validating_files", "queued", "running", "running", "running", "succeeded"))

    class Interrupt(Sleeps):
        def __call__(self, seconds):
            super().__call__(seconds)
            if len(self) == 3:
                raise KeyboardInterrupt   # the kernel is interrupted / restarted mid-monitoring

    with pytest.raises(KeyboardInterrupt):
        run_ft(run_dir, fake.client(), sleep=Interrupt())
    (path, card), = job_cards(run_dir)
    assert card["status"] in ("queued", "running") and card["job_id"]
    seen_before = card["monitor"]["last_event_at"]
    assert seen_before is not None

    result = run_ft(run_dir, fake.client())                 # a new client, a new monitor, the same run_dir
    assert fake.count("POST", "/fine_tuning/jobs") == 1     # no second job
    assert fake.count("POST", "/files") == 2                # no second upload
    assert result.card_path == path and result.card["job_id"] == card["job_id"]
    assert result.card["status"] == "succeeded"
    events = [json.loads(line) for line in (run_dir / result.card["monitor"]["events_file"]).read_text().splitlines()]
    assert len({e["id"] for e in events}) == len(events)   # nothing logged twice after the restart

    # and once more: a finished job is only reported, never re-created or re-polled
    polls = fake.count("GET", r"/fine_tuning/jobs/[^/]+")
    again = run_ft(run_dir, fake.client())
    assert again.card["model_id"] == result.card["model_id"]
    assert fake.count("POST", "/fine_tuning/jobs") == 1 and fake.count("GET", r"/fine_tuning/jobs/[^/]+") == polls


def test_identical_data_is_not_uploaded_twice(run_dir, no_key):
    fake = FakeOpenAI()
    first = run_ft(run_dir, fake.client())
    second = run_ft(run_dir, fake.client(), suffix="kokoro-chat-b")    # another job, the same data
    assert fake.count("POST", "/fine_tuning/jobs") == 2
    assert fake.count("POST", "/files") == 2
    assert second.card["file_ids"] == first.card["file_ids"]
    assert fake.count("GET", r"/files/file-[^/]+") >= 2                 # the reused ids were checked
    # a file deleted at OpenAI is uploaded again, and the ledger updated
    del fake.files[first.card["file_ids"]["train"]]
    third = run_ft(run_dir, fake.client(), suffix="kokoro-chat-c")
    assert fake.count("POST", "/files") == 3
    assert third.card["file_ids"]["train"] != first.card["file_ids"]["train"]


def test_cost_guard_refuses_with_the_numbers_before_any_request(run_dir, no_key):
    fake = FakeOpenAI()
    with pytest.raises(CostGuardError) as info:
        run_ft(run_dir, fake.client(), max_training_cost_usd=0.01, n_epochs=10)
    msg = str(info.value)
    stats = json.loads((run_dir / "data" / "stats.json").read_text())
    billed = 10 * stats["tokens"]["train"]
    assert f"{billed:,} billed tokens" in msg and "10 epochs" in msg and "$0.01" in msg
    assert fmt_usd(billed * 3 / 1e6) in msg and "max_training_cost_usd" in msg
    assert fake.calls == []
    record = json.loads((run_dir / "openai" / "job_request.json").read_text())
    assert record["cost_guard"]["passes"] is False and record["epochs"] == 10


def test_a_job_whose_creation_answer_was_lost_is_adopted_not_duplicated(run_dir, no_key, monkeypatch):
    fake = FakeOpenAI()
    real = hosted_submit.write_job_card

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated) right after jobs.create")

    monkeypatch.setattr(hosted_submit, "write_job_card", crash)
    with pytest.raises(OSError):
        run_ft(run_dir, fake.client())
    assert (run_dir / "openai" / "pending_job.json").exists()
    monkeypatch.setattr(hosted_submit, "write_job_card", real)
    result = run_ft(run_dir, fake.client())
    assert fake.count("POST", "/fine_tuning/jobs") == 1
    assert result.card["status"] == "succeeded"


def test_modes_and_the_missing_key(no_key, monkeypatch):
    assert resolve_mode("auto") == "dry_run"
    assert resolve_mode("dry_run") == "dry_run"
    with pytest.raises(MissingKeyError, match="OPENAI_API_KEY"):
        resolve_mode("submit")
    with pytest.raises(MissingKeyError, match="OPENAI_API_KEY"):
        make_client()
    with pytest.raises(ValueError, match="openai_mode"):
        resolve_mode("yes please")
    assert resolve_mode("auto", client=object()) == "submit"
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    assert resolve_mode("auto") == "submit"
    assert SECRET not in describe_mode("submit")
    monkeypatch.setenv(FORCE_DRY_RUN_ENV, "1")
    assert resolve_mode("submit") == "dry_run"
    with pytest.raises(OpenAIFTError, match="never a parameter"):
        make_client(api_key=SECRET)


def test_client_from_environment_respects_base_url_and_chat_uses_the_card(with_key, monkeypatch, tmp_path):
    fake = FakeOpenAI(key=SECRET)
    monkeypatch.setenv("OPENAI_BASE_URL", BASE_URL)
    client = make_client(http_client=httpx2.Client(transport=httpx2.MockTransport(fake.handler)))
    card = cards.new_card("openai", "ft:gpt-4o-mini-2024-07-18:org:kokoro-chat:abc", BASE_MODEL, {},
                          system_prompt="あなたは心理カウンセラーです。")
    model = open_model(card, client=client, max_new_tokens=50, temperature=0)
    reply = model.reply([{"role": "user", "content": "こんにちは"}])
    assert reply == "お話を聞かせてください。"
    body = fake.bodies[-1][2]
    assert body["model"] == card["model_id"] and body["max_tokens"] == 50 and body["temperature"] == 0
    assert body["messages"][0] == {"role": "system", "content": "あなたは心理カウンセラーです。"}   # the card's
    model.reply([{"role": "system", "content": "別の指示"}, {"role": "user", "content": "x"}])
    assert [m["content"] for m in fake.bodies[-1][2]["messages"] if m["role"] == "system"] == ["別の指示"]


def test_cancel_is_one_call_and_recorded(run_dir, no_key):
    fake = FakeOpenAI()
    pf = preflight(run_dir, counter=estimate_counter())
    req = write_job_request(pf, "submit", max_training_cost_usd=5)
    path = submit(req, fake.client(), log=lambda m: None)
    before = len(fake.calls)
    card = cancel(path, fake.client())
    assert len(fake.calls) == before + 1 and card["status"] == "cancelled"
    final = monitor(path, fake.client(), progress=False, sleep=Sleeps(), log=lambda m: None)
    assert final["status"] == "cancelled" and final["model_id"] is None


def test_preflight_refuses_bad_or_missing_data(tmp_path, run_dir, counter):
    with pytest.raises(DataError, match="run 01_data first"):
        preflight(tmp_path / "nowhere", counter=counter)
    train = run_dir / "data" / "train.jsonl"
    lines = train.read_text(encoding="utf-8").splitlines()
    bad = json.loads(lines[0])
    bad["messages"] = [m for m in bad["messages"] if m["role"] != "assistant"]
    train.write_text("\n".join([json.dumps(bad, ensure_ascii=False)] + lines[1:]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="example_missing_assistant_message"):
        preflight(run_dir, counter=counter)
    train.write_text("\n".join(lines[:5]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="at least 10"):
        preflight(run_dir, counter=counter)


def test_preflight_caps_long_examples_and_notes_changed_files(run_dir, counter):
    pf = preflight(run_dir, max_example_tokens=500, n_epochs=2, counter=counter)
    toks = pf.example_tokens["train"]
    assert pf.estimate.tokens_per_epoch == sum(min(500, t) for t in toks)
    assert pf.estimate.capped_examples == sum(t > 500 for t in toks) > 0
    assert pf.estimate.billed_tokens == 2 * pf.estimate.tokens_per_epoch
    assert any("truncates" in n for n in pf.notes)
    table = pf.cost_table()
    assert table.loc["cost (USD)", "note"] == "estimate"
    with open(run_dir / "data" / "valid.jsonl", "a", encoding="utf-8") as f:
        f.write(open(run_dir / "data" / "valid.jsonl", encoding="utf-8").readline())
    assert any("changed since 01_data" in n for n in preflight(run_dir, counter=counter).notes)


def test_an_unreadable_job_card_blocks_a_new_job(run_dir, no_key):
    fake = FakeOpenAI()
    (run_dir / "models").mkdir()
    (run_dir / "models" / "openai-kokoro-chat-ftjob-0001.json").write_text("{half a card", encoding="utf-8")
    with pytest.raises(OpenAIFTError, match="unreadable and may hold a running job"):
        run_ft(run_dir, fake.client())
    assert fake.calls == []


def test_the_key_may_come_from_dotenv_and_never_overrides_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv(FORCE_DRY_RUN_ENV, raising=False)
    monkeypatch.setattr(hosted_client, "project_root", lambda: tmp_path)
    (tmp_path / ".env").write_text(f"OPENAI_API_KEY={SECRET}\n", encoding="utf-8")
    assert has_api_key() and resolve_mode("auto") == "submit"
    monkeypatch.setenv("OPENAI_API_KEY", "")               # the environment wins over .env
    assert not has_api_key() and resolve_mode("auto") == "dry_run"


def test_preflight_reads_01s_counts_and_recounts_only_a_file_edited_since(run_dir):
    class Refuses:
        """A counter of the same name that must not be asked while 01's counts still describe the files."""
        name = estimate_counter().name

        def count_messages(self, messages):
            raise AssertionError("pre-flight tokenised a file 01_data had already counted")

    from kokoro_helpers.jsonio import read_json
    saved = read_json(run_dir / "data" / "example_tokens.json")
    pf = preflight(run_dir, counter=Refuses())
    assert pf.example_tokens["train"] == saved["splits"]["train"]["tokens"]
    with open(run_dir / "data" / "train.jsonl", "a", encoding="utf-8") as f:
        f.write(open(run_dir / "data" / "train.jsonl", encoding="utf-8").readline())
    with pytest.raises(AssertionError, match="already counted"):
        preflight(run_dir, counter=Refuses())           # edited: counted again, not trusted
    again = preflight(run_dir, counter=estimate_counter())
    assert again.example_tokens["train"] == saved["splits"]["train"]["tokens"] + saved["splits"]["train"]["tokens"][:1]
