"""03_eval: the same items for every model, and their replies, cached.

The steps the notebook calls in turn (metrics in :mod:`kokoro_helpers.evaluation.metrics`, the optional LLM
judge in :mod:`kokoro_helpers.evaluation.judge`, human scores in :mod:`kokoro_helpers.evaluation.scoring`):

    items = build_eval_items(run_dir, splits=("test", "valid"), max_eval_items=20, seed=42)
    save_items(items, run_dir)                                   # run_dir/eval/items.jsonl
    responders = models_from_run(run_dir, extra_endpoints=[{"base_url": ..., "model": ...}])
    gens = generate_all(items, responders, run_dir)              # cached: a re-run costs nothing

What lives where under `run_dir/eval/`:

    items.jsonl          the evaluation items (item_id, split, context, reference, ...)
    cache/<model>.jsonl  append-only generation cache, one line per reply, flushed and fsync'd:
                         keyed by (model, item_id, sha of the generation settings)
    generations.jsonl    item_id, model, split, response, settings, latency, tokens, ...
    metrics.csv          one row per model, one column per metric (metrics.py)
    judge/cache.jsonl    append-only cache of LLM-judge answers (judge.py; they cost money too)
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import itertools
import json
import os
import random
import re
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from kokoro_helpers.progress import tqdm

from kokoro_helpers.cards import now_iso
from kokoro_helpers.jsonio import file_sha256, read_jsonl, write_jsonl
from kokoro_helpers.retry import is_transient_error
from kokoro_helpers.paths import resolve

Item = dict[str, Any]
Log = Callable[[str], None] | None

DEFAULT_SPLITS = ("test", "valid")
DEFAULT_MAX_EVAL_ITEMS = 20            # per split, like the seeds' max_test_cases
KEEP_MESSAGE_KEYS = ("role", "content", "name")


class EvalError(RuntimeError):
    """A problem with the evaluation's inputs or set-up; the message says what to do."""


class GenerationError(EvalError):
    """Generation failed for one or more models. Every reply obtained before the failure is in the
    cache: fix the cause and re-run; only the missing replies are generated."""

    def __init__(self, message: str, failures: Mapping[str, BaseException] | None = None):
        super().__init__(message)
        self.failures = dict(failures or {})


class LocalGenerationUnavailable(EvalError):
    """kokoro_helpers.local.generate (04's local generation) is not available in this checkout."""


def _say(log: Log, msg: str) -> None:
    if log is not None:
        log(msg)


def _sha1(obj: Any) -> str:
    blob = json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()


def eval_dir(run_dir: str | Path) -> Path:
    """run_dir/eval (not created)."""
    return resolve(run_dir) / "eval"


# =================================================================================================
# 1. Evaluation items
# =================================================================================================

