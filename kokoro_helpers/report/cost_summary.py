"""05_cost's summary: run_dir/cost/summary.json from every step's result, `build_summary` running the
steps at once (what the notebook does cell by cell), and the report index's key-figure rows.

The steps 05_cost calls in turn, each reading what an earlier notebook wrote into `run_dir`:

    inputs   = load_inputs(run_dir, prices_file)               # cost_inputs: stats.json, cards, 02's request, 03's files
    training = training_costs(inputs, n_epochs, max_example_tokens)     # training_costs: {base model: TrainingEstimate}
    actual   = actual_costs(inputs)                             # training_costs: 02's pre-flight, trained_tokens × price
    workload = measure_workload(inputs)                         # inference_costs: tokens in/out of the evaluation
    inference = inference_costs(inputs, workload, replies=1000) # inference_costs: evaluation, per-1,000-replies cost
    seeds    = seeds_comparison(inputs.prices)                  # seeds_comparison: the seeds' figures, corrected
    local    = local_costs(inputs, epochs, gpu_hourly_usd)      # local_costs: GPU hours from 02's measured tokens/s
    whatif   = what_if(inputs, base_model, epochs_list, local)  # what_if_costs: epochs × dataset size
    write_summary(run_dir, inputs=inputs, training=training, ...)   # here: run_dir/cost/summary.json

Rules every figure follows:

* **Billed tokens** are epochs × Σ min(per-example limit, example tokens) of the training split in
  `data/stats.json`, priced at the *training* rate of `params/prices.yaml` (the seeds priced them
  at an inference input rate). `n_epochs="auto"` uses OpenAI's default heuristic, as 02 does.
* **Labels.** A figure is "computed" only when every number behind it is exact; otherwise it is an
  "estimate: <why>" — token counts from the offline estimate counter, epochs from the "auto"
  heuristic, a workload taken from the test split, reply lengths from the reference replies, a
  dataset size scaled from this run, a throughput measured on another device.
* **Dates.** Every price carries the table's date (`prices_as_of`) and the JPY rate its own.
"""
from __future__ import annotations

import math
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from kokoro_helpers.data.tokens import TokenCounter
from kokoro_helpers.jsonio import read_json, write_json_atomic
from kokoro_helpers.paths import resolve
from kokoro_helpers.report import costs
from kokoro_helpers.report.cost_format import fmt_jpy, fmt_usd
from kokoro_helpers.report.cost_inputs import DEFAULT_BASE_MODEL, CostInputs, load_inputs
from kokoro_helpers.report.inference_costs import DEFAULT_REPLIES, Workload, inference_costs, measure_workload
from kokoro_helpers.report.local_costs import local_costs
from kokoro_helpers.report.seeds_comparison import seeds_comparison
from kokoro_helpers.report.service_window import service_window
from kokoro_helpers.report.training_costs import actual_costs, training_costs
from kokoro_helpers.report.what_if_costs import DEFAULT_WHAT_IF_EPOCHS, what_if

SUMMARY_FILE = Path("cost") / "summary.json"


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN/inf become None, tuples lists, dataclass-free."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):      # numpy scalars
        return _clean(obj.item())
    return obj


def _training_entry(e: costs.TrainingEstimate) -> dict[str, Any]:
    return {"billed_tokens": e.billed_tokens, "epochs": e.epochs, "usd": e.usd, "jpy": e.jpy,
            "price_per_1m": e.price_per_1m, "tokens_per_epoch": e.tokens_per_epoch,
            "tokens_uncapped": e.tokens_uncapped, "n_examples": e.n_examples,
            "max_tokens_per_example": e.max_tokens_per_example, "capped_examples": e.capped_examples,
            "epochs_from_heuristic": e.epochs_from_heuristic, "is_estimate": e.is_estimate, "label": e.label}


