"""05_cost: what fine-tuning and using the models costs — OpenAI and local, dated and labelled.

The steps 05_cost calls in turn, each reading what an earlier notebook wrote into `run_dir`:

    inputs   = load_inputs(run_dir, prices_file)               # stats.json, cards, 02's request, 03's files
    training = training_costs(inputs, n_epochs, max_example_tokens)     # {base model: TrainingEstimate}
    actual   = actual_costs(inputs)                             # 02's pre-flight and trained_tokens × price
    workload = measure_workload(inputs)                         # tokens in/out of the evaluation (or test split)
    inference = inference_costs(inputs, workload, replies=1000) # evaluation and per-1,000-replies cost
    seeds    = seeds_comparison(inputs.prices)                  # the seeds' figures beside the corrected ones
    local    = local_costs(inputs, epochs, gpu_hourly_usd)      # GPU hours from 02's measured tokens/s
    whatif   = what_if(inputs, base_model, epochs_list, local)  # epochs × dataset size (paper's subsets)
    write_summary(run_dir, inputs=inputs, training=training, ...)   # run_dir/cost/summary.json

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

import json
import math
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from kokoro_helpers import cards as cards_mod
from kokoro_helpers.report import costs
from kokoro_helpers.data.pipeline import read_example_tokens
from kokoro_helpers.jsonio import file_sha256, read_json, write_json_atomic
from kokoro_helpers.paths import resolve
from kokoro_helpers.report.prices import PriceError, PriceTable, load_prices
from kokoro_helpers.data.tokens import TokenCounter, get_token_counter

SUMMARY_FILE = Path("cost") / "summary.json"
DEFAULT_BASE_MODEL = "gpt-4o-mini-2024-07-18"
DEFAULT_WHAT_IF_EPOCHS = (1, 2, 3, 5, 10)
DEFAULT_REPLIES = 1_000
SECONDS_PER_HOUR = 3_600

# The paper's training subsets by the client's score (KOKOROCHAT.md), and the whole release.
PAPER_SUBSETS = (("Low (<70)", 3_870), ("High (70-98)", 2_601), ("Full (<=98)", 6_471))
CORPUS_DIALOGUES = 6_589


@dataclass(frozen=True)
class SeedsFigures:
    """The seeds' cost estimate, as they stated it."""

    tokens: int = 11_620_000          # the whole corpus, gpt-4o-mini tokens (a widely quoted rough figure)
    epochs: int = 10
    price_per_1m: float = 0.40        # an inference *input* rate, used for training
    training_jpy: float = 6_823
    inference_jpy: float = 1_091
    total_jpy: float = 7_914
    dialogues: int = CORPUS_DIALOGUES


SEEDS = SeedsFigures()

# The release's converted chat examples with message overhead, o200k_base, measured with the
# genuine encoding file (../shared/KOKOROCHAT.md): the quoted 11.62 M is the utterance text alone.
RELEASE_TOKENS_WITH_OVERHEAD = {"with system prompt": 13_814_682, "without": 13_544_533}


class CostReportError(RuntimeError):
    """A missing input of 05_cost; the message says which notebook writes it."""


# =================================================================================================
# Inputs
# =================================================================================================

def _read_json(path: Path) -> Any:
    try:
        return read_json(path)
    except ValueError as exc:
        raise CostReportError(f"{exc}; re-run the notebook that writes it") from None


def _read_jsonl(path: Path, notes: list[str]) -> list[dict[str, Any]] | None:
    if not path.is_file():
        return None
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        notes.append(f"{path.name}: {bad} unreadable line(s) skipped")
    return rows


