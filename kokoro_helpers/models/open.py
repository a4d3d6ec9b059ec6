"""Which model a caller means, in one place: a model card (OpenAI, Azure OpenAI or local LoRA), a folder, an
endpoint, a loaded model or a function becomes a `ChatModel` (models/base.py). 03's list of models to
evaluate (`models_from_run`) and the chat widget's picker are built from it; nothing else asks what kind a
model is."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from kokoro_helpers import cards
from kokoro_helpers.models.base import ChatModel, FunctionChatModel, ModelError
from kokoro_helpers.models.endpoint import EndpointChatModel, endpoint_client
from kokoro_helpers.models.local import LocalChatModel
from kokoro_helpers.notes import Log, say
from kokoro_helpers.paths import DEFAULT_RUN_DIR

def hosted_client(provider: str = "openai", max_retries: int = 5, timeout: float = 120.0, log: Log = print,
                  required: bool = False) -> Any:
    """An OpenAI (or, provider="azure", Azure OpenAI) client when its key is set (environment or .env),
    else None and a note — or, `required`, the error that names the variables to set. The key is read by
    the SDK from the environment; it is never a parameter."""
    from kokoro_helpers.hosted import client as hosted
    if not hosted.has_api_key(provider) and not required:
        say(log, f"{hosted.KEY_ENV[provider]} is not set (environment or .env): {provider} models are skipped.")
        return None
    return hosted.make_client(max_retries=max_retries, timeout=timeout, provider=provider)


def _card_of(source: Any, run_dir: str | Path) -> tuple[Path | None, dict[str, Any]] | None:
    """(card file, card) when `source` is a card, a card file or the model id / file name of a run's card."""
    if isinstance(source, Mapping) and "base_url" not in source:
        return None, dict(source)
    if isinstance(source, (str, Path)):
        text = str(source)
        if text.endswith(".json") and Path(text).is_file():
            return Path(text), cards.load_card(text)
        if not Path(text).exists():
            for path, card in cards.list_cards(run_dir):
                if card.get("model_id") == text or path.stem == text:
                    return path, card
    return None


def open_model(source: Any, run_dir: str | Path = DEFAULT_RUN_DIR, *, name: str | None = None,
               base_only: bool = False, client: Any = None, deployment: str | None = None,
               max_new_tokens: int = 256, temperature: float = 0.0, top_p: float | None = None,
               seed: int | None = None, local: Mapping[str, Any] | None = None,
               endpoint: Mapping[str, Any] | None = None, log: Log = print) -> ChatModel:
    """The ChatModel for `source`:

    * a ChatModel: as is; a function `fn(messages, **settings) -> str`: a FunctionChatModel;
    * an endpoint `{"base_url", "model", "name"?, "api_key_env"?, "cache_tag"?, "client"?}`: an EndpointChatModel;
    * a card (dict, file, or a model id / card file name in `run_dir/models`): `openai` → its fine-tuned model
      (on Azure its deployment: `deployment` or the card's `azure_deployment`) through `client` (default: from
      the environment); `local_lora` → its adapter, or with `base_only` its base with the adapter off;
    * a loaded LocalModel, an adapter or model folder, `embedded:tiny` or a Hub id: a LocalChatModel.

    Generation settings are the same whatever the kind; `local` / `endpoint` pass kind-specific options
    (e.g. `{"batch_size": 8}`, `{"concurrency": 4, "batch_run_dir": run_dir}`)."""
    if isinstance(source, ChatModel):
        return source
    gen = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    ep_opts = dict(endpoint or {})
    local_opts = dict(local or {})
    if isinstance(source, Mapping) and "base_url" in source:
        if not source.get("base_url") or not source.get("model"):
            raise ModelError(f"an endpoint needs base_url and model, got {dict(source)!r}")
        ep_client = source.get("client") or endpoint_client(source["base_url"], source.get("api_key_env"))
        return EndpointChatModel(ep_client, source["model"],
                                 name=name or source.get("name") or f"{source['model']} @ {source['base_url']}",
                                 cache_tag=source.get("cache_tag"), max_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, seed=seed, log=log, **ep_opts)
    found = _card_of(source, run_dir)
    if found is not None:
        model = _from_card(*found, run_dir=run_dir, name=name, base_only=base_only, client=client,
                           deployment=deployment, gen=gen, local_opts=local_opts, ep_opts=ep_opts, log=log)
        model.system_prompt = found[1].get("system_prompt") or None     # what it was trained with
        return model
    if callable(source) and not hasattr(source, "batch_generate"):
        return FunctionChatModel(source, name=name, **{k: v for k, v in gen.items() if v is not None})
    if hasattr(source, "batch_generate"):                 # a loaded LocalModel
        return LocalChatModel(str(source.name), name=name or str(source.name), base_only=base_only, lm=source,
                              run_dir=run_dir, **gen, **local_opts)
    return LocalChatModel(source, name=name, base_only=base_only, run_dir=run_dir, **gen, **local_opts)


