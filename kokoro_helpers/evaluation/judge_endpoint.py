"""Which LLM judge 03 uses: any OpenAI-compatible endpoint, OpenAI itself, or an offline fake.

The `judge` setting (03's parameter, params/*.yaml):

    judge: null                               # no judge: the judge steps say so and are skipped
    judge: fake                               # the deterministic offline fake (tests, embedded default)
    judge: {model: gpt-4.1-mini-2025-04-14}   # OpenAI, key from OPENAI_API_KEY (environment or .env)
    judge: {model: Qwen/Qwen2.5-7B-Instruct, base_url: "http://127.0.0.1:8001/v1"}      # local vLLM
    judge: {model: lora-tiny, base_url: "http://127.0.0.1:8000/v1"}                      # 04's server
    judge: {model: my-gpt-4o, base_url: "https://<resource>.openai.azure.com/openai/v1/",
            api_key_env: AZURE_OPENAI_API_KEY}                                         # Azure OpenAI (v1 API)

`api_key_env` names the environment variable that holds the endpoint's key (never the key itself:
papermill writes parameters into the reports). Without it a third-party `base_url` gets the
placeholder key "EMPTY" (local servers need none); OPENAI_API_KEY is sent only to OpenAI.
The old `judge_model` parameter still works: `judge_model: X` means `judge: {model: X}`.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Mapping

FAKE_NAME = "fake-judge"
FAKE_LABEL = ("FAKE judge: a deterministic offline stand-in (hash of the text + simple counts), not an "
              "LLM — its scores and correlations only show that the machinery works")


@dataclass
class JudgeSpec:
    client: Any
    model: str
    label: str                 # what the tables call it
    is_fake: bool = False
    is_openai: bool = False    # api.openai.com: the Batch API is available

    @property
    def name(self) -> str:
        return FAKE_NAME if self.is_fake else self.model


class JudgeConfigError(ValueError):
    """The `judge` setting is malformed; the message shows the accepted forms."""


def resolve_judge(judge: Any = None, judge_model: str | None = None, *, max_retries: int = 2,
                  timeout: float = 120.0, log=print) -> JudgeSpec | None:
    """The judge of a `judge` setting (see the module doc), or None (with a note saying why) when
    there is none or its key is missing."""
    if judge_model and judge in (None, "fake"):      # an explicit judge_model beats the offline default
        judge = {"model": judge_model}
    if judge is None or judge is False or judge == "":
        if log:
            log("no LLM judge configured (judge: null): the judge steps are skipped. Set judge to "
                "{model: ..., base_url: ...} (any OpenAI-compatible server) or {model: ...} with OPENAI_API_KEY.")
        return None
    if judge == "fake":
        return JudgeSpec(FakeJudgeClient(), FAKE_NAME, FAKE_LABEL, is_fake=True)
    if isinstance(judge, str):
        judge = {"model": judge}
    if not isinstance(judge, Mapping) or not judge.get("model"):
        raise JudgeConfigError(f"judge must be null, 'fake', a model name or {{model, base_url, api_key_env}}, "
                               f"got {judge!r}")
    model = str(judge["model"])
    base_url = judge.get("base_url")
    import os

    from kokoro_helpers.hosted import client as openai_client
    if os.environ.get(openai_client.FORCE_DRY_RUN_ENV) == "1" and (not base_url or "api.openai.com" in str(base_url)):
        if log:
            log(f"LLM judge {model} skipped: OpenAI calls are off ({openai_client.FORCE_DRY_RUN_ENV}=1: tests never spend money)")
        return None
    if base_url:
        from kokoro_helpers.models.base import ModelError
        from kokoro_helpers.models.endpoint import endpoint_client
        try:
            client = endpoint_client(str(base_url), judge.get("api_key_env"), max_retries=max_retries, timeout=timeout)
        except ModelError as exc:
            if log:
                log(f"LLM judge skipped: {exc}")
            return None
        is_openai = "api.openai.com" in str(base_url)
        return JudgeSpec(client, model, f"{model} @ {base_url}", is_openai=is_openai)
    if not openai_client.has_api_key():
        if log:
            log(f"LLM judge {model} skipped: {openai_client.ENV_KEY} is not set (environment or .env); "
                f"or give the judge a base_url of an OpenAI-compatible server")
        return None
    return JudgeSpec(openai_client.make_client(max_retries=max_retries, timeout=timeout), model, model, is_openai=True)


# ---- the offline fake ------------------------------------------------------------------------------

def _unit(text: str, salt: str) -> float:
    """A number in [0, 1) from sha256(salt + text): deterministic 'noise'."""
    return int(hashlib.sha256(f"{salt}\x00{text}".encode("utf-8")).hexdigest()[:8], 16) / 2 ** 32


def fake_rating(text: str, key: str, lo: int, hi: int) -> int:
    """The fake judge's integer rating in lo..hi of `text` for `key`: half a simple count (share of
    counselor lines that ask or acknowledge), half hash noise. Deterministic."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    counselor = [ln for ln in lines if ln.startswith("カウンセラー")]
    warm = sum(1 for ln in counselor if re.search(r"[？?]|ですね|なんですね|ありがとう", ln))
    share = warm / len(counselor) if counselor else 0.0
    value = 0.5 * min(1.0, share * 1.5) + 0.5 * _unit(text, key)
    return int(round(lo + value * (hi - lo)))


