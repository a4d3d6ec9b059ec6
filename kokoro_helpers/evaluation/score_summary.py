"""Reading the human scores back and summarising them: the latest score per rater × item ×
model, means with t-intervals, inter-rater agreement, tables, plots and CSV files.

``load_scores`` (latest per rater × item × model) → ``summarize`` (mean, sd, n and a 95 %
t-interval per model × criterion, from scipy's t distribution) → ``summary_table`` /
``plot_distributions`` / ``plot_means`` → ``agreement`` (Krippendorff's alpha, ordinal, value
domain 0..5, via the ``krippendorff`` package) → ``export_csv``. Writing the summary into the
model cards is kokoro_helpers.evaluation.score_cards.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from kokoro_helpers.evaluation.score_store import (DEMO_PREFIX, META_COLUMNS, SCORE_MAX, SCORE_MIN, SCORE_VALUES,
                                                   STORE_SUFFIX, read_records)
from kokoro_helpers.jsonio import atomic_write
from kokoro_helpers.paths import resolve

#: Below this many scores of a model × criterion the summary shows the count and the mean only
#: (no interval, NaN): with one or two scores a t-interval runs far outside 0..5.
MIN_SCORES_FOR_INTERVAL = 5
SUMMARY_COLUMNS = ("criterion", "n", "mean", "sd", "ci_low", "ci_high", "n_raters", "n_items", "n_demo")


def load_scores(store_dir: str | Path, items: Iterable[Mapping[str, Any]] | None = None, *,
                include_demo: bool = True, history: bool = False):
    """All scores in ``store_dir/*.jsonl`` as a DataFrame: one row per rater × item × model —
    the latest line wins (file order) — with columns item_id, model, rater, comment, time,
    demo (rater name starts with ``demo-``), split, then one column per criterion.

    ``items`` (optional) supplies each item's ``split`` ("test"/"valid", when items carry one).
    ``history=True`` keeps every line (a ``seq`` column gives the order within a rater's file).
    A missing or empty folder gives an empty frame with those columns."""
    import pandas as pd

    folder = resolve(store_dir)
    split_of = {}
    if items is not None and hasattr(items, "to_dict") and hasattr(items, "columns"):   # a DataFrame
        items = items.to_dict("records")
    for it in items if items is not None else []:
        split_of[str(it["item_id"])] = it.get("split")
    rows: dict[Any, dict[str, Any]] = {}
    criteria: list[str] = []
    files = sorted(folder.glob(f"*{STORE_SUFFIX}")) if folder.is_dir() else []
    for path in files:
        for seq, rec in enumerate(read_records(path)):
            rater = str(rec.get("rater") or path.stem)
            demo = rater.lower().startswith(DEMO_PREFIX)
            if demo and not include_demo:
                continue
            row = {"item_id": str(rec["item_id"]), "model": str(rec["model"]), "rater": rater,
                   "comment": rec.get("comment", "") or "", "time": rec.get("time"), "demo": demo,
                   "split": split_of.get(str(rec["item_id"]))}
            for crit, value in rec["scores"].items():
                if crit not in criteria:
                    criteria.append(crit)
                row[crit] = value
            if history:
                row["seq"] = seq
                rows[(rater, row["item_id"], row["model"], seq)] = row
            else:
                rows.pop((rater, row["item_id"], row["model"]), None)   # keep insertion = latest order
                rows[(rater, row["item_id"], row["model"])] = row
    columns = [*META_COLUMNS, *(["seq"] if history else []), *criteria]
    frame = pd.DataFrame(list(rows.values()), columns=columns)
    for crit in criteria:
        frame[crit] = pd.to_numeric(frame[crit], errors="coerce").astype(float)
    return frame


def criteria_columns(scores_df) -> list[str]:
    """The criterion columns of a load_scores() frame."""
    return [c for c in scores_df.columns if c not in META_COLUMNS and c != "seq"]


@lru_cache(maxsize=256)
def t_critical(confidence: float, df: int) -> float:
    """Two-sided critical value of Student's t (e.g. 2.776 for 95 % and df=4), from scipy."""
    from scipy import stats

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    df = int(df)
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return float(stats.t.ppf(0.5 + confidence / 2, df))


def t_interval(mean: float, sd: float, n: int, confidence: float = 0.95,
               min_n: int = MIN_SCORES_FOR_INTERVAL) -> tuple[float, float]:
    """(ci_low, ci_high): the ``confidence`` t-interval of a mean of ``n`` values with sample sd
    ``sd``, clipped to the score range 0..5; (NaN, NaN) below ``min_n`` (and 2) values."""
    if n < max(2, int(min_n)):
        return math.nan, math.nan
    half = t_critical(confidence, n - 1) * sd / math.sqrt(n)
    return _clip_score(mean - half), _clip_score(mean + half)


def mean_ci(values: Sequence[float], confidence: float = 0.95,
            min_n: int = MIN_SCORES_FOR_INTERVAL) -> tuple[float, float, float, float]:
    """(mean, sd, ci_low, ci_high) with a t-interval clipped to the score range 0..5. Below
    ``min_n`` values there is no interval (NaN): the count and the mean (sd from 2 values on,
    which pooling needs) only."""
    import numpy as np

    xs = np.asarray(values, dtype=float)
    n = len(xs)
    if n == 0:
        return (math.nan,) * 4
    mean = float(xs.mean())
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    sd = float(xs.std(ddof=1))
    return (mean, sd, *t_interval(mean, sd, n, confidence, min_n))


def _clip_score(x: float) -> float:
    return min(float(SCORE_MAX), max(float(SCORE_MIN), x))


def summarize(scores_df, criteria: Sequence[str] | None = None, by: Sequence[str] = ("model",),
              confidence: float = 0.95):
    """Per ``by`` (default model) × criterion: n, mean, sd and a ``confidence`` t-interval
    (ci_low, ci_high, clipped to 0..5), with the number of raters, items and demo scores behind
    each row. Below :data:`MIN_SCORES_FOR_INTERVAL` scores a row has no interval (NaN): the count
    and the mean (and sd) only; ``attrs["min_scores_for_interval"]`` states the number.

    Every score counts as one observation (scores of one item by several raters are not
    independent, so treat the interval as descriptive). ``by=("split", "model")`` splits test
    and valid when load_scores() was given the items."""
    import pandas as pd

    by = list(by)
    columns = [*by, *SUMMARY_COLUMNS]
    missing = [c for c in by if c not in scores_df.columns]
    if missing:
        raise ValueError(f"cannot group by {missing}: not columns of the scores "
                         f"(pass items to load_scores() for 'split')")
    criteria = list(criteria) if criteria is not None else criteria_columns(scores_df)
    unknown = [c for c in criteria if c not in scores_df.columns]
    if unknown:
        raise ValueError(f"no scores for criteria {unknown}; scored criteria: {criteria_columns(scores_df)}")
    out = []
    if len(scores_df):
        for keys, group in scores_df.groupby(by, sort=True, dropna=False):
            keys = keys if isinstance(keys, tuple) else (keys,)
            for crit in criteria:
                sub = group[group[crit].notna()]
                if not len(sub):
                    continue
                mean, sd, lo, hi = mean_ci(sub[crit].astype(float).tolist(), confidence)
                out.append({**dict(zip(by, keys)), "criterion": crit, "n": len(sub), "mean": mean,
                            "sd": sd, "ci_low": lo, "ci_high": hi, "n_raters": sub["rater"].nunique(),
                            "n_items": sub["item_id"].nunique(), "n_demo": int(sub["demo"].sum())})
    frame = pd.DataFrame(out, columns=columns)
    frame.attrs["confidence"] = confidence
    frame.attrs["min_scores_for_interval"] = MIN_SCORES_FOR_INTERVAL
    return frame


def summary_table(summary, digits: int = 2):
    """The summary for people: below ``min_scores_for_interval`` scores a row shows its count and
    mean only (sd and interval "—"); otherwise the interval as one "low–high" column (within 0–5)."""
    import pandas as pd

    if not len(summary):
        return summary
    min_n = summary.attrs.get("min_scores_for_interval", MIN_SCORES_FOR_INTERVAL)
    conf = summary.attrs.get("confidence", 0.95)
    keys = [c for c in summary.columns if c not in SUMMARY_COLUMNS]
    enough = summary["n"] >= min_n
    out = summary[[*keys, "criterion", "n"]].copy()
    out["mean"] = summary["mean"].round(digits)
    out["sd"] = [f"{sd:.{digits}f}" if ok and not math.isnan(sd) else "—" for sd, ok in zip(summary["sd"], enough)]
    out[f"{conf:.0%} CI"] = [f"{lo:.{digits}f}–{hi:.{digits}f}" if ok else f"— (n < {min_n})"
                             for lo, hi, ok in zip(summary["ci_low"], summary["ci_high"], enough)]
    out["raters"] = summary["n_raters"]
    if summary["n_demo"].sum():
        out["demo"] = summary["n_demo"]
    return pd.DataFrame(out).reset_index(drop=True)


def _no_scores_figure():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, "no human scores yet", ha="center", va="center")
    return fig


def plot_distributions(scores_df, criteria: Sequence[str] | None = None,
                       models: Sequence[str] | None = None, normalize: bool = True):
    """One panel per criterion: how often each score 0..5 was given, one bar colour per model
    (share of that model's scores when ``normalize``). Labels are criterion keys and model names
    (ASCII), so no CJK font is needed. Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt
    import numpy as np

    criteria = list(criteria) if criteria is not None else criteria_columns(scores_df)
    models = list(models) if models is not None else sorted(scores_df["model"].unique()) if len(scores_df) else []
    if not criteria or not models:
        return _no_scores_figure()
    ncols = min(3, len(criteria))
    nrows = math.ceil(len(criteria) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
    width = 0.8 / len(models)
    x = np.arange(len(SCORE_VALUES))
    for i, crit in enumerate(criteria):
        ax = axes[i // ncols][i % ncols]
        for j, model in enumerate(models):
            values = scores_df.loc[(scores_df["model"] == model) & scores_df[crit].notna(), crit].astype(int)
            counts = np.array([(values == s).sum() for s in SCORE_VALUES], dtype=float)
            if normalize and counts.sum():
                counts /= counts.sum()
            ax.bar(x - 0.4 + width * (j + 0.5), counts, width, label=str(model))
        ax.set_xticks(x, [str(s) for s in SCORE_VALUES])
        ax.set(title=crit, xlabel="score", ylabel="share of scores" if normalize else "scores")
    for k in range(len(criteria), nrows * ncols):
        axes[k // ncols][k % ncols].axis("off")
    axes[0][0].legend(fontsize="small")
    fig.suptitle("Human scores (0-5) by criterion and model")
    fig.tight_layout()
    return fig


def plot_means(summary):
    """Mean score per model × criterion with its confidence interval as error bars (a
    summarize() frame grouped by model). Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt
    import numpy as np

    if not len(summary):
        return _no_scores_figure()
    criteria = list(dict.fromkeys(summary["criterion"]))
    models = list(dict.fromkeys(summary["model"]))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(criteria) * max(1, len(models)) / 2), 4))
    width = 0.8 / len(models)
    x = np.arange(len(criteria))
    for j, model in enumerate(models):
        rows = summary[summary["model"] == model].set_index("criterion").reindex(criteria)
        means = rows["mean"].to_numpy(dtype=float)
        err = np.vstack([means - rows["ci_low"].to_numpy(dtype=float),
                         rows["ci_high"].to_numpy(dtype=float) - means])
        ax.bar(x - 0.4 + width * (j + 0.5), means, width, yerr=np.nan_to_num(err), capsize=3, label=str(model))
    conf = summary.attrs.get("confidence", 0.95)
    ax.set_xticks(x, criteria, rotation=20, ha="right")
    ax.set(ylim=(SCORE_MIN, SCORE_MAX), ylabel="mean score (0-5)",
           title=f"Mean human score with {conf:.0%} CI (none below "
                 f"{summary.attrs.get('min_scores_for_interval', MIN_SCORES_FOR_INTERVAL)} scores)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


@dataclass
class Agreement:
    """Krippendorff's alpha for one criterion; ``alpha`` is None with a ``reason`` when it
    cannot be computed."""
    criterion: str
    alpha: float | None
    n_raters: int
    n_units: int          # (item, model) units scored by two or more raters
    reason: str = ""


def agreement(scores_df, criterion: str, raters: Sequence[str] | None = None) -> Agreement:
    """Krippendorff's alpha (ordinal, value domain 0..5, via the ``krippendorff`` package) among
    raters on the (item, model) units two or more of them scored. alpha is None, with the
    reason, when fewer than two raters scored a common unit or all scores are identical."""
    import numpy as np

    if criterion not in scores_df.columns:
        raise ValueError(f"no scores for criterion {criterion!r}; scored: {criteria_columns(scores_df)}")
    df = scores_df[scores_df[criterion].notna()]
    if raters is not None:
        df = df[df["rater"].isin(list(raters))]
    units = df.groupby(["item_id", "model"])["rater"].nunique()
    shared = units[units >= 2].index
    raters_all = sorted(df["rater"].unique())
    if len(raters_all) < 2:
        return Agreement(criterion, None, len(raters_all), 0,
                         f"needs two or more raters; found {len(raters_all)} ({', '.join(raters_all) or 'none'})")
    if not len(shared):
        return Agreement(criterion, None, len(raters_all), 0,
                         f"{len(raters_all)} raters but no item scored by two of them")
    df = df.set_index(["item_id", "model"]).loc[shared].reset_index()
    matrix = df.pivot_table(index="rater", columns=["item_id", "model"], values=criterion, aggfunc="last")
    values = matrix.to_numpy(dtype=float)
    n_raters, n_units = int(matrix.shape[0]), int(matrix.shape[1])
    present = values[~np.isnan(values)]
    if len(set(present.tolist())) < 2:
        return Agreement(criterion, None, n_raters, n_units,
                         f"every shared score is {present[0]:g}: no variation, alpha is undefined")
    try:
        import krippendorff
    except ImportError as exc:
        raise ImportError("agreement() needs the 'krippendorff' package (a project dependency): "
                          "pip install krippendorff") from exc
    try:
        alpha = float(krippendorff.alpha(reliability_data=values, level_of_measurement="ordinal",
                                         value_domain=list(SCORE_VALUES)))
    except (ValueError, ZeroDivisionError) as exc:
        return Agreement(criterion, None, n_raters, n_units, f"krippendorff: {exc}")
    if math.isnan(alpha):
        return Agreement(criterion, None, n_raters, n_units, "alpha is undefined for these scores")
    return Agreement(criterion, alpha, n_raters, n_units)


def agreement_table(scores_df, criteria: Sequence[str] | None = None, raters: Sequence[str] | None = None):
    """agreement() for every criterion as a DataFrame (criterion, alpha, n_raters, n_units, reason)."""
    import pandas as pd
    criteria = list(criteria) if criteria is not None else criteria_columns(scores_df)
    return pd.DataFrame([asdict(agreement(scores_df, c, raters)) for c in criteria],
                        columns=["criterion", "alpha", "n_raters", "n_units", "reason"])


def _write_csv_atomic(frame, path: Path) -> Path:
    # binary, so pandas' own line ends are written as they are (what newline="" gives a text file)
    with atomic_write(path, "wb") as f:
        frame.to_csv(f, index=False, encoding="utf-8")
    return path


def export_csv(scores_df, out_dir: str | Path, *, summary=None, agreement=None,
               prefix: str = "human_") -> dict[str, Path]:
    """Write ``<prefix>scores.csv`` (one row per rater × item × model), ``<prefix>summary.csv``
    and ``<prefix>agreement.csv`` into ``out_dir`` (UTF-8, atomically). The summary and the
    agreement table are computed when not given. Returns {name: path}."""
    out = resolve(out_dir)
    if summary is None:
        summary = summarize(scores_df)
    if agreement is None:
        agreement = agreement_table(scores_df)
    elif isinstance(agreement, (list, tuple)):
        import pandas as pd
        agreement = pd.DataFrame([asdict(a) for a in agreement])
    scores_out = scores_df.copy()
    for crit in criteria_columns(scores_out):     # whole numbers in the CSV: 4, not 4.0
        scores_out[crit] = scores_out[crit].round().astype("Int64")
    return {"scores": _write_csv_atomic(scores_out, out / f"{prefix}scores.csv"),
            "summary": _write_csv_atomic(summary, out / f"{prefix}summary.csv"),
            "agreement": _write_csv_atomic(agreement, out / f"{prefix}agreement.csv")}
