"""05_cost's what-if grid: OpenAI (and local GPU) training cost for each number of epochs × dataset
size — this run, and the paper's subsets and the whole corpus scaled from it."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from kokoro_helpers.report import costs
from kokoro_helpers.report.cost_format import fmt_usd
from kokoro_helpers.report.cost_inputs import DEFAULT_BASE_MODEL, CostInputs, CostReportError
from kokoro_helpers.report.local_costs import SECONDS_PER_HOUR

DEFAULT_WHAT_IF_EPOCHS = (1, 2, 3, 5, 10)

# The paper's training subsets by the client's score (KOKOROCHAT.md), and the whole release.
PAPER_SUBSETS = (("Low (<70)", 3_870), ("High (70-98)", 2_601), ("Full (<=98)", 6_471))
CORPUS_DIALOGUES = 6_589


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