class _Completions:
    def __init__(self, owner: "FakeJudgeClient"):
        self.owner = owner

    def create(self, *, model: str, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        self.owner.calls += 1
        prompt = messages[-1]["content"]
        keys = re.findall(r'"([A-Za-z_]+)": <(\d+)〜(\d+)の整数>', prompt)
        body = prompt.split("## 対話", 1)[-1]
        if '"winner"' in prompt:
            a = body.split("## 候補 A", 1)[-1].split("## 候補 B", 1)[0]
            b = body.split("## 候補 B", 1)[-1].split("## 出力", 1)[0]
            sa, sb = fake_rating(a, "pair", 0, 100), fake_rating(b, "pair", 0, 100)
            answer = {"winner": "A" if sa > sb else "B" if sb > sa else "tie", "reason": "fake"}
        else:
            answer = {"scores": {k: fake_rating(body, k, int(lo), int(hi)) for k, lo, hi in keys}, "reason": "fake"}
        text = json.dumps(answer, ensure_ascii=False)
        return SimpleNamespace(model=FAKE_NAME, created=int(time.time()),
                               choices=[SimpleNamespace(message=SimpleNamespace(content=text, role="assistant"),
                                                        finish_reason="stop", index=0)],
                               usage=SimpleNamespace(prompt_tokens=len(prompt), completion_tokens=len(text)))


class FakeJudgeClient:
    """A stand-in for an OpenAI client (`chat.completions.create`) that answers the judge's
    prompts with `fake_rating`s in the asked JSON shape. Offline and deterministic; labelled as a
    fake wherever its numbers appear."""

    base_url = "fake://judge"

    def __init__(self):
        self.calls = 0
        self.chat = SimpleNamespace(completions=_Completions(self))

    def with_options(self, **_: Any) -> "FakeJudgeClient":
        return self


def batch_runner(spec: JudgeSpec | None, run_dir: Any, name: str, enabled: bool = False, *,
                 poll_seconds: float = 30.0, log=print) -> Any:
    """A batch_api.BatchRunner for this judge when `enabled` (judge_batch) and the judge is OpenAI's
    (the Batch API is OpenAI's own); otherwise None, with a note when batching was asked for."""
    if not enabled or spec is None:
        return None
    if not spec.is_openai:
        if log:
            log(f"judge_batch: the Batch API is OpenAI's; {spec.label} is asked request by request")
        return None
    from kokoro_helpers.hosted.batch import BatchRunner
    return BatchRunner(spec.client, run_dir, f"judge-{name}", poll_seconds=poll_seconds, log=log)
