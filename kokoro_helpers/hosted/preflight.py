"""Pre-flight of an OpenAI fine-tuning job: re-validate run_dir/data's files in OpenAI's chat format,
count their tokens, and estimate the bill before anything is sent (and say how amounts are written)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kokoro_helpers.data.pipeline import read_example_tokens
from kokoro_helpers.data.tokens import TokenCounter, get_token_counter
from kokoro_helpers.data.validate import example_errors
from kokoro_helpers.hosted.client import check_provider
from kokoro_helpers.hosted.errors import DataError
from kokoro_helpers.hosted.records import read_record
from kokoro_helpers.jsonio import file_sha256, read_jsonl
from kokoro_helpers.paths import resolve
from kokoro_helpers.report.costs import TrainingEstimate, estimate_training
from kokoro_helpers.report.prices import PriceTable, load_prices

MIN_TRAIN_EXAMPLES = 10          # OpenAI rejects training files with fewer examples
DEFAULT_MAX_EXAMPLE_TOKENS = 65_536


def fmt_usd(value: float) -> str:
    """A dollar amount with enough digits to be non-zero: $12.34, $0.50, $0.015, $0.0001."""
    x = float(value)
    if x == 0 or abs(x) >= 1:
        return f"${x:,.2f}"
    decimals = min(8, max(2, 2 - math.floor(math.log10(abs(x)))))
    text = f"{x:.{decimals}f}".rstrip("0")
    head, _, tail = text.partition(".")
    return f"${head}.{tail.ljust(2, '0')}"


@dataclass
class Preflight:
    """The re-validated files, their token counts, the price, and the estimate of the bill."""

    run_dir: Path
    base_model: str
    n_epochs: Any
    files: dict[str, Path]
    sha256: dict[str, str]
    examples: dict[str, int]
    tokens: dict[str, int]
    example_tokens: dict[str, list[int]]
    max_example_tokens: int
    token_counter: str
    stats: dict[str, Any]
    prices: PriceTable
    estimate: TrainingEstimate
    service_window: str | None = None
    notes: list[str] = field(default_factory=list)
    provider: str = "openai"

    @property
    def is_estimate(self) -> bool:
        return self.estimate.is_estimate

    def files_table(self):
        """One row per file: examples, tokens, longest example, sha256 (short), vs stats.json."""
        import pandas as pd
        rows = []
        recorded = self.stats.get("data_sha256") or {}
        for split, path in self.files.items():
            toks = self.example_tokens[split]
            rows.append({"split": split, "file": str(path.relative_to(self.run_dir)),
                         "examples": self.examples[split], "tokens": self.tokens[split],
                         "longest example": max(toks) if toks else 0,
                         "sha256": self.sha256[split][:12],
                         "matches stats.json": recorded.get(split) == self.sha256[split] if recorded else None})
        return pd.DataFrame(rows).set_index("split")

    def cost_table(self):
        """The pre-flight estimate as a two-column table (value, note), labelled."""
        import pandas as pd
        e = self.estimate
        tag = "estimate" if e.is_estimate else "computed"
        limit = f"{e.max_tokens_per_example:,}" if e.max_tokens_per_example else "no limit"
        rows = [
            ("base model", self.base_model, f"priced from {self.prices.path.name if self.prices.path else 'table'}"),
            ("training examples", f"{e.n_examples:,}", "data/train.jsonl"),
            ("tokens per epoch", f"{e.tokens_per_epoch:,}",
             f"Σ min({limit}, example tokens); {e.capped_examples} example(s) over the limit"
             if e.capped_examples >= 0 else f"Σ example tokens, cap {limit} (upper bound)"),
            ("epochs", e.epochs_label, f"n_epochs={self.n_epochs!r}"),
            ("billed tokens", f"{e.billed_tokens:,}", "epochs × tokens per epoch"),
            ("price", f"{fmt_usd(e.price_per_1m)} / 1M training tokens", f"{self.prices.source}, as of {e.prices_as_of}"),
            ("cost (USD)", fmt_usd(e.usd), tag),
            ("cost (JPY)", f"¥{e.jpy:,.0f}", f"{tag}; at {e.fx_label}"),
            ("token counter", self.token_counter, "estimate" if self.token_counter.startswith("estimate:") else "exact"),
            ("label", tag, e.label),
        ]
        return pd.DataFrame(rows, columns=["item", "value", "note"]).set_index("item")


def read_examples(path: Path) -> list[dict[str, Any]]:
    """The examples of a .jsonl file; a clear error naming the line of a broken one."""
    try:
        return read_jsonl(path)
    except ValueError as exc:
        raise DataError(f"{exc} (01_data)") from None


def preflight(run_dir: str | Path = "runs/default", base_model: str = "gpt-4o-mini-2024-07-18",
              n_epochs: Any = "auto", max_example_tokens: int | None = None,
              prices_file: str | Path | None = None, counter: TokenCounter | None = None,
              today: Any = None, provider: str = "openai") -> Preflight:
    """Re-validate data/train.jsonl and data/valid.jsonl in OpenAI's chat format, count their tokens,
    and estimate the bill: epochs × Σ min(limit, example tokens) × the training price. Raises
    DataError with counts per error category (and the first lines) if a file is not valid."""
    run = resolve(run_dir)
    data_dir = run / "data"
    train = data_dir / "train.jsonl"
    if not train.is_file():
        raise DataError(f"no training file at {train}: run 01_data first (it writes run_dir/data/)")
    stats = read_record(data_dir / "stats.json", default={}) or {}
    notes: list[str] = []
    if not stats:
        notes.append("data/stats.json is missing: token counts are computed here only")
    limit = int(max_example_tokens or stats.get("max_example_tokens") or DEFAULT_MAX_EXAMPLE_TOKENS)
    counter = counter or get_token_counter()
    provider = check_provider(provider)
    table = load_prices(prices_file).for_provider(provider)
    price = table.entry(base_model)   # a clear error for an unpriced model, before anything else

    files: dict[str, Path] = {"train": train}
    valid = data_dir / "valid.jsonl"
    if valid.is_file() and valid.stat().st_size > 0:
        files["valid"] = valid
    else:
        notes.append("no validation examples: the job runs without a validation file")

    sha, n_ex, toks, per_ex = {}, {}, {}, {}
    problems: list[str] = []
    counts: dict[str, int] = {}
    for split, path in files.items():
        examples = read_examples(path)
        sha[split] = file_sha256(path)
        per_ex[split], _ = read_example_tokens(data_dir, split, counter_name=counter.name, sha256=sha[split])
        if per_ex[split] is None or len(per_ex[split]) != len(examples):   # edited after 01, or another counter
            per_ex[split] = [counter.count_messages(ex.get("messages") or []) if isinstance(ex, dict) else 0
                             for ex in examples]
        n_ex[split] = len(examples)
        toks[split] = sum(per_ex[split])
        for i, ex in enumerate(examples, 1):
            errs = example_errors(ex)
            for e in errs:
                counts[f"{split}:{e}"] = counts.get(f"{split}:{e}", 0) + 1
            if errs and len(problems) < 3:
                problems.append(f"{path.name} example {i}: {', '.join(errs)}")
        over = sum(1 for t in per_ex[split] if t > limit)
        if over:
            notes.append(f"{over} {split} example(s) exceed {limit:,} tokens: OpenAI truncates them "
                         f"(billed at the limit)")
        recorded = (stats.get("data_sha256") or {}).get(split)
        if recorded and recorded != sha[split]:
            notes.append(f"{split}.jsonl changed since 01_data wrote stats.json (sha256 differs): re-run 01_data")
    if counts:
        raise DataError(f"the data is not in OpenAI's chat fine-tuning format: {counts}; first: "
                        f"{'; '.join(problems)}. Fix the source or re-run 01_data.")
    if n_ex["train"] < MIN_TRAIN_EXAMPLES:
        raise DataError(f"train.jsonl has {n_ex['train']} examples; OpenAI needs at least "
                        f"{MIN_TRAIN_EXAMPLES}: lower the filters of 01_data or add data")
    if stats.get("token_counter") and stats["token_counter"] != counter.name:
        notes.append(f"01_data counted with {stats['token_counter']!r}; this pre-flight counts with "
                     f"{counter.name!r}")

    estimate = estimate_training(per_ex["train"], n_epochs, price["training"], table.jpy_per_usd,
                                 max_tokens_per_example=limit, base_model=price["model"],
                                 token_counter=counter.name, prices_as_of=table.as_of, fx_label=table.fx_label)
    window = table.service_window(base_model, today=today).warning() if provider == "openai" else None
    return Preflight(provider=provider, run_dir=run, base_model=base_model, n_epochs=n_epochs, files=files, sha256=sha,
                     examples=n_ex, tokens=toks, example_tokens=per_ex, max_example_tokens=limit,
                     token_counter=counter.name, stats=stats, prices=table, estimate=estimate,
                     service_window=window, notes=notes)


def show_service_window(model: str, prices_file: str | Path | None = None, today: Any = None) -> str | None:
    """Print the service-window warning for `model` (or that no reported date is near); return it."""
    table = load_prices(prices_file)
    window = table.service_window(model, today=today)
    text = window.warning()
    if text:
        print(text)
    else:
        dates = ", ".join(f"{k} {v}" for k, v in (("retirement", window.retires_on),
                                                   ("no new jobs after", window.no_new_jobs_after)) if v)
        print(f"No reported service-window date is past or within {window.warn_days} days of {window.today} "
              f"for {model}{f' ({window.status}: {dates})' if dates else ''}.")
    return text

