"""The `jobs.create` request of an OpenAI fine-tuning job: its hyperparameters, what makes two requests
the same job (the fingerprint), the cost guard, and run_dir/openai/job_request.json — written in every
mode, so the dry run shows exactly what would be sent and what it would cost."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kokoro_helpers import cards
from kokoro_helpers.hosted.preflight import Preflight, fmt_usd
from kokoro_helpers.hosted.records import openai_dir, read_record
from kokoro_helpers.jsonio import write_json_atomic
from kokoro_helpers.report.costs import is_auto
from kokoro_helpers.report.prices import DEFAULT_PRICES_FILE

MAX_SUFFIX_CHARS = 64


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
    known = read_record(openai_dir(pf.run_dir) / "uploads.json", default={}) or {}
    ids = {split: (known.get(pf.sha256[split]) or {}).get("file_id") for split in pf.files}
    req = JobRequest(path=openai_dir(pf.run_dir) / "job_request.json", mode=mode, body=body,
                     fingerprint=fingerprint, preflight=pf, max_training_cost_usd=max_training_cost_usd,
                     prices_file=str(prices_file) if prices_file else DEFAULT_PRICES_FILE)
    req.write(ids if any(ids.values()) else None)
    return req

