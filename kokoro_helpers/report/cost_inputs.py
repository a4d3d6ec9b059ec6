"""05_cost's inputs: what the earlier notebooks wrote into `run_dir` (stats.json, model cards, 02's job
request, 03's items and generations) and the dated price table, read once into a `CostInputs`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kokoro_helpers import cards as cards_mod
from kokoro_helpers.jsonio import read_json, read_jsonl
from kokoro_helpers.paths import resolve
from kokoro_helpers.report.prices import PriceTable, load_prices

DEFAULT_BASE_MODEL = "gpt-4o-mini-2024-07-18"


class CostReportError(RuntimeError):
    """A missing input of 05_cost; the message says which notebook writes it."""


def _read_json(path: Path) -> Any:
    try:
        return read_json(path)
    except ValueError as exc:
        raise CostReportError(f"{exc}; re-run the notebook that writes it") from None


def _read_rows(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    """The object rows of a .jsonl file ([] when missing); a torn or non-object line is skipped and
    counted in `notes`."""
    bad = 0

    def count_bad(_n: int, _line: str) -> None:
        nonlocal bad
        bad += 1

    rows = read_jsonl(path, lenient=True, on_bad=count_bad, missing_ok=True)
    objects = [row for row in rows if isinstance(row, dict)]
    bad += len(rows) - len(objects)
    if bad:
        notes.append(f"{path.name}: {bad} unreadable line(s) skipped")
    return objects


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
    items = _read_rows(run / "eval" / "items.jsonl", notes)
    generations = _read_rows(run / "eval" / "generations.jsonl", notes)
    return CostInputs(run_dir=run, prices=prices, stats=stats, cards=cards_mod.list_cards(run),
                      job_request=_read_json(run / "openai" / "job_request.json"),
                      items=items or None, generations=generations or None, notes=notes)