@dataclass
class CostInputs:
    """Everything 05 reads from `run_dir`, plus the price table."""

    run_dir: Path
    prices: PriceTable
    stats: dict[str, Any]
    cards: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)
    job_request: dict[str, Any] | None = None
    items: list[dict[str, Any]] | None = None
    generations: list[dict[str, Any]] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def token_counter(self) -> str:
        return str(self.stats.get("token_counter") or "unknown (stats.json does not say)")

    @property
    def counts_are_estimate(self) -> bool:
        name = self.stats.get("token_counter")
        return not name or str(name).startswith("estimate:")

    @property
    def openai_cards(self) -> list[tuple[Path, dict[str, Any]]]:
        return [(p, c) for p, c in self.cards if c.get("kind") == "openai"]

    @property
    def local_cards(self) -> list[tuple[Path, dict[str, Any]]]:
        return [(p, c) for p, c in self.cards if c.get("kind") == "local_lora"]

    def sources(self):
        """What was found in run_dir (one row per input), so a reader knows what each figure rests on."""
        import pandas as pd
        rows = [
            ("data/stats.json (01_data)", "found", f"{self.stats['tokens']['train']:,} training tokens, "
                                                   f"counter: {self.token_counter}"),
            ("models/*.json, kind openai (02 Part A)", len(self.openai_cards) or "none",
             ", ".join(str(c.get("status")) for _, c in self.openai_cards) or "no job has run"),
            ("models/*.json, kind local_lora (02 Part B)", len(self.local_cards) or "none",
             ", ".join(str(c.get("model_id")) for _, c in self.local_cards) or "no local adapter trained"),
            ("openai/job_request.json (02 Part A)", "found" if self.job_request else "none",
             f"mode {self.job_request.get('mode')}" if self.job_request else "02 has not run"),
            ("eval/items.jsonl (03_eval)", len(self.items) if self.items else "none",
             "evaluation items" if self.items else "the workload is estimated from the test split"),
            ("eval/generations.jsonl (03_eval)", len(self.generations) if self.generations else "none",
             ", ".join(sorted({str(g.get('model')) for g in self.generations})) if self.generations else "-"),
            ("prices", self.prices.path.name if self.prices.path else "table",
             f"{self.prices.source}, as of {self.prices.as_of}; {self.prices.fx_label}"),
        ]
        return pd.DataFrame(rows, columns=["input", "found", "detail"]).set_index("input")


def load_inputs(run_dir: str | Path = "runs/default", prices_file: str | Path | None = None) -> CostInputs:
    """Read run_dir/data/stats.json (required: 01_data), the model cards and 02's job request, 03's
    items and generations (all optional), and the dated price table."""
    run = resolve(run_dir)
    stats_path = run / "data" / "stats.json"
    stats = _read_json(stats_path)
    if not stats:
        raise CostReportError(
            f"{stats_path} not found: run 01_data for this run_dir first (notebooks/01_data.ipynb, or "
            "python -c \"from kokoro_helpers.data.pipeline import prepare_data; prepare_data()\")")
    try:
        int(stats["tokens"]["train"])
        int((stats.get("examples") or stats["splits"])["train"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CostReportError(f"{stats_path} has no training token total or example count: re-run 01_data") from exc
    prices = load_prices(prices_file)
    notes: list[str] = []
    items = _read_jsonl(run / "eval" / "items.jsonl", notes)
    generations = _read_jsonl(run / "eval" / "generations.jsonl", notes)
    return CostInputs(run_dir=run, prices=prices, stats=stats, cards=cards_mod.list_cards(run),
                      job_request=_read_json(run / "openai" / "job_request.json"),
                      items=items or None, generations=generations or None, notes=notes)


# =================================================================================================
# Formatting
# =================================================================================================

def fmt_usd(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if abs(x) >= 1 or x == 0:
        return f"${x:,.2f}"
    if abs(x) >= 0.01:
        return f"${x:,.4f}"
    return "$" + f"{x:.8f}".rstrip("0")          # tiny amounts keep their significant digits


def fmt_jpy(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"¥{x:,.0f}" if abs(x) >= 10 else f"¥{x:,.2f}"


def _basis(is_estimate: bool) -> str:
    return "estimate" if is_estimate else "computed"


# =================================================================================================
# OpenAI training
# =================================================================================================

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


def _window_note(prices: PriceTable | None, model: str, today: date | str | None) -> str | None:
    if prices is None:
        return None
    w = prices.service_window(model, today=today)
    if w.retires_on is not None and w.retires_on < w.today:
        return f"reportedly retired {w.retires_on}: no job can run"
    if w.no_new_jobs_after is not None and w.no_new_jobs_after < w.today:
        return f"reportedly no new jobs after {w.no_new_jobs_after}"
    if w.warn:
        return f"reported dates near: new jobs until {w.no_new_jobs_after}, retired {w.retires_on}"
    return "no reported date near"


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
                     "USD": fmt_usd(e.usd), "JPY": fmt_jpy(e.jpy), "basis": _basis(e.is_estimate),
                     "why": "; ".join(e.reasons) or "exact token counts, given epochs"})
        note = _window_note(prices, model, today)
        if note:
            rows[-1]["service window"] = note
    return pd.DataFrame(rows).set_index("base model")


# =================================================================================================
# What 02 recorded: the pre-flight estimate and actual job costs
# =================================================================================================

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
            else _basis(r["is_estimate"]) if r.get("usd") is not None else "-", "label": r["label"]}
           for r in rows]
    return pd.DataFrame(out).set_index("what")


