"""One reply of a saved model (an OpenAI / Azure OpenAI fine-tune, or a local LoRA card) to a conversation."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from kokoro_helpers import cards
from kokoro_helpers.hosted.client import client_for_card, inference_model
from kokoro_helpers.hosted.errors import LocalModelUnavailable


def _as_card(card_or_model_id: Any) -> dict[str, Any]:
    if isinstance(card_or_model_id, dict):
        return card_or_model_id
    text = str(card_or_model_id)
    if text.endswith(".json") and Path(text).is_file():
        return cards.load_card(text)
    return {"model_id": text, "kind": "openai"}


def chat(card_or_model_id: Any, messages: Iterable[dict[str, Any]], client: Any = None, max_tokens: int = 512,
         temperature: float = 0.7, system: str | None = None, deployment: str | None = None) -> str:
    """One reply of a saved model to `messages`. `card_or_model_id`: a card (dict or path) or a model id.
    `system` replaces/adds the system message; otherwise the card's training system prompt is added
    when the messages have none. Local LoRA cards go to kokoro_helpers.local.generate.chat_local."""
    card = _as_card(card_or_model_id)
    msgs = [dict(m) for m in messages]
    prompt = system if system is not None else card.get("system_prompt")
    if system is not None:
        msgs = [m for m in msgs if m.get("role") != "system"]
    if prompt and not any(m.get("role") == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": prompt})
    if card.get("kind") == "local_lora":
        try:
            from kokoro_helpers.local.generate import chat_local
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.endswith("kokoro_helpers.local.generate"):
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

