"""Who talks to the service, and whether anything is sent: the key (environment or .env, never a
parameter), the API client (OpenAI or Azure OpenAI, or an injected one), the submit / dry-run mode,
and which client and `model=` a saved card is served by."""
from __future__ import annotations

import os
from typing import Any

from kokoro_helpers.hosted.errors import AZURE_ENV, KEY_ENV, PROVIDERS, SERVICE, MissingKeyError, OpenAIFTError
from kokoro_helpers.paths import project_root

ENV_KEY = "OPENAI_API_KEY"
FORCE_DRY_RUN_ENV = "KOKORO_OPENAI_DRY_RUN"   # "1": every mode resolves to dry_run (CI, make test)
MODES = ("auto", "dry_run", "submit")


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
    (the create calls switch them off: see hosted.jobs)."""
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


# --- a saved card's client and model ---------------------------------------------------------------

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

