"""OpenAI (or Azure OpenAI) supervised fine-tuning, the whole of 02_finetune's Part A: `finetune(...)`
runs the steps in turn, and `PartA` runs them for the notebook, turning any failure into one printed
message and a recorded outcome, so Part B always runs.

    pf   = preflight(run_dir, base_model, n_epochs, max_example_tokens, provider=...)  # hosted.preflight
    mode = resolve_mode(openai_mode, provider=...)             # hosted.client: "submit" | "dry_run"
    req  = write_job_request(pf, mode, batch_size=..., suffix=..., seed=..., max_training_cost_usd=...)
    if mode == "submit":
        client = make_client(provider=...)     # hosted.client: the key comes from the environment / .env only
        card_path = submit(req, client)        # hosted.submit: lock, lookup, cost guard, upload once, create once
        card = monitor(card_path, client)      # hosted.monitor: progress, status, loss events; resumable
        plot_loss(card_path)                   # hosted.results

What the steps guarantee:

* **Never pay twice.** Files are uploaded once per content (hosted.uploads: recorded pending in
  `run_dir/openai/uploads.json` before sending, reconciled against the file list after a lost
  answer). A job is created once per request (hosted.jobs): `jobs.create` runs with the client's
  retries off; after a transient error the job is looked up by its metadata through every page of
  the job list before any new try, and a failed lookup stops with the pending record kept. Its id
  goes into the model card the moment it exists; re-running resumes it. A failed or cancelled job
  is only replaced when asked (`new_job=True`, the notebook's `openai_new_job`). An OS file lock on
  the run folder keeps a second run of 02 from submitting at the same time.
* **Never lose a job.** Cards are written atomically; the monitor keeps its place in the card.
* **One message per failure** (hosted.errors): what happened, what it means, what to do; the
  details go to `run_dir/openai/errors.jsonl`.
* **Never leak the key.** It is read by the SDK from `OPENAI_API_KEY` (Azure: AZURE_OPENAI_API_KEY,
  with AZURE_OPENAI_ENDPOINT and OPENAI_API_VERSION; environment or `.env`); it is never a
  parameter, never printed, never written (server messages are redacted).
* **Say what it costs first.** The pre-flight estimate (labelled an estimate when it is one) is
  written to `run_dir/openai/job_request.json` in every mode; the cost guard refuses to create a
  job above `max_training_cost_usd`.

Any OpenAI-compatible client can be injected (a proxy, a test double): the code only calls
`files`, `fine_tuning.jobs`, `chat.completions` and `with_options`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kokoro_helpers import cards
from kokoro_helpers.data.tokens import TokenCounter
from kokoro_helpers.hosted.client import check_provider, describe_mode, make_client, resolve_mode
from kokoro_helpers.hosted.errors import SERVICE, OpenAIFTError, explain, record_failure, redact
from kokoro_helpers.hosted.monitor import TERMINAL, monitor
from kokoro_helpers.hosted.preflight import Preflight, preflight
from kokoro_helpers.hosted.records import openai_dir
from kokoro_helpers.hosted.request import JobRequest, write_job_request
from kokoro_helpers.hosted.submit import submit
from kokoro_helpers.jsonio import read_json, write_json_atomic
from kokoro_helpers.paths import resolve


@dataclass
class FineTuneResult:
    mode: str
    preflight: Preflight
    request: JobRequest
    card_path: Path | None = None
    card: dict[str, Any] | None = None


def finetune(run_dir: str | Path = "runs/default", openai_base_model: str = "gpt-4o-mini-2024-07-18",
             n_epochs: Any = "auto", batch_size: Any = "auto", learning_rate_multiplier: Any = "auto",
             suffix: str | None = "kokoro-chat", openai_mode: str = "auto", max_training_cost_usd: float | None = 20.0,
             poll_seconds: float = 30.0, seed: int | None = 42, max_example_tokens: int | None = None,
             prices_file: str | Path | None = None, client: Any = None, progress: bool = True,
             counter: TokenCounter | None = None, new_job: bool = False, monitor_kwargs: dict | None = None,
             log: Callable[[str], None] = print, provider: str = "openai", azure_deployment: str | None = None,
             submit_kwargs: dict | None = None) -> FineTuneResult:
    """Part A of 02_finetune in one call: pre-flight, mode, request written; when submitting: submit
    (or resume), monitor to the end, card. In dry run nothing touches a client or the network."""
    pf = preflight(run_dir, openai_base_model, n_epochs, max_example_tokens, prices_file, counter, provider=provider)
    mode = resolve_mode(openai_mode, client, provider)
    req = write_job_request(pf, mode, batch_size, learning_rate_multiplier, suffix, seed,
                            max_training_cost_usd, prices_file=prices_file)
    result = FineTuneResult(mode=mode, preflight=pf, request=req)
    if mode != "submit":
        log(describe_mode(mode, openai_mode, provider))
        if not req.guard_passes:
            log("dry run: " + req.guard_message())
        return result
    client = make_client(client, provider=provider)
    result.card_path = submit(req, client, new_job=new_job, log=log, azure_deployment=azure_deployment,
                              **(submit_kwargs or {}))
    result.card = monitor(result.card_path, client, poll_seconds=poll_seconds, progress=progress,
                          log=log, **(monitor_kwargs or {}))
    return result


# --- Part A in the notebook: one message per failure, and Part B goes on --------------------------------

OUTCOME_FILE = "outcome.json"


def read_outcome(run_dir: str | Path) -> dict[str, Any] | None:
    """Part A's last recorded outcome (run_dir/openai/outcome.json), or None."""
    try:
        return read_json(openai_dir(run_dir) / OUTCOME_FILE, None)
    except ValueError:
        return None


