"""The errors of the OpenAI / Azure OpenAI fine-tuning path, and one short message per failure.

Every failure of Part A reaches the user as one `OpenAIFTError` whose text says what happened,
what it means and what to do (where the key is read from, the dry run, the local path). The SDK's
exception, its response body and the traceback go to `run_dir/openai/errors.jsonl` (with any key
redacted), never to the notebook output.

    try: ...
    except Exception as exc:
        err = explain(exc, provider="openai", action="creating the fine-tuning job")
        record_failure(run_dir, err, exc, stage="submit")
        print(err)
"""
from __future__ import annotations

import json
import os
import re
import traceback
from datetime import date
from pathlib import Path
from typing import Any

PROVIDERS = ("openai", "azure")
KEY_ENV = {"openai": "OPENAI_API_KEY", "azure": "AZURE_OPENAI_API_KEY"}
AZURE_ENV = ("AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY", "OPENAI_API_VERSION")
SERVICE = {"openai": "OpenAI", "azure": "Azure OpenAI"}
WIND_DOWN_DATE = "2027-01-06"     # params/prices.yaml service_window.no_new_jobs_after (reported)

# what the user can always fall back on
DRY_RUN_HINT = 'openai_mode: dry_run writes the request and its estimate without sending anything'
LOCAL_HINT = "Part B of 02_finetune (local LoRA) needs no key and runs now"
NEW_JOB_HINT = ("set openai_new_job: true (02's parameters cell, or make report SET=\"openai_new_job=true\") "
                "and run 02 again")


class OpenAIFTError(RuntimeError):
    """Base of the fine-tuning path's errors; the message says what to do."""

    kind = "error"          # recorded as Part A's outcome status


class MissingKeyError(OpenAIFTError):
    """No key (or Azure endpoint / API version) where a request must be sent."""

    kind = "no_key"


class DataError(OpenAIFTError):
    """The training/validation files are missing or not in OpenAI's chat format."""

    kind = "data_error"


class CostGuardError(OpenAIFTError):
    """The estimated cost is above max_training_cost_usd."""

    kind = "cost_guard"


class JobFailedError(OpenAIFTError):
    """A job ended `failed`; carries the service's error code and message."""

    kind = "failed"

    def __init__(self, job_id: str, code: str | None, message: str | None, param: str | None = None,
                 provider: str = "openai"):
        self.job_id, self.code, self.message, self.param = job_id, code, message, param
        where = f" (param: {param})" if param else ""
        super().__init__(
            f"{SERVICE.get(provider, 'OpenAI')} fine-tuning job {job_id} failed: {code or 'error'}: "
            f"{redact(message or 'no message')}{where}. Nothing more is billed for it. Fix the cause "
            f"(usually the data: re-run 01_data), then {NEW_JOB_HINT} to start another; {LOCAL_HINT}.")


class JobEndedError(OpenAIFTError):
    """The last job for this exact request ended failed/cancelled; a new one needs openai_new_job."""

    kind = "ended"


class RunLockedError(OpenAIFTError):
    """Another run of 02 holds the run folder's lock."""

    kind = "locked"


class APIFailure(OpenAIFTError):
    """An API call failed (after the SDK's retries where retrying was safe)."""

    kind = "api_error"

    def __init__(self, text: str, status: int | None = None, code: str | None = None):
        super().__init__(text)
        self.status, self.code = status, code


class CreationRefusedError(APIFailure):
    """The service refused to create a fine-tuning job (not an outage: retrying will not help)."""

    kind = "refused"


class LookupFailedError(APIFailure):
    """A job may exist but could not be looked up; the pending record is kept."""

    kind = "lookup_failed"


# --- keys never leave the process ---------------------------------------------------------------

_KEYLIKE = re.compile(r"\bsk-[A-Za-z0-9_\-*.]{3,}")


def redact(text: Any) -> str:
    """`text` with every configured key (and anything shaped like an OpenAI/Azure key) replaced."""
    out = str(text)
    for env in KEY_ENV.values():
        value = os.environ.get(env, "").strip()
        if len(value) >= 8:
            out = out.replace(value, "[redacted]")
    return _KEYLIKE.sub("[redacted]", out)