def summary_dict(inputs: CostInputs, training: Mapping[str, costs.TrainingEstimate], *,
                 base_model: str | None = None, actual: Sequence[Mapping[str, Any]] | None = None,
                 workload: Workload | None = None, inference: Sequence[Mapping[str, Any]] | None = None,
                 local: Mapping[str, Any] | None = None, seeds: Mapping[str, Any] | None = None,
                 what_if_frame: Any = None, window: Mapping[str, Any] | None = None,
                 parameters: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The summary as a dict (what write_summary writes)."""
    table = inputs.prices
    reasons: list[str] = []
    if inputs.counts_are_estimate:
        reasons.append(f"token counts are an estimate ({inputs.token_counter})")
    if any(e.epochs_from_heuristic for e in training.values()):
        reasons.append("training epochs by OpenAI's 'auto' heuristic")
    if workload is not None and workload.is_estimate:
        reasons.append("inference: " + "; ".join(workload.reasons))
    if local and local.get("available"):
        reasons.append("local: a projection from a measured throughput")
    summary = {
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(inputs.run_dir),
        "base_model": base_model,
        "prices_as_of": table.as_of,
        "prices_source": table.source,
        "prices_file": str(table.path) if table.path else None,
        "fx": {"jpy_per_usd": table.jpy_per_usd, "as_of": table.fx_as_of, "label": table.fx_label},
        "token_counter": inputs.stats.get("token_counter"),
        "data_sha256": inputs.stats.get("data_sha256"),
        "is_estimate": bool(reasons),
        "estimate_reasons": reasons,
        "training": {m: _training_entry(e) for m, e in training.items()},
        "actual": list(actual or []),
        "inference": ({"workload": workload.as_dict() if workload else None,
                       "replies": inference[0]["replies"] if inference else None,
                       "models": {r["model"]: {"evaluation": r["evaluation"], "evaluation_batch": r["evaluation_batch"],
                                              "per_replies": r["per_replies"]} for r in inference or []},
                       "is_estimate": workload.is_estimate if workload else True,
                       "label": workload.label if workload else "not computed"}),
        "local": dict(local) if local else {"available": False, "reason": "not computed"},
        "seeds": dict(seeds) if seeds else None,
        "what_if": what_if_frame.to_dict("records") if what_if_frame is not None else [],
        "service_window": dict(window) if window else None,
        "parameters": dict(parameters or {}),
        "notes": list(inputs.notes),
    }
    return _clean(summary)


def write_summary(run_dir: str | Path, inputs: CostInputs, training: Mapping[str, costs.TrainingEstimate],
                  **sections: Any) -> Path:
    """Write run_dir/cost/summary.json: {"training": {<base model>: {billed_tokens, epochs, usd, jpy, ...}},
    "inference": {...}, "local": {...}, "seeds": {...}, "what_if": [...], "prices_as_of", "is_estimate",
    "token_counter", ...} (see summary_dict for the keyword sections). Atomic; returns the path."""
    path = resolve(run_dir) / SUMMARY_FILE
    write_json_atomic(path, summary_dict(inputs, training, **sections))
    return path


def build_summary(run_dir: str | Path = "runs/default", prices_file: str | Path | None = None,
                  n_epochs: Any = "auto", base_model: str = DEFAULT_BASE_MODEL,
                  max_example_tokens: int | None = None, gpu_hourly_usd: float | None = None,
                  replies: int = DEFAULT_REPLIES, what_if_epochs: Iterable[int] = DEFAULT_WHAT_IF_EPOCHS,
                  local_tokens_per_s: float | None = None, counter: TokenCounter | None = None,
                  today: date | str | None = None) -> tuple[Path, dict[str, Any]]:
    """Every step of 05_cost at once (what the notebook does cell by cell); returns (path, summary)."""
    inputs = load_inputs(run_dir, prices_file)
    training = training_costs(inputs, n_epochs, max_example_tokens)
    base = inputs.prices.resolve_model(base_model)
    workload = measure_workload(inputs, counter=counter)
    inference = inference_costs(inputs, workload, replies)
    local = local_costs(inputs, training[base].epochs, gpu_hourly_usd, local_tokens_per_s)
    frame = what_if(inputs, base, what_if_epochs, local, max_example_tokens)
    params = {"n_epochs": n_epochs, "openai_base_model": base_model, "max_example_tokens": max_example_tokens,
              "gpu_hourly_usd": gpu_hourly_usd, "replies_per_estimate": replies,
              "what_if_epochs": list(what_if_epochs), "local_tokens_per_s": local_tokens_per_s}
    path = write_summary(run_dir, inputs, training, base_model=base, actual=actual_costs(inputs),
                         workload=workload, inference=inference, local=local,
                         seeds=seeds_comparison(inputs.prices, stats=inputs.stats), what_if_frame=frame,
                         window=service_window(inputs.prices, base, today), parameters=params)
    return path, read_json(path)


def key_figure_rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The report index's cost table, from a summary.json: (what, figure with its basis) rows."""
    rows: list[tuple[str, str]] = []

    def tag(d: Mapping[str, Any]) -> str:
        return "estimate" if d.get("is_estimate", True) else "computed"

    base = summary.get("base_model")
    for model, v in (summary.get("training") or {}).items():
        mark = " (the run's model)" if model == base else ""
        rows.append((f"training: {model}{mark}",
                     f"{fmt_usd(v.get('usd'))} / {fmt_jpy(v.get('jpy'))} — {v.get('billed_tokens', 0):,} billed "
                     f"tokens, {v.get('epochs')} epochs{' (auto)' if v.get('epochs_from_heuristic') else ''} "
                     f"at ${v.get('price_per_1m', 0):.2f}/1M; {tag(v)}"))
    for r in summary.get("actual") or []:
        if r.get("job_id") and r.get("usd") is not None:
            rows.append((f"actual: job {r['job_id']}", f"{fmt_usd(r['usd'])} / {fmt_jpy(r.get('jpy'))} — "
                                                     f"{r.get('tokens', 0):,} trained tokens"))
    inf = summary.get("inference") or {}
    models = inf.get("models") or {}
    if base in models:
        m = models[base]
        rows.append((f"inference: evaluation on {base}", f"{fmt_usd(m['evaluation']['usd'])}; {tag(inf)}"))
        rows.append((f"inference: per {inf.get('replies', DEFAULT_REPLIES):,} replies",
                     f"{fmt_usd(m['per_replies']['usd'])} / {fmt_jpy(m['per_replies']['jpy'])}; {tag(inf)}"))
    local = summary.get("local") or {}
    if local.get("available"):
        rows.append((f"local LoRA, {local.get('epochs')} epochs",
                     f"{local.get('gpu_hours', 0):,.4g} GPU hours × ${local.get('gpu_hourly_usd', 0):.2f} = "
                     f"{fmt_usd(local.get('usd'))} / {fmt_jpy(local.get('jpy'))}; estimate, measured on "
                     f"{local.get('device')}"))
    elif local.get("reason"):
        rows.append(("local LoRA", local["reason"]))
    seeds = summary.get("seeds") or {}
    if seeds:
        rows.append(("seeds' estimate → corrected (JPY total)",
                     f"{fmt_jpy(seeds['seeds']['total_jpy'])} → {fmt_jpy(seeds['corrected']['total_jpy'])} "
                     f"(training at ${seeds['corrected']['price_per_1m']:.2f}/1M, not "
                     f"${seeds['seeds']['price_per_1m']:.2f}/1M)"))
    fx = summary.get("fx") or {}
    rows.append(("prices as of", f"{summary.get('prices_as_of')} ({summary.get('prices_source')}); "
                                 f"{fx.get('label', '')}"))
    rows.append(("token counter", str(summary.get("token_counter"))))
    window = summary.get("service_window") or {}
    if window.get("warning"):
        rows.append(("service window", window["warning"]))
    return rows