# =================================================================================================
# Inference: the evaluation's workload and its price
# =================================================================================================

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
                    "basis": _basis(r["is_estimate"])})
    return pd.DataFrame(out).set_index("fine-tuned model of")


# =================================================================================================
# The seeds' figures beside the corrected ones
# =================================================================================================

def seeds_comparison(prices: PriceTable, base_model: str = DEFAULT_BASE_MODEL,
                     seeds: SeedsFigures = SEEDS, stats: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The seeds' estimate (11.62 M tokens × 10 epochs at $0.40/1M) beside the same tokens and
    epochs at the training price of `base_model`. Their inference figure is carried over as stated
    (they give no workload to re-derive it from); the measured one is in the inference section."""
    entry = prices.entry(base_model)
    billed = seeds.tokens * seeds.epochs
    seeds_usd = costs.usd(billed, seeds.price_per_1m)
    implied_rate = seeds.training_jpy / seeds_usd
    corrected = costs.estimate_training_from_totals(
        seeds.tokens, seeds.dialogues, seeds.epochs, entry["training"], prices.jpy_per_usd,
        base_model=entry["model"], token_counter="estimate:the seeds' quoted 11.62 M tokens (a rough figure)",
        prices_as_of=prices.as_of, fx_label=prices.fx_label)
    total = corrected.jpy + seeds.inference_jpy
    ratio = entry["training"] / seeds.price_per_1m
    sentence = (f"The seeds priced {billed / 1e6:,.1f} M billed training tokens ({seeds.tokens / 1e6:.2f} M × "
                f"{seeds.epochs} epochs) at ${seeds.price_per_1m:.2f}/1M, an inference input rate, but OpenAI bills "
                f"fine-tuning training separately at ${entry['training']:.2f}/1M for {entry['model']} (as of "
                f"{prices.as_of}), {ratio:.1f} times as much: training is about {fmt_jpy(corrected.jpy)} "
                f"({fmt_usd(corrected.usd)}), not {fmt_jpy(seeds.training_jpy)}, and the total about "
                f"{fmt_jpy(total)}, not {fmt_jpy(seeds.total_jpy)}.")
    # the seeds' token figure was low too: it leaves out the message overhead OpenAI bills
    this_run = dict((stats or {}).get("tokens") or {})
    counter_name = str((stats or {}).get("token_counter") or "unknown counter")
    release = RELEASE_TOKENS_WITH_OVERHEAD
    tokens_sentence = (f"The quoted {seeds.tokens / 1e6:.2f} M tokens are the utterance text alone; with message "
                       f"overhead (3 + 1 role token per message, +3 per example) the release's examples are "
                       f"{release['with system prompt'] / 1e6:.2f} M o200k_base tokens "
                       f"({release['without'] / 1e6:.2f} M without a system prompt).")
    if this_run:
        tokens_sentence += (" This run's data: " + ", ".join(f"{k} {v:,}" for k, v in this_run.items())
                            + f" = {sum(this_run.values()):,} tokens ({counter_name}).")
    sentence += " " + tokens_sentence
    return {
        "tokens_with_overhead": {"quoted_text_only": seeds.tokens, "release_measured": dict(release),
                                 "this_run": this_run, "this_run_total": sum(this_run.values()),
                                 "token_counter": counter_name if this_run else None,
                                 "sentence": tokens_sentence},
        "seeds": {"tokens": seeds.tokens, "epochs": seeds.epochs, "billed_tokens": billed,
                  "price_per_1m": seeds.price_per_1m, "training_usd": seeds_usd,
                  "training_jpy": seeds.training_jpy, "implied_jpy_per_usd": implied_rate,
                  "inference_jpy": seeds.inference_jpy, "total_jpy": seeds.total_jpy},
        "corrected": {"base_model": entry["model"], "billed_tokens": corrected.billed_tokens,
                      "epochs": corrected.epochs, "price_per_1m": corrected.price_per_1m,
                      "training_usd": corrected.usd, "training_jpy": corrected.jpy,
                      "jpy_per_usd": prices.jpy_per_usd, "inference_jpy": seeds.inference_jpy,
                      "total_jpy": total, "is_estimate": True,
                      "label": "estimate: the seeds' rough token figure at the dated training price; their "
                               "inference figure carried over as stated"},
        "price_ratio": ratio,
        "prices_as_of": prices.as_of,
        "sentence": sentence,
    }


def seeds_table(cmp: Mapping[str, Any]):
    import pandas as pd
    s, c = cmp["seeds"], cmp["corrected"]
    rows = [
        ("tokens (whole corpus)", f"{s['tokens'] / 1e6:.2f} M", f"{s['tokens'] / 1e6:.2f} M", "the seeds' rough figure, kept"),
        *[(f"tokens with message overhead: {k}", "-", f"{v:,}", f"this run's data/stats.json "
           f"({cmp['tokens_with_overhead']['token_counter']})")
          for k, v in (cmp.get("tokens_with_overhead", {}).get("this_run") or {}).items()],
        *[(f"tokens with message overhead: release, {k}", "-", f"{v / 1e6:.2f} M",
           "measured with o200k_base: the quoted figure leaves out message overhead")
          for k, v in (cmp.get("tokens_with_overhead", {}).get("release_measured") or {}).items()],
        ("epochs", s["epochs"], c["epochs"], ""),
        ("billed training tokens", f"{s['billed_tokens']:,}", f"{c['billed_tokens']:,}", "epochs × tokens"),
        ("price per 1M training tokens", f"${s['price_per_1m']:.2f}", f"${c['price_per_1m']:.2f}",
         f"seeds: an inference input rate; corrected: fine-tuning training, {c['base_model']}, as of {cmp['prices_as_of']}"),
        ("training (USD)", fmt_usd(s["training_usd"]), fmt_usd(c["training_usd"]), ""),
        ("JPY per USD", f"{s['implied_jpy_per_usd']:.1f} (implied)", f"{c['jpy_per_usd']:g}",
         "seeds: implied by their own figures; corrected: the price table's dated assumption"),
        ("training (JPY)", fmt_jpy(s["training_jpy"]), fmt_jpy(c["training_jpy"]), ""),
        ("inference (JPY)", fmt_jpy(s["inference_jpy"]), fmt_jpy(c["inference_jpy"]),
         "carried over: the seeds give no workload (see the inference section for measured prices)"),
        ("total (JPY)", fmt_jpy(s["total_jpy"]), fmt_jpy(c["total_jpy"]), c["label"]),
    ]
    return pd.DataFrame(rows, columns=["item", "seeds", "corrected", "note"]).set_index("item")


# =================================================================================================
# Local LoRA: GPU hours from 02's measured throughput
# =================================================================================================

def _str(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def device_label(card: Mapping[str, Any]) -> tuple[str, bool]:
    """(label, named): the device a local card's throughput was measured on — its recorded device
    name when the card has one, else "CPU" / "GPU (model not recorded)", with " (embedded smoke
    model)" for the package's tiny model."""
    params = card.get("training_params") or {}
    metrics = card.get("training_metrics") or {}
    name = None
    for source in (card, params, metrics):
        name = name or _str(source.get("device_name"))
    device = None
    for source in (card, params, metrics):
        device = device or _str(source.get("device"))
    if name:
        label, named = name, True
    elif device and device.lower().startswith("cpu"):
        label, named = "CPU", True
    elif device and device.lower().startswith(("cuda", "gpu")):
        label, named = "GPU (model not recorded)", False
    else:
        label, named = "unknown device", False
    world = params.get("world_size")
    if isinstance(world, int) and world > 1:
        label += f" x{world}"
    if card.get("smoke_model") or str(card.get("base_model", "")).startswith("embedded:"):
        label += " (embedded smoke model)"
    return label, named


