"""Creating a fine-tuning job exactly once: the run-folder lock, the lookup of a job whose creation
answer was lost, and `jobs.create` without blind retries.

`jobs.create` has no idempotency key, so a retry after a lost answer (a 502 or a dropped connection
after the server committed) pays for a second job. Here the create call runs with the client's
retries off; after a transient error or a timeout the job is looked up by the request's metadata
(`kokoro_attempt`, unique per attempt) through *all* pages of `jobs.list` before trying again. A
lookup that fails stops with a message and keeps `pending_job.json` — never a new job.
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from kokoro_helpers.hosted.errors import LookupFailedError, RunLockedError, SERVICE, explain
from kokoro_helpers.retry import is_transient_error

LOCK_NAME = ".02_finetune.lock"
DEFAULT_LOCK_TIMEOUT_S = 120.0
CREATE_ATTEMPTS = 3


# --- the run-folder lock ------------------------------------------------------------------------------

class RunLock:
    """An OS file lock on run_dir/openai/ (filelock: flock on POSIX, msvcrt on Windows), so that two
    runs of 02 on the same folder never create or upload at the same time. A second run waits up to
    `timeout_s`, then stops with a message naming the holder."""

    def __init__(self, run_dir: str | Path, timeout_s: float | None = DEFAULT_LOCK_TIMEOUT_S,
                 what: str = "submitting", name: str = LOCK_NAME):
        from filelock import FileLock
        self.folder = Path(run_dir) / "openai"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / name
        self.info = self.folder / (name + ".holder")
        self.timeout_s = 0 if timeout_s is None else max(0.0, float(timeout_s))
        self.what = what
        self._lock = FileLock(str(self.path), thread_local=False, is_singleton=False)

    def __enter__(self) -> "RunLock":
        from filelock import Timeout
        try:
            self._lock.acquire(timeout=self.timeout_s, poll_interval=0.05)
        except Timeout:
            holder = ""
            try:
                holder = self.info.read_text(encoding="utf-8").strip()
            except OSError:
                pass
            raise RunLockedError(
                f"another run of 02 ({holder or 'holder unknown'}) still held the lock of this run folder "
                f"({self.folder.parent}) after {self.timeout_s:.0f}s: let it finish (or stop it), then run this cell again — "
                "it resumes that run's job instead of creating a second one. Or give this run its own run_dir.") \
                from None
        self.info.write_text(f"{self.what}, pid {os.getpid()}, since {time.strftime('%Y-%m-%dT%H:%M:%S')}",
                             encoding="utf-8")
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.info.unlink(missing_ok=True)
        finally:
            self._lock.release()


# --- finding a job ------------------------------------------------------------------------------------

def without_retries(client: Any) -> Any:
    """The client with the SDK's automatic retries off (for the non-idempotent create calls)."""
    with_options = getattr(client, "with_options", None)
    return with_options(max_retries=0) if callable(with_options) else client


def job_metadata(job: Any) -> dict[str, Any]:
    meta = getattr(job, "metadata", None)
    return dict(meta) if isinstance(meta, dict) else {}


def job_matches(job: Any, pending: dict[str, Any]) -> bool:
    """Whether `job` is the one `pending` describes: its metadata's attempt id, or — on a service that
    drops metadata — the same model, suffix and training file, created since the attempt began."""
    meta = job_metadata(job)
    if meta.get("kokoro_attempt"):
        return meta["kokoro_attempt"] == pending.get("attempt")
    if meta.get("kokoro_request"):
        return False
    body = pending.get("body") or {}
    since = float(pending.get("since_ts") or 0) - 120
    return (bool(body.get("training_file")) and getattr(job, "training_file", None) == body.get("training_file")
            and str(getattr(job, "model", "")).startswith(str(body.get("model", "")))
            and (not body.get("suffix") or body["suffix"] in str(getattr(job, "suffix", "") or body["suffix"]))
            and float(getattr(job, "created_at", 0) or 0) >= since)


def find_job(client: Any, pending: dict[str, Any], provider: str = "openai", page_size: int = 100) -> Any | None:
    """The job of `pending` in the service's job list, through every page (newest first, any status);
    None when it is certainly not there. A failed lookup raises LookupFailedError (never "no job")."""
    try:
        for job in client.fine_tuning.jobs.list(limit=page_size):   # the SDK's cursor pages, all of them
            if job_matches(job, pending):
                return job
    except Exception as exc:  # noqa: BLE001 - any failure means "unknown", not "absent"
        detail = explain(exc, provider, "listing fine-tuning jobs")
        raise LookupFailedError(
            f"a fine-tuning job may already exist for this request (its creation answer was lost), but "
            f"{SERVICE.get(provider, 'OpenAI')}'s job list could not be read: {detail} No new job is created "
            f"until it can be checked; run_dir/openai/pending_job.json is kept. Run the cell again later.",
            getattr(exc, "status_code", None), getattr(exc, "code", None)) from exc
    return None


def new_pending(body: dict[str, Any], fingerprint: str) -> dict[str, Any]:
    from kokoro_helpers.cards import now_iso
    return {"request_fingerprint": fingerprint, "kokoro_request": body.get("metadata", {}).get("kokoro_request"),
            "attempt": uuid.uuid4().hex[:16], "since": now_iso(), "since_ts": time.time(), "body": body}


def create_job_once(client: Any, body: dict[str, Any], pending: dict[str, Any], provider: str = "openai",
                    attempts: int = CREATE_ATTEMPTS, sleep: Callable[[float], None] = time.sleep,
                    log: Callable[[str], None] = print, backoff: float = 2.0) -> Any:
    """`jobs.create(**body)` at most once per job: retries off; after a transient error, look the job up
    (all pages) and only if it is certainly absent try again, up to `attempts` times. Non-transient
    errors are raised as they are (the caller explains them)."""
    create = without_retries(client).fine_tuning.jobs.create
    last: BaseException | None = None
    for attempt in range(1, attempts + 1):
        try:
            return create(**body)
        except Exception as exc:  # noqa: BLE001
            if not is_transient_error(exc):
                raise
            last = exc
            if getattr(exc, "status_code", None) == 429:    # rejected, not committed: no lookup needed
                log("jobs.create was rate-limited (429); trying again shortly")
                if attempt < attempts:
                    sleep(backoff * 2 ** (attempt - 1))
                continue
            log(f"jobs.create got no answer ({type(exc).__name__}"
                f"{' ' + str(exc.status_code) if getattr(exc, 'status_code', None) else ''}); "
                "checking whether the job was created anyway before trying again")
            # wait first: a job the server has just committed can take a moment to appear in its list
            sleep(backoff * 2 ** (attempt - 1))
            job = find_job(client, pending, provider)
            if job is not None:
                log(f"found it: job {job.id} was created; not creating another")
                return job
    err = explain(last, provider, "creating the fine-tuning job") if last else None
    if getattr(last, "status_code", None) == 429:
        raise err from last                                  # rate-limited each time: nothing was created
    raise LookupFailedError(f"{err} (jobs.create got no answer {attempts} times; each time the job list showed "
                            "no such job). run_dir/openai/pending_job.json is kept: the next run checks again "
                            "before creating.") from last
