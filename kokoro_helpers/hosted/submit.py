"""Submitting an OpenAI fine-tuning job, never twice: under the run folder's lock, resume this exact
request's job if it has one, adopt a job whose creation answer was lost, apply the cost guard, upload
each file once (hosted.uploads), create the job once (hosted.jobs) and write its card at once; and
cancelling a job."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from kokoro_helpers import cards
from kokoro_helpers.hosted import uploads
from kokoro_helpers.hosted.errors import (KEY_ENV, NEW_JOB_HINT, SERVICE, CostGuardError, CreationRefusedError,
                                          JobEndedError, OpenAIFTError, explain, is_creation_refused,
                                          record_failure, redact, refused_message, server_message)
from kokoro_helpers.hosted.job_card import job_cards, usage_instructions, write_job_card
from kokoro_helpers.hosted.jobs import RunLock, create_job_once, find_job, new_pending
from kokoro_helpers.hosted.records import openai_dir, read_record
from kokoro_helpers.hosted.request import JobRequest
from kokoro_helpers.jsonio import write_json_atomic

LOCAL_HINT_TEXT = "Part B of 02_finetune (local LoRA) does not depend on it."


def _ended_message(card: dict[str, Any], path: Path, found: str = "") -> str:
    err = card.get("error") or {}
    detail = f" ({err.get('code')}: {redact(err.get('message'))})" if err else ""
    return (f"The last fine-tuning job for this exact request, {card['job_id']}{found}, ended "
            f"{card.get('status')}{detail}; no new job was created (nothing is paid twice). Fix the cause (or change "
            f"the request), then {NEW_JOB_HINT} to start another — from Python: "
            f"submit(req, client, new_job=True). Card: {path}. {LOCAL_HINT_TEXT}")


def _check_cards(req: JobRequest) -> None:
    unreadable = []
    for card_file in sorted(cards.models_dir(req.run_dir).glob("openai-*.json")):
        try:
            cards.load_card(card_file)
        except cards.CardError:
            unreadable.append(card_file)
    if unreadable:   # it may hold the id of a running job: creating another could pay twice
        raise OpenAIFTError(f"model card {unreadable[0]} is unreadable and may hold a running job's id: "
                            "repair it (or move it away if you are sure) before submitting")


def submit(req: JobRequest, client: Any, new_job: bool = False, log: Callable[[str], None] = print,
           azure_deployment: str | None = None, lock_timeout_s: float | None = 120.0,
           sleep: Callable[[float], None] = time.sleep) -> Path:
    """Create the job for `req` — or resume the one this exact request already has — and return its
    card's path. Under the run folder's lock: resume check, lost-answer lookup, cost guard, upload
    once, create once, card (immediately). `new_job=True` (the notebook's `openai_new_job`) starts a
    fresh job when the last one for this request failed or was cancelled. API failures are raised
    as one-message OpenAIFTErrors (details in run_dir/openai/errors.jsonl)."""
    if req.mode != "submit":
        raise OpenAIFTError("this request was written in dry-run mode: nothing is submitted "
                            f"(set openai_mode='submit' or 'auto' with {KEY_ENV[req.preflight.provider]} set)")
    provider = req.preflight.provider
    with RunLock(req.run_dir, lock_timeout_s, what="submitting a fine-tuning job"):
        try:
            return _submit_locked(req, client, new_job, log, provider, azure_deployment, sleep)
        except OpenAIFTError as err:
            record_failure(req.run_dir, err, err.__cause__ or err, stage="submit", provider=provider)
            err._recorded = True  # type: ignore[attr-defined]
            raise
        except Exception as exc:  # an SDK error: one message, the details to errors.jsonl
            import openai
            if not isinstance(exc, openai.APIError):      # not the API's: raised as it is (PartA explains it)
                raise
            err = explain(exc, provider, "submitting the fine-tuning job")
            record_failure(req.run_dir, err, exc, stage="submit", provider=provider)
            err._recorded = True  # type: ignore[attr-defined]
            raise err from exc


def _submit_locked(req: JobRequest, client: Any, new_job: bool, log: Callable[[str], None], provider: str,
                   azure_deployment: str | None, sleep: Callable[[float], None]) -> Path:
    _check_cards(req)
    existing = job_cards(req.run_dir, req.fingerprint)
    if existing:
        path, card = existing[0]
        status = card.get("status")
        if status not in ("failed", "cancelled"):
            if provider == "azure" and azure_deployment and card.get("azure_deployment") != azure_deployment:
                card = cards.update_card(path, azure_deployment=azure_deployment, usage_instructions=usage_instructions(
                    card.get("model_id"), card["job_id"], status, provider, azure_deployment))
            what = f"model {card['model_id']}" if card.get("model_id") else f"status {status}"
            log(f"Resuming job {card['job_id']} of this request ({what}) from {path} — no new job created.")
            return path
        if not new_job:
            raise JobEndedError(_ended_message(card, path))

    pending_path = openai_dir(req.run_dir) / "pending_job.json"
    pending = read_record(pending_path, default=None)
    if pending and pending.get("request_fingerprint") == req.fingerprint:
        job = find_job(client, pending, provider)        # a failed lookup stops here, the record kept
        if job is not None:
            file_ids = {k: v for k, v in {"train": job.training_file,
                                          "valid": getattr(job, "validation_file", None)}.items() if v}
            path = write_job_card(req, job, file_ids, azure_deployment)
            pending_path.unlink(missing_ok=True)
            if job.status in ("failed", "cancelled"):
                if not new_job:
                    raise JobEndedError(_ended_message(cards.load_card(path), path,
                                                       " (created by an earlier run whose answer was lost)"))
            else:
                log(f"Adopted job {job.id}, created by an earlier run whose answer was lost; card {path}")
                return path
        else:
            log("an earlier run's job creation left no job at the service; creating it now")
    elif pending:   # another request's attempt: kept aside (its job, if any, is not this request's)
        aside = pending_path.with_name(f"pending_job.{str(pending.get('request_fingerprint', 'x'))[:12]}.json")
        os.replace(pending_path, aside)
        log(f"an earlier, different request left {pending_path.name}; kept as {aside.name} "
            "(check the job list for its job before paying for it again)")
    if not req.guard_passes:
        raise CostGuardError(req.guard_message())
    log(req.guard_message())

    file_ids = {split: uploads.upload_once(client, p, req.run_dir, log=log, provider=provider, sleep=sleep)
                for split, p in req.preflight.files.items()}
    req.write(file_ids)
    pending = new_pending(req.body, req.fingerprint)
    body = {**req.body, "metadata": {**req.body["metadata"], "kokoro_attempt": pending["attempt"]}}
    pending["body"] = body
    write_json_atomic(pending_path, pending)            # before the request: a lost answer is found later
    try:
        job = create_job_once(client, body, pending, provider, sleep=sleep, log=log)
    except Exception as exc:
        if is_creation_refused(exc):
            pending_path.unlink(missing_ok=True)         # refused: certainly no job
            raise CreationRefusedError(refused_message(provider, server_message(exc),
                                                       getattr(exc, "code", None)),
                                       getattr(exc, "status_code", None), getattr(exc, "code", None)) from exc
        if getattr(exc, "status_code", None) in (400, 401, 403, 404, 422):
            pending_path.unlink(missing_ok=True)         # an answer came back: no job was created
        raise
    path = write_job_card(req, job, file_ids, azure_deployment)   # the job id is safe on disk from here on
    pending_path.unlink(missing_ok=True)
    log(f"Created job {job.id} ({job.status}) at {SERVICE[provider]}; card {path}")
    return path


def cancel(card_path: str | Path, client: Any) -> dict[str, Any]:
    """Cancel the card's job (one call) and record it in the card."""
    card = cards.load_card(card_path)
    job = client.fine_tuning.jobs.cancel(card["job_id"])
    history = list(card.get("status_history") or []) + [{"status": job.status, "time": cards.now_iso(), "by": "cancel()"}]
    card = cards.update_card(card_path, status=job.status, status_history=history)
    print(f"Cancel requested for {card['job_id']}: status {job.status}")
    return card

