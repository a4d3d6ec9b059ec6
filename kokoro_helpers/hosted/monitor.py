"""Following an OpenAI fine-tuning job to its end, resumably: status transitions, training-loss events
(with a progress bar), transient errors waited out, the monitor's place kept in the card; and on
success the model id, trained tokens, actual cost, checkpoints and the result file recorded."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from kokoro_helpers import cards
from kokoro_helpers.hosted.errors import SERVICE, APIFailure, JobFailedError, OpenAIFTError, explain
from kokoro_helpers.hosted.job_card import usage_instructions
from kokoro_helpers.hosted.jobs import RunLock
from kokoro_helpers.hosted.records import as_json_data, iso_time, openai_dir
from kokoro_helpers.hosted.results import summarize_metrics
from kokoro_helpers.jsonio import atomic_write
from kokoro_helpers.report.costs import actual_training_cost
from kokoro_helpers.report.prices import load_prices
from kokoro_helpers.retry import is_transient_error

TERMINAL = ("succeeded", "failed", "cancelled")
MAX_EVENT_PAGES = 100            # 10,000 events per poll at most, whatever a broken server says


class JobMonitor:
    """Follow a job from its card until it ends: status transitions, training-loss events (with a
    progress bar), transient errors retried with backoff, state kept in the card so a new monitor
    (after a kernel restart) picks up where the last one stopped. On success the card gets the
    model id, trained tokens, actual cost, checkpoints and the result-file metrics."""

    def __init__(self, card_path: str | Path, client: Any, poll_seconds: float = 30.0, progress: bool = True,
                 sleep: Callable[[float], None] = time.sleep, max_errors: int = 30,
                 backoff: tuple[float, float] = (2.0, 300.0), log: Callable[[str], None] = print,
                 print_every: int | None = None):
        self.path = Path(card_path)
        self.client = client
        self.poll_seconds = float(poll_seconds)
        self.progress = progress
        self.sleep = sleep
        self.max_errors = max_errors
        self.backoff = backoff
        self._log = log
        self.print_every = print_every
        self.card = cards.load_card(self.path)
        if not self.card.get("job_id"):
            raise OpenAIFTError(f"{self.path} is not an OpenAI job card (no job_id)")
        self.job_id = self.card["job_id"]
        self.run_dir = self.path.parent.parent
        self.bar = None
        self.errors_in_a_row = 0

    # output through the bar when there is one, so lines and the bar don't garble each other
    def log(self, msg: str) -> None:
        if self.bar is not None and not getattr(self.bar, "disable", True):
            self.bar.write(msg)
        else:
            self._log(msg)

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """fn(...) retried on transient errors (after the SDK's own retries) with exponential backoff."""
        # not a copy of the SDK's retries: those span seconds, while a job runs for hours, so an outage of
        # minutes is waited out here (up to max_errors in a row, backoff up to 5 min) and then one message
        while True:
            try:
                out = fn(*args, **kwargs)
                self.errors_in_a_row = 0
                return out
            except Exception as exc:
                if not is_transient_error(exc):
                    raise
                self.errors_in_a_row += 1
                if self.errors_in_a_row > self.max_errors:
                    provider = self.card.get("provider", "openai")
                    why = explain(exc, provider, f"following job {self.job_id}")
                    raise APIFailure(f"{why} (gave up after {self.max_errors} errors in a row; the job itself "
                                     f"continues at {SERVICE.get(provider, 'OpenAI')}, and re-running resumes it)",
                                     getattr(exc, "status_code", None), getattr(exc, "code", None)) from exc
                delay = min(self.backoff[1], self.backoff[0] * 2 ** (self.errors_in_a_row - 1))
                self.log(f"transient error ({type(exc).__name__}: {getattr(exc, 'status_code', '') or 'no status'}); "
                         f"retrying in {delay:.0f}s")
                self.sleep(delay)

    def _save(self, **fields: Any) -> None:
        self.card = cards.update_card(self.path, **fields)

    def _status(self, job: Any) -> None:
        status = job.status
        if status != self.card.get("status"):
            history = list(self.card.get("status_history") or []) + [{"status": status, "time": cards.now_iso()}]
            self.log(f"status: {self.card.get('status')} → {status}")
            self._save(status=status, status_history=history,
                       usage_instructions=usage_instructions(job.fine_tuned_model, self.job_id, status,
                                                 self.card.get("provider", "openai"), self.card.get("azure_deployment")))
        if self.bar is not None:
            self.bar.set_description(f"{self.job_id} {status}")

    def _new_events(self) -> list[Any]:
        """Events newer than the last one seen, oldest first. OpenAI lists events newest first; the
        SDK's cursor pages go backwards: page until a seen event (each page fetch waited out on its own)."""
        state = self.card.get("monitor") or {}
        last_at, last_ids = state.get("last_event_at"), set(state.get("last_event_ids") or [])

        def seen(ev: Any) -> bool:
            return last_at is not None and (ev.created_at < last_at or (ev.created_at == last_at and ev.id in last_ids))

        new: list[Any] = []
        page = self._call(self.client.fine_tuning.jobs.list_events, self.job_id, limit=100)
        for _ in range(MAX_EVENT_PAGES):
            data = list(page.data or [])
            fresh = [ev for ev in data if not seen(ev)]
            new.extend(fresh)
            if len(fresh) < len(data) or not page.has_next_page():
                break
            page = self._call(page.get_next_page)
        unique = {ev.id: ev for ev in new}
        return sorted(unique.values(), key=lambda ev: (ev.created_at, str(ev.id)))   # oldest first, ties by id

    def _events(self) -> None:
        events = self._new_events()
        if not events:
            return
        events_file = self.run_dir / (self.card.get("monitor") or {}).get("events_file", f"openai/{self.job_id}_events.jsonl")
        events_file.parent.mkdir(parents=True, exist_ok=True)
        with open(events_file, "a", encoding="utf-8") as f:
            for ev in events:
                f.write(json.dumps(as_json_data(ev), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for ev in events:
            data = ev.data if isinstance(getattr(ev, "data", None), dict) else {}
            if getattr(ev, "type", None) == "metrics" and "step" in data:
                step, total = int(data["step"]), data.get("total_steps")
                if self.bar is not None:
                    if total and self.bar.total != total:
                        self.bar.total = int(total)
                    self.bar.n = step
                    post = {k: round(float(data[k]), 4) for k in ("train_loss", "valid_loss") if data.get(k) is not None}
                    self.bar.set_postfix(post, refresh=True)
                every = self.print_every or max(1, int(total or 100) // 20)
                if step == 1 or step % every == 0 or (total and step == total):
                    losses = ", ".join(f"{k}={float(data[k]):.4f}" for k in ("train_loss", "valid_loss", "full_valid_loss")
                                       if data.get(k) is not None)
                    self.log(f"step {step}{f'/{total}' if total else ''}: {losses}")
            else:
                flag = "" if getattr(ev, "level", "info") == "info" else f"[{ev.level}] "
                self.log(f"{iso_time(ev.created_at)} {flag}{ev.message}")
        last_at = max(ev.created_at for ev in events)
        prev = self.card.get("monitor") or {}
        ids = [ev.id for ev in events if ev.created_at == last_at]
        if prev.get("last_event_at") == last_at:
            ids = list(dict.fromkeys(list(prev.get("last_event_ids") or []) + ids))
        self._save(monitor={**prev, "last_event_at": last_at, "last_event_ids": ids})

    def run(self, timeout_s: float | None = None, lock_timeout_s: float | None = 120.0) -> dict[str, Any]:
        """Poll until the job ends (or `timeout_s` passes: then return; re-run to resume). One monitor
        per job at a time: a second one waits for the job's lock up to `lock_timeout_s`, then stops
        with a message (the job is not affected)."""
        with RunLock(self.run_dir, lock_timeout_s, what=f"monitoring job {self.job_id}",
                     name=f".monitor-{self.job_id}.lock"):
            self.card = cards.load_card(self.path)     # the other monitor may have moved it on
            return self._run(timeout_s)

    def _run(self, timeout_s: float | None = None) -> dict[str, Any]:
        if self.card.get("status") in TERMINAL and self.card.get("finalized"):
            self.log(f"job {self.job_id} already {self.card['status']} ({self.path})")
            if self.card["status"] == "failed":
                self._raise_failed(self.card.get("error") or {})
            return self.card
        start = time.monotonic()
        if self.progress:
            from kokoro_helpers.progress import tqdm
            self.bar = tqdm(total=None, desc=f"{self.job_id} {self.card.get('status')}", unit="step")
        try:
            while True:
                job = self._call(self.client.fine_tuning.jobs.retrieve, self.job_id)
                self._status(job)
                self._events()
                if job.status in TERMINAL:
                    break
                if timeout_s is not None and time.monotonic() - start > timeout_s:
                    self.log(f"still {job.status} after {timeout_s:.0f}s; the job continues at OpenAI — "
                             "re-run monitor() to resume")
                    return self.card
                self.sleep(self.poll_seconds)
        except KeyboardInterrupt:
            self.log(f"interrupted: job {self.job_id} continues at OpenAI; re-run monitor() (or the notebook) "
                     f"to resume, or cancel it with kokoro_helpers.hosted.submit.cancel('{self.path}', client)")
            raise
        finally:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
        return self.finalize(job)

    def _raise_failed(self, err: dict[str, Any]) -> None:
        raise JobFailedError(self.job_id, err.get("code"), err.get("message"), err.get("param"),
                             provider=self.card.get("provider", "openai"))

    def finalize(self, job: Any) -> dict[str, Any]:
        """Record how the job ended. Cheap, essential fields are saved first, then the downloads."""
        if job.status == "failed":
            err = as_json_data(job.error) if job.error is not None else {}
            self._save(error=err, finished_at=iso_time(job.finished_at), finalized=True)
            self._raise_failed(err or {})
        if job.status == "cancelled":
            self._save(finished_at=iso_time(job.finished_at), finalized=True)
            self.log(f"job {self.job_id} was cancelled; nothing more to record")
            return self.card
        hp = as_json_data(getattr(getattr(getattr(job, "method", None), "supervised", None), "hyperparameters", None)) \
            or as_json_data(getattr(job, "hyperparameters", None)) or {}
        params = dict(self.card.get("training_params") or {})
        for ours, theirs in (("epochs", "n_epochs"), ("batch_size", "batch_size"),
                             ("learning_rate_multiplier", "learning_rate_multiplier")):
            if hp.get(theirs) not in (None, "auto"):
                params[ours] = hp[theirs]
        fields: dict[str, Any] = dict(
            model_id=job.fine_tuned_model, trained_tokens=job.trained_tokens, finished_at=iso_time(job.finished_at),
            training_params=params, result_files=list(job.result_files or []),
            usage_instructions=usage_instructions(job.fine_tuned_model, self.job_id, job.status,
                                      self.card.get("provider", "openai"), self.card.get("azure_deployment")))
        if job.trained_tokens:
            try:
                table = load_prices(self.card.get("prices_file")).for_provider(self.card.get("provider", "openai"))
                cost = actual_training_cost(job.trained_tokens, table.training_price(self.card["base_model"]),
                                            table.jpy_per_usd, table.as_of)
                fields["actual_cost"] = {"usd": round(cost.usd, 6), "jpy": round(cost.jpy, 2),
                                         "is_estimate": False, "label": cost.label, "fx": table.fx_label}
            except Exception as exc:  # a missing price must not lose the model id
                fields["actual_cost"] = {"error": f"could not price: {exc}"}
        self._save(**fields)
        self.log(f"job {self.job_id} succeeded: model {job.fine_tuned_model}, "
                 f"{job.trained_tokens or 0:,} trained tokens")
        try:
            page = self._call(self.client.fine_tuning.jobs.checkpoints.list, self.job_id)
            checkpoints = [{"id": c.id, "step_number": c.step_number,
                            "fine_tuned_model_checkpoint": c.fine_tuned_model_checkpoint,
                            "metrics": as_json_data(c.metrics)} for c in (page.data or [])]
            self._save(checkpoints=sorted(checkpoints, key=lambda c: c["step_number"]))
        except Exception as exc:  # the model id is saved already; a later monitor() retries this
            self.log(f"checkpoints not recorded ({type(exc).__name__}: {exc}); re-run monitor() to retry")
            return self.card
        if job.result_files:
            try:
                metrics_path = self.download_results(job.result_files[0])
                summary = summarize_metrics(metrics_path)
                summary["metrics_file"] = str(metrics_path.relative_to(self.run_dir))
                self._save(training_metrics=summary)
            except Exception as exc:  # as above: retried by the next monitor()
                self.log(f"result file not downloaded ({type(exc).__name__}: {exc}); re-run monitor() to retry")
                return self.card
        self._save(finalized=True)
        return self.card

    def download_results(self, file_id: str) -> Path:
        """Save the job's result file (CSV: step, train_loss, ...) to run_dir/openai/<job>_results.csv."""
        resp = self._call(self.client.files.content, file_id)
        content = resp.content if hasattr(resp, "content") else resp.read()
        if isinstance(content, str):
            content = content.encode("utf-8")
        # OpenAI has served this file base64-encoded at times; decode when it is not CSV text
        if not content.lstrip().startswith(b"step"):
            import base64
            import binascii
            try:
                decoded = base64.b64decode(content, validate=True)
                if decoded.lstrip().startswith(b"step"):
                    content = decoded
            except (binascii.Error, ValueError):
                pass
        path = openai_dir(self.run_dir) / f"{self.job_id}_results.csv"
        with atomic_write(path, "wb") as f:
            f.write(content)
        self.log(f"metrics saved to {path}")
        return path


def monitor(card_path: str | Path, client: Any, poll_seconds: float = 30.0, progress: bool = True,
            timeout_s: float | None = None, **kwargs: Any) -> dict[str, Any]:
    """Follow the card's job until it ends and return the final card (see JobMonitor). Safe to call
    again at any time: it resumes from the card. A failed job raises JobFailedError with OpenAI's
    error code and message."""
    lock_timeout_s = kwargs.pop("lock_timeout_s", 120.0)
    return JobMonitor(card_path, client, poll_seconds=poll_seconds, progress=progress, **kwargs).run(
        timeout_s, lock_timeout_s=lock_timeout_s)