def _from_card(path: Path | None, card: dict[str, Any], *, run_dir: str | Path, name: str | None, base_only: bool,
               client: Any, deployment: str | None, gen: dict[str, Any], local_opts: dict[str, Any],
               ep_opts: dict[str, Any], log: Log) -> ChatModel:
    kind = card.get("kind")
    if kind == "openai":
        from kokoro_helpers.hosted.client import inference_model
        provider = card.get("provider", "openai")
        model = inference_model(card, deployment)       # a clear error: no model yet / no Azure deployment
        return EndpointChatModel(client or (lambda: hosted_client(provider, log=log, required=True)), model,
                                 name=name or (card["model_id"] if model != card["model_id"] else None),
                                 max_tokens=gen["max_new_tokens"], temperature=gen["temperature"],
                                 top_p=gen["top_p"], seed=gen["seed"], log=log, **ep_opts)
    if kind == "local_lora":
        return LocalChatModel(path if path is not None else card, name=name, base_only=base_only,
                              run_dir=run_dir, **gen, **local_opts)
    raise ModelError(f"{path or 'this card'}: unknown kind {kind!r} (expected openai or local_lora)")


def models_from_run(run_dir: str | Path = DEFAULT_RUN_DIR, include_base: bool = True,
                    extra_endpoints: Iterable[Mapping[str, Any]] = (), *, client: Any = None,
                    include_openai_base: bool = False, max_tokens: int = 256, temperature: float = 0.0,
                    seed: int | None = None, concurrency: int = 4, local_batch_size: int = 8,
                    openai_batch: bool = False, progress: bool = True, log: Log = print) -> list[ChatModel]:
    """What 03 evaluates:

    * every card in run_dir/models: kind `openai` → its fine-tuned model through `client` (default: from
      OPENAI_API_KEY; without one these cards are skipped with a note), and with `include_openai_base` its
      base model too; cards whose job has no model yet are skipped with a note. Kind `local_lora` → its
      adapter and, with `include_base`, its base model as a baseline (once per base);
    * every endpoint in `extra_endpoints` (see `open_model`).
    `openai_batch` (03's `eval_batch`): OpenAI's models answer through the Batch API (half price; resumable);
    endpoints are always asked request by request. Generation settings are the same for every model."""
    models: list[ChatModel] = []
    seen: set[str] = set()

    def add(m: ChatModel) -> None:
        if m.name in seen:
            say(log, f"skipped a second model named {m.name!r}")
            return
        seen.add(m.name)
        models.append(m)

    gen = dict(max_new_tokens=max_tokens, temperature=temperature, seed=seed, log=log)
    hosted = dict(concurrency=concurrency, progress=progress)
    batch = dict(batch_run_dir=run_dir) if openai_batch else {}
    local = dict(batch_size=local_batch_size, progress=progress)
    found = cards.list_cards(run_dir)
    openai_client = client
    if openai_client is None and any(c.get("kind") == "openai" and c.get("provider", "openai") == "openai"
                                     and c.get("model_id") for _, c in found):
        openai_client = hosted_client(log=log)
    for path, card in found:
        kind = card.get("kind")
        if kind == "openai":
            if not card.get("model_id"):
                say(log, f"skipped {path.name}: its job ({card.get('job_id')}) has no model yet "
                          f"(status {card.get('status')}); resume it in 02_finetune")
                continue
            azure = card.get("provider") == "azure"
            if azure and not card.get("azure_deployment"):
                say(log, f"skipped {card['model_id']} ({path.name}): deploy it in Azure, then set "
                          "azure_deployment in 02's parameters (see the card's usage_instructions)")
                continue
            card_client = (client or hosted_client("azure", log=log)) if azure else openai_client
            if card_client is None:
                say(log, f"skipped {card['model_id']} ({path.name}): no OpenAI client (set OPENAI_API_KEY)")
                continue
            add(open_model(path, run_dir, client=card_client, endpoint={**hosted, **({} if azure else batch)},
                           **gen))
            if include_openai_base and card.get("base_model"):
                add(EndpointChatModel(openai_client, card["base_model"], name=f"{card['base_model']} (base)",
                                      max_tokens=max_tokens, temperature=temperature, seed=seed, log=log,
                                      **hosted, **batch))
        elif kind == "local_lora":
            add(open_model(path, run_dir, local=local, **gen))
            if include_base and card.get("base_model"):
                base = open_model(path, run_dir, base_only=True, local=local, **gen)
                if base.name not in seen:
                    add(base)
        else:
            say(log, f"skipped {path.name}: unknown kind {kind!r}")
    for ep in extra_endpoints or ():
        add(open_model(ep, run_dir, endpoint=hosted, **gen))
    say(log, f"{len(models)} model(s) to evaluate: " + (", ".join(m.name for m in models) or "none"))
    return models