def _local_card(inputs: CostInputs) -> tuple[Path, dict[str, Any]] | None:
    for path, card in inputs.local_cards:       # newest first
        if (card.get("training_metrics") or {}).get("train_tokens_per_s"):
            return path, card
    return None


def local_costs(inputs: CostInputs, epochs: int, gpu_hourly_usd: float | None = None,
                tokens_per_s: float | None = None) -> dict[str, Any]:
    """GPU hours to train the local LoRA on the same data for `epochs` epochs: tokens per epoch (the
    local tokenizer's count from the card, else stats.json's) × epochs ÷ the tokens/s 02 measured
    (or `tokens_per_s`, an assumption), × the number of processes, × the GPU price (`gpu_hourly_usd`
    or the price table's). Always an estimate: the label names the device it was measured on."""
    table = inputs.prices
    price = float(gpu_hourly_usd) if gpu_hourly_usd is not None else table.gpu_hourly_usd
    price_label = (f"${price:.2f}/GPU-hour (parameter gpu_hourly_usd)" if gpu_hourly_usd is not None
                   else table.gpu_label)
    found = _local_card(inputs)
    if found is None and tokens_per_s is None:
        return {"available": False, "is_estimate": True,
                "reason": "no local LoRA card with a measured tokens/s in run_dir/models (02 Part B has not "
                          "trained): set local_tokens_per_s to price an assumed throughput"}
    if price is None:
        return {"available": False, "is_estimate": True,
                "reason": "no GPU price: set gpu_hourly_usd or local.gpu_hourly_usd in the price table"}
    stats = inputs.stats
    o200k_per_epoch = int(stats["tokens"]["train"])
    out: dict[str, Any] = {"available": True, "is_estimate": True, "epochs": int(epochs),
                           "gpu_hourly_usd": price, "gpu_price_label": price_label}
    reasons = []
    world = 1
    if found is not None:
        path, card = found
        metrics = card.get("training_metrics") or {}
        params = card.get("training_params") or {}
        world = int(params.get("world_size") or 1)
        label, named = device_label(card)
        local_tokens = ((card.get("training_data") or {}).get("train") or {}).get("tokens")
        out.update(card=path.name, model_id=card.get("model_id"), base_model=card.get("base_model"),
                   smoke_model=bool(card.get("smoke_model")), device=label, device_named=named,
                   world_size=world)
        measured_tps = float(metrics["train_tokens_per_s"])
        wall = metrics.get("wall_s")
        if wall:
            hours = float(wall) / SECONDS_PER_HOUR * world
            out["measured_run"] = {"wall_s": float(wall), "gpu_hours": hours, "usd": hours * price,
                                   "jpy": costs.to_jpy(hours * price, table.jpy_per_usd),
                                   "epochs": metrics.get("epochs") or params.get("epochs"),
                                   "label": f"this run's own training, measured wall time on {label}"}
    else:
        measured_tps, local_tokens = None, None
        out.update(device="assumed (parameter local_tokens_per_s)", device_named=False, world_size=1)
    if tokens_per_s is not None:
        out["tokens_per_s"] = float(tokens_per_s)
        out["tokens_per_s_source"] = "parameter local_tokens_per_s (an assumption)"
        reasons.append("throughput assumed (parameter local_tokens_per_s)")
    else:
        out["tokens_per_s"] = measured_tps
        out["tokens_per_s_source"] = f"measured by 02 on {out['device']} (training steps, non-padding tokens)"
        reasons.append(f"throughput measured on {out['device']}")
        if out.get("smoke_model") or out["device"].startswith("CPU"):
            reasons.append("a CPU / smoke-model throughput says nothing about a real model on a GPU: "
                           "the figure shows the arithmetic only — measure on the target GPU")
    if local_tokens:
        out["tokens_per_epoch"] = int(local_tokens)
        out["tokens_source"] = "the local tokenizer's count of train.jsonl (card training_data.train.tokens)"
    else:
        out["tokens_per_epoch"] = o200k_per_epoch
        out["tokens_source"] = f"data/stats.json training tokens ({inputs.token_counter}) as a proxy"
        reasons.append("token count of another tokenizer used as a proxy")
    out["local_tokens_per_stats_token"] = out["tokens_per_epoch"] / o200k_per_epoch if o200k_per_epoch else 1.0
    train_tokens = out["tokens_per_epoch"] * int(epochs)
    hours = train_tokens / out["tokens_per_s"] / SECONDS_PER_HOUR if out["tokens_per_s"] else float("nan")
    out.update(train_tokens=train_tokens, hours=hours, gpu_hours=hours * world, usd=hours * world * price,
               jpy=costs.to_jpy(hours * world * price, table.jpy_per_usd))
    reasons.append("training steps only (model loading and evaluation excluded)")
    if str(price_label).endswith("(assumption)"):
        reasons.append("GPU price is an assumption")
    out["reasons"] = reasons
    out["label"] = "estimate: " + "; ".join(reasons)
    return out


