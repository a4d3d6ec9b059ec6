"""The reported service window of each priced base model (retirement, no-new-jobs date) as 05_cost
shows it: a table, the summary's entry, and the short note beside a training cost."""
from __future__ import annotations

from datetime import date
from typing import Any

from kokoro_helpers.report.prices import PriceTable


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


def window_note(prices: PriceTable | None, model: str, today: date | str | None) -> str | None:
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
