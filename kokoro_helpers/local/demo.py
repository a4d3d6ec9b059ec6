"""The helpers of 04_local_lora_inference: which model to show (an untrained fallback before 02 has
trained one), the run's system prompt, held-out prompts to generate for, and the batched-vs-looped demo."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from kokoro_helpers.jsonio import iter_jsonl, read_jsonl, write_json_atomic
from kokoro_helpers.local.export import init_adapter
from kokoro_helpers.local.model import LocalModel
from kokoro_helpers.local.prompts import Messages, clean_messages
from kokoro_helpers.local.sources import (ModelNotFoundError, local_cards, not_found_message,
                                          resolve_source)
from kokoro_helpers.paths import DEFAULT_RUN_DIR, portable, resolve


def system_prompt_of(run_dir: str | Path = DEFAULT_RUN_DIR) -> str | None:
    """The system prompt the run's training data starts with (01_data's ``system_prompt``), or None."""
    path = resolve(run_dir) / "data" / "train.jsonl"
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        try:
            row = next(iter_jsonl(f, where=str(path)), None)      # the first row is enough
        except ValueError:
            return None
    if not isinstance(row, dict):       # no rows, or a row that is not a record
        return None
    msgs = row.get("messages") or []
    first = msgs[0] if msgs else {}
    return first.get("content") if first.get("role") == "system" else None


def sample_contexts(run_dir: str | Path = DEFAULT_RUN_DIR, n: int | None = 32, seed: int = 42,
                    splits: Sequence[str] = ("test", "valid")) -> list[list[dict[str, str]]]:
    """Prompts from 01_data's held-out files: for each counselor turn that answers a client turn,
    the dialogue before it (system prompt included). ``n`` of them drawn by ``seed`` (all when
    None or fewer exist), in a fixed order. Used by 04's batch demo and the benchmark."""
    import random

    data = resolve(run_dir) / "data"
    found = [data / f"{s}.jsonl" for s in splits if (data / f"{s}.jsonl").is_file()]
    if not found:
        raise FileNotFoundError(f"no {'/'.join(splits)}.jsonl in {data}: run 01_data first "
                                "(notebooks/01_data.ipynb, or kokoro_helpers.data.pipeline.prepare_data)")
    contexts: list[list[dict[str, str]]] = []
    for path in found:
        for row in read_jsonl(path):
            msgs = clean_messages(row["messages"])
            for i in range(1, len(msgs)):
                if msgs[i]["role"] == "assistant" and msgs[i - 1]["role"] == "user":
                    contexts.append(msgs[:i])
    if n is not None and len(contexts) > n:
        picked = sorted(random.Random(seed).sample(range(len(contexts)), int(n)))
        contexts = [contexts[i] for i in picked]
    return contexts


def compare_batching(lm: LocalModel, prompts: Sequence[Messages], batch_size: int = 8,
                     max_new_tokens: int = 48, run_dir: str | Path | None = None):
    """04's demo: the same prompts decoded greedily in batches and one per call.

    Returns (table, batched replies as :class:`Generation`); with ``run_dir`` also writes
    ``run_dir/inference/batching.json`` for the report. One timing each on whatever else the
    machine is doing — a demonstration, labelled so; ``benchmarks/bench_generate.py`` measures
    properly (forced equal lengths, best of several interleaved runs)."""
    import pandas as pd

    greedy = dict(max_new_tokens=max_new_tokens, temperature=0.0)
    lm.batch_generate(prompts[:2], batch_size=2, max_new_tokens=2, temperature=0.0)   # warm-up, untimed
    t0 = time.perf_counter()
    batched = lm.batch_generate(prompts, batch_size=batch_size, return_details=True, **greedy)
    batch_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    looped = [lm.generate(p, return_details=True, **greedy) for p in prompts]
    loop_s = time.perf_counter() - t0
    rows = {}
    for label, out, seconds, calls in ((f"batched ({batch_size} prompts per call)", batched, batch_s,
                                        -(-len(prompts) // batch_size)),
                                       ("one prompt per call", looped, loop_s, len(prompts))):
        tokens = sum(g.completion_tokens for g in out)
        rows[label] = {"calls": calls, "seconds": round(seconds, 3), "new tokens": tokens,
                       "tokens/s": round(tokens / seconds, 1) if seconds else float("nan")}
    same = sum(a.token_ids == b.token_ids for a, b in zip(batched, looped))
    table = pd.DataFrame(rows).T
    table["same replies"] = same
    if run_dir is not None:
        write_json_atomic(resolve(run_dir) / "inference" / "batching.json", {
            "model": lm.name, "device": str(lm.device), "prompts": len(prompts), "batch_size": batch_size,
            "max_new_tokens": max_new_tokens, "modes": rows, "same_replies": same,
            "speedup": round(loop_s / batch_s, 2) if batch_s else None,
            "label": "demo timing (one run, greedy, replies may stop early); benchmarks/bench_generate.py measures"})
    return table, batched


def pick_model(model_name: str | None = None, run_dir: str | Path = DEFAULT_RUN_DIR, *,
               fallback: bool = True, log: Callable[[str], None] = print) -> tuple[Any, str]:
    """(source, description) of the model 04 works with: the card ``model_name`` (or an adapter
    folder), else the run's newest ``local_lora`` card, else, with ``fallback``, an UNTRAINED
    adapter on the embedded tiny model in ``run_dir/inference/untrained-adapter`` (said loudly),
    so that the notebook still runs before 02's Part B has trained anything."""
    if model_name:
        try:
            src = resolve_source(model_name, run_dir)
            if src.card_path is not None:
                return src.card_path, f"card {src.name!r} ({portable(src.card_path)})"
            return model_name, f"{src.kind} {portable(src.adapter_dir or src.model_path)}"
        except ModelNotFoundError as exc:
            log(f"{model_name!r}: {exc}")
    found = local_cards(run_dir)
    if found:
        path, card = found[0]
        if model_name:
            log(f"using the newest local LoRA card instead: {card['model_id']!r}")
        return path, f"card {card['model_id']!r} ({portable(path)})"
    if not fallback:
        raise ModelNotFoundError(not_found_message(model_name or "(newest)", run_dir))
    folder = resolve(run_dir) / "inference" / "untrained-adapter"
    log("NO TRAINED ADAPTER in this run: 02_finetune Part B has not written a local_lora card yet. Using a freshly "
        "initialised, UNTRAINED adapter on the embedded tiny model so that the steps below still run; its replies "
        "mean nothing. Train one with 02_finetune (Part B) or `python -m kokoro_helpers.train_lora --params "
        "params/default.yaml`, then run this notebook again.")
    return init_adapter(folder, overwrite=False), f"UNTRAINED adapter {portable(folder)} (fallback)"
