"""Never pay twice, one short message per failure, and life after the wind-down (Azure OpenAI).

Every test runs the real openai SDK against the stateful fake of tests/fake_openai.py, which fails
like the real services: answers lost after the server committed, list outages, paged lists, failed
orphans, the real 401 body, refused creation, two runs at once.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from kokoro_helpers import cards
from kokoro_helpers.hosted import openai_ft
from kokoro_helpers.models.open import open_model
from kokoro_helpers.hosted.client import FORCE_DRY_RUN_ENV, make_client, resolve_mode
from kokoro_helpers.hosted.errors import (APIFailure, JobEndedError, LookupFailedError, MissingKeyError, OpenAIFTError,
                                          RunLockedError)
from kokoro_helpers.hosted.job_card import job_cards
from kokoro_helpers.hosted.monitor import monitor
from kokoro_helpers.hosted.preflight import fmt_usd, preflight
from kokoro_helpers.hosted.request import write_job_request
from kokoro_helpers.hosted.submit import submit
from kokoro_helpers.report import index as report
from kokoro_helpers.hosted.jobs import RunLock
from kokoro_helpers.models.open import models_from_run
from kokoro_helpers.data.tokens import estimate_counter

from fake_openai import AZURE_API_VERSION, AZURE_ENDPOINT, FakeOpenAI
from test_openai_ft import Sleeps, _data_once, no_key, run_dir, run_ft  # noqa: F401 - fixtures

SK = "sk-" + "proj-KOKOROtestKEY0123456789abcdefWXYZ"
JOBS = r"/fine_tuning/jobs"


def tag_of(run_dir: Path) -> str:
    return json.loads((run_dir / "openai" / "job_request.json").read_text())["request"]["metadata"]["kokoro_request"]


def pending(run_dir: Path) -> Path:
    return run_dir / "openai" / "pending_job.json"


def uploads(fake: FakeOpenAI) -> list[str]:
    return [m["filename"] for m in fake.file_meta.values()]


def short(message: str) -> None:
    """One message: no traceback, no SDK repr, a few lines at most."""
    assert "Traceback" not in message and "Error code:" not in message and "httpx" not in message
    assert len(message) < 900, message


@pytest.fixture
def sk_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SK)
    monkeypatch.delenv(FORCE_DRY_RUN_ENV, raising=False)


# --- jobs.create is never blindly retried ----------------------------------------------------------------

@pytest.mark.parametrize("lost", [502, "drop", "timeout"])
def test_a_create_answer_lost_after_commit_gives_one_job(run_dir, no_key, lost):
    fake = FakeOpenAI()
    fake.fault("POST", JOBS, lost, after_commit=True)          # the job exists; its answer never arrives
    result = run_ft(run_dir, fake.client(max_retries=2))       # the SDK would have retried twice
    assert fake.count("POST", JOBS) == 1 and len(fake.jobs) == 1
    assert result.card["job_id"] in fake.jobs and result.card["status"] == "succeeded"
    assert not pending(run_dir).exists()


def test_a_lost_answer_is_looked_up_after_a_wait_so_a_lagging_job_list_still_finds_the_job(run_dir, no_key):
    """A job the server has just committed can take a moment to show in its list: the client waits
    before looking, so the lookup finds it instead of creating a second job."""
    fake = FakeOpenAI()
    fake.list_lag_s = 1.5                                       # invisible in jobs.list for 1.5 s of waiting
    fake.fault("POST", JOBS, 502, after_commit=True)
    run_ft(run_dir, fake.client(max_retries=2), submit_kwargs={"sleep": fake.sleep})
    assert fake.count("POST", JOBS) == 1 and len(fake.jobs) == 1 and fake.waited >= 1.5


def test_a_list_outage_after_a_lost_answer_stops_with_a_message_and_keeps_the_pending_record(run_dir, no_key):
    fake = FakeOpenAI()
    fake.fault("POST", JOBS, 502, after_commit=True)
    fake.fault("GET", JOBS, 503, times=1000)                    # the list is down, even after SDK retries
    with pytest.raises(LookupFailedError) as info:
        run_ft(run_dir, fake.client(max_retries=1))
    msg = str(info.value)
    short(msg)
    assert "may already exist" in msg and "pending_job.json is kept" in msg and "No new job" in msg
    assert pending(run_dir).exists() and len(fake.jobs) == 1
    # still down: a re-run looks again and stops again — never a second job
    with pytest.raises(LookupFailedError):
        run_ft(run_dir, fake.client(max_retries=0))
    assert fake.count("POST", JOBS) == 1
    fake.faults.clear()
    result = run_ft(run_dir, fake.client())
    assert fake.count("POST", JOBS) == 1 and result.card["job_id"] == next(iter(fake.jobs))
    assert not pending(run_dir).exists()
    errors = (run_dir / "openai" / "errors.jsonl").read_text().splitlines()
    assert errors and json.loads(errors[0])["kind"] == "lookup_failed" and "Traceback" in json.loads(errors[0])["traceback"]


def test_the_orphan_is_found_beyond_the_first_page(run_dir, no_key):
    fake = FakeOpenAI()
    fake.fault("POST", JOBS, "drop", after_commit=True)
    fake.fault("GET", JOBS, 500, times=1000)
    with pytest.raises(LookupFailedError):
        run_ft(run_dir, fake.client(max_retries=0))
    ours = next(iter(fake.jobs))
    fake.faults.clear()
    fake.add_other_jobs(230)                                   # newer jobs push ours to the third page
    before = fake.count("GET", JOBS)
    result = run_ft(run_dir, fake.client())
    assert result.card["job_id"] == ours and fake.count("POST", JOBS) == 1
    assert fake.count("GET", JOBS) - before >= 3               # 100 + 100 + the page holding ours


@pytest.mark.parametrize("ended", ["failed", "cancelled"])
def test_a_failed_or_cancelled_orphan_is_reported_like_a_known_job(run_dir, no_key, ended):
    fake = FakeOpenAI()
    fake.fault("POST", JOBS, 502, after_commit=True)
    fake.fault("GET", JOBS, 503, times=1000)
    with pytest.raises(LookupFailedError):
        run_ft(run_dir, fake.client(max_retries=0))
    orphan = next(iter(fake.jobs))
    fake.fail_job(orphan, status=ended, message="Training file has 3 examples with an unknown role.")
    fake.faults.clear()
    with pytest.raises(JobEndedError) as info:
        run_ft(run_dir, fake.client())
    msg = str(info.value)
    short(msg)
    assert orphan in msg and ended in msg and "openai_new_job: true" in msg and "new_job=True" in msg
    assert fake.count("POST", JOBS) == 1
    (path, card), = job_cards(run_dir)
    assert card["job_id"] == orphan and card["status"] == ended
    if ended == "failed":
        assert "unknown role" in msg and card["error"]["code"] == "invalid_training_file"
    with pytest.raises(JobEndedError):               # known now: the same message, still one job
        run_ft(run_dir, fake.client())
    assert fake.count("POST", JOBS) == 1
    result = run_ft(run_dir, fake.client(), new_job=True)      # only when asked
    assert fake.count("POST", JOBS) == 2 and result.card["job_id"] != orphan


def test_rate_limited_create_is_retried_without_a_second_job(run_dir, no_key):
    fake = FakeOpenAI()
    fake.fault("POST", JOBS, 429, times=2)
    result = run_ft(run_dir, fake.client(max_retries=5))
    assert fake.count("POST", JOBS) == 3 and len(fake.jobs) == 1
    assert result.card["status"] == "succeeded"


# --- uploads once ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lost", [502, "drop"])
def test_a_lost_upload_answer_is_reconciled_not_uploaded_again(run_dir, no_key, lost):
    fake = FakeOpenAI()
    fake.fault("POST", "/files", lost, after_commit=True)
    result = run_ft(run_dir, fake.client(max_retries=2))
    assert fake.count("POST", "/files") == 2 and len(fake.file_meta) == 2     # train + valid, once each
    ledger = json.loads((run_dir / "openai" / "uploads.json").read_text())
    assert {e["status"] for e in ledger.values()} == {"uploaded"}
    assert set(result.card["file_ids"].values()) == set(fake.file_meta)
    sha = result.preflight.sha256["train"]
    assert ledger[sha]["filename"] == f"train.{sha[:12]}.jsonl" in uploads(fake)


def test_an_upload_killed_mid_flight_is_found_by_the_next_run(run_dir, no_key):
    fake = FakeOpenAI()
    fake.fault("POST", "/files", "drop", after_commit=True)
    fake.fault("GET", "/files", 503, times=1000)
    with pytest.raises(LookupFailedError, match="Nothing is uploaded twice"):
        run_ft(run_dir, fake.client(max_retries=0))
    ledger = json.loads((run_dir / "openai" / "uploads.json").read_text())
    assert [e["status"] for e in ledger.values()] == ["pending"]          # written before the bytes were sent
    fake.faults.clear()
    run_ft(run_dir, fake.client())
    assert fake.count("POST", "/files") == 2 and len(fake.file_meta) == 2


# --- two runs at once ----------------------------------------------------------------------------------------

def test_two_runs_on_one_folder_create_one_job(run_dir, no_key):
    fake = FakeOpenAI()
    results, errors = [], []

    def second_run():
        try:
            results.append(run_ft(run_dir, fake.client()))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    other = threading.Thread(target=second_run)

    def while_creating():                    # the second 02 starts while the first one is inside create
        other.start()
        time.sleep(0.5)

    fake.on_create = while_creating
    first = run_ft(run_dir, fake.client())
    other.join(60)
    assert not errors and len(results) == 1
    assert fake.count("POST", JOBS) == 1 and len(fake.jobs) == 1
    assert results[0].card["job_id"] == first.card["job_id"]


def test_a_second_run_that_cannot_wait_stops_with_a_message(run_dir, no_key):
    fake = FakeOpenAI()
    pf = preflight(run_dir, counter=estimate_counter())
    req = write_job_request(pf, "submit", max_training_cost_usd=5)
    with RunLock(run_dir, what="submitting"):
        with pytest.raises(RunLockedError) as info:
            submit(req, fake.client(), log=lambda m: None, lock_timeout_s=0.2)
    short(str(info.value))
    assert "another run of 02" in str(info.value) and "pid" in str(info.value)
    assert fake.calls == []


# --- one message per failure -------------------------------------------------------------------------------

def test_a_wrong_key_gets_one_message_naming_where_the_key_comes_from(run_dir, sk_key, capsys):
    fake = FakeOpenAI(key="sk-" + "proj-the-right-one-000000000000")
    part = openai_ft.PartA(run_dir, client=fake.client(key=SK))
    pf = preflight(run_dir, counter=estimate_counter())
    assert part.resolve_mode("auto") == "submit"
    req = write_job_request(pf, "submit", max_training_cost_usd=5)
    assert part.submit(req) is None and part.monitor() is None
    out = capsys.readouterr().out
    assert "401" in out and "OPENAI_API_KEY" in out and ".env" in out and "dry_run" in out and "Part B" in out
    short(out)
    outcome = openai_ft.read_outcome(run_dir)
    assert outcome["status"] == "api_error" and "401" in outcome["message"]
    everything = out + "".join(p.read_text(errors="ignore") for p in run_dir.rglob("*") if p.is_file())
    assert SK not in everything and SK[-4:] + "." not in everything    # not even the masked echo
    assert "invalid_api_key" in (run_dir / "openai" / "errors.jsonl").read_text()


@pytest.mark.parametrize("status,words", [(403, "permissions"), (404, "does not exist"), (429, "wait"),
                                          (500, "outage"), (503, "outage")])
def test_each_api_failure_is_one_short_message(run_dir, no_key, capsys, status, words):
    fake = FakeOpenAI()
    fake.fault("GET", r"/fine_tuning/jobs/[^/]+", status, times=1000)
    part = openai_ft.PartA(run_dir, client=fake.client(max_retries=1))
    pf = preflight(run_dir, counter=estimate_counter())
    part.resolve_mode("submit")
    assert part.submit(write_job_request(pf, "submit", max_training_cost_usd=5))
    card = part.monitor(poll_seconds=0, sleep=Sleeps(), max_errors=2, progress=False)
    assert card is None
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("Part A stopped"))
    short(line)
    assert words in line, line
    assert openai_ft.read_outcome(run_dir)["stage"] == "monitor"


def test_a_failed_job_and_the_cost_guard_are_one_message_each(run_dir, no_key, capsys):
    fake = FakeOpenAI(fail_with={"code": "invalid_training_file", "message": "3 examples have an unknown role.",
                                 "param": "training_file"})
    part = openai_ft.PartA(run_dir, client=fake.client())
    pf = preflight(run_dir, counter=estimate_counter())
    part.resolve_mode("submit")
    part.submit(write_job_request(pf, "submit", max_training_cost_usd=5))
    assert part.monitor(poll_seconds=0, sleep=Sleeps(), progress=False) is None
    out = capsys.readouterr().out
    assert "invalid_training_file" in out and "openai_new_job" in out and "Traceback" not in out
    assert openai_ft.read_outcome(run_dir)["status"] == "failed"
    part2 = openai_ft.PartA(run_dir, client=fake.client())
    part2.resolve_mode("submit")
    pf2 = preflight(run_dir, counter=estimate_counter(), n_epochs=9)
    assert part2.submit(write_job_request(pf2, "submit", max_training_cost_usd=0.0001)) is None
    out = capsys.readouterr().out
    assert "cost guard refuses" in out and "$0.0001" in out and "no job was created" in out
    assert openai_ft.read_outcome(run_dir)["status"] == "cost_guard"


def test_a_refused_creation_explains_the_wind_down_and_points_to_azure_and_part_b(run_dir, sk_key, capsys):
    fake = FakeOpenAI(refuse_creation=True)
    part = openai_ft.PartA(run_dir, client=fake.client(key=SK))
    pf = preflight(run_dir, counter=estimate_counter())
    part.resolve_mode("auto")
    assert part.submit(write_job_request(pf, "submit", max_training_cost_usd=5)) is None
    assert part.monitor() is None
    out = capsys.readouterr().out
    short(next(l for l in out.splitlines() if l.startswith("Part A stopped")))
    assert "refused to create" in out and "2027-01-06" in out and "reported" in out
    assert "openai_provider: azure" in out and "AZURE_OPENAI_ENDPOINT" in out and "Part B" in out
    assert "model_not_available" in out and "retrying will not help" in out
    assert fake.count("POST", JOBS) == 1 and not fake.jobs and not pending(run_dir).exists()
    assert openai_ft.read_outcome(run_dir)["status"] == "refused"
    # the report index shows Part A's outcome with its message
    figures = report.key_figures(run_dir)
    assert "refused" in figures["02"] and "2027-01-06" in figures["02"]
    assert SK not in out


def test_a_missing_key_for_submit_continues_as_a_dry_run(run_dir, no_key, capsys):
    part = openai_ft.PartA(run_dir)
    assert part.resolve_mode("submit") == "dry_run"
    pf = preflight(run_dir, counter=estimate_counter())
    assert part.submit(write_job_request(pf, "dry_run")) is None
    out = capsys.readouterr().out
    assert "OPENAI_API_KEY is not set" in out and "Part A stopped (mode)" in out
    assert openai_ft.read_outcome(run_dir)["status"] == "no_key"


# --- Azure OpenAI --------------------------------------------------------------------------------------------

@pytest.fixture
def azure_env(monkeypatch):
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", AZURE_ENDPOINT)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "azure-KOKORO-test-key-5a5a5a5a5a5a")
    monkeypatch.setenv("OPENAI_API_VERSION", AZURE_API_VERSION)
    monkeypatch.setenv("OPENAI_API_KEY", "")
    monkeypatch.delenv(FORCE_DRY_RUN_ENV, raising=False)


def test_azure_runs_the_same_steps_and_finds_a_lost_job_without_metadata(run_dir, azure_env, monkeypatch, capsys):
    fake = FakeOpenAI(key="azure-KOKORO-test-key-5a5a5a5a5a5a", azure=True)
    fake.fault("POST", JOBS, 502, after_commit=True)
    import httpx2
    import openai

    real = openai.AzureOpenAI

    def azure_via_fake(**kwargs):                     # the environment's endpoint, the fake's transport
        return real(http_client=httpx2.Client(transport=httpx2.MockTransport(fake.handler)), **kwargs)

    monkeypatch.setattr(openai, "AzureOpenAI", azure_via_fake)
    assert resolve_mode("auto", provider="azure") == "submit"
    part = openai_ft.PartA(run_dir, provider="azure", azure_deployment="kokoro-ft")
    pf = preflight(run_dir, counter=estimate_counter(), provider="azure")
    assert pf.prices.source.startswith("Azure") and pf.estimate.price_per_1m == 3.30
    part.resolve_mode("auto")
    req = write_job_request(pf, part.mode, max_training_cost_usd=5)
    path = part.submit(req)
    card = part.monitor(poll_seconds=0, sleep=Sleeps(), progress=False)
    assert path and card["status"] == "succeeded" and card["provider"] == "azure"
    assert fake.count("POST", JOBS) == 1 and len(fake.jobs) == 1
    assert card["azure_deployment"] == "kokoro-ft" and "DEPLOYED" in card["usage_instructions"]
    assert card["actual_cost"]["usd"] == pytest.approx(12_345 * 3.30 / 1e6, abs=1e-6)
    # using it: through the deployment, not the model id
    reply = open_model(card).reply([{"role": "user", "content": "こんにちは"}])
    assert reply and fake.calls[-1] == ("POST", "/deployments/kokoro-ft/chat/completions")
    with pytest.raises(OpenAIFTError, match="deployment"):
        open_model({**card, "azure_deployment": None})
    assert "azure-KOKORO-test-key" not in capsys.readouterr().out


def test_azure_without_its_environment_names_the_variables(run_dir, no_key, monkeypatch):
    for name in ("AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY", "OPENAI_API_VERSION"):
        monkeypatch.setenv(name, "")
    assert resolve_mode("auto", provider="azure") == "dry_run"
    with pytest.raises(MissingKeyError) as info:
        make_client(provider="azure")
    assert all(n in str(info.value) for n in ("AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY", "OPENAI_API_VERSION"))
    with pytest.raises(ValueError, match="openai_provider"):
        resolve_mode("auto", provider="bedrock")


# --- events, amounts, wording ---------------------------------------------------------------------------------

def test_events_sharing_a_second_print_oldest_first_ties_by_id(run_dir, no_key):
    fake = FakeOpenAI(plan=("validating_files", "running", "succeeded"))
    fake._tick = lambda: int(time.time())                     # every event in the same second
    lines: list[str] = []
    pf = preflight(run_dir, counter=estimate_counter())
    path = submit(write_job_request(pf, "submit", max_training_cost_usd=5), fake.client(),
                            log=lambda m: None)
    monitor(path, fake.client(), poll_seconds=0, progress=False, sleep=Sleeps(), log=lines.append,
                      print_every=1)
    steps = [int(l.split()[1].split("/")[0]) for l in lines if l.startswith("step ")]
    assert steps == sorted(steps) and steps
    card = cards.load_card(path)
    events = [json.loads(l) for l in (run_dir / card["monitor"]["events_file"]).read_text().splitlines()]
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)


def test_amounts_keep_enough_digits():
    assert fmt_usd(0.0001) == "$0.0001"
    assert fmt_usd(0.015) == "$0.015"
    assert fmt_usd(0.5) == "$0.50"
    assert fmt_usd(1234.5) == "$1,234.50"
    assert fmt_usd(0) == "$0.00"


def test_03_uses_an_azure_card_through_its_deployment(tmp_path, azure_env):
    card = cards.new_card("openai", "gpt-4o-mini-2024-07-18.ft-0001", "gpt-4o-mini-2024-07-18", {},
                          provider="azure", azure_deployment=None, job_id="ftjob-1", status="succeeded")
    path = cards.save_card(cards.card_path(tmp_path, "openai-kokoro-chat-ftjob-1"), card)
    notes: list[str] = []
    fake = FakeOpenAI(azure=True)
    assert models_from_run(tmp_path, client=fake.client(), log=notes.append) == []
    assert any("azure_deployment" in n for n in notes)
    cards.update_card(path, azure_deployment="kokoro-ft")
    (responder,) = models_from_run(tmp_path, client=fake.client(), log=notes.append)
    assert responder.name == card["model_id"] and responder.model == "kokoro-ft"


def test_azure_prices_have_a_source_a_date_and_are_validated():
    import copy

    from kokoro_helpers.report.prices import PriceError, load_prices, validate_prices
    table = load_prices()
    az = table.for_provider("azure")
    assert az.source.startswith("Azure OpenAI pricing page") and az.as_of == "2026-11"
    assert az.entry("gpt-4o-mini-2024-07-18")["training"] == 3.30
    assert az.entry("gpt-4o-mini-2024-07-18")["hosting_per_hour"] == 1.70
    assert table.for_provider("openai") is table and table.entry("gpt-4o-mini-2024-07-18")["training"] == 3.00
    assert az.jpy_per_usd == table.jpy_per_usd
    bad = copy.deepcopy(table.raw)
    bad["azure"]["models"]["gpt-4o-mini-2024-07-18"]["training"] = "cheap"
    with pytest.raises(PriceError, match="azure.models.gpt-4o-mini-2024-07-18.training"):
        validate_prices(bad)
    del bad["azure"]
    validate_prices(bad)                                   # the section is optional
    from kokoro_helpers.report.prices import PriceTable
    with pytest.raises(PriceError, match="no `azure:` prices"):
        PriceTable(raw=bad).for_provider("azure")


def test_create_rate_limited_every_time_is_one_message_and_no_job(run_dir, no_key):
    fake = FakeOpenAI()
    fake.fault("POST", JOBS, 429, times=100)
    with pytest.raises(APIFailure) as info:
        run_ft(run_dir, fake.client(max_retries=3))
    short(str(info.value))
    assert "429" in str(info.value) and "nothing is created twice" in str(info.value)
    assert fake.count("POST", JOBS) == 3 and not fake.jobs          # our 3 tries, none by the SDK


def test_a_pending_record_of_another_request_is_kept_aside(run_dir, no_key):
    fake = FakeOpenAI()
    (run_dir / "openai").mkdir(parents=True)
    pending(run_dir).write_text(json.dumps({"request_fingerprint": "f" * 64, "attempt": "abc"}))
    run_ft(run_dir, fake.client())
    assert (run_dir / "openai" / f"pending_job.{'f' * 12}.json").exists() and not pending(run_dir).exists()
    assert fake.count("POST", JOBS) == 1


def test_the_lock_holds_across_processes(run_dir, no_key):
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom kokoro_helpers.hosted.jobs import RunLock\n"
         "with RunLock(sys.argv[1], what='submitting'):\n    print('held', flush=True)\n    time.sleep(30)\n",
         str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=root,
        env={**__import__("os").environ, "PYTHONPATH": str(root)})
    try:
        assert holder.stdout.readline().strip() == "held"
        fake = FakeOpenAI()
        pf = preflight(run_dir, counter=estimate_counter())
        req = write_job_request(pf, "submit", max_training_cost_usd=5)
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            submit(req, fake.client(), log=lambda m: None, lock_timeout_s=0.3)
        assert fake.calls == []
    finally:
        holder.kill()
        holder.wait()
    path = submit(req, fake.client(), log=lambda m: None, lock_timeout_s=5)   # released with the process
    assert path.is_file() and fake.count("POST", JOBS) == 1