def _clean_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A message as a chat API accepts it: role, content (and name), no training-only keys such as
    `weight`."""
    return {k: message[k] for k in KEEP_MESSAGE_KEYS if k in message}


def make_item_id(split: str, context: Sequence[Mapping[str, Any]], reference: str) -> str:
    """`<split>:<first 12 hex of sha1(context + reference)>`: the same text gives the same id in
    every run, whatever the file order or `max_eval_items`; changed text (e.g. another system
    prompt) gives a new id, so no cached reply is ever reused for a different prompt."""
    return f"{split}:{_sha1({'context': [_clean_message(m) for m in context], 'reference': reference})[:12]}"


def _read_examples(path: Path) -> list[list[dict[str, Any]]]:
    try:
        rows = read_jsonl(path)
        return [row["messages"] for row in rows]
    except (ValueError, KeyError, TypeError) as exc:
        raise EvalError(f"{path}: not one {{\"messages\": [...]}} per line ({exc}); "
                        f"re-run 01_data (prepare_data) to rewrite it") from exc


def candidate_items(messages: Sequence[Mapping[str, Any]], split: str, example_index: int = 0,
                    min_user_turns: int = 1) -> tuple[list[Item], Counter]:
    """Every assistant turn of one example as an item: the messages before it (system prompt
    included) are the context, its text the reference. Turns marked `"weight": 0` (context copied
    from a previous window) are not targets; nor are turns with fewer than `min_user_turns` user
    messages before them (the counselor's opening greeting answers nothing). Returns the items and
    a Counter of what was skipped and why."""
    items: list[Item] = []
    skipped: Counter = Counter()
    users = 0
    for j, msg in enumerate(messages):
        role = msg.get("role")
        if role == "user":
            users += 1
        if role != "assistant":
            continue
        if msg.get("weight", 1) == 0:
            skipped["weight_0_context_turn"] += 1
            continue
        if users < min_user_turns:
            skipped["no_user_turn_before"] += 1
            continue
        reference = msg.get("content")
        if not isinstance(reference, str) or not reference.strip():
            skipped["empty_reference"] += 1
            continue
        context = [_clean_message(m) for m in messages[:j]]
        items.append({"item_id": make_item_id(split, context, reference), "split": split,
                      "context": context, "reference": reference,
                      "example_index": example_index, "turn_index": j})
    return items, skipped


def build_eval_items(run_dir: str | Path = "runs/default", splits: Sequence[str] = DEFAULT_SPLITS,
                     max_eval_items: int | None = DEFAULT_MAX_EVAL_ITEMS, seed: int = 42,
                     min_user_turns: int = 1, log: Log = print) -> list[Item]:
    """The evaluation items from `run_dir/data/<split>.jsonl`, the same for every model.

    Each assistant (counselor) turn becomes an item `{item_id, split, context, reference,
    example_index, turn_index}` with the dialogue before it as `context` and the real reply as
    `reference` (see `candidate_items` for what is skipped). `max_eval_items` is the most items
    *per split* (the seeds' `max_test_cases`; None = all). The draw is deterministic: candidates
    are ordered by sha1(seed, item_id) and the first ones kept, so the same seed gives the same
    items, a larger `max_eval_items` keeps every item of a smaller one (cached replies stay
    useful), and file order does not matter. Items come back in file order (split, example, turn).
    """
    data = resolve(run_dir) / "data"
    items: list[Item] = []
    for split in splits:
        path = data / f"{split}.jsonl"
        if not path.is_file():
            raise EvalError(f"{path} not found: run 01_data (kokoro_helpers.data.pipeline.prepare_data) for this "
                            f"run_dir first, or drop {split!r} from splits")
        candidates: dict[str, Item] = {}
        skipped: Counter = Counter()
        for k, messages in enumerate(_read_examples(path)):
            found, why = candidate_items(messages, split, k, min_user_turns)
            skipped.update(why)
            for it in found:
                if it["item_id"] in candidates:
                    skipped["duplicate_context_and_reply"] += 1
                else:
                    candidates[it["item_id"]] = it
        pool = list(candidates.values())
        if max_eval_items is not None and len(pool) > int(max_eval_items):
            pool.sort(key=lambda it: _sha1([seed, it["item_id"]]))
            pool = pool[: int(max_eval_items)]
        pool.sort(key=lambda it: (it["example_index"], it["turn_index"]))
        items.extend(pool)
        why = ", ".join(f"{r} {n}" for r, n in sorted(skipped.items())) or "none"
        _say(log, f"{split}: {len(pool)} items drawn (seed {seed}) from {len(candidates)} counselor turns; "
                  f"not targets: {why}")
    if not items:
        raise EvalError(f"no evaluation items in {data} for splits {list(splits)}: "
                        f"are the split files empty?")
    return items


def describe_items(items: Sequence[Item]):
    """Per split: items, examples they come from, mean context messages, mean reference length."""
    import pandas as pd
    frame = pd.DataFrame([{"split": it["split"], "example": it.get("example_index"),
                           "context_messages": len(it["context"]),
                           "reference_chars": len(_chars(it["reference"]))} for it in items])
    return frame.groupby("split", sort=False).agg(
        items=("example", "size"), examples=("example", "nunique"),
        mean_context_messages=("context_messages", "mean"),
        mean_reference_chars=("reference_chars", "mean")).round(1)


def save_items(items: Sequence[Item], run_dir: str | Path) -> Path:
    """Write the items to run_dir/eval/items.jsonl (atomically) so scoring sessions and later
    notebooks use exactly the same ones."""
    path = eval_dir(run_dir) / "items.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, list(items))
    return path


def load_items(run_dir: str | Path) -> list[Item]:
    """The items written by `save_items`."""
    path = eval_dir(run_dir) / "items.jsonl"
    if not path.is_file():
        raise EvalError(f"{path} not found: build the items (build_eval_items + save_items) first")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# =================================================================================================
# 2. Responders (one interface), retries, concurrency
# =================================================================================================

OnResult = Callable[[int, str, dict[str, Any]], None]


class Responder(Protocol):
    """What generate_all needs from a model.

    `name` labels its rows (and its cache file); `settings` is everything that changes its replies
    (its sha is part of the cache key); `respond(items, on_result=None)` returns one reply per
    item, in order, and should call `on_result(index, text, meta)` as each reply arrives so that
    replies are cached even if the run is interrupted (`meta`: latency, tokens, ... if known).
    """

    name: str
    settings: dict[str, Any]

    def respond(self, items: Sequence[Item], on_result: OnResult | None = None) -> list[str]: ...


@dataclass
class RetryPolicy:
    """Our own retry around each call, on top of the SDK's `max_retries`: exponential backoff
    (`base_delay` · 2^k, at most `max_delay`, with jitter) on transient errors, `retries` times."""

    retries: int = 4
    base_delay: float = 2.0
    max_delay: float = 60.0
    sleep: Callable[[float], None] = time.sleep

    def call(self, fn: Callable[[], Any], on_retry: Callable[[BaseException, float], None] | None = None) -> Any:
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as exc:
                if attempt >= self.retries or not is_transient_error(exc):
                    raise
                delay = min(self.max_delay, self.base_delay * 2 ** attempt) * (0.5 + random.random() / 2)
                attempt += 1
                if on_retry is not None:
                    on_retry(exc, delay)
                self.sleep(delay)


def run_concurrently(fn: Callable[[Any], Any], inputs: Sequence[Any], concurrency: int = 4,
                     on_result: Callable[[int, Any], None] | None = None, progress: bool = True,
                     desc: str = "") -> list[Any]:
    """fn(x) for every input on at most `concurrency` threads; results in input order.

    Results are handed to `on_result(index, value)` in the calling thread as they complete (so the
    caller can write them to disk without locks). No more than `concurrency` calls are ever in
    flight. The first exception stops new work, waits for the calls in flight (their results
    are still handed over) and is re-raised; so is KeyboardInterrupt."""
    n = len(inputs)
    results: list[Any] = [None] * n
    if n == 0:
        return results
    concurrency = max(1, int(concurrency))
    bar = tqdm(total=n, desc=desc, unit="item", disable=not progress)
    pending = iter(range(n))
    error: BaseException | None = None
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        running = {}
        try:
            for i in itertools.islice(pending, concurrency):
                running[pool.submit(fn, inputs[i])] = i
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = running.pop(fut)
                    try:
                        value = fut.result()
                    except BaseException as exc:  # noqa: BLE001 - re-raised below
                        error = error or exc
                        continue
                    results[i] = value
                    if on_result is not None:
                        on_result(i, value)
                    bar.update(1)
                    if error is None:
                        nxt = next(pending, None)
                        if nxt is not None:
                            running[pool.submit(fn, inputs[nxt])] = nxt
        except BaseException:
            for fut in running:
                fut.cancel()
            raise
        finally:
            bar.close()
    if error is not None:
        raise error
    return results


def _usage_meta(resp: Any) -> dict[str, Any]:
    usage = getattr(resp, "usage", None)
    meta: dict[str, Any] = {"prompt_tokens": getattr(usage, "prompt_tokens", None),
                            "completion_tokens": getattr(usage, "completion_tokens", None)}
    try:
        choice = resp.choices[0]
        meta["finish_reason"] = getattr(choice, "finish_reason", None)
    except (AttributeError, IndexError, TypeError):
        pass
    served = getattr(resp, "model", None)
    if isinstance(served, str):
        meta["served_model"] = served
    return meta


def _completion_text(resp: Any) -> str:
    try:
        content = resp.choices[0].message.content
    except (AttributeError, IndexError, TypeError) as exc:
        raise EvalError(f"the endpoint answered without choices[0].message ({type(resp).__name__})") from exc
    return content or ""


class OpenAIChatResponder:
    """Replies from an OpenAI chat model (a fine-tuned `ft:...` model) or from any OpenAI-compatible
    endpoint (vLLM, 04's server): give a client built with that endpoint's `base_url`.

    Calls `client.chat.completions.create` for each item, at most `concurrency` at a time, each
    retried on transient errors by the SDK (`sdk_max_retries`, when given, via
    `client.with_options`) and then by our own backoff (`retries`, `base_delay`, `max_delay`).
    `temperature=0` by default so replies are as repeatable as the service allows; `seed` is
    passed on when given. `cache_tag` goes into the settings: change it when the model behind a
    name changed (an endpoint serving a new adapter under the same name)."""

    kind = "openai"

    def __init__(self, client: Any, model: str, *, name: str | None = None, max_tokens: int = 256,
                 temperature: float = 0.0, top_p: float | None = None, seed: int | None = None,
                 concurrency: int = 4, retries: int = 4, base_delay: float = 2.0, max_delay: float = 60.0,
                 sdk_max_retries: int | None = None, timeout: float | None = None,
                 extra_body: Mapping[str, Any] | None = None, cache_tag: str | None = None,
                 progress: bool = True, sleep: Callable[[float], None] = time.sleep, log: Log = print,
                 batch_run_dir: str | Path | None = None, batch_poll_seconds: float = 30.0):
        if not model:
            raise EvalError("OpenAIChatResponder needs a model name")
        self.batch_run_dir = batch_run_dir          # set: replies through OpenAI's Batch API (batch_api.py)
        self.batch_poll_seconds = batch_poll_seconds
        self.client = client
        self.model = model
        self.name = name or model
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
        self.top_p = top_p
        self.seed = seed
        self.concurrency = max(1, int(concurrency))
        self.retry = RetryPolicy(retries, base_delay, max_delay, sleep)
        self.sdk_max_retries = sdk_max_retries
        self.timeout = timeout
        self.extra_body = dict(extra_body or {})
        self.cache_tag = cache_tag
        self.progress = progress
        self.log = log

    @property
    def base_url(self) -> str:
        return str(getattr(self.client, "base_url", "") or "")

    @property
    def settings(self) -> dict[str, Any]:
        s = {"kind": "chat.completions", "model": self.model, "base_url": self.base_url,
             "max_tokens": self.max_tokens, "temperature": self.temperature}
        for key in ("top_p", "seed", "cache_tag"):
            if getattr(self, key) is not None:
                s[key] = getattr(self, key)
        if self.extra_body:
            s["extra_body"] = self.extra_body
        return s

    def _client(self) -> Any:
        opts = {}
        if self.sdk_max_retries is not None:
            opts["max_retries"] = int(self.sdk_max_retries)
        if self.timeout is not None:
            opts["timeout"] = self.timeout
        if opts and hasattr(self.client, "with_options"):
            return self.client.with_options(**opts)
        return self.client

    def request(self, messages: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The keyword arguments of one chat.completions.create call."""
        kwargs: dict[str, Any] = {"model": self.model, "messages": [_clean_message(m) for m in messages],
                                  "max_tokens": self.max_tokens, "temperature": self.temperature}
        if self.top_p is not None:
            kwargs["top_p"] = self.top_p
        if self.seed is not None:
            kwargs["seed"] = self.seed
        if self.extra_body:
            kwargs["extra_body"] = self.extra_body
        return kwargs

    def _one(self, item: Item) -> tuple[str, dict[str, Any]]:
        client = self._client()
        kwargs = self.request(item["context"])
        retries = []

        def note(exc: BaseException, delay: float) -> None:
            retries.append(type(exc).__name__)
            _say(self.log, f"{self.name}: transient {type(exc).__name__} "
                           f"({getattr(exc, 'status_code', '') or 'no status'}) on {item['item_id']}; "
                           f"retry {len(retries)}/{self.retry.retries} in {delay:.1f}s")

        t0 = time.perf_counter()
        resp = self.retry.call(lambda: client.chat.completions.create(**kwargs), on_retry=note)
        meta = {"latency_s": round(time.perf_counter() - t0, 3), **_usage_meta(resp)}
        if retries:
            meta["retries"] = len(retries)
        return _completion_text(resp), meta

    def _respond_batch(self, items: Sequence[Item], on_result: OnResult | None) -> list[str]:
        """All replies in one OpenAI batch (custom_id = item_id), resumable (batch_api.BatchRunner).
        Replies are handed to `on_result` (cached) before any failure is raised."""
        from kokoro_helpers.hosted.batch import BatchError, BatchRunner
        bodies = {}
        for it in items:
            b = self.request(it["context"])
            b.update(b.pop("extra_body", None) or {})
            bodies[it["item_id"]] = b
        runner = BatchRunner(self._client(), self.batch_run_dir, f"replies-{self.name}",
                             poll_seconds=self.batch_poll_seconds, log=self.log)
        try:
            results = runner.run(bodies)
            failure: BaseException | None = None
        except BatchError as exc:
            results, failure = exc.partial, exc
        out: list[str] = []
        missing = []
        for i, it in enumerate(items):
            r = results.get(it["item_id"])
            if r is None or r.text is None:
                missing.append(f"{it['item_id']}: {r.error if r is not None else 'no result'}")
                out.append("")
                continue
            out.append(r.text)
            if on_result is not None:
                usage = r.usage or {}
                on_result(i, r.text, {"via": "batch", "prompt_tokens": usage.get("prompt_tokens"),
                                      "completion_tokens": usage.get("completion_tokens")})
        if failure is not None:
            raise failure
        if missing:
            raise EvalError(f"{self.name}: {len(missing)} of {len(items)} batch request(s) failed (first: "
                            f"{missing[0]}); the others are cached: re-run to ask for the rest")
        return out

    def respond(self, items: Sequence[Item], on_result: OnResult | None = None) -> list[str]:
        if self.batch_run_dir is not None and items:
            return self._respond_batch(list(items), on_result)

        def handed(i: int, value: tuple[str, dict[str, Any]]) -> None:
            if on_result is not None:
                on_result(i, value[0], value[1])

        out = run_concurrently(self._one, list(items), self.concurrency, handed, self.progress,
                               desc=f"generate {self.name}")
        return [text for text, _ in out]

    def __repr__(self) -> str:
        return f"OpenAIChatResponder(name={self.name!r}, base_url={self.base_url!r})"


def _generate_module() -> Any:
    try:
        return importlib.import_module("kokoro_helpers.local.generate")
    except ModuleNotFoundError as exc:
        if exc.name not in ("kokoro_helpers.local.generate", None):
            raise
        raise LocalGenerationUnavailable(
            "local generation needs kokoro_helpers.local.generate (04_local_lora_inference: batch_generate, "
            "load_model), which this checkout does not have yet. Meanwhile evaluate the adapter through "
            "an OpenAI-compatible server (extra_endpoints=[{'base_url': 'http://127.0.0.1:8000/v1', "
            "'model': ...}]), or pass model=, tokenizer= and generate_fn= to LocalResponder.") from exc


def _file_sha256(path: Path, limit: int = 1 << 30) -> str | None:
    """The file's sha256, or None when it is missing or over `limit` bytes (not worth hashing)."""
    if not path.is_file() or path.stat().st_size > limit:
        return None
    return file_sha256(path)


class LocalResponder:
    """Replies from a local model: a `local_lora` card (its adapter, or with `base_only=True` its
    base model as a baseline), a card file, or a model folder.

    The model is loaded lazily, on the first `respond` (a fully cached run never loads it), by
    `loader(card_or_path, base_only=...) -> (model, tokenizer)` — by default
    `kokoro_helpers.local.generate.load_model` — and replies come from
    `generate_fn(model, tokenizer, list_of_messages, max_new_tokens=..., temperature=..., ...)` —
    by default `kokoro_helpers.local.generate.batch_generate` (04's batched generation) — called on
    chunks of `batch_size` so each chunk is cached as soon as it is done. Pass `model=` and
    `tokenizer=` to use an already loaded model."""

    kind = "local"

    def __init__(self, card_or_path: Any, *, name: str | None = None, base_only: bool = False,
                 max_new_tokens: int = 256, temperature: float = 0.0, top_p: float | None = None,
                 seed: int | None = None, batch_size: int = 8, model: Any = None, tokenizer: Any = None,
                 loader: Callable[..., tuple[Any, Any]] | None = None,
                 generate_fn: Callable[..., Sequence[Any]] | None = None, cache_tag: str | None = None,
                 progress: bool = True, **generate_kwargs: Any):
        self.card_path: Path | None = None
        self.card: dict[str, Any] | None = None
        if isinstance(card_or_path, Mapping):
            self.card = dict(card_or_path)
        elif isinstance(card_or_path, (str, Path)) and str(card_or_path).endswith(".json"):
            from kokoro_helpers.cards import load_card
            self.card_path = Path(card_or_path)
            self.card = load_card(self.card_path)
        self.source = card_or_path
        self.base_only = bool(base_only)
        if name is None:
            if self.card is not None:
                name = (f"{self.card.get('base_model')} (base)" if self.base_only
                        else str(self.card.get("model_id")))
            else:
                name = Path(str(card_or_path)).name or str(card_or_path)
        self.name = name
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.top_p = top_p
        self.seed = seed
        self.batch_size = max(1, int(batch_size))
        self.model, self.tokenizer = model, tokenizer
        self.loader = loader
        self.generate_fn = generate_fn
        self.cache_tag = cache_tag
        self.progress = progress
        self.generate_kwargs = generate_kwargs
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        """What identifies the weights: the adapter file's sha256 (a retrained adapter under the same
        name gets new cache keys), else the card's timestamp, else the source's name."""
        if self._fingerprint is None:
            fp = None
            if self.card is not None and self.base_only:
                fp = f"base:{self.card.get('base_fingerprint') or self.card.get('base_model')}"   # by content
            elif self.card is not None:
                from kokoro_helpers.cards import adapter_dir
                folder = adapter_dir(self.card, self.card_path)
                sha = _file_sha256(folder / "adapter_model.safetensors") if folder else None
                fp = f"adapter-sha256:{sha}" if sha else f"card:{self.card.get('model_id')}@{self.card.get('timestamp')}"
            else:
                path = Path(str(self.source))
                weights = next(iter(sorted(path.glob("*.safetensors"))), None) if path.is_dir() else None
                sha = _file_sha256(weights) if weights else None
                fp = f"weights-sha256:{sha}" if sha else f"source:{self.source}"
            self._fingerprint = fp
        return self._fingerprint

    @property
    def settings(self) -> dict[str, Any]:
        s: dict[str, Any] = {"kind": "local", "weights": self.fingerprint(), "base_only": self.base_only,
                             "max_new_tokens": self.max_new_tokens, "temperature": self.temperature}
        for key in ("top_p", "seed", "cache_tag"):
            if getattr(self, key) is not None:
                s[key] = getattr(self, key)
        if self.generate_kwargs:
            s["generate_kwargs"] = self.generate_kwargs
        return s

    def load(self) -> tuple[Any, Any]:
        """(model, tokenizer), loaded once."""
        if self.model is None or self.tokenizer is None:
            loader = self.loader
            if loader is None:
                gen = _generate_module()
                loader = getattr(gen, "load_model", None)
                if loader is None:
                    raise LocalGenerationUnavailable(
                        "kokoro_helpers.local.generate has no load_model(card_or_path, base_only=...): "
                        "pass loader= (or model= and tokenizer=) to LocalResponder")
            source = self.card_path if self.card_path is not None else (self.card or self.source)
            self.model, self.tokenizer = loader(source, base_only=self.base_only)
        return self.model, self.tokenizer

    def _generate_fn(self) -> Callable[..., Sequence[Any]]:
        if self.generate_fn is None:
            gen = _generate_module()
            fn = getattr(gen, "batch_generate", None)
            if fn is None:
                raise LocalGenerationUnavailable("kokoro_helpers.local.generate has no batch_generate(model, "
                                                 "tokenizer, messages, max_new_tokens, temperature, ...)")
            self.generate_fn = fn
        return self.generate_fn

    def respond(self, items: Sequence[Item], on_result: OnResult | None = None) -> list[str]:
        items = list(items)
        if not items:
            return []
        fn = self._generate_fn()
        model, tokenizer = self.load()
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                                  **self.generate_kwargs}
        if self.top_p is not None:
            kwargs["top_p"] = self.top_p
        if self.seed is not None:
            kwargs["seed"] = self.seed
        out: list[str] = []
        bar = tqdm(total=len(items), desc=f"generate {self.name}", unit="item", disable=not self.progress)
        try:
            for start in range(0, len(items), self.batch_size):
                chunk = items[start:start + self.batch_size]
                t0 = time.perf_counter()
                replies = fn(model, tokenizer, [it["context"] for it in chunk], **kwargs)
                took = time.perf_counter() - t0
                replies = list(replies)
                if len(replies) != len(chunk):
                    raise EvalError(f"{self.name}: generate_fn returned {len(replies)} replies for {len(chunk)} prompts")
                for k, reply in enumerate(replies):
                    text = reply if isinstance(reply, str) else getattr(reply, "text", None)
                    if text is None and isinstance(reply, Mapping):
                        text = reply.get("text", reply.get("response"))
                    if not isinstance(text, str):
                        raise EvalError(f"{self.name}: generate_fn returned {type(reply).__name__}, not text")
                    out.append(text)
                    if on_result is not None:
                        on_result(start + k, text, {"batch_latency_s": round(took, 3), "batch_size": len(chunk)})
                bar.update(len(chunk))
        finally:
            bar.close()
        return out

    def __repr__(self) -> str:
        return f"LocalResponder(name={self.name!r}, base_only={self.base_only})"


def default_client(max_retries: int = 5, timeout: float = 120.0, log: Log = print,
                   provider: str = "openai") -> Any | None:
    """An OpenAI (or, provider="azure", Azure OpenAI) client when its key is set (environment or .env),
    else None (and a note). The key is read by the SDK from the environment; it is never a parameter."""
    from kokoro_helpers.hosted.client import has_api_key, make_client
    from kokoro_helpers.hosted.errors import KEY_ENV
    if not (has_api_key() if provider == "openai" else has_api_key(provider)):
        _say(log, f"{KEY_ENV[provider]} is not set (environment or .env): {provider} models are skipped.")
        return None
    return make_client(max_retries=max_retries, timeout=timeout, provider=provider)


def endpoint_client(base_url: str, api_key_env: str | None = None, max_retries: int = 2,
                    timeout: float = 300.0) -> Any:
    """An `openai.OpenAI` client for an OpenAI-compatible server (vLLM, 04's server). Its key is read
    from the environment variable `api_key_env` when given, else the placeholder "EMPTY" (local
    servers need none; OPENAI_API_KEY is deliberately not sent to a third-party URL)."""
    import openai
    key = os.environ.get(api_key_env, "") if api_key_env else ""
    if api_key_env and not key:
        raise EvalError(f"endpoint {base_url}: environment variable {api_key_env} is not set")
    return openai.OpenAI(base_url=base_url, api_key=key or "EMPTY", max_retries=max_retries, timeout=timeout)


def models_from_run(run_dir: str | Path = "runs/default", include_base: bool = True,
                    extra_endpoints: Iterable[Mapping[str, Any]] = (), *, client: Any = None,
                    include_openai_base: bool = False, max_tokens: int = 256, temperature: float = 0.0,
                    seed: int | None = None, concurrency: int = 4, local_batch_size: int = 8,
                    openai_batch: bool = False, progress: bool = True, log: Log = print) -> list[Any]:
    """What to evaluate, as responders:

    * every card in run_dir/models (`cards.list_cards`): kind `openai` → its fine-tuned model
      through `client` (default: `default_client()` when OPENAI_API_KEY is set; without one these
      cards are skipped with a note), and with `include_openai_base` its base model too; cards
      whose job has no model yet are skipped with a note. Kind `local_lora` → its adapter and,
      with `include_base`, its base model as a baseline (once per base);
    * every endpoint in `extra_endpoints`: `{"base_url": ..., "model": ..., "name": optional,
      "api_key_env": optional (the variable holding its key), "cache_tag": optional, "client":
      optional ready-made client}`.
    `openai_batch` (03's `eval_batch`): the OpenAI cards' models answer through OpenAI's Batch API
    (half price; resumable, see batch_api.py); endpoints are always asked request by request.
    Generation settings (`max_tokens`, `temperature`, `seed`) are the same for every model."""
    from kokoro_helpers.cards import list_cards
    responders: list[Any] = []
    seen: set[str] = set()

    def add(r: Any) -> None:
        if r.name in seen:
            _say(log, f"skipped a second model named {r.name!r}")
            return
        seen.add(r.name)
        responders.append(r)

    common = dict(temperature=temperature, seed=seed, progress=progress)
    batch = dict(batch_run_dir=run_dir) if openai_batch else {}
    cards_found = list_cards(run_dir)
    openai_client = client
    if openai_client is None and any(c.get("kind") == "openai" and c.get("provider", "openai") == "openai"
                                     for _, c in cards_found):
        openai_client = default_client(log=log)
    for path, card in cards_found:
        kind = card.get("kind")
        if kind == "openai":
            if not card.get("model_id"):
                _say(log, f"skipped {path.name}: its job ({card.get('job_id')}) has no model yet "
                          f"(status {card.get('status')}); resume it in 02_finetune")
                continue
            card_client, model = openai_client, card["model_id"]
            if card.get("provider") == "azure":   # Azure serves a fine-tune only through its deployment
                card_client, model = client or default_client(log=log, provider="azure"), card.get("azure_deployment")
                if not model:
                    _say(log, f"skipped {card['model_id']} ({path.name}): deploy it in Azure, then set "
                              "azure_deployment in 02's parameters (see the card's usage_instructions)")
                    continue
            if card_client is None:
                _say(log, f"skipped {card['model_id']} ({path.name}): no OpenAI client (set OPENAI_API_KEY)")
                continue
            add(OpenAIChatResponder(card_client, model, max_tokens=max_tokens, concurrency=concurrency, log=log,
                                    **({"name": card["model_id"]} if model != card["model_id"] else {}), **common,
                                    **(batch if card.get("provider", "openai") == "openai" else {})))
            if include_openai_base and card.get("base_model"):
                add(OpenAIChatResponder(openai_client, card["base_model"], name=f"{card['base_model']} (base)",
                                        max_tokens=max_tokens, concurrency=concurrency, log=log, **common, **batch))
        elif kind == "local_lora":
            add(LocalResponder(path, max_new_tokens=max_tokens, batch_size=local_batch_size, **common))
            if include_base and card.get("base_model"):
                base = LocalResponder(path, base_only=True, max_new_tokens=max_tokens,
                                      batch_size=local_batch_size, **common)
                if base.name not in seen:
                    add(base)
        else:
            _say(log, f"skipped {path.name}: unknown kind {kind!r}")
    for ep in extra_endpoints or ():
        if not ep.get("base_url") or not ep.get("model"):
            raise EvalError(f"an endpoint needs base_url and model, got {dict(ep)!r}")
        ep_client = ep.get("client") or endpoint_client(ep["base_url"], ep.get("api_key_env"))
        add(OpenAIChatResponder(ep_client, ep["model"], name=ep.get("name") or f"{ep['model']} @ {ep['base_url']}",
                                max_tokens=max_tokens, concurrency=concurrency, cache_tag=ep.get("cache_tag"),
                                log=log, **common))
    _say(log, f"{len(responders)} model(s) to evaluate: " + (", ".join(r.name for r in responders) or "none"))
    return responders


# =================================================================================================
# 2b. Cache and generate_all
# =================================================================================================

def settings_sha(settings: Mapping[str, Any]) -> str:
    """12 hex of sha1 of the canonical JSON of the generation settings."""
    return _sha1(dict(settings))[:12]


class JsonlCache:
    """Append-only JSON-lines store: each `append` writes one line, flushed and fsync'd, so an
    interrupted run keeps every line written. A torn last line (a kill mid-write) is skipped on
    reading and never glued to the next one."""

    def __init__(self, path: str | Path, key_fields: Sequence[str]):
        self.path = Path(path)
        self.key_fields = tuple(key_fields)
        self._lock = threading.Lock()
        self.bad_lines = 0

    def key(self, row: Mapping[str, Any]) -> tuple:
        return tuple(row.get(k) for k in self.key_fields)

    def load(self) -> dict[tuple, dict[str, Any]]:
        """key -> row (the latest line wins)."""
        rows: dict[tuple, dict[str, Any]] = {}
        self.bad_lines = 0
        if not self.path.is_file():
            return rows
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    self.bad_lines += 1
                    continue
                if isinstance(row, dict):
                    rows[self.key(row)] = row
        return rows

    def append(self, row: Mapping[str, Any]) -> None:
        line = json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a+b") as f:
                if f.tell() > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":       # a torn line from a killed run: end it first
                        f.write(b"\n")
                f.write(line.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())


GEN_KEY = ("model", "item_id", "settings_sha")


def _slug(name: str) -> str:
    from kokoro_helpers.cards import slugify
    return slugify(name)


def generation_cache(run_dir: str | Path, model_name: str) -> JsonlCache:
    """The cache file of one model: run_dir/eval/cache/<slug of the name>.jsonl."""
    return JsonlCache(eval_dir(run_dir) / "cache" / f"{_slug(model_name)}.jsonl", GEN_KEY)


def _accepts_on_result(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "on_result" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def generate_all(items: Sequence[Item], responders: Sequence[Any], run_dir: str | Path = "runs/default", *,
                 strict: bool = True, log: Log = print):
    """Every responder's reply to every item, from the cache where possible.

    For each responder the cache (run_dir/eval/cache/<model>.jsonl, keyed by model name, item_id
    and the sha of its `settings`) is read first; only the missing items go to `respond`, and
    each reply is appended to the cache the moment it arrives, so an interrupted run keeps what
    it got and the next run generates only the rest. A fully cached responder is not called at
    all. A failing responder does not stop the others; with `strict` a GenerationError naming
    every failure is raised at the end (after generations.jsonl is written with what exists).

    Writes run_dir/eval/generations.jsonl — rewritten on each call with exactly these items ×
    these responders (so pass every model each time; the cache keeps the rest) — one row per
    (item, model) that has a reply:
    item_id, model, split, response, settings_sha, settings, cached (true when it came from an
    earlier run), time, and what is known of latency_s / prompt_tokens / completion_tokens /
    finish_reason — and returns the same rows as a DataFrame.
    """
    import pandas as pd

    items = list(items)
    ids = [it["item_id"] for it in items]
    if len(set(ids)) != len(ids):
        raise EvalError("item_ids are not unique: build the items with build_eval_items")
    names = [r.name for r in responders]
    if len(set(names)) != len(names):
        raise EvalError(f"two responders share a name ({names}): give each a distinct name=")
    rows: list[dict[str, Any]] = []
    failures: dict[str, BaseException] = {}
    for responder in responders:
        settings = dict(responder.settings)
        sha = settings_sha(settings)
        cache = generation_cache(run_dir, responder.name)
        have = cache.load()
        if cache.bad_lines:
            _say(log, f"{responder.name}: skipped {cache.bad_lines} unreadable line(s) in {cache.path} "
                      f"(a run killed mid-write); those replies will be generated again")
        found = {it["item_id"]: have.get((responder.name, it["item_id"], sha)) for it in items}
        missing = [it for it in items if found[it["item_id"]] is None]
        _say(log, f"{responder.name}: {len(items) - len(missing)} cached, {len(missing)} to generate")
        fresh: dict[str, dict[str, Any]] = {}

        def on_result(i: int, text: str, meta: Mapping[str, Any] | None = None,
                      _missing=missing, _cache=cache, _fresh=fresh, _name=responder.name,
                      _sha=sha, _settings=settings) -> None:
            it = _missing[i]
            if it["item_id"] in _fresh:
                return
            row = {"model": _name, "item_id": it["item_id"], "settings_sha": _sha, "split": it["split"],
                   "response": text, "settings": _settings, "time": now_iso(), **dict(meta or {})}
            _cache.append(row)
            _fresh[it["item_id"]] = row

        if missing:
            try:
                if _accepts_on_result(responder.respond):
                    replies = responder.respond(missing, on_result=on_result)
                else:
                    replies = responder.respond(missing)
                replies = list(replies or [])
                if len(replies) != len(missing):
                    raise EvalError(f"{responder.name}: respond() returned {len(replies)} replies for "
                                    f"{len(missing)} items")
                for i, text in enumerate(replies):   # responders that do not call on_result
                    on_result(i, text, None)
            except (KeyboardInterrupt, SystemExit):
                _say(log, f"{responder.name}: interrupted; {len(fresh)} new replies are cached, "
                          f"re-run to generate the rest")
                raise
            except Exception as exc:  # noqa: BLE001 - reported below, the other models still run
                failures[responder.name] = exc
                _say(log, f"{responder.name}: FAILED after {len(fresh)} of {len(missing)} new replies "
                          f"({type(exc).__name__}: {exc}); what it got is cached")
        for it in items:
            cached_row = found[it["item_id"]]
            row = cached_row if cached_row is not None else fresh.get(it["item_id"])
            if row is None:
                continue
            out = dict(row)
            out["split"] = it["split"]
            out["cached"] = cached_row is not None
            rows.append(out)
    path = eval_dir(run_dir) / "generations.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(path, rows)
    _say(log, f"wrote {len(rows)} generations to {path}")
    if failures and strict:
        detail = "; ".join(f"{n}: {type(e).__name__}: {e}" for n, e in failures.items())
        raise GenerationError(f"generation failed for {len(failures)} model(s) — {detail}. Every reply "
                              f"obtained is cached: fix the cause and re-run generate_all.", failures)
    frame = pd.DataFrame(rows)
    frame.attrs["failures"] = {n: f"{type(e).__name__}: {e}" for n, e in failures.items()}
    return frame


def generation_overview(generations: Any, run_dir: str | Path = "runs/default", log: Log = print):
    """Replies per model (and how many came from the cache), or None — after saying plainly why —
    when no model replied: no card in run_dir/models (02 trained or submitted nothing), or cards
    that could not be evaluated (the notes above name the reason for each)."""
    if generations is not None and len(generations):
        return generations.groupby("model").agg(replies=("item_id", "count"), from_cache=("cached", "sum"))
    from kokoro_helpers.cards import list_cards
    cards = list_cards(run_dir)
    if not cards:
        why = (f"no model card in {resolve(run_dir) / 'models'}: 02_finetune trained or submitted nothing "
               f"(local_mode auto trains a Hub-size model only on a GPU; OpenAI stays in dry run without "
               f"OPENAI_API_KEY), and no endpoints were given")
    else:
        why = (f"{len(cards)} model card(s) in {resolve(run_dir) / 'models'}, but none could be evaluated "
               f"(the notes above say why for each)")
    _say(log, f"No model replied: {why}. Skipped: automatic metrics, the judge of replies, human scoring and "
              f"paired comparisons. Still run: judge validity and score prediction (whole sessions).")
    return None


def load_generations(run_dir: str | Path):
    """run_dir/eval/generations.jsonl as a DataFrame."""
    import pandas as pd
    path = eval_dir(run_dir) / "generations.jsonl"
    if not path.is_file():
        raise EvalError(f"{path} not found: run generate_all first")
    return pd.read_json(path, lines=True, dtype={"item_id": str, "model": str, "response": str})


def scoring_items(generations: Any, items: Sequence[Item]) -> list[dict[str, Any]]:
    """`{item_id, model, context, reference, response}` per generation: the manual scoring widget's
    input (kokoro_helpers.evaluation.scoring.ScoringWidget)."""
    by_id = {it["item_id"]: it for it in items}
    out = []
    for row in _generation_rows(generations):
        it = by_id.get(row["item_id"])
        if it is not None:
            response = row.get("response")
            out.append({"item_id": it["item_id"], "model": row["model"], "split": it["split"],
                        "context": it["context"], "reference": it["reference"],
                        "response": response if isinstance(response, str) else ""})
    return out


_WS = re.compile(r"\s+")


def _chars(text: str) -> str:
    """The characters metrics count: the text with all whitespace removed (spaces and line breaks
    carry no meaning in Japanese replies)."""
    return _WS.sub("", text or "")


def _generation_rows(generations: Any) -> list[dict[str, Any]]:
    if generations is None:
        return []
    if hasattr(generations, "to_dict"):
        return generations.to_dict("records")
    if isinstance(generations, (str, Path)):
        path = Path(generations)
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [dict(r) for r in generations]