def _redact_data(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _redact_data(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_redact_data(v) for v in data]
    if isinstance(data, str):
        return redact(data)
    return data


# --- refused creation -----------------------------------------------------------------------------

_REFUSED_CODES = {"model_not_available", "fine_tuning_unavailable", "fine_tuning_not_available",
                  "feature_not_available", "unsupported_model", "invalid_base_model"}
_REFUSED_TEXT = re.compile(r"not available for fine-tuning|fine-tuning (is )?(no longer|not) (available|supported)|"
                           r"no longer (accept|support)|cannot create (new )?fine-tuning", re.I)


def is_creation_refused(exc: BaseException) -> bool:
    """Whether a `jobs.create` error is a refusal to fine-tune (400/403/404 with a refusal code or text)."""
    status = getattr(exc, "status_code", None)
    if status not in (400, 403, 404):
        return False
    code = str(getattr(exc, "code", "") or "")
    return code in _REFUSED_CODES or bool(_REFUSED_TEXT.search(server_message(exc)))


def server_message(exc: BaseException) -> str:
    """The service's own error message (the body's `message`), redacted."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and body.get("message"):
        return redact(body["message"])
    return redact(getattr(exc, "message", "") or exc)


def _wind_down_date() -> date:
    """The reported last day for new self-serve jobs, from params/prices.yaml (else the known date)."""
    try:
        from kokoro_helpers.report.prices import load_prices
        return date.fromisoformat(str(load_prices().raw["service_window"]["no_new_jobs_after"]))
    except Exception:  # noqa: BLE001 - a message must never fail
        return date.fromisoformat(WIND_DOWN_DATE)


def refused_message(provider: str = "openai", server_message: str | None = None, code: str | None = None) -> str:
    svc = SERVICE.get(provider, "OpenAI")
    said = f" ({code}: {redact(server_message)})" if server_message else ""
    text = f"{svc} refused to create the fine-tuning job{said}. "
    if provider == "openai":
        cutoff, today = _wind_down_date(), date.today()
        when = (f"OpenAI has reportedly stopped new self-serve fine-tuning jobs after {cutoff}"
                if today > cutoff else
                f"OpenAI reportedly stops new self-serve fine-tuning jobs after {cutoff}, {(cutoff - today).days} "
                "days from today, and may refuse some organizations or models earlier")
        text += (f"{when} (reported: params/prices.yaml service_window), so this is not an outage and retrying "
                 "will not help. "
                 "Azure OpenAI still fine-tunes gpt-4o-mini and gpt-4.1-mini with the same files: set "
                 "openai_provider: azure with AZURE_OPENAI_ENDPOINT, AZURE_OPENAI_API_KEY and OPENAI_API_VERSION "
                 f"in the environment or .env. Or use the local path: {LOCAL_HINT}.")
    else:
        text += ("The base model may not be fine-tunable in this resource's region or this API version: check the "
                 f"model's fine-tuning regions and OPENAI_API_VERSION. Or use the local path: {LOCAL_HINT}.")
    return text + " Nothing was created or billed."


# --- one message per failure ------------------------------------------------------------------------

def _key_where(provider: str) -> str:
    if provider == "azure":
        return ("AZURE_OPENAI_API_KEY (with AZURE_OPENAI_ENDPOINT and OPENAI_API_VERSION), read from the "
                "environment or from .env at the project root")
    return "OPENAI_API_KEY, read from the environment or from .env at the project root"


def explain(exc: BaseException, provider: str = "openai", action: str = "talking to the API") -> OpenAIFTError:
    """The one short message for `exc` as an OpenAIFTError (an OpenAIFTError is returned as it is)."""
    if isinstance(exc, OpenAIFTError):
        return exc
    svc = SERVICE.get(provider, "OpenAI")
    try:
        import openai
    except ImportError:  # pragma: no cover - openai is a dependency
        openai = None  # type: ignore[assignment]
    status = getattr(exc, "status_code", None)
    code = getattr(exc, "code", None)
    body = getattr(exc, "body", None)
    server = redact(body.get("message") if isinstance(body, dict) and body.get("message")
                    else getattr(exc, "message", "") or "")
    tail = f" {DRY_RUN_HINT}; {LOCAL_HINT}."
    if openai is not None and isinstance(exc, (openai.OpenAIError, ValueError)) \
            and not isinstance(exc, openai.APIError) and any(
            w in str(exc) for w in ("credentials", "api_key", "AZURE_OPENAI_ENDPOINT", "OPENAI_API_VERSION")):
        return MissingKeyError(f"no key for {svc} while {action}: set {_key_where(provider)}.{tail}")
    if status == 401:
        return APIFailure(f"{svc} did not accept the key while {action} (401 {code or 'unauthorized'}): "
                          f"{_key_where(provider)}, is wrong, revoked or for another "
                          f"{'resource' if provider == 'azure' else 'organization'}. Fix it there — never in a "
                          f"parameter file.{tail}", 401, code)
    if status == 403:
        return APIFailure(f"{svc} refused {action} (403 {code or 'forbidden'}: {server}): this key's project or "
                          f"role may not use fine-tuning or this model. Check its permissions, or use another "
                          f"key in {_key_where(provider)}.{tail}", 403, code)
    if status == 404:
        more = (" On Azure, check AZURE_OPENAI_ENDPOINT, OPENAI_API_VERSION and the deployment name."
                if provider == "azure" else "")
        return APIFailure(f"{svc} found nothing while {action} (404: {server}): the id does not exist for this "
                          f"key's {'resource' if provider == 'azure' else 'organization'}.{more}{tail}", 404, code)
    if status == 429:
        if code == "insufficient_quota":
            return APIFailure(f"{svc} says the quota is used up (429 insufficient_quota) while {action}: add credit "
                              f"or raise the limit in the account's billing settings, then re-run (it resumes).{tail}",
                              429, code)
        return APIFailure(f"{svc} kept rate-limiting {action} (429) after the client's retries: wait a few minutes "
                          f"and run the cell again — it resumes, nothing is created twice.", 429, code)
    if isinstance(status, int) and status >= 500 or (
            openai is not None and isinstance(exc, (openai.APIConnectionError, openai.APITimeoutError))) \
            or isinstance(exc, (TimeoutError, ConnectionError)):
        what = f"{status}" if status else type(exc).__name__.replace("API", "")
        return APIFailure(f"{svc} was unavailable while {action} ({what}) after the client's retries: it is an "
                          f"outage, not your data. Run the cell again later — it resumes from run_dir, nothing is "
                          f"paid twice.", status, code)
    if status == 400:
        return APIFailure(f"{svc} rejected {action} (400 {code or 'bad request'}: {server}). Fix what it names "
                          f"(often the data: re-run 01_data) and run again.{tail}", 400, code)
    if status is not None:
        return APIFailure(f"{svc} answered {status} while {action}: {server}.{tail}", status, code)
    return OpenAIFTError(f"{type(exc).__name__} while {action}: {redact(exc)}")


def record_failure(run_dir: str | Path, err: BaseException, cause: BaseException | None = None,
                   stage: str = "", provider: str = "openai") -> Path:
    """Append the details of a failure (the SDK exception, its body, the traceback; keys redacted)
    to run_dir/openai/errors.jsonl; return that path."""
    from kokoro_helpers.cards import now_iso
    path = Path(run_dir) / "openai" / "errors.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    cause = cause if cause is not None else err
    entry = {"time": now_iso(), "stage": stage, "provider": provider, "message": str(err),
             "kind": getattr(err, "kind", "error"), "exception": type(cause).__name__,
             "status": getattr(cause, "status_code", None), "code": getattr(cause, "code", None),
             "request_id": getattr(cause, "request_id", None),
             "body": _redact_data(getattr(cause, "body", None)),
             "traceback": redact("".join(traceback.format_exception(type(cause), cause, cause.__traceback__)))}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
    return path
