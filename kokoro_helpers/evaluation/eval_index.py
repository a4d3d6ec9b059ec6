"""The report index's view of 03's reviewer-facing results: the judge-validity table, the
score-prediction figures and the paired verdicts, read from run_dir/eval/ (never failing: a
missing or unreadable file gives no part)."""
from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from kokoro_helpers.jsonio import read_json


def fmt_num(v: Any, spec: str = ".3f") -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if math.isnan(f) else format(f, spec)


def frame_html(frame) -> str:
    return frame.to_html(index=False, classes="metrics", na_rep="n/a", float_format=lambda x: f"{x:.3f}")


def index_parts(eval_dir: Path) -> list[str]:
    """HTML fragments, in order: judge validity, score prediction (test split), paired comparisons."""
    import pandas as pd
    parts: list[str] = []
    try:
        csv = eval_dir / "judge_validity.csv"
        if csv.is_file():
            table = pd.read_csv(csv)
            meta = read_json(eval_dir / "judge_validity.json", {}) or {}
            fake = bool(table["judge_is_fake"].any()) if "judge_is_fake" in table else False
            head = ("<p><b>FAKE judge</b> (deterministic offline stand-in, not an LLM): these correlations only "
                    "show the machinery.</p>" if fake else "")
            parts.append("<h3>Judge validity: judge vs the clients' own ratings (test sessions)</h3>" + head
                         + f"<p>{html.escape(str(meta.get('sentence', '')))}</p>"
                         + frame_html(table[[c for c in ("criterion", "n", "spearman", "kendall", "ci_low", "ci_high")
                                              if c in table]].round(3)))
    except Exception:  # noqa: BLE001 - the index renders whatever the files hold
        pass
    for name in ("score_prediction.json", "score_prediction_llm.json"):
        parts += _prediction_part(eval_dir / name)
    try:
        csv = eval_dir / "paired.csv"
        if csv.is_file():
            table = pd.read_csv(csv)
            parts.append("<h3>Paired comparisons (mean difference A − B, paired bootstrap 95% CI)</h3>"
                         + (frame_html(table.round(3)) if len(table) else "<p>No pair to compare.</p>"))
    except Exception:  # noqa: BLE001
        pass
    return parts


def _prediction_part(path: Path) -> list[str]:
    import pandas as pd
    parts: list[str] = []
    try:
        rep = read_json(path)
        if rep and rep.get("targets"):
            rows = []
            for target, by_split in rep["targets"].items():
                r = by_split.get("test")
                if r:
                    rows.append({"target": target, "n": r.get("n"), "pearson": r.get("pearson"),
                                 "spearman": r.get("spearman"), "mae": r.get("mae"), "mae_of_mean": r.get("mae_of_mean")})
            if rows:
                s = rep["targets"].get("score", {}).get("test") or {}
                line = (f"Overall score on {s.get('n')} test sessions: MAE {fmt_num(s.get('mae'), '.2f')} vs "
                        f"{fmt_num(s.get('mae_of_mean'), '.2f')} for the train mean, Spearman {fmt_num(s.get('spearman'), '+.2f')}."
                        if s else "")
                parts.append(f"<h3>Score prediction ({html.escape(str(rep.get('predictor')))}, test split)</h3>"
                             f"<p>{html.escape(line)}</p>" + frame_html(pd.DataFrame(rows)))
    except Exception:  # noqa: BLE001
        pass
    return parts
