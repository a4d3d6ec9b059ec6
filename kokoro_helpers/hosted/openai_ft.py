"""OpenAI (or Azure OpenAI) supervised fine-tuning: pre-flight, upload once, launch once, monitor
resumably, register.

The steps of 02_finetune's Part A, each a function the notebook calls in turn (through `PartA`,
which turns any failure into one printed message and a recorded outcome, so Part B always runs):

    pf   = preflight(run_dir, base_model, n_epochs, max_example_tokens, provider=...)  # re-validate, price
    mode = resolve_mode(openai_mode, provider=...)                                    # "submit" | "dry_run"
    req  = write_job_request(pf, mode, batch_size=..., suffix=..., seed=..., max_training_cost_usd=...)
    if mode == "submit":
        client = make_client(provider=...)      # the key comes from the environment / .env only
        card_path = submit(req, client)         # lock, lookup, cost guard, upload once, create once
        card = monitor(card_path, client)       # progress, status, loss events; resumable
        plot_loss(card_path)

`finetune(...)` runs them all. What this module guarantees:

* **Never pay twice.** Files are uploaded once per content (openai_uploads: recorded pending in
  `run_dir/openai/uploads.json` before sending, reconciled against the file list after a lost
  answer). A job is created once per request (openai_jobs): `jobs.create` runs with the client's
  retries off; after a transient error the job is looked up by its metadata through every page of
  the job list before any new try, and a failed lookup stops with the pending record kept. Its id
  goes into the model card the moment it exists; re-running resumes it. A failed or cancelled job
  is only replaced when asked (`new_job=True`, the notebook's `openai_new_job`). An OS file lock on
  the run folder keeps a second run of 02 from submitting at the same time.
* **Never lose a job.** Cards are written atomically; the monitor keeps its place in the card.
* **One message per failure** (openai_errors): what happened, what it means, what to do; the
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

import csv
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from kokoro_helpers import cards
from kokoro_helpers.report.costs import TrainingEstimate, actual_training_cost, estimate_training, is_auto
from kokoro_helpers.jsonio import file_sha256, read_json, read_jsonl, write_json_atomic
from kokoro_helpers.retry import is_transient_error
from kokoro_helpers.paths import project_root, resolve
from kokoro_helpers.report.prices import DEFAULT_PRICES_FILE, PriceTable, load_prices
from kokoro_helpers.data.pipeline import read_example_tokens
from kokoro_helpers.data.tokens import TokenCounter, get_token_counter
from kokoro_helpers.data.validate import example_errors
from kokoro_helpers.hosted.errors import AZURE_ENV, KEY_ENV, SERVICE

ENV_KEY = "OPENAI_API_KEY"
FORCE_DRY_RUN_ENV = "KOKORO_OPENAI_DRY_RUN"   # "1": every mode resolves to dry_run (CI, make test)
MODES = ("auto", "dry_run", "submit")
STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")
MIN_TRAIN_EXAMPLES = 10          # OpenAI rejects training files with fewer examples
DEFAULT_MAX_EXAMPLE_TOKENS = 65_536
MAX_SUFFIX_CHARS = 64


# --- errors (kokoro_helpers.hosted.errors; re-exported here) ------------------------------------

from kokoro_helpers.hosted.errors import (APIFailure, CostGuardError, CreationRefusedError, DataError,  # noqa: E402,F401
                            JobEndedError, JobFailedError, LocalModelUnavailable, LookupFailedError,
                            MissingKeyError, OpenAIFTError, PROVIDERS, RunLockedError, explain,
                            is_creation_refused, record_failure, redact, refused_message, server_message,
                            NEW_JOB_HINT)
from kokoro_helpers.hosted.jobs import RunLock, create_job_once, find_job, new_pending  # noqa: E402,F401
from kokoro_helpers.hosted import uploads as openai_uploads  # noqa: E402


def fmt_usd(value: float) -> str:
    """A dollar amount with enough digits to be non-zero: $12.34, $0.50, $0.015, $0.0001."""
    x = float(value)
    if x == 0 or abs(x) >= 1:
        return f"${x:,.2f}"
    import math
    decimals = min(8, max(2, 2 - math.floor(math.log10(abs(x)))))
    text = f"{x:.{decimals}f}".rstrip("0")
    head, _, tail = text.partition(".")
    return f"${head}.{tail.ljust(2, '0')}"


# --- small I/O helpers ---------------------------------------------------------------------------

def _iso(ts: int | float | None) -> str | None:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds") if ts else None


def _read_json(path: Path, default: Any = None) -> Any:
    try:
        return read_json(path, default)
    except ValueError as exc:
        raise OpenAIFTError(f"{exc}; fix or delete it") from None


def openai_dir(run_dir: str | Path) -> Path:
    return resolve(run_dir) / "openai"


def _dump(obj: Any) -> Any:
    """An SDK object (pydantic) or plain value as JSON-able data."""
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json", exclude_none=False)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return obj


# --- key, client, mode ---------------------------------------------------------------------------

def load_env() -> None:
    """Load `<project root>/.env` into the environment (existing variables win)."""
    try:
        from dotenv import load_dotenv
    except ImportError:  # python-dotenv is a dependency; without it only the environment counts
        return
    env_file = project_root() / ".env"
    if env_file.is_file():
        load_dotenv(env_file, override=False)


def check_provider(provider: str | None) -> str:
    p = str(provider or "openai").strip().lower()
    if p not in PROVIDERS:
        raise ValueError(f"openai_provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    return p


def _missing_env(provider: str = "openai") -> list[str]:
    """The environment variables `provider` needs that are not set (names only, never values)."""
    load_env()
    needed = AZURE_ENV if check_provider(provider) == "azure" else (ENV_KEY,)
    return [name for name in needed if not os.environ.get(name, "").strip()]


def has_api_key(provider: str = "openai") -> bool:
    """Whether the provider's key (OPENAI_API_KEY; for azure also its endpoint and API version) is set
    in the environment or .env. Never returns the key itself."""
    return not _missing_env(provider)


def _missing_key_message(what: str = "this", provider: str = "openai") -> str:
    names = " and ".join(_missing_env(provider) or ([ENV_KEY] if provider == "openai" else list(AZURE_ENV)))
    return (f"{names} {'is' if ' and ' not in names else 'are'} not set: {what} needs "
            f"{'it' if ' and ' not in names else 'them'}. Put {'it' if ' and ' not in names else 'them'} in the "
            f"environment or in .env at the project root (see .env.example); never in a parameter file.")


def make_client(client: Any = None, *, max_retries: int = 5, timeout: float = 120.0, provider: str = "openai",
                **client_kwargs: Any):
    """The API client: an injected one as is (any compatible client, a test double); else for
    provider "openai" `openai.OpenAI`, which reads OPENAI_API_KEY (and OPENAI_BASE_URL, OPENAI_ORG_ID,
    OPENAI_PROJECT_ID) from the environment, and for "azure" `openai.AzureOpenAI`, which reads
    AZURE_OPENAI_ENDPOINT, AZURE_OPENAI_API_KEY and OPENAI_API_VERSION — both after `.env` is loaded.
    `max_retries`: the SDK's own retries with backoff on 429, 5xx, timeouts and connection errors
    (the create calls switch them off: see openai_jobs)."""
    if client is not None:
        return client
    provider = check_provider(provider)
    if "api_key" in client_kwargs:
        raise OpenAIFTError(f"the key is never a parameter: set {KEY_ENV[provider]} in the environment or .env")
    if not has_api_key(provider):
        raise MissingKeyError(_missing_key_message(f"talking to {SERVICE[provider]}", provider))
    import openai
    cls = openai.AzureOpenAI if provider == "azure" else openai.OpenAI
    return cls(max_retries=max_retries, timeout=timeout, **client_kwargs)


def resolve_mode(openai_mode: str = "auto", client: Any = None, provider: str = "openai") -> str:
    """"submit" or "dry_run". auto: submit when the provider's key is set (or a client is injected);
    dry_run: never touches the network, even with a key; submit: an error without a key.
    The environment variable KOKORO_OPENAI_DRY_RUN=1 forces dry_run (for CI and `make test`)."""
    provider = check_provider(provider)
    mode = str(openai_mode).strip().lower().replace("-", "_")
    if mode not in MODES:
        raise ValueError(f"openai_mode must be one of {', '.join(MODES)}, got {openai_mode!r}")
    if os.environ.get(FORCE_DRY_RUN_ENV) == "1" or mode == "dry_run":
        return "dry_run"
    available = client is not None or has_api_key(provider)
    if mode == "submit" and not available:
        raise MissingKeyError(_missing_key_message('openai_mode="submit"', provider)
                              + ' Or use openai_mode="dry_run"; Part B (local LoRA) needs no key.')
    return "submit" if available else "dry_run"


def describe_mode(mode: str, requested: str = "auto", provider: str = "openai") -> str:
    """One sentence on what the resolved mode will do (never mentions the key's value)."""
    provider = check_provider(provider)
    key = KEY_ENV[provider]
    if mode == "submit":
        return (f"Mode: submit to {SERVICE[provider]} (openai_mode={requested!r}, {key} found): files are "
                "uploaded once and a job is created — or the earlier job for this same request is resumed.")
    why = ("forced by KOKORO_OPENAI_DRY_RUN=1" if os.environ.get(FORCE_DRY_RUN_ENV) == "1"
           else "as asked" if str(requested) == "dry_run"
           else f"no {' / '.join(_missing_env(provider)) or key} in the environment or .env")
    return (f"Mode: dry run (openai_mode={requested!r}, {why}): the request and its estimate are written "
            "to run_dir/openai/job_request.json; nothing is sent.")


# --- pre-flight -----------------------------------------------------------------------------------

@dataclass
class Preflight:
    """The re-validated files, their token counts, the price, and the estimate of the bill."""

    run_dir: Path
    base_model: str
    n_epochs: Any
    files: dict[str, Path]
    sha256: dict[str, str]
    examples: dict[str, int]
    tokens: dict[str, int]
    example_tokens: dict[str, list[int]]
    max_example_tokens: int
    token_counter: str
    stats: dict[str, Any]
    prices: PriceTable
    estimate: TrainingEstimate
    service_window: str | None = None
    notes: list[str] = field(default_factory=list)
    provider: str = "openai"

    @property
    def is_estimate(self) -> bool:
        return self.estimate.is_estimate

    def files_table(self):
        """One row per file: examples, tokens, longest example, sha256 (short), vs stats.json."""
        import pandas as pd
        rows = []
        recorded = self.stats.get("data_sha256") or {}
        for split, path in self.files.items():
            toks = self.example_tokens[split]
            rows.append({"split": split, "file": str(path.relative_to(self.run_dir)),
                         "examples": self.examples[split], "tokens": self.tokens[split],
                         "longest example": max(toks) if toks else 0,
                         "sha256": self.sha256[split][:12],
                         "matches stats.json": recorded.get(split) == self.sha256[split] if recorded else None})
        return pd.DataFrame(rows).set_index("split")

    def cost_table(self):
        """The pre-flight estimate as a two-column table (value, note), labelled."""
        import pandas as pd
        e = self.estimate
        tag = "estimate" if e.is_estimate else "computed"
        limit = f"{e.max_tokens_per_example:,}" if e.max_tokens_per_example else "no limit"
        rows = [
            ("base model", self.base_model, f"priced from {self.prices.path.name if self.prices.path else 'table'}"),
            ("training examples", f"{e.n_examples:,}", "data/train.jsonl"),
            ("tokens per epoch", f"{e.tokens_per_epoch:,}",
             f"Σ min({limit}, example tokens); {e.capped_examples} example(s) over the limit"
             if e.capped_examples >= 0 else f"Σ example tokens, cap {limit} (upper bound)"),
            ("epochs", e.epochs_label, f"n_epochs={self.n_epochs!r}"),
            ("billed tokens", f"{e.billed_tokens:,}", "epochs × tokens per epoch"),
            ("price", f"{fmt_usd(e.price_per_1m)} / 1M training tokens", f"{self.prices.source}, as of {e.prices_as_of}"),
            ("cost (USD)", fmt_usd(e.usd), tag),
            ("cost (JPY)", f"¥{e.jpy:,.0f}", f"{tag}; at {e.fx_label}"),
            ("token counter", self.token_counter, "estimate" if self.token_counter.startswith("estimate:") else "exact"),
            ("label", tag, e.label),
        ]
        return pd.DataFrame(rows, columns=["item", "value", "note"]).set_index("item")


def read_examples(path: Path) -> list[dict[str, Any]]:
    """The examples of a .jsonl file; a clear error naming the line of a broken one."""
    try:
        return read_jsonl(path)
    except ValueError as exc:
        raise DataError(f"{exc} (01_data)") from None


def preflight(run_dir: str | Path = "runs/default", base_model: str = "gpt-4o-mini-2024-07-18",
              n_epochs: Any = "auto", max_example_tokens: int | None = None,
              prices_file: str | Path | None = None, counter: TokenCounter | None = None,
              today: Any = None, provider: str = "openai") -> Preflight:
    """Re-validate data/train.jsonl and data/valid.jsonl in OpenAI's chat format, count their tokens,
    and estimate the bill: epochs × Σ min(limit, example tokens) × the training price. Raises
    DataError with counts per error category (and the first lines) if a file is not valid."""
    run = resolve(run_dir)
    data_dir = run / "data"
    train = data_dir / "train.jsonl"
    if not train.is_file():
        raise DataError(f"no training file at {train}: run 01_data first (it writes run_dir/data/)")
    stats = _read_json(data_dir / "stats.json", default={}) or {}
    notes: list[str] = []
    if not stats:
        notes.append("data/stats.json is missing: token counts are computed here only")
    limit = int(max_example_tokens or stats.get("max_example_tokens") or DEFAULT_MAX_EXAMPLE_TOKENS)
    counter = counter or get_token_counter()
    provider = check_provider(provider)
    table = load_prices(prices_file).for_provider(provider)
    price = table.entry(base_model)   # a clear error for an unpriced model, before anything else

    files: dict[str, Path] = {"train": train}
    valid = data_dir / "valid.jsonl"
    if valid.is_file() and valid.stat().st_size > 0:
        files["valid"] = valid
    else:
        notes.append("no validation examples: the job runs without a validation file")

    sha, n_ex, toks, per_ex = {}, {}, {}, {}
    problems: list[str] = []
    counts: dict[str, int] = {}
    for split, path in files.items():
        examples = read_examples(path)
        sha[split] = file_sha256(path)
        per_ex[split], _ = read_example_tokens(data_dir, split, counter_name=counter.name, sha256=sha[split])
        if per_ex[split] is None or len(per_ex[split]) != len(examples):   # edited after 01, or another counter
            per_ex[split] = [counter.count_messages(ex.get("messages") or []) if isinstance(ex, dict) else 0
                             for ex in examples]
        n_ex[split] = len(examples)
        toks[split] = sum(per_ex[split])
        for i, ex in enumerate(examples, 1):
            errs = example_errors(ex)
            for e in errs:
                counts[f"{split}:{e}"] = counts.get(f"{split}:{e}", 0) + 1
            if errs and len(problems) < 3:
                problems.append(f"{path.name} example {i}: {', '.join(errs)}")
        over = sum(1 for t in per_ex[split] if t > limit)
        if over:
            notes.append(f"{over} {split} example(s) exceed {limit:,} tokens: OpenAI truncates them "
                         f"(billed at the limit)")
        recorded = (stats.get("data_sha256") or {}).get(split)
        if recorded and recorded != sha[split]:
            notes.append(f"{split}.jsonl changed since 01_data wrote stats.json (sha256 differs): re-run 01_data")
    if counts:
        raise DataError(f"the data is not in OpenAI's chat fine-tuning format: {counts}; first: "
                        f"{'; '.join(problems)}. Fix the source or re-run 01_data.")
    if n_ex["train"] < MIN_TRAIN_EXAMPLES:
        raise DataError(f"train.jsonl has {n_ex['train']} examples; OpenAI needs at least "
                        f"{MIN_TRAIN_EXAMPLES}: lower the filters of 01_data or add data")
    if stats.get("token_counter") and stats["token_counter"] != counter.name:
        notes.append(f"01_data counted with {stats['token_counter']!r}; this pre-flight counts with "
                     f"{counter.name!r}")

    estimate = estimate_training(per_ex["train"], n_epochs, price["training"], table.jpy_per_usd,
                                 max_tokens_per_example=limit, base_model=price["model"],
                                 token_counter=counter.name, prices_as_of=table.as_of, fx_label=table.fx_label)
    window = table.service_window(base_model, today=today).warning() if provider == "openai" else None
    return Preflight(provider=provider, run_dir=run, base_model=base_model, n_epochs=n_epochs, files=files, sha256=sha,
                     examples=n_ex, tokens=toks, example_tokens=per_ex, max_example_tokens=limit,
                     token_counter=counter.name, stats=stats, prices=table, estimate=estimate,
                     service_window=window, notes=notes)


def show_service_window(model: str, prices_file: str | Path | None = None, today: Any = None) -> str | None:
    """Print the service-window warning for `model` (or that no reported date is near); return it."""
    table = load_prices(prices_file)
    window = table.service_window(model, today=today)
    text = window.warning()
    if text:
        print(text)
    else:
        dates = ", ".join(f"{k} {v}" for k, v in (("retirement", window.retires_on),
                                                   ("no new jobs after", window.no_new_jobs_after)) if v)
        print(f"No reported service-window date is past or within {window.warn_days} days of {window.today} "
              f"for {model}{f' ({window.status}: {dates})' if dates else ''}.")
    return text


# --- the request ----------------------------------------------------------------------------------

def _hyper(name: str, value: Any, kind: type) -> Any:
    if is_auto(value):
        return "auto"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if kind is int:
        ok = ok and int(value) == value
    if not ok:
        raise ValueError(f"{name} must be a positive {'integer' if kind is int else 'number'} or \"auto\", "
                         f"got {value!r}")
    return kind(value)


def hyperparameters(n_epochs: Any = "auto", batch_size: Any = "auto",
                    learning_rate_multiplier: Any = "auto") -> dict[str, Any]:
    """The supervised hyperparameters as the API takes them: a number, or "auto" (OpenAI decides)."""
    return {"n_epochs": _hyper("n_epochs", n_epochs, int),
            "batch_size": _hyper("batch_size", batch_size, int),
            "learning_rate_multiplier": _hyper("learning_rate_multiplier", learning_rate_multiplier, float)}


def request_fingerprint(body: dict[str, Any], sha256: dict[str, str]) -> str:
    """What makes two requests the same job: model, suffix, seed, method, and the data's sha256
    (not the file ids, which are assigned at upload)."""
    key = {k: body.get(k) for k in ("model", "suffix", "seed", "method")}
    key["data"] = {k: sha256.get(k) for k in ("train", "valid")}
    return hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


@dataclass
class JobRequest:
    """The exact `jobs.create` arguments (file ids filled at upload), the estimate, the guard."""

    path: Path
    mode: str
    body: dict[str, Any]
    fingerprint: str
    preflight: Preflight
    max_training_cost_usd: float | None
    prices_file: str | None
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.preflight.run_dir

    @property
    def guard_passes(self) -> bool:
        return self.max_training_cost_usd is None or self.preflight.estimate.usd <= float(self.max_training_cost_usd)

    def guard_message(self) -> str:
        e = self.preflight.estimate
        tag = "estimate" if e.is_estimate else "computed"
        numbers = (f"{fmt_usd(e.usd)} ({tag}: {e.billed_tokens:,} billed tokens = {e.epochs} epochs × "
                   f"{e.tokens_per_epoch:,} tokens × ${e.price_per_1m:g}/1M)")
        if self.max_training_cost_usd is None:
            return f"cost guard off (max_training_cost_usd is None); training cost {numbers}"
        limit = fmt_usd(float(self.max_training_cost_usd))
        if self.guard_passes:
            return f"cost guard passes: {numbers} ≤ max_training_cost_usd {limit}"
        return (f"cost guard refuses: training cost {numbers} is above max_training_cost_usd {limit}, so no "
                "job was created and nothing was sent. Raise max_training_cost_usd if you mean it, "
                "or reduce the data (max_samples, score filters) or n_epochs; the dry run shows the estimate.")

    def write(self, file_ids: dict[str, str | None] | None = None) -> Path:
        """(Re)write run_dir/openai/job_request.json; with file ids once they are known."""
        if file_ids:
            self.body["training_file"] = file_ids.get("train")
            if "valid" in self.preflight.files:
                self.body["validation_file"] = file_ids.get("valid")
        e = self.preflight.estimate
        pf = self.preflight
        self.record = {
            "written_at": cards.now_iso(),
            "mode": self.mode,
            "request": self.body,
            "request_fingerprint": self.fingerprint,
            "files": {split: {"path": str(p.relative_to(pf.run_dir)), "sha256": pf.sha256[split],
                              "examples": pf.examples[split], "tokens": pf.tokens[split],
                              "file_id": self.body.get("training_file" if split == "train" else "validation_file")}
                      for split, p in pf.files.items()},
            "epochs": e.epochs,
            "billed_tokens": e.billed_tokens,
            "estimated_cost_usd": round(e.usd, 6),
            "estimated_cost_jpy": round(e.jpy, 2),
            "is_estimate": e.is_estimate,
            "estimate": e.as_dict(),
            "cost_guard": {"max_training_cost_usd": self.max_training_cost_usd, "passes": self.guard_passes,
                           "message": self.guard_message()},
            "prices": {"file": self.prices_file, "source": pf.prices.source, "as_of": pf.prices.as_of,
                       "jpy_per_usd": pf.prices.jpy_per_usd, "fx": pf.prices.fx_label},
            "service_window": pf.service_window,
            "token_counter": pf.token_counter,
            "notes": (["file ids are filled in at upload (upload once per sha256: openai/uploads.json)"]
                      if not self.body.get("training_file") else []) + pf.notes,
        }
        return write_json_atomic(self.path, self.record)

    def show(self) -> None:
        """Print job_request.json as written (it holds no secret: the key is never in it)."""
        print(f"{self.path}:")
        print(json.dumps(self.record, ensure_ascii=False, indent=2))


def write_job_request(pf: Preflight, mode: str, batch_size: Any = "auto", learning_rate_multiplier: Any = "auto",
                      suffix: str | None = "kokoro-chat", seed: int | None = 42,
                      max_training_cost_usd: float | None = None, metadata: dict[str, str] | None = None,
                      prices_file: str | Path | None = None) -> JobRequest:
    """Build the `jobs.create` request in the `method=` form and write job_request.json with the
    estimate (estimated_cost_usd, billed_tokens, epochs) — in every mode. File ids already in
    uploads.json for this content are filled in (no network); others are filled at upload."""
    if mode not in ("submit", "dry_run"):
        raise ValueError(f"mode must be 'submit' or 'dry_run' (see resolve_mode), got {mode!r}")
    if suffix is not None and len(str(suffix)) > MAX_SUFFIX_CHARS:
        raise ValueError(f"suffix must be at most {MAX_SUFFIX_CHARS} characters, got {len(str(suffix))}")
    hp = hyperparameters(pf.n_epochs, batch_size, learning_rate_multiplier)
    body: dict[str, Any] = {
        "model": pf.base_model,
        "training_file": None,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
    }
    if "valid" in pf.files:
        body["validation_file"] = None
    if suffix:
        body["suffix"] = str(suffix)
    if seed is not None:
        body["seed"] = int(seed)
    fingerprint = request_fingerprint(body, pf.sha256)
    meta = {"project": "kokoro-chat", "run": pf.run_dir.name[:64], "kokoro_request": fingerprint[:32]}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    body["metadata"] = meta
    known = _read_json(openai_dir(pf.run_dir) / "uploads.json", default={}) or {}
    ids = {split: (known.get(pf.sha256[split]) or {}).get("file_id") for split in pf.files}
    req = JobRequest(path=openai_dir(pf.run_dir) / "job_request.json", mode=mode, body=body,
                     fingerprint=fingerprint, preflight=pf, max_training_cost_usd=max_training_cost_usd,
                     prices_file=str(prices_file) if prices_file else DEFAULT_PRICES_FILE)
    req.write(ids if any(ids.values()) else None)
    return req


# --- upload once ----------------------------------------------------------------------------------

def upload_once(client: Any, path: str | Path, run_dir: str | Path, verify: bool = True,
                log: Callable[[str], None] = print, provider: str = "openai") -> str:
    """The file id of `path`'s content at the service, uploaded at most once (see openai_uploads):
    recorded pending before sending, reconciled against the file list after a lost answer."""
    return openai_uploads.upload_once(client, path, run_dir, verify=verify, log=log, provider=provider)


# --- cards ----------------------------------------------------------------------------------------

def _usage(model_id: str | None, job_id: str, status: str, provider: str = "openai",
           deployment: str | None = None) -> str:
    if not model_id:
        return (f"Not usable yet: job {job_id} is {status}. Resume with openai_ft.monitor(card_path, client) "
                "or by re-running 02_finetune.")
    if provider == "azure":
        name = deployment or "<deployment>"
        return (f"Azure OpenAI fine-tuned model {model_id}. Azure serves it only once it is DEPLOYED: create a "
                f"deployment of {model_id} (Foundry portal > Deployments, or the Azure management API / "
                f"`az cognitiveservices account deployment create`), named e.g. {name!r}; a Standard deployment "
                f"bills an hourly hosting fee until deleted (params/prices.yaml azure). Then set azure_deployment: "
                f"{name} (02/03 parameters) and use it: python -m kokoro_helpers.saved_models --model-id {model_id} "
                f"--deployment {name} --input 'こんにちは' (needs AZURE_OPENAI_ENDPOINT, AZURE_OPENAI_API_KEY, "
                "OPENAI_API_VERSION).")
    return (f"OpenAI chat model {model_id} (needs {ENV_KEY}). CLI: python -m kokoro_helpers.saved_models "
            f"--model-id {model_id} --input 'こんにちは'. Python: kokoro_helpers.hosted.openai_ft.chat(card, messages) "
            f"or client.chat.completions.create(model='{model_id}', messages=[...]).")


def job_cards(run_dir: str | Path, fingerprint: str | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """OpenAI job cards of the run (newest first), optionally only those of one request."""
    return [(p, c) for p, c in cards.list_cards(run_dir)
            if c.get("kind") == "openai" and c.get("job_id")
            and (fingerprint is None or c.get("request_fingerprint") == fingerprint)]


def _training_params(req: JobRequest, hp: dict[str, Any]) -> dict[str, Any]:
    stats = req.preflight.stats
    counts = stats.get("examples") or stats.get("splits") or {}
    return {"epochs": hp.get("n_epochs"), "batch_size": hp.get("batch_size"),
            "learning_rate_multiplier": hp.get("learning_rate_multiplier"),
            "max_samples": stats.get("max_samples"), "seed": req.body.get("seed"),
            "data_splits": {"train": counts.get("train", req.preflight.examples.get("train")),
                            "test": counts.get("test"),
                            "valid": counts.get("valid", req.preflight.examples.get("valid"))}}


def write_job_card(req: JobRequest, job: Any, file_ids: dict[str, str], azure_deployment: str | None = None) -> Path:
    """The model card of a job that now exists — written before anything else can fail."""
    pf = req.preflight
    hp = req.body["method"]["supervised"]["hyperparameters"]
    path = cards.card_path(pf.run_dir, f"openai-{req.body.get('suffix') or 'ft'}-{job.id}")
    error = _dump(getattr(job, "error", None)) if getattr(job, "status", None) == "failed" else None
    card = cards.new_card(
        "openai", model_id=getattr(job, "fine_tuned_model", None), base_model=pf.base_model,
        training_params=_training_params(req, hp),
        usage_instructions=_usage(None, job.id, job.status, pf.provider, azure_deployment),
        provider=pf.provider, azure_deployment=azure_deployment if pf.provider == "azure" else None,
        job_id=job.id, status=job.status, status_history=[{"status": job.status, "time": cards.now_iso()}],
        job_created_at=_iso(getattr(job, "created_at", None)), suffix=req.body.get("suffix"),
        requested_hyperparameters=hp, file_ids=file_ids,
        data_sha256={**(pf.stats.get("data_sha256") or {}), **pf.sha256},
        token_counter=pf.token_counter, system_prompt=pf.stats.get("system_prompt"),
        estimate={"epochs": pf.estimate.epochs, "billed_tokens": pf.estimate.billed_tokens,
                  "usd": round(pf.estimate.usd, 6), "jpy": round(pf.estimate.jpy, 2),
                  "is_estimate": pf.estimate.is_estimate, "label": pf.estimate.label},
        request_fingerprint=req.fingerprint, job_request_file="openai/job_request.json",
        request_metadata=_meta_of(job) or req.body.get("metadata"),
        prices_file=req.prices_file, trained_tokens=None, actual_cost=None, checkpoints=[],
        training_metrics={}, result_files=[], error=error or None, finalized=False,
        monitor={"last_event_at": None, "last_event_ids": [], "events_file": f"openai/{job.id}_events.jsonl"},
    )
    return cards.save_card(path, card)


def _meta_of(job: Any) -> dict[str, Any] | None:
    meta = getattr(job, "metadata", None)
    return dict(meta) if isinstance(meta, dict) else None


# --- submit ---------------------------------------------------------------------------------------

def _ended_message(card: dict[str, Any], path: Path, found: str = "") -> str:
    err = card.get("error") or {}
    detail = f" ({err.get('code')}: {redact(err.get('message'))})" if err else ""
    return (f"The last fine-tuning job for this exact request, {card['job_id']}{found}, ended "
            f"{card.get('status')}{detail}; no new job was created (nothing is paid twice). Fix the cause (or change "
            f"the request), then {NEW_JOB_HINT} to start another — from Python: "
            f"submit(req, client, new_job=True). Card: {path}. {LOCAL_HINT_TEXT}")


LOCAL_HINT_TEXT = "Part B of 02_finetune (local LoRA) does not depend on it."


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
                card = cards.update_card(path, azure_deployment=azure_deployment, usage_instructions=_usage(
                    card.get("model_id"), card["job_id"], status, provider, azure_deployment))
            what = f"model {card['model_id']}" if card.get("model_id") else f"status {status}"
            log(f"Resuming job {card['job_id']} of this request ({what}) from {path} — no new job created.")
            return path
        if not new_job:
            raise JobEndedError(_ended_message(card, path))

    pending_path = openai_dir(req.run_dir) / "pending_job.json"
    pending = _read_json(pending_path, default=None)
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

    file_ids = {split: openai_uploads.upload_once(client, p, req.run_dir, log=log, provider=provider, sleep=sleep)
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


# --- monitor --------------------------------------------------------------------------------------

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
                       usage_instructions=_usage(job.fine_tuned_model, self.job_id, status,
                                                 self.card.get("provider", "openai"), self.card.get("azure_deployment")))
        if self.bar is not None:
            self.bar.set_description(f"{self.job_id} {status}")

    def _new_events(self) -> list[Any]:
        """Events newer than the last one seen, oldest first. OpenAI lists events newest first and
        pages backwards with `after=<last id of the previous page>`: page until a seen event."""
        state = self.card.get("monitor") or {}
        last_at, last_ids = state.get("last_event_at"), set(state.get("last_event_ids") or [])
        new: list[Any] = []
        after = None
        for _ in range(100):
            kwargs: dict[str, Any] = {"limit": 100}
            if after:
                kwargs["after"] = after
            page = self._call(self.client.fine_tuning.jobs.list_events, self.job_id, **kwargs)
            data = list(getattr(page, "data", []) or [])
            reached_seen = False
            for ev in data:
                if last_at is not None and (ev.created_at < last_at or (ev.created_at == last_at and ev.id in last_ids)):
                    reached_seen = True
                    continue
                new.append(ev)
            if reached_seen or not data or not getattr(page, "has_more", False):
                break
            after = data[-1].id
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
                f.write(json.dumps(_dump(ev), ensure_ascii=False) + "\n")
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
                self.log(f"{_iso(ev.created_at)} {flag}{ev.message}")
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
                     f"to resume, or cancel it with openai_ft.cancel('{self.path}', client)")
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
            err = _dump(job.error) if job.error is not None else {}
            self._save(error=err, finished_at=_iso(job.finished_at), finalized=True)
            self._raise_failed(err or {})
        if job.status == "cancelled":
            self._save(finished_at=_iso(job.finished_at), finalized=True)
            self.log(f"job {self.job_id} was cancelled; nothing more to record")
            return self.card
        hp = _dump(getattr(getattr(getattr(job, "method", None), "supervised", None), "hyperparameters", None)) \
            or _dump(getattr(job, "hyperparameters", None)) or {}
        params = dict(self.card.get("training_params") or {})
        for ours, theirs in (("epochs", "n_epochs"), ("batch_size", "batch_size"),
                             ("learning_rate_multiplier", "learning_rate_multiplier")):
            if hp.get(theirs) not in (None, "auto"):
                params[ours] = hp[theirs]
        fields: dict[str, Any] = dict(
            model_id=job.fine_tuned_model, trained_tokens=job.trained_tokens, finished_at=_iso(job.finished_at),
            training_params=params, result_files=list(job.result_files or []),
            usage_instructions=_usage(job.fine_tuned_model, self.job_id, job.status,
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
                            "metrics": _dump(c.metrics)} for c in (page.data or [])]
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
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(content)
        os.replace(tmp, path)
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


# --- metrics and the loss curve -------------------------------------------------------------------

def _float(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def summarize_metrics(path: str | Path) -> dict[str, Any]:
    """Steps and the last value of each loss column of a result CSV."""
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out: dict[str, Any] = {"steps": len(rows)}
    for col in ("train_loss", "valid_loss", "full_valid_loss", "train_mean_token_accuracy",
                "valid_mean_token_accuracy", "full_valid_mean_token_accuracy", "train_accuracy"):
        values = [v for v in (_float(r.get(col)) for r in rows) if v is not None]
        if values:
            out[f"final_{col}"] = values[-1]
    return out


def card_summary(card: dict[str, Any]):
    """The card's key facts as a one-column table (what the notebook shows after a job)."""
    import pandas as pd
    params = card.get("training_params") or {}
    metrics = card.get("training_metrics") or {}
    est, actual = card.get("estimate") or {}, card.get("actual_cost") or {}
    rows = {
        "model_id": card.get("model_id"), "job_id": card.get("job_id"), "status": card.get("status"),
        "base_model": card.get("base_model"), "epochs": params.get("epochs"), "batch_size": params.get("batch_size"),
        "learning_rate_multiplier": params.get("learning_rate_multiplier"),
        "trained_tokens": card.get("trained_tokens"),
        "estimated cost (USD)": f"{fmt_usd(est['usd'])} ({'estimate' if est.get('is_estimate') else 'computed'})"
        if "usd" in est else None,
        "actual cost (USD)": f"{fmt_usd(actual['usd'])} (trained_tokens × listed price)" if "usd" in actual else None,
        "provider": card.get("provider", "openai"),
        "final train loss": metrics.get("final_train_loss"),
        "final valid loss": metrics.get("final_valid_loss", metrics.get("final_full_valid_loss")),
        "checkpoints": len(card.get("checkpoints") or []),
    }
    return pd.DataFrame({"value": rows})


def _metrics_path(card_or_path: str | Path | dict[str, Any], run_dir: str | Path | None = None) -> Path:
    if isinstance(card_or_path, (str, Path)) and str(card_or_path).endswith(".csv"):
        return Path(card_or_path)
    if isinstance(card_or_path, dict):
        card, base = card_or_path, resolve(run_dir) if run_dir else None
    else:
        card, base = cards.load_card(card_or_path), Path(card_or_path).parent.parent
    rel = (card.get("training_metrics") or {}).get("metrics_file")
    if not rel or base is None:
        raise OpenAIFTError("no result-file metrics for this card yet (the job has not succeeded, "
                            "or pass run_dir=...)")
    return base / rel


def load_metrics(card_or_path: str | Path | dict[str, Any], run_dir: str | Path | None = None):
    """The result-file metrics as a DataFrame (step, train_loss, valid_loss, ...)."""
    import pandas as pd
    return pd.read_csv(_metrics_path(card_or_path, run_dir))


def plot_loss(card_or_path: str | Path | dict[str, Any], run_dir: str | Path | None = None, ax=None):
    """Training (and validation) loss per step from the job's result file; returns the figure."""
    import matplotlib.pyplot as plt
    df = load_metrics(card_or_path, run_dir)
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 3.5))
    else:
        fig = ax.figure
    ax.plot(df["step"], df["train_loss"], label="train loss", lw=1, alpha=0.8)
    for col, style in (("valid_loss", "-"), ("full_valid_loss", "o")):
        if col in df and df[col].notna().any():
            d = df[df[col].notna()]
            ax.plot(d["step"], d[col], style, label=col.replace("_", " "), ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("OpenAI fine-tuning: loss per step")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# --- using a model ---------------------------------------------------------------------------------

def _as_card(card_or_model_id: Any) -> dict[str, Any]:
    if isinstance(card_or_model_id, dict):
        return card_or_model_id
    text = str(card_or_model_id)
    if text.endswith(".json") and Path(text).is_file():
        return cards.load_card(text)
    return {"model_id": text, "kind": "openai"}


def inference_model(card: dict[str, Any], deployment: str | None = None) -> str:
    """The `model=` to send for a card: its fine-tuned model id; on Azure its deployment name (a
    fine-tuned model must be deployed before Azure serves it)."""
    if card.get("provider", "openai") == "azure":
        name = deployment or card.get("azure_deployment")
        if not name:
            raise OpenAIFTError(
                f"{card.get('model_id')} is an Azure OpenAI fine-tune: Azure serves it only through a deployment. "
                "Deploy it (see the card's usage_instructions), then pass its name: azure_deployment (02/03 "
                "parameters) or --deployment NAME (saved_models).")
        return str(name)
    model = card.get("model_id")
    if not model:
        raise OpenAIFTError(f"this card has no model yet (job {card.get('job_id')} is {card.get('status')}): "
                            "resume monitoring first")
    return str(model)


def client_for_card(card: dict[str, Any], client: Any = None, **kwargs: Any) -> Any:
    """The client for a card's provider (openai / azure), from the environment; an injected one as is."""
    return make_client(client, provider=card.get("provider", "openai"), **kwargs)


def chat(card_or_model_id: Any, messages: Iterable[dict[str, Any]], client: Any = None, max_tokens: int = 512,
         temperature: float = 0.7, system: str | None = None, deployment: str | None = None) -> str:
    """One reply of a saved model to `messages`. `card_or_model_id`: a card (dict or path) or a model id.
    `system` replaces/adds the system message; otherwise the card's training system prompt is added
    when the messages have none. Local LoRA cards go to kokoro_helpers.local.loading.chat_local."""
    card = _as_card(card_or_model_id)
    msgs = [dict(m) for m in messages]
    prompt = system if system is not None else card.get("system_prompt")
    if system is not None:
        msgs = [m for m in msgs if m.get("role") != "system"]
    if prompt and not any(m.get("role") == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": prompt})
    if card.get("kind") == "local_lora":
        try:
            from kokoro_helpers.local.loading import chat_local
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.endswith("kokoro_helpers.local.loading"):
                raise LocalModelUnavailable(
                    "local LoRA models are served by notebook 04 / `kokoro_helpers.local.serve`; "
                    "kokoro_helpers.local.generate is not in this checkout yet") from None
            raise
        return chat_local(card, msgs, max_tokens=max_tokens, temperature=temperature)
    model = inference_model(card, deployment)
    client = client_for_card(card, client)
    resp = client.chat.completions.create(model=model, messages=msgs, max_tokens=int(max_tokens),
                                          temperature=float(temperature))
    return resp.choices[0].message.content or ""


# --- all of it --------------------------------------------------------------------------------------

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
