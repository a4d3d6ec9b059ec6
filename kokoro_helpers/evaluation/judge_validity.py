"""How far to trust the LLM judge: it rates whole held-out sessions on the clients' own review
criteria, and its ratings are correlated with what the clients themselves gave.

KokoroChat carries every session's client rating (overall `score` 0..100 and 20 criteria 0..5).
The judge reads the whole dialogue of each test-split session with a rubric written from those
criteria (`session_rubric_prompt`) and answers the same 21 numbers; per target we report
Spearman's rho and Kendall's tau between judge and clients, with a bootstrap 95% interval of rho
(sessions resampled in pairs, percentile method), and the number of sessions.

    result = judge_validity(sessions, spec, run_dir=run_dir, max_sessions=100, seed=42)
    result.table            # criterion, n, spearman, kendall, ci_low, ci_high, judge, judge_is_fake
    result.sentence         # whether the judge tracks the clients
    write_validity(result, run_dir)                    # run_dir/eval/judge_validity.csv
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from kokoro_helpers.jsonio import write_json_atomic
from kokoro_helpers.paths import resolve
from kokoro_helpers.data.schema import CRITERIA
from kokoro_helpers.evaluation.sessions import SCORE_MAX, TARGETS, Session

MIN_SESSIONS = 5                 # below this no correlation is reported
COLUMNS = ["criterion", "n", "spearman", "kendall", "ci_low", "ci_high", "judge", "judge_is_fake"]

SESSION_SYSTEM = ("あなたはカウンセリングの相談者（クライアント）の立場で、終わった相談セッション全体を振り返って"
                  "評価する評価者です。指定された JSON だけを出力してください。")


def session_rubric_prompt(text: str) -> str:
    """The dialogue-level rubric: the client review's overall score (0..100) and its 20 criteria
    (0..5, in the review's own words), answered from the client's point of view."""
    lines = ["以下はカウンセラーと相談者の相談セッション全体の記録です。",
             "あなたがこの相談者だったとして、相談後のアンケートに答えてください。",
             "", "## 採点基準",
             "- score: この相談全体の満足度を 0〜100 の整数で（0 = まったく満足しない、100 = この上なく満足）。",
             "- 以下の各項目は 0〜5 の整数で（0 = まったく当てはまらない、5 = 非常によく当てはまる）:"]
    lines += [f"  - {key}: {jp}" for key, jp in CRITERIA.items()]
    lines += ["", "## 相談セッション", text, "", "## 出力",
              "次の形の JSON だけを出力してください（<...> は置き換える）: "
              + '{"scores": {"score": <0〜100の整数>, '
              + ", ".join(f'"{k}": <0〜5の整数>' for k in CRITERIA) + '}, "reason": "<短い理由>"}']
    return "\n".join(lines)


def parse_session_rating(text: str) -> tuple[dict[str, float | None], str | None]:
    """({target: value or None}, error) from a judge's answer; values outside a target's range are None."""
    from kokoro_helpers.evaluation.judge import extract_json
    obj = extract_json(text)
    if obj is None:
        return {t: None for t in TARGETS}, "no JSON object in the answer"
    scores = obj.get("scores") if isinstance(obj.get("scores"), dict) else obj
    out: dict[str, float | None] = {}
    for t in TARGETS:
        v = scores.get(t)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= SCORE_MAX[t]
        out[t] = float(v) if ok else None
    bad = [t for t, v in out.items() if v is None]
    return out, (f"missing or out-of-range ratings for {len(bad)} target(s): {bad[:5]}" if bad else None)


@dataclass
class ValidityResult:
    table: Any                               # DataFrame with COLUMNS
    ratings: Any                             # DataFrame: session id, target, judge, client, error
    judge: str
    judge_is_fake: bool
    n_sessions: int
    n_failed: int
    sentence: str
    notes: list[str] = field(default_factory=list)


def draw_sessions(sessions: Sequence[Session], split: str = "test", max_sessions: int | None = None,
                  seed: int = 42) -> list[Session]:
    """The sessions of `split`, at most `max_sessions` of them drawn by `seed` (in id order)."""
    pool = [s for s in sessions if s.split == split]
    if max_sessions is not None and len(pool) > int(max_sessions):
        pool = random.Random(seed).sample(pool, int(max_sessions))
    return sorted(pool, key=lambda s: str(s.id))


def correlate(judge: Sequence[float], client: Sequence[float], *, n_resamples: int = 2000,
              seed: int = 42) -> dict[str, float]:
    """Spearman, Kendall, and a percentile bootstrap 95% interval of Spearman (pairs resampled).
    NaN when n < MIN_SESSIONS or either side is constant."""
    import numpy as np
    from scipy import stats
    x, y = np.asarray(judge, float), np.asarray(client, float)
    out = {"n": int(len(x)), "spearman": float("nan"), "kendall": float("nan"),
           "ci_low": float("nan"), "ci_high": float("nan")}
    if len(x) < MIN_SESSIONS or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    out["spearman"] = float(stats.spearmanr(x, y).statistic)
    out["kendall"] = float(stats.kendalltau(x, y).statistic)

    lo, hi = bootstrap_spearman_ci(x, y, n_resamples=n_resamples, seed=seed)
    out["ci_low"], out["ci_high"] = float(lo), float(hi)
    return out


def bootstrap_spearman_ci(x: Any, y: Any, *, n_resamples: int = 2000, seed: int = 42,
                          level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of Spearman's rho, sessions resampled in pairs (vectorised:
    ranks per resample, then Pearson of the ranks). Resamples in which one side is constant (rho
    undefined) are left out; NaN when more than half of them are."""
    import numpy as np
    from scipy.stats import rankdata
    rng = np.random.default_rng(seed)
    n = len(x)
    idx = rng.integers(0, n, size=(n_resamples, n))
    rx, ry = rankdata(np.asarray(x)[idx], axis=1), rankdata(np.asarray(y)[idx], axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    den = np.sqrt((rx ** 2).sum(axis=1) * (ry ** 2).sum(axis=1))
    ok = den > 0
    if ok.sum() < n_resamples / 2:
        return float("nan"), float("nan")
    rho = (rx * ry).sum(axis=1)[ok] / den[ok]
    a = (1 - level) / 2
    return float(np.quantile(rho, a)), float(np.quantile(rho, 1 - a))


def tracks_sentence(table: Any, judge_label: str, is_fake: bool) -> str:
    """One sentence: does the judge track the clients' own ratings?"""
    rows = table.dropna(subset=["spearman"])
    if not len(rows):
        return (f"No correlation could be computed for {judge_label} (too few sessions, or ratings that do "
                f"not vary): nothing can be said yet about whether it tracks the clients.")
    tracked = int((rows["ci_low"] > 0).sum())
    overall = rows[rows["criterion"] == "score"]
    head = ""
    if len(overall):
        r = overall.iloc[0]
        verdict = "tracks" if r["ci_low"] > 0 else ("runs against" if r["ci_high"] < 0 else "is not shown to track")
        head = (f"On the overall score the judge {verdict} the clients (Spearman {r['spearman']:+.2f}, "
                f"95% CI {r['ci_low']:+.2f} to {r['ci_high']:+.2f}, n = {int(r['n'])}); ")
    text = (head + f"on {tracked} of {len(rows)} targets the interval lies above zero"
            f" (median Spearman {rows['spearman'].median():+.2f}).")
    if is_fake:
        text += " This is the FAKE offline judge: the numbers show the machinery only."
    return text


def judge_validity(sessions: Sequence[Session], spec: Any, *, run_dir: str | Path | None = None,
                   split: str = "test", max_sessions: int | None = None, seed: int = 42,
                   concurrency: int = 4, max_tokens: int = 1200, retries: int | None = 2,
                   progress: bool = True, log=print, batch: Any = None) -> ValidityResult:
    """Have the judge (`judge_endpoint.JudgeSpec`) rate the `split` sessions and correlate its ratings
    with the clients'. Answers are cached like every judge answer (run_dir/eval/judge/cache.jsonl);
    a failed request or an unreadable answer is counted and that session left out of the
    correlations of the targets it lacks. Fewer than MIN_SESSIONS usable sessions: the table's
    correlations are NaN and the sentence says so."""
    import pandas as pd
    from kokoro_helpers.evaluation.judge import Judge

    chosen = draw_sessions(sessions, split, max_sessions, seed)
    notes = []
    if len(chosen) < MIN_SESSIONS:
        notes.append(f"only {len(chosen)} {split} session(s) (need {MIN_SESSIONS} for a correlation): use a "
                     f"larger dataset_source / max_samples, or a larger split")
    judge = Judge(spec.client, spec.model, run_dir, concurrency, max_tokens, 0.0, True, retries,
                  progress, log, system=SESSION_SYSTEM, batch=batch)
    answers = judge.ask([session_rubric_prompt(s.text) for s in chosen], "sessions") if chosen else []
    rows = []
    for k, (s, answer) in enumerate(zip(chosen, answers)):
        values, error = parse_session_rating(answer)
        if k in judge.errors:
            error = f"request failed: {judge.errors[k]}"
        for t in TARGETS:
            rows.append({"session": s.id, "target": t, "judge": values[t], "client": s.ratings.get(t), "error": error})
    ratings = pd.DataFrame(rows, columns=["session", "target", "judge", "client", "error"])
    failed = int(ratings.groupby("session")["error"].first().fillna("").str.startswith("request failed").sum()) if rows else 0
    unreadable = int(ratings.groupby("session")["error"].first().notna().sum()) - failed if rows else 0
    if failed:
        notes.append(f"{failed} session(s) not rated: the judge request failed (see ratings.error); re-run to retry")
    if unreadable:
        notes.append(f"{unreadable} session(s) with an unreadable or incomplete answer (see ratings.error)")
    table_rows = []
    for t in TARGETS:
        g = ratings[(ratings["target"] == t)].dropna(subset=["judge", "client"])
        c = correlate(g["judge"].tolist(), g["client"].tolist(), seed=seed)
        table_rows.append({"criterion": t, **c, "judge": spec.label if not spec.is_fake else spec.name,
                           "judge_is_fake": bool(spec.is_fake)})
    table = pd.DataFrame(table_rows, columns=COLUMNS)
    sentence = tracks_sentence(table, spec.name, spec.is_fake)
    if notes:
        sentence += " Note: " + "; ".join(notes) + "."
    return ValidityResult(table, ratings, spec.name, bool(spec.is_fake), len(chosen), failed, sentence, notes)


def write_validity(result: ValidityResult, run_dir: str | Path) -> Path:
    """run_dir/eval/judge_validity.csv (the table) and judge_validity.json (sentence, counts)."""
    folder = resolve(run_dir) / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "judge_validity.csv"
    tmp = path.with_name(path.name + ".tmp")
    result.table.to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(path)
    write_json_atomic(folder / "judge_validity.json", {
        "judge": result.judge, "judge_is_fake": result.judge_is_fake, "n_sessions": result.n_sessions,
        "n_failed": result.n_failed, "sentence": result.sentence, "notes": result.notes,
        "method": "Spearman / Kendall (scipy.stats); 95% CI: percentile bootstrap of Spearman, sessions resampled in pairs, 2000 resamples"})
    return path


def plot_validity(table: Any):
    """Spearman per target with its 95% interval (judge vs clients)."""
    import matplotlib.pyplot as plt
    t = table.dropna(subset=["spearman"])
    fig, ax = plt.subplots(figsize=(7, 0.28 * max(len(t), 3) + 1.2))
    if len(t):
        y = range(len(t))[::-1]
        ax.errorbar(t["spearman"], list(y), xerr=[t["spearman"] - t["ci_low"], t["ci_high"] - t["spearman"]],
                    fmt="o", color="#4c72b0", ecolor="#999", capsize=2)
        ax.set_yticks(list(y), t["criterion"], fontsize=7)
    ax.axvline(0, color="#cf222e", lw=1)
    ax.set_xlim(-1, 1)
    label = table["judge"].iloc[0] if len(table) else ""
    ax.set_title(f"judge vs clients: Spearman with 95% CI ({label})", fontsize=9)
    fig.tight_layout()
    return fig