def local_table(local: Mapping[str, Any]):
    import pandas as pd
    if not local.get("available"):
        return pd.DataFrame({"note": [local.get("reason", "no local estimate")]})
    rows = [("adapter", local.get("model_id", "-"), f"base {local.get('base_model', '-')}"),
            ("measured on", local["device"], local.get("card", "")),
            ("throughput", f"{local['tokens_per_s']:,.0f} tokens/s", local["tokens_per_s_source"]),
            ("tokens per epoch", f"{local['tokens_per_epoch']:,}", local["tokens_source"]),
            ("epochs", local["epochs"], "the same as the OpenAI estimate"),
            ("GPU hours", f"{local['gpu_hours']:,.4g}", f"× {local.get('world_size', 1)} process(es)"),
            ("GPU price", f"${local['gpu_hourly_usd']:.2f}/h", local["gpu_price_label"]),
            ("cost (USD)", fmt_usd(local["usd"]), "estimate"),
            ("cost (JPY)", fmt_jpy(local["jpy"]), "estimate"),
            ("label", "estimate", local["label"])]
    run = local.get("measured_run")
    if run:
        rows.insert(6, ("this run (measured wall time)", f"{run['wall_s']:,.1f} s = {fmt_usd(run['usd'])}",
                        f"{run['label']}, priced at the GPU rate"))
    return pd.DataFrame(rows, columns=["item", "value", "note"]).set_index("item")


