"""05_cost's OpenAI training bill: epochs × capped example tokens × the dated training price per base
model, and what 02 recorded (its pre-flight estimate, each job's trained_tokens × price)."""
from __future__ import annotations

from datetime import date
from typing import Any, Mapping, Sequence

from kokoro_helpers.data.pipeline import read_example_tokens
from kokoro_helpers.jsonio import file_sha256
from kokoro_helpers.report import costs
from kokoro_helpers.report.cost_format import basis, fmt_jpy, fmt_usd
from kokoro_helpers.report.cost_inputs import CostInputs
from kokoro_helpers.report.prices import PriceError, PriceTable
from kokoro_helpers.report.service_window import window_note


def _train_example_tokens(inputs: CostInputs) -> list[int] | None:
    """Per-example token counts of data/train.jsonl as 01_data wrote them (data/example_tokens.json), or None
    (with a note) when they are missing or no longer describe the file."""
    path = inputs.run_dir / "data" / "train.jsonl"
    if not path.is_file():
        return None
    tokens, why = read_example_tokens(path.parent, "train", counter_name=inputs.stats.get("token_counter"),
                                      sha256=file_sha256(path))
    if tokens is None or sum(tokens) != int(inputs.stats["tokens"]["train"]):
        inputs.notes.append(f"per-example cap: {why or 'the counts disagree with stats.json (re-run 01_data)'}; "
                            "billed tokens stay an upper bound")
        return None
    return tokens


def training_costs(inputs: CostInputs, n_epochs: Any = "auto", max_example_tokens: int | None = None,
                   models: Sequence[str] | None = None) -> dict[str, costs.TrainingEstimate]:
    """The training bill for each priced base model (default: every model of the price table):
    epochs × Σ min(limit, example tokens) of the training split of stats.json × the training price.

    `n_epochs`: a positive integer or "auto" (OpenAI's heuristic on the number of training
    examples, labelled). `max_example_tokens`: the per-example limit (default: stats.json's). When
    an example exceeds the limit, 01's per-example counts (data/example_tokens.json) make the cap exact; otherwise the totals are used and the label says they are an upper bound."""
    stats = inputs.stats
    limit = int(max_example_tokens) if max_example_tokens else stats.get("max_example_tokens")
    seen = stats.get("max_example_tokens_seen")
    per_example = None
    if limit is not None and (seen is None or int(seen) > int(limit)):
        per_example = _train_example_tokens(inputs)
    table = inputs.prices
    out: dict[str, costs.TrainingEstimate] = {}
    for model in models or table.models:
        entry = table.entry(model)
        common = dict(base_model=entry["model"], prices_as_of=table.as_of, fx_label=table.fx_label)
        if per_example is not None:
            est = costs.estimate_training(per_example, n_epochs, entry["training"], table.jpy_per_usd,
                                          max_tokens_per_example=limit, token_counter=stats.get("token_counter"),
                                          **common)
        else:
            est = costs.estimate_from_stats(stats, n_epochs, entry["training"], table.jpy_per_usd,
                                            max_tokens_per_example=limit, **common)
        out[entry["model"]] = est
    return out


def training_table(training: Mapping[str, costs.TrainingEstimate], prices: PriceTable | None = None,
                   today: date | str | None = None):
    """One row per base model: price (dated), tokens per epoch, epochs, billed tokens, USD, JPY, basis
    and why; with `prices`, a service-window column (reported dates past or near)."""
    import pandas as pd
    rows = []
    for model, e in training.items():
        rows.append({"base model": model, f"training price (USD/1M, as of {e.prices_as_of})": f"${e.price_per_1m:.2f}",
                     "examples": f"{e.n_examples:,}", "tokens per epoch": f"{e.tokens_per_epoch:,}",
                     "epochs": e.epochs_label, "billed tokens": f"{e.billed_tokens:,}",
                     "USD": fmt_usd(e.usd), "JPY": fmt_jpy(e.jpy), "basis": basis(e.is_estimate),
                     "why": "; ".join(e.reasons) or "exact token counts, given epochs"})
        note = window_note(prices, model, today)
        if note:
            rows[-1]["service window"] = note
    return pd.DataFrame(rows).set_index("base model")


def actual_costs(inputs: CostInputs) -> list[dict[str, Any]]:
    """02's pre-flight estimate (openai/job_request.json) and, for every OpenAI job card, the actual
    cost: trained_tokens reported by OpenAI × the listed training price (dated)."""
    table = inputs.prices
    rows: list[dict[str, Any]] = []
    req = inputs.job_request
    if req:
        est = req.get("estimate") or {}
        rows.append({"what": f"02 pre-flight ({req.get('mode', '?')})", "job_id": None,
                     "base_model": (req.get("request") or {}).get("model"), "status": "request written",
                     "tokens": req.get("billed_tokens"), "epochs": req.get("epochs"),
                     "usd": req.get("estimated_cost_usd"), "jpy": req.get("estimated_cost_jpy"),
                     "is_estimate": bool(req.get("is_estimate", True)),
                     "label": est.get("label") or "02's pre-flight estimate",
                     "prices_as_of": (req.get("prices") or {}).get("as_of")})
    for path, card in inputs.openai_cards:
        base = card.get("base_model") or card.get("model_id") or "?"
        row = {"what": f"job {path.stem}", "job_id": card.get("job_id"), "base_model": base,
               "status": card.get("status", "n/a"), "tokens": card.get("trained_tokens"),
               "epochs": (card.get("training_params") or {}).get("epochs"), "usd": None, "jpy": None,
               "is_estimate": False, "label": "", "prices_as_of": table.as_of}
        trained = card.get("trained_tokens")
        if trained:
            try:
                cost = costs.actual_training_cost(int(trained), table.training_price(base), table.jpy_per_usd,
                                                  table.as_of)
                row.update(usd=cost.usd, jpy=cost.jpy, label=cost.label)
            except PriceError as exc:
                row["label"] = f"could not price: {exc}"
        else:
            row["label"] = f"no trained_tokens yet (job status {row['status']}): no actual cost"
        rows.append(row)
    return rows


def actual_table(rows: Sequence[Mapping[str, Any]]):
    import pandas as pd
    if not rows:
        return pd.DataFrame({"note": ["02_finetune has not run: no job request, no job card"]})
    out = [{"what": r["what"], "base model": r["base_model"], "status": r["status"],
            "tokens": f"{r['tokens']:,}" if r.get("tokens") else "n/a", "epochs": r.get("epochs"),
            "USD": fmt_usd(r.get("usd")), "JPY": fmt_jpy(r.get("jpy")),
            "basis": "actual" if (r.get("usd") is not None and not r["is_estimate"] and r.get("job_id"))
            else basis(r["is_estimate"]) if r.get("usd") is not None else "-", "label": r["label"]}
           for r in rows]
    return pd.DataFrame(out).set_index("what")
