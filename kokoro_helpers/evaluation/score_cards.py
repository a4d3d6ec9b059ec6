"""Writing the human-score summary (and the automatic metrics) into each model card's
``evaluation_results``, in the seeds' shape: test_evaluation, valid_evaluation, summary,
timestamp.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

from kokoro_helpers import cards
from kokoro_helpers.evaluation.score_summary import MIN_SCORES_FOR_INTERVAL, t_interval

#: Which block of evaluation_results a split's results go to.
_SPLIT_BLOCK = {"test": "test_evaluation", "valid": "valid_evaluation", "validation": "valid_evaluation"}

def _num(x: Any, digits: int = 4) -> Any:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else round(x, digits)


def _metric_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """Metric values as plain JSON: numbers rounded to 6 digits (NaN → None), the rest as they are."""
    return {k: (_num(v, 6) if isinstance(v, numbers.Number) else v) for k, v in values.items()}


def _pool(rows, confidence: float) -> dict[str, Any]:
    """Combine summary rows of one criterion (e.g. test and valid) exactly from n, mean, sd."""
    n = int(rows["n"].sum())
    mean = float((rows["n"] * rows["mean"]).sum() / n)
    ss = sum((r.n - 1) * (r.sd ** 2 if r.n > 1 and not math.isnan(r.sd) else 0.0) + r.n * (r.mean - mean) ** 2
             for r in rows.itertuples())
    sd = math.sqrt(ss / (n - 1)) if n > 1 else math.nan
    low, high = t_interval(mean, sd, n, confidence, MIN_SCORES_FOR_INTERVAL)
    return {"mean": mean, "sd": sd, "n": n, "ci_low": low, "ci_high": high,
            "n_raters": int(rows["n_raters"].max()), "n_items": int(rows["n_items"].sum()),
            "n_demo": int(rows["n_demo"].sum())}


def _criteria_block(stats: dict[str, dict[str, Any]], confidence: float) -> dict[str, Any]:
    crit = {c: {"mean": _num(s["mean"]), "sd": _num(s["sd"]), "n": int(s["n"]),
                "ci_low": _num(s["ci_low"]), "ci_high": _num(s["ci_high"]),
                "n_raters": int(s["n_raters"]), "n_items": int(s["n_items"])} for c, s in stats.items()}
    means = [v["mean"] for v in crit.values() if v["mean"] is not None]
    demo = any(int(s.get("n_demo", 0)) for s in stats.values())
    block = {"criteria": crit, "overall_mean": _num(sum(means) / len(means)) if means else None,
             "n_scores": sum(v["n"] for v in crit.values()), "confidence": confidence, "demo": demo}
    if demo:
        block["note"] = "includes DEMO scores (seeded by demo_scores(), not human judgements)"
    return block


def _human_scores(summary_rows, confidence: float) -> dict[str, Any]:
    """The human_scores block of some summary rows, pooled per criterion."""
    stats = {c: _pool(rows, confidence) for c, rows in summary_rows.groupby("criterion", sort=False)}
    return _criteria_block(stats, confidence)


def write_evaluation_results(run_dir: str | Path, summary=None, *, agreement=None, metrics=None,
                             metrics_by_split=None,
                             models: Mapping[str, str] | None = None) -> dict[str, dict[str, str]]:
    """Write the human-score summary into each model card's ``evaluation_results`` in the seeds'
    shape ``{test_evaluation, valid_evaluation, summary, timestamp}``.

    ``summary``: a summarize() frame, by ("split", "model") or ("model",). With a split column,
    "test" rows go to ``test_evaluation.human_scores`` and "valid"/"validation" rows to
    ``valid_evaluation.human_scores``; ``summary.human_scores`` always holds all rows pooled
    (exactly, from n, mean, sd). ``agreement``: an agreement_table() frame or a list of
    Agreement, stored as ``summary.human_agreement``. ``metrics``: automatic metrics, a frame
    with a ``model`` column (or model index) or ``{model: {metric: value}}``, stored as
    ``summary.automatic_metrics``; ``metrics_by_split`` (compute_metrics(..., by="split")) goes to
    ``test_evaluation.automatic_metrics`` / ``valid_evaluation.automatic_metrics``. A model with
    metrics but no human scores (yet) still gets its metrics written. ``models`` maps a model name in the scores to a card's
    model_id when they differ. Cards are matched by model_id (or file name) and updated
    atomically; existing keys of evaluation_results written by other steps are kept.

    Returns ``{"written": {model: card path}, "skipped": {model: reason}}`` — e.g. a base model
    or an endpoint that has no card."""
    if summary is not None and "model" not in summary.columns:
        raise ValueError("summary needs a 'model' column (summarize(scores_df) groups by model)")
    confidence = float(summary.attrs.get("confidence", 0.95)) if summary is not None else 0.95
    agreement_info = None
    if agreement is not None:
        rows = agreement.to_dict("records") if hasattr(agreement, "to_dict") else [asdict(a) for a in agreement]
        agreement_info = {r["criterion"]: {"alpha": _num(r["alpha"]), "n_raters": int(r["n_raters"]),
                                           "n_units": int(r["n_units"]), "reason": r.get("reason") or ""}
                          for r in rows}
    metrics_of = _metrics_by_model(metrics)
    split_metrics: dict[str, dict[str, dict[str, Any]]] = {}
    if metrics_by_split is not None:
        frame = metrics_by_split if "model" in metrics_by_split.columns else metrics_by_split.reset_index()
        for row in frame.to_dict("records"):
            target = _SPLIT_BLOCK.get(str(row.pop("split", "")))
            model = str(row.pop("model"))
            if target:
                split_metrics.setdefault(model, {})[target] = _metric_values(row)
    groups = dict(tuple(summary.groupby("model", sort=True))) if summary is not None else {}
    written, skipped = {}, {}
    for model in sorted(set(groups) | set(metrics_of) | set(split_metrics)):
        group = groups.get(model)
        card_id = (models or {}).get(model, model)
        try:
            path, card = cards.find_card(run_dir, card_id)
        except cards.CardError as exc:
            skipped[model] = str(exc)
            continue
        new: dict[str, dict[str, Any]] = {}
        for target, values in split_metrics.get(model, {}).items():
            new.setdefault(target, {})["automatic_metrics"] = values
        summary_block: dict[str, Any] = {}
        if group is not None and "split" in group.columns:
            for split, sub in group.groupby("split", dropna=True):
                target = _SPLIT_BLOCK.get(str(split))
                if target:
                    new.setdefault(target, {})["human_scores"] = _human_scores(sub, confidence)
        if group is not None:
            summary_block["human_scores"] = _human_scores(group, confidence)
        if agreement_info is not None and group is not None:
            summary_block["human_agreement"] = agreement_info
        if model in metrics_of:
            summary_block["automatic_metrics"] = metrics_of[model]
        new["summary"] = summary_block
        old = card.get("evaluation_results")
        old = old if isinstance(old, dict) else ({"previous": old} if old else {})
        merged = dict(old)
        for key in ("test_evaluation", "valid_evaluation", "summary"):
            base = old.get(key) if isinstance(old.get(key), dict) else {}
            merged[key] = {**base, **new.get(key, {})}
        merged["timestamp"] = cards.now_iso()
        cards.update_card(path, evaluation_results=merged)
        written[model] = str(path)
    return {"written": written, "skipped": skipped}


def _metrics_by_model(metrics) -> dict[str, dict[str, Any]]:
    if metrics is None:
        return {}
    if isinstance(metrics, Mapping):
        return {str(m): _metric_values(d) for m, d in metrics.items()}
    frame = metrics if "model" in metrics.columns else metrics.rename_axis("model").reset_index()
    out = {}
    for row in frame.to_dict("records"):
        model = str(row.pop("model"))
        out[model] = _metric_values(row)
    return out