# =================================================================================================
# What if: epochs × dataset size
# =================================================================================================

def _train_fraction(stats: Mapping[str, Any]) -> float:
    ratios = stats.get("split_ratios")
    if isinstance(ratios, (list, tuple)) and ratios and sum(ratios) > 0:
        return float(ratios[0]) / float(sum(ratios))
    kept = stats.get("dialogues_kept") or 0
    return stats["splits"]["train"] / kept if kept else 0.8


def what_if(inputs: CostInputs, base_model: str = DEFAULT_BASE_MODEL,
            epochs_list: Iterable[int] = DEFAULT_WHAT_IF_EPOCHS, local: Mapping[str, Any] | None = None,
            max_example_tokens: int | None = None, include_auto: bool = True):
    """OpenAI training cost (and local GPU cost, when `local` is available) for each number of
    epochs × dataset size: this run as measured, and the paper's Low / High / Full subsets and the
    whole corpus, *scaled* from this run's tokens and examples per training dialogue (training
    dialogues = dialogues × this run's train ratio). A long DataFrame, one row per (dataset, epochs)."""
    import pandas as pd
    stats = inputs.stats
    table = inputs.prices
    entry = table.entry(base_model)
    train_dialogues = int(stats["splits"]["train"])
    if train_dialogues <= 0:
        raise CostReportError("the training split is empty: re-run 01_data with more data")
    tokens = int(stats["tokens"]["train"])
    examples = int((stats.get("examples") or stats["splits"])["train"])
    per_dlg_tokens, per_dlg_examples = tokens / train_dialogues, examples / train_dialogues
    frac = _train_fraction(stats)
    limit = int(max_example_tokens) if max_example_tokens else stats.get("max_example_tokens")
    embedded = str(stats.get("source", "")) == "embedded"
    datasets = [("this run", int(stats.get("dialogues_kept") or train_dialogues), train_dialogues, tokens,
                 examples, False)]
    for name, n in (*PAPER_SUBSETS, ("All (whole corpus)", CORPUS_DIALOGUES)):
        td = round(n * frac)
        datasets.append((name, n, td, round(per_dlg_tokens * td), max(1, round(per_dlg_examples * td)), True))
    epochs_values: list[Any] = sorted({int(e) for e in epochs_list})
    if include_auto:
        epochs_values.append("auto")
    scaled_note = (f"scaled from this run's {per_dlg_tokens:,.0f} tokens per training dialogue"
                   + (" (the embedded sample: short project-written dialogues, not KokoroChat: the arithmetic "
                      "only)" if embedded else ""))
    rows = []
    for name, n, td, tok, ex, scaled in datasets:
        for e in epochs_values:
            est = costs.estimate_training_from_totals(
                tok, ex, e, entry["training"], table.jpy_per_usd, stats.get("max_example_tokens_seen"), limit,
                base_model=entry["model"], token_counter=stats.get("token_counter"), prices_as_of=table.as_of,
                fx_label=table.fx_label)
            reasons = list(est.reasons) + ([scaled_note] if scaled else [])
            row = {"dataset": name, "dialogues": n, "train_dialogues": td, "scaled": scaled,
                   "tokens_per_epoch": est.tokens_per_epoch, "examples": ex,
                   "epochs": est.epochs, "epochs_setting": str(e), "billed_tokens": est.billed_tokens,
                   "openai_usd": est.usd, "openai_jpy": est.jpy, "local_gpu_hours": None, "local_usd": None,
                   "is_estimate": bool(reasons), "label": ("estimate: " + "; ".join(reasons)) if reasons else "computed"}
            if local and local.get("available") and local.get("tokens_per_s"):
                hours = (tok * local["local_tokens_per_stats_token"] * est.epochs / local["tokens_per_s"]
                         / SECONDS_PER_HOUR * int(local.get("world_size") or 1))
                row.update(local_gpu_hours=hours, local_usd=hours * local["gpu_hourly_usd"])
            rows.append(row)
    frame = pd.DataFrame(rows)
    frame.attrs.update(base_model=entry["model"], scaled_note=scaled_note, prices_as_of=table.as_of)
    return frame


