"""The model card of an OpenAI fine-tuning job: what it records the moment the job exists, how to use
the model it makes (its usage instructions), and finding the cards of a request."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from kokoro_helpers import cards
from kokoro_helpers.hosted.client import ENV_KEY
from kokoro_helpers.hosted.jobs import job_metadata
from kokoro_helpers.hosted.records import as_json_data, iso_time
from kokoro_helpers.hosted.request import JobRequest


def usage_instructions(model_id: str | None, job_id: str, status: str, provider: str = "openai",
                       deployment: str | None = None) -> str:
    """How to use the model a job makes: how to resume while it has none; on Azure, deploy it first."""
    if not model_id:
        return (f"Not usable yet: job {job_id} is {status}. Resume with "
                "kokoro_helpers.hosted.monitor.monitor(card_path, client) or by re-running 02_finetune.")
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
            f"--model-id {model_id} --input 'こんにちは'. Python: kokoro_helpers.models.open.open_model(card).reply(messages) "
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
    error = as_json_data(getattr(job, "error", None)) if getattr(job, "status", None) == "failed" else None
    card = cards.new_card(
        "openai", model_id=getattr(job, "fine_tuned_model", None), base_model=pf.base_model,
        training_params=_training_params(req, hp),
        usage_instructions=usage_instructions(None, job.id, job.status, pf.provider, azure_deployment),
        provider=pf.provider, azure_deployment=azure_deployment if pf.provider == "azure" else None,
        job_id=job.id, status=job.status, status_history=[{"status": job.status, "time": cards.now_iso()}],
        job_created_at=iso_time(getattr(job, "created_at", None)), suffix=req.body.get("suffix"),
        requested_hyperparameters=hp, file_ids=file_ids,
        data_sha256={**(pf.stats.get("data_sha256") or {}), **pf.sha256},
        token_counter=pf.token_counter, system_prompt=pf.stats.get("system_prompt"),
        estimate={"epochs": pf.estimate.epochs, "billed_tokens": pf.estimate.billed_tokens,
                  "usd": round(pf.estimate.usd, 6), "jpy": round(pf.estimate.jpy, 2),
                  "is_estimate": pf.estimate.is_estimate, "label": pf.estimate.label},
        request_fingerprint=req.fingerprint, job_request_file="openai/job_request.json",
        request_metadata=job_metadata(job) or req.body.get("metadata"),
        prices_file=req.prices_file, trained_tokens=None, actual_cost=None, checkpoints=[],
        training_metrics={}, result_files=[], error=error or None, finalized=False,
        monitor={"last_event_at": None, "last_event_ids": [], "events_file": f"openai/{job.id}_events.jsonl"},
    )
    return cards.save_card(path, card)