class PartA:
    """The notebook's Part A steps, each catching its failure: the one-line message is printed, the
    details go to run_dir/openai/errors.jsonl, the outcome to run_dir/openai/outcome.json (the
    report index shows it), and the notebook goes on — Part B, 03, 04 and 05 never stop because of
    OpenAI. Ctrl-C still interrupts.

        ft = openai_ft.PartA(run_dir, provider=openai_provider, azure_deployment=azure_deployment)
        ft_mode = ft.resolve_mode(openai_mode)
        ft_card_path = ft.submit(ft_request, new_job=openai_new_job)
        ft_card = ft.monitor(poll_seconds=poll_seconds)
    """

    def __init__(self, run_dir: str | Path, provider: str = "openai", azure_deployment: str | None = None,
                 client: Any = None, log: Callable[[str], None] = print):
        self.run_dir = resolve(run_dir)
        self.provider = check_provider(provider)
        self.azure_deployment = azure_deployment or None
        self.client = client
        self.log = log
        self.card_path: Path | None = None
        self.card: dict[str, Any] | None = None
        self.error: OpenAIFTError | None = None
        self.mode = "dry_run"

    @property
    def stopped(self) -> bool:
        return self.error is not None

    def _outcome(self, status: str, stage: str, message: str, **extra: Any) -> None:
        record = {"status": status, "stage": stage, "message": redact(message), "provider": self.provider,
                  "mode": self.mode, "time": cards.now_iso(), **extra}
        write_json_atomic(openai_dir(self.run_dir) / OUTCOME_FILE, record)

    def _fail(self, exc: BaseException, stage: str, action: str) -> None:
        err = explain(exc, self.provider, action)
        self.error = err
        if not getattr(err, "_recorded", False):
            record_failure(self.run_dir, err, exc if err is not exc else (err.__cause__ or err), stage, self.provider)
        self._outcome(getattr(err, "kind", "error"), stage, str(err),
                      job_id=(self.card or {}).get("job_id"), card=str(self.card_path) if self.card_path else None)
        self.log(f"Part A stopped ({stage}): {err}")
        self.log("Details: run_dir/openai/errors.jsonl. Part B below does not depend on it.")

    def _run(self, stage: str, action: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes one message
            self._fail(exc, stage, action)
            return None

    def resolve_mode(self, openai_mode: str = "auto") -> str:
        """resolve_mode(); a missing key for openai_mode="submit" is reported and the run goes on as a dry run."""
        mode = self._run("mode", "choosing the mode", lambda: resolve_mode(openai_mode, self.client, self.provider))
        self.mode = mode or "dry_run"
        self.log(describe_mode(self.mode, openai_mode, self.provider) if mode else "Continuing as a dry run.")
        return self.mode

    def submit(self, request: JobRequest, new_job: bool = False, lock_timeout_s: float | None = 120.0) -> Path | None:
        """Upload once and create the job (or resume it); None when Part A stopped or in dry run."""
        if self.stopped:
            self.log(f"Part A stopped earlier: nothing submitted ({type(self.error).__name__}).")
            return None
        if request.mode != "submit":
            self._outcome("dry_run", "submit", "dry run: the request and its estimate are in "
                          "run_dir/openai/job_request.json; nothing was sent. " + request.guard_message())
            self.log("Dry run: nothing uploaded, no job created.")
            return None

        def go() -> Path:
            self.client = make_client(self.client, provider=self.provider)
            return submit(request, self.client, new_job=new_job, log=self.log,
                          azure_deployment=self.azure_deployment, lock_timeout_s=lock_timeout_s)
        self.card_path = self._run("submit", "submitting the fine-tuning job", go)
        if self.card_path:
            self.card = cards.load_card(self.card_path)
            self._outcome("submitted", "submit", f"job {self.card['job_id']} ({self.card['status']}) at "
                          f"{SERVICE[self.provider]}", job_id=self.card["job_id"], card=str(self.card_path))
        return self.card_path

    def monitor(self, poll_seconds: float = 30.0, **kwargs: Any) -> dict[str, Any] | None:
        """Follow the job to its end; the final card, or None (dry run, or Part A stopped)."""
        if not self.card_path:
            self.log("Dry run: no job to monitor." if not self.stopped else "Part A stopped earlier: no job to monitor.")
            return None
        card = self._run("monitor", "monitoring the fine-tuning job",
                         lambda: monitor(self.card_path, self.client, poll_seconds=poll_seconds, log=self.log, **kwargs))
        if card is not None:
            self.card = card
            status = card.get("status")
            msg = (f"job {card['job_id']} {status}: model {card.get('model_id')}" if card.get("model_id")
                   else f"job {card['job_id']} {status}")
            self._outcome(status if status in TERMINAL else "running", "monitor", msg,
                          job_id=card["job_id"], card=str(self.card_path), model_id=card.get("model_id"))
        return card