def what_if_table(frame):
    """The what-if rows as a grid: one row per dataset; OpenAI USD (and local GPU USD) per number of
    epochs; the "auto" column shows the epochs OpenAI's heuristic picks for that dataset's size."""
    import pandas as pd
    datasets = list(dict.fromkeys(frame["dataset"]))
    settings = list(dict.fromkeys(frame["epochs_setting"]))
    parts = [("OpenAI USD", "openai_usd")]
    if frame["local_usd"].notna().any():
        parts.append(("local GPU USD", "local_usd"))
    index, data = [], {}
    for name in datasets:
        rows = frame[frame["dataset"] == name]
        first = rows.iloc[0]
        index.append(f"{name} ({int(first['dialogues']):,} dlg{', scaled' if first['scaled'] else ''})")
        for part, column in parts:
            for setting in settings:
                row = rows[rows["epochs_setting"] == setting]
                value = fmt_usd(row[column].iloc[0]) if len(row) and pd.notna(row[column].iloc[0]) else "n/a"
                if setting == "auto" and len(row):
                    value += f" ({int(row['epochs'].iloc[0])} ep)"
                data.setdefault((part, setting), []).append(value)
    grid = pd.DataFrame(data, index=index)
    grid.columns = pd.MultiIndex.from_tuples(grid.columns, names=["", "epochs"])
    grid.index.name = "dataset"
    return grid


# =================================================================================================
# Plots (ASCII labels: no CJK font needed)
# =================================================================================================

