"""05_cost's inference cost: the evaluation's workload (tokens in and out, from 03's files or the test
split's prompts and replies) and its price per base model, for the evaluation and per N replies."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from kokoro_helpers.data.tokens import TokenCounter, get_token_counter
from kokoro_helpers.report import costs
from kokoro_helpers.report.cost_format import basis, fmt_jpy, fmt_usd
from kokoro_helpers.report.cost_inputs import CostInputs, CostReportError
from kokoro_helpers.report.prices import PriceError, PriceTable

DEFAULT_REPLIES = 1_000


def _reported(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else int(f)


@dataclass
class Workload:
    """Tokens in and out of one pass over the evaluation items (one request per item)."""

    source: str
    n_replies: int
    input_tokens: int
    output_tokens: int
    input_source: str
    output_source: str
    counter: str
    reasons: list[str] = field(default_factory=list)
    per_model: list[dict[str, Any]] = field(default_factory=list)

    @property
    def is_estimate(self) -> bool:
        return bool(self.reasons)

    @property
    def label(self) -> str:
        return ("estimate: " + "; ".join(self.reasons)) if self.reasons else \
            "measured: tokens reported by the API for the evaluation"

    @property
    def mean_input(self) -> float:
        return self.input_tokens / self.n_replies if self.n_replies else 0.0

    @property
    def mean_output(self) -> float:
        return self.output_tokens / self.n_replies if self.n_replies else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "n_replies": self.n_replies, "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens, "mean_input_tokens": round(self.mean_input, 1),
                "mean_output_tokens": round(self.mean_output, 1), "input_source": self.input_source,
                "output_source": self.output_source, "token_counter": self.counter,
                "is_estimate": self.is_estimate, "label": self.label, "per_model": self.per_model}

    def table(self):
        import pandas as pd
        rows = [("replies (requests)", f"{self.n_replies:,}", self.source),
                ("input tokens", f"{self.input_tokens:,}", self.input_source),
                ("output tokens", f"{self.output_tokens:,}", self.output_source),
                ("mean input / reply", f"{self.mean_input:,.0f}", "the dialogue so far, system prompt included"),
                ("mean output / reply", f"{self.mean_output:,.0f}", "one counselor reply"),
                ("basis", "estimate" if self.is_estimate else "measured", self.label)]
        return pd.DataFrame(rows, columns=["item", "value", "note"]).set_index("item")

    def model_table(self):
        """What each model of 03 generated, measured (API usage where reported, else counted)."""
        import pandas as pd
        if not self.per_model:
            return pd.DataFrame({"note": ["03_eval has not written eval/generations.jsonl"]})
        rows = [{"model": r["model"], "replies": r["replies"], "input tokens": f"{r['input_tokens']:,}",
                 "output tokens": f"{r['output_tokens']:,}", "tokens from": r["tokens_from"],
                 "USD at its price": fmt_usd(r.get("usd")), "priced as": r.get("priced_as") or "local: no API cost"}
                for r in self.per_model]
        return pd.DataFrame(rows).set_index("model")


def _eval_items_from_split(run_dir: Path) -> tuple[list[dict[str, Any]], str]:
    from kokoro_helpers.evaluation.evaluate import EvalError, build_eval_items
    for split in ("test", "valid", "train"):
        try:
            items = build_eval_items(run_dir, splits=(split,), max_eval_items=None, log=None)
        except EvalError:
            continue
        return items, split
    raise CostReportError(f"no counselor turns in {run_dir / 'data'}: re-run 01_data")


def measure_workload(inputs: CostInputs, counter: TokenCounter | None = None,
                     prices: PriceTable | None = None) -> Workload:
    """Tokens in and out of the evaluation: 03's items (eval/items.jsonl) — or, when 03 has not run,
    every counselor turn of the test split with its dialogue so far (labelled an estimate).

    Input per reply: the context as billed (OpenAI's message rule, reply priming included), or the
    prompt_tokens the API reported in generations.jsonl. Output: completion_tokens the API reported
    for a priced (OpenAI) model, else the reference counselor replies counted (labelled), because a
    local smoke model's replies say nothing about a fine-tuned model's length."""
    counter = counter or get_token_counter()
    table = prices or inputs.prices
    reasons: list[str] = []
    if inputs.items:
        items, source = inputs.items, f"eval/items.jsonl: the {len(inputs.items):,} items of 03_eval"
    else:
        items, split = _eval_items_from_split(inputs.run_dir)
        source = f"every counselor turn of data/{split}.jsonl with its dialogue so far (03_eval has not run)"
        reasons.append(f"workload estimated from the {split} split (no eval/items.jsonl from 03_eval)")
    ctx_tokens = {it["item_id"]: counter.count_messages(it.get("context") or []) for it in items}
    ref_tokens = {it["item_id"]: counter.count(str(it.get("reference") or "")) for it in items}
    n = len(items)

    per_model: list[dict[str, Any]] = []
    best: tuple[int, str, list[dict[str, Any]]] | None = None
    by_model: dict[str, list[dict[str, Any]]] = {}
    for g in inputs.generations or []:
        if g.get("item_id") in ctx_tokens:
            by_model.setdefault(str(g.get("model")), []).append(g)
    for model, rows in by_model.items():
        prompt = [_reported(r.get("prompt_tokens")) for r in rows]
        completion = [_reported(r.get("completion_tokens")) for r in rows]
        in_tok = sum(p if p is not None else ctx_tokens[r["item_id"]] for p, r in zip(prompt, rows))
        out_tok = sum(c if c is not None else counter.count(str(r.get("response") or ""))
                      for c, r in zip(completion, rows))
        reported = sum(c is not None for c in completion)
        tokens_from = ("reported by the API" if reported == len(rows)
                       else f"counted ({counter.name})" if reported == 0 else "partly reported, partly counted")
        settings = rows[0].get("settings")
        served = (settings.get("model") if isinstance(settings, dict) else None) or rows[0].get("served_model") or model
        priced_as, usd_cost = None, None
        try:
            entry = table.entry(str(served))
            priced_as = entry["model"]
            usd_cost = costs.inference_cost(in_tok, out_tok, entry, table.jpy_per_usd).usd
        except PriceError:
            pass
        per_model.append({"model": model, "replies": len(rows), "input_tokens": in_tok, "output_tokens": out_tok,
                          "tokens_from": tokens_from, "priced_as": priced_as, "usd": usd_cost})
        if priced_as and reported == len(rows) and (best is None or len(rows) > best[0]):
            best = (len(rows), model, rows)

    if best is not None:
        _, model, rows = best
        mean_out = sum(_reported(r["completion_tokens"]) for r in rows) / len(rows)
        output = round(mean_out * n)
        output_source = f"completion_tokens reported by the API for {model} (mean per reply × {n:,} items)"
        prompts = [_reported(r.get("prompt_tokens")) for r in rows]
        if all(p is not None for p in prompts):
            input_tok = round(sum(prompts) / len(prompts) * n)
            input_source = f"prompt_tokens reported by the API for {model}"
        else:
            input_tok = sum(ctx_tokens.values())
            input_source = f"the items' contexts counted ({counter.name})"
            if counter.is_estimate:
                reasons.append(f"input token counts are an estimate ({counter.name})")
    else:
        input_tok = sum(ctx_tokens.values())
        output = sum(ref_tokens.values())
        input_source = f"the items' contexts counted ({counter.name})"
        output_source = f"the reference (real counselor) replies counted ({counter.name})"
        if counter.is_estimate:
            reasons.append(f"token counts are an estimate ({counter.name})")
        reasons.append("reply length taken from the reference counselor replies (no API-reported "
                       "completion tokens of a fine-tuned OpenAI model in eval/generations.jsonl)")
    return Workload(source=source, n_replies=n, input_tokens=int(input_tok), output_tokens=int(output),
                    input_source=input_source, output_source=output_source, counter=counter.name,
                    reasons=reasons, per_model=per_model)


def inference_costs(inputs: CostInputs, workload: Workload, replies: int = DEFAULT_REPLIES,
                    models: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """For each priced base model: the evaluation's cost (one pass over the items, standard and Batch
    API rates) and the cost of `replies` counseling replies of the same mean size."""
    table = inputs.prices
    out = []
    scale = replies / workload.n_replies if workload.n_replies else 0.0
    for model in models or table.models:
        entry = table.entry(model)
        ev = costs.inference_cost(workload.input_tokens, workload.output_tokens, entry, table.jpy_per_usd,
                                  is_estimate=workload.is_estimate, what="evaluation")
        batch = None
        if entry.get("batch"):
            batch = costs.inference_cost(workload.input_tokens, workload.output_tokens, entry, table.jpy_per_usd,
                                         batch=True, is_estimate=workload.is_estimate, what="evaluation (Batch API)")
        per = costs.inference_cost(round(workload.input_tokens * scale), round(workload.output_tokens * scale),
                                   entry, table.jpy_per_usd, is_estimate=workload.is_estimate,
                                   what=f"{replies:,} replies")
        out.append({"model": entry["model"], "input_price": float(entry["input"]),
                    "output_price": float(entry["output"]), "evaluation": ev.as_dict(),
                    "evaluation_batch": batch.as_dict() if batch else None, "replies": int(replies),
                    "per_replies": per.as_dict(), "is_estimate": workload.is_estimate,
                    "label": workload.label, "prices_as_of": table.as_of})
    return out


def inference_table(rows: Sequence[Mapping[str, Any]]):
    import pandas as pd
    out = []
    for r in rows:
        n = r["replies"]
        out.append({"fine-tuned model of": r["model"],
                    f"price in / out (USD/1M, as of {r['prices_as_of']})": f"${r['input_price']:g} / ${r['output_price']:g}",
                    "evaluation USD": fmt_usd(r["evaluation"]["usd"]),
                    "evaluation USD (Batch API)": fmt_usd(r["evaluation_batch"]["usd"]) if r["evaluation_batch"] else "n/a",
                    f"per {n:,} replies USD": fmt_usd(r["per_replies"]["usd"]),
                    f"per {n:,} replies JPY": fmt_jpy(r["per_replies"]["jpy"]),
                    "basis": basis(r["is_estimate"])})
    return pd.DataFrame(out).set_index("fine-tuned model of")