def plot_training(training: Mapping[str, costs.TrainingEstimate], local: Mapping[str, Any] | None = None):
    """Horizontal bars: training cost (USD) per priced base model at the chosen epochs, and the local
    LoRA's GPU cost for the same data and epochs when known. Returns the Figure."""
    import matplotlib.pyplot as plt
    names = list(training)
    values = [training[m].usd for m in names]
    colors = ["tab:blue"] * len(names)
    estimate = any(e.is_estimate for e in training.values())
    if local and local.get("available"):
        names.append(f"local LoRA ({local['device']})")
        values.append(local["usd"])
        colors.append("tab:green")
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.6))
    ax.barh(names, values, color=colors)
    for y, v in enumerate(values):
        ax.text(v, y, f" {fmt_usd(v)}", va="center", fontsize=9)
    ax.invert_yaxis()
    first = next(iter(training.values()))
    ax.set_xlabel(f"USD (prices as of {first.prices_as_of})")
    ax.set_title(f"Training cost at {first.epochs} epochs{' (estimate)' if estimate else ''}")
    ax.set_xlim(0, max(values) * 1.3 if values and max(values) > 0 else 1)
    fig.tight_layout()
    return fig


def plot_what_if(frame):
    """USD against epochs, one line per dataset size: OpenAI (solid) and local GPU (dashed). Log scale."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 6))
    numeric = frame[frame["epochs_setting"] != "auto"]
    for i, (name, group) in enumerate(numeric.groupby("dataset", sort=False)):
        color = f"C{i}"
        scaled = " (scaled)" if group["scaled"].iloc[0] else ""
        ax.plot(group["epochs"], group["openai_usd"], "o-", color=color, label=f"OpenAI, {name}{scaled}")
        if group["local_usd"].notna().any():
            ax.plot(group["epochs"], group["local_usd"], "s--", color=color, alpha=0.7, label=f"local GPU, {name}")
    ax.set_yscale("log")
    ax.set_xlabel("epochs")
    ax.set_ylabel(f"USD (prices as of {frame.attrs.get('prices_as_of', '?')})")
    ax.set_title(f"Training cost by epochs and dataset size ({frame.attrs.get('base_model', '')}, estimate)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.tight_layout()
    return fig


def plot_inference(rows: Sequence[Mapping[str, Any]]):
    """Horizontal bars: USD per `replies` counseling replies, per fine-tuned model."""
    import matplotlib.pyplot as plt
    names = [r["model"] for r in rows]
    values = [r["per_replies"]["usd"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.6))
    ax.barh(names, values, color="tab:orange")
    for y, v in enumerate(values):
        ax.text(v, y, f" {fmt_usd(v)}", va="center", fontsize=9)
    ax.invert_yaxis()
    n = rows[0]["replies"] if rows else DEFAULT_REPLIES
    est = any(r["is_estimate"] for r in rows)
    ax.set_xlabel(f"USD per {n:,} replies (prices as of {rows[0]['prices_as_of'] if rows else '?'})")
    ax.set_title(f"Using a fine-tuned model{' (estimate)' if est else ''}")
    ax.set_xlim(0, max(values) * 1.3 if values and max(values) > 0 else 1)
    fig.tight_layout()
    return fig


# =================================================================================================
# Service window
# =================================================================================================

def service_window_table(prices: PriceTable, today: date | str | None = None):
    """Per priced base model: the reported retirement date, days left, and whether it warns today."""
    import pandas as pd
    rows = []
    for model in prices.models:
        w = prices.service_window(model, today=today)
        rows.append({"base model": model,
                     "retires on (reported)": str(w.retires_on) if w.retires_on else "-",
                     "days left": (w.retires_on - w.today).days if w.retires_on else None,
                     "no new jobs after (reported)": str(w.no_new_jobs_after) if w.no_new_jobs_after else "-",
                     "warning": "yes" if w.warn else "no"})
    return pd.DataFrame(rows).set_index("base model")


def service_window(prices: PriceTable, base_model: str, today: date | str | None = None) -> dict[str, Any]:
    w = prices.service_window(base_model, today=today)
    return {"model": w.base_model, "checked_on": str(w.today),
            "retires_on": str(w.retires_on) if w.retires_on else None,
            "no_new_jobs_after": str(w.no_new_jobs_after) if w.no_new_jobs_after else None,
            "status": w.status, "source": w.source, "warning": w.warning()}


# =================================================================================================
# The summary
# =================================================================================================

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
    path.parent.mkdir(parents=True, exist_ok=True)
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
    return path, json.loads(path.read_text(encoding="utf-8"))


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
