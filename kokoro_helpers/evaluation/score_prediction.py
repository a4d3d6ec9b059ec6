"""Score prediction (KokoroChat paper, second experiment): the client's own rating of a session —
the overall `score` (0..100) and each of the 20 criteria (0..5) — predicted from the dialogue text.

The CPU baseline is scikit-learn's character n-gram TF-IDF + ridge regression (one ridge per
target, its alpha chosen by leave-one-out on the train split, RidgeCV). It is trained on the train
split and reported on every split next to the mean predictor (the train mean for every session):

    pred = fit_baseline([s for s in sessions if s.split == "train"])
    report = evaluate_predictor(pred, sessions)            # {target: {split: {n, pearson, ...}}}
    write_report(report, pred, run_dir)                    # run_dir/eval/score_prediction.json
    save_predictor(pred, run_dir)                          # run_dir/eval/score_predictor/{model.joblib,card.json}
    pred.predict(["相談者: ...\\nカウンセラー: ..."])      # rates any session text, generated ones too
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from kokoro_helpers.cards import now_iso
from kokoro_helpers.jsonio import read_json, write_json_atomic
from kokoro_helpers.paths import resolve
from kokoro_helpers.evaluation.sessions import SCORE_MAX, TARGETS, Session

BASELINE_NAME = "tfidf-char-1to3+ridge"
MIN_TRAIN = 5              # sessions with a rating, per target, to fit anything


class PredictionError(RuntimeError):
    """Score prediction cannot run on these sessions; the message says why and what to do."""


class RatesTexts:
    """`rate(texts)` for any predictor with `predict(texts) -> {target: [values]}`."""

    def rate(self, texts: Sequence[str], names: Sequence[str] | None = None):
        """A DataFrame: one row per text, one column per target (predicted client rating)."""
        import pandas as pd
        frame = pd.DataFrame(self.predict(texts))
        if names is not None:
            frame.index = list(names)
        return frame


@dataclass
class ScorePredictor(RatesTexts):
    """A fitted vectorizer and one ridge per target; `predict(texts)` -> {target: [values]}."""

    vectorizer: Any
    models: dict[str, Any]
    train_means: dict[str, float]
    name: str = BASELINE_NAME
    info: dict[str, Any] = field(default_factory=dict)

    def predict(self, texts: Sequence[str]) -> dict[str, list[float]]:
        import numpy as np
        X = self.vectorizer.transform(list(texts))
        out = {}
        shared: dict[int, Any] = {}              # one predict per fitted ridge, shared by its targets
        for target, model in self.models.items():
            hi = SCORE_MAX.get(target, None)
            if isinstance(model, _Column):
                if id(model.ridge) not in shared:
                    shared[id(model.ridge)] = np.asarray(model.ridge.predict(X), dtype=float).reshape(X.shape[0], -1)
                values = shared[id(model.ridge)][:, model.col]
            else:
                values = np.asarray(model.predict(X), dtype=float)
            out[target] = list(np.clip(values, 0, hi) if hi is not None else values)
        return out



@dataclass
class _Column:
    """One target of a multi-output ridge."""
    ridge: Any
    col: int

    @property
    def alpha_(self) -> float:
        alpha = self.ridge.alpha_
        return float(alpha[self.col]) if getattr(alpha, "ndim", 0) else float(alpha)


def fit_baseline(train: Sequence[Session], targets: Sequence[str] = TARGETS, *, ngram_range=(1, 3),
                 max_features: int = 200_000, alphas: Sequence[float] = (0.1, 1.0, 10.0, 100.0),
                 log=print) -> ScorePredictor:
    """Char n-gram TF-IDF (sublinear tf) + RidgeCV per target, fitted on `train` sessions (about two
    minutes for KokoroChat's 5,271 train sessions on two CPU cores)."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import RidgeCV

    train = list(train)
    if len(train) < MIN_TRAIN:
        raise PredictionError(f"score prediction needs at least {MIN_TRAIN} train sessions with ratings, "
                              f"got {len(train)}: use a larger dataset_source / max_samples")
    if log is not None:
        log(f"score prediction: fitting {BASELINE_NAME} on {len(train)} train sessions "
            f"({sum(len(s.text) for s in train):,} characters)")
    vec = TfidfVectorizer(analyzer="char", ngram_range=tuple(ngram_range), sublinear_tf=True,
                          max_features=max_features, min_df=1)
    X = vec.fit_transform([s.text for s in train])
    models, means, skipped = {}, {}, {}
    # the sessions rated on every target (all of KokoroChat's): one multi-output RidgeCV, an alpha per
    # target — a single decomposition however many targets; the rest one ridge per target
    complete = [k for k, s in enumerate(train) if all(s.ratings.get(t) is not None for t in targets)]
    if len(complete) == len(train):
        Y = np.array([[train[k].ratings[t] for t in targets] for k in complete], dtype=float)
        ridge = RidgeCV(alphas=list(alphas), alpha_per_target=True).fit(X, Y)
        for j, target in enumerate(targets):
            models[target] = _Column(ridge, j)
            means[target] = float(Y[:, j].mean())
    for target in targets if not models else ():
        rows = [k for k, s in enumerate(train) if s.ratings.get(target) is not None]
        if len(rows) < MIN_TRAIN:
            skipped[target] = f"{len(rows)} rated train sessions (< {MIN_TRAIN})"
            continue
        y = np.array([train[k].ratings[target] for k in rows], dtype=float)
        models[target] = RidgeCV(alphas=list(alphas)).fit(X[rows], y)
        means[target] = float(y.mean())
    if not models:
        raise PredictionError(f"no target has {MIN_TRAIN} rated train sessions ({skipped})")
    return ScorePredictor(vec, models, means, info={"train_sessions": len(train), "skipped_targets": skipped,
                                                    "ngram_range": list(ngram_range), "features": len(vec.vocabulary_),
                                                    "alphas": {t: float(m.alpha_) for t, m in models.items()}})


def regression_figures(y_true: Sequence[float], y_pred: Sequence[float], mean: float) -> dict[str, Any]:
    """n, pearson, spearman, mae, and mae_of_mean (predicting `mean` for every session). A
    correlation is NaN when either side is constant or n < 3."""
    import numpy as np
    from scipy import stats
    y, p = np.asarray(y_true, float), np.asarray(y_pred, float)
    n = int(len(y))
    out: dict[str, Any] = {"n": n, "pearson": float("nan"), "spearman": float("nan"),
                           "mae": float(np.mean(np.abs(y - p))) if n else float("nan"),
                           "mae_of_mean": float(np.mean(np.abs(y - mean))) if n else float("nan")}
    if n >= 3 and np.ptp(y) > 0 and np.ptp(p) > 0:
        out["pearson"] = float(stats.pearsonr(y, p).statistic)
        out["spearman"] = float(stats.spearmanr(y, p).statistic)
    return out


def evaluate_predictor(predictor: ScorePredictor, sessions: Sequence[Session],
                       splits: Sequence[str] = ("train", "valid", "test")) -> dict[str, dict[str, dict[str, Any]]]:
    """{target: {split: regression_figures}} over the sessions of each split that the client rated."""
    out: dict[str, dict[str, dict[str, Any]]] = {t: {} for t in predictor.models}
    for split in splits:
        group = [s for s in sessions if s.split == split]
        if not group:
            continue
        preds = predictor.predict([s.text for s in group])
        for target in predictor.models:
            keep = [k for k, s in enumerate(group) if s.ratings.get(target) is not None]
            out[target][split] = regression_figures([group[k].ratings[target] for k in keep],
                                                    [preds[target][k] for k in keep], predictor.train_means[target])
    return out


def report_frame(report: Mapping[str, Mapping[str, Mapping[str, Any]]], split: str = "test"):
    """One row per target for one split: n, pearson, spearman, mae, mae_of_mean, beats_mean."""
    import pandas as pd
    rows = []
    for target, by_split in report.items():
        if split in by_split:
            r = dict(by_split[split])
            r["beats_mean"] = bool(r["mae"] < r["mae_of_mean"]) if not math.isnan(r["mae"]) else None
            rows.append({"target": target, **r})
    return pd.DataFrame(rows).set_index("target") if rows else pd.DataFrame()


def compare_frame(reports: Mapping[str, Mapping[str, Any]], split: str = "test"):
    """Predictors side by side on `split`: one row per (target, predictor) with mae, mae_of_mean, spearman."""
    import pandas as pd
    rows = []
    for name, report in reports.items():
        for target, by_split in report.items():
            r = by_split.get(split)
            if r:
                rows.append({"target": target, "predictor": name, "n": r["n"], "mae": r["mae"],
                             "mae_of_mean": r["mae_of_mean"], "spearman": r["spearman"]})
    return pd.DataFrame(rows).pivot_table(index="target", columns="predictor", values=["mae", "spearman"],
                                          sort=False) if rows else pd.DataFrame()


def verdict_sentence(report: Mapping[str, Mapping[str, Mapping[str, Any]]], split: str = "test") -> str:
    """One sentence on the overall score: does the predictor beat the mean predictor on `split`?"""
    r = report.get("score", {}).get(split)
    if not r:
        return f"No {split} sessions with an overall score: nothing to report."
    beats = r["mae"] < r["mae_of_mean"]
    sp = r["spearman"]
    sp_txt = "undefined" if math.isnan(sp) else f"{sp:+.2f}"
    return (f"On the {r['n']} {split} sessions the predictor's MAE for the overall score is {r['mae']:.2f} vs "
            f"{r['mae_of_mean']:.2f} for the train mean ({'better' if beats else 'not better'}), Spearman {sp_txt}"
            + (" — too few sessions to read much into it." if r["n"] < 30 else "."))


def rate_generations(predictor: ScorePredictor, generations: Any, items: Sequence[Mapping[str, Any]],
                     target: str = "score"):
    """The predicted client rating (`target`) of each model's sessions-so-far: the item's dialogue
    with the model's reply as the next counselor line. Mean, sd and n per model — an indicator
    from a text regressor, not a client's rating."""
    import pandas as pd
    from kokoro_helpers.evaluation.evaluate import generation_rows
    from kokoro_helpers.evaluation.sessions import messages_to_lines, session_text
    by_id = {it["item_id"]: it for it in items}
    rows, texts = [], []
    for g in generation_rows(generations):
        it = by_id.get(g.get("item_id"))
        if it is None:
            continue
        reply = g.get("response") if isinstance(g.get("response"), str) else ""
        texts.append(session_text(messages_to_lines(it["context"]) + [("assistant", reply)]))
        rows.append({"model": g["model"], "item_id": it["item_id"]})
    if not rows:
        return pd.DataFrame(columns=["mean", "sd", "n"])
    frame = pd.DataFrame(rows)
    frame[f"predicted_{target}"] = predictor.predict(texts)[target]
    return frame.groupby("model", sort=False)[f"predicted_{target}"].agg(["mean", "std", "count"]).rename(
        columns={"std": "sd", "count": "n"})


def prediction_path(run_dir: str | Path, name: str = "score_prediction.json") -> Path:
    return resolve(run_dir) / "eval" / name


def write_report(report: Mapping[str, Any], predictor: Any, run_dir: str | Path,
                 name: str = "score_prediction.json") -> Path:
    """run_dir/eval/<name> (default score_prediction.json; the LLM regressor's: score_prediction_llm.json):
    {predictor, info, created, targets: {target: {split: {...}}}}."""
    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and math.isnan(v) else v
    targets = {t: {s: {k: clean(v) for k, v in r.items()} for s, r in by.items()} for t, by in report.items()}
    path = prediction_path(run_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"predictor": predictor.name, "info": predictor.info, "created": now_iso(),
                             "targets": targets})
    return path


def save_predictor(predictor: ScorePredictor, run_dir: str | Path, report: Mapping[str, Any] | None = None) -> Path:
    """run_dir/eval/score_predictor/model.joblib and card.json (what it is, what it was trained on, its
    test figures). Returns the folder."""
    import joblib
    folder = resolve(run_dir) / "eval" / "score_predictor"
    folder.mkdir(parents=True, exist_ok=True)
    joblib.dump({"vectorizer": predictor.vectorizer, "models": predictor.models,
                 "train_means": predictor.train_means, "name": predictor.name, "info": predictor.info},
                folder / "model.joblib")
    test = {t: by.get("test") for t, by in (report or {}).items() if by.get("test")}
    write_json_atomic(folder / "card.json", {
        "model_id": predictor.name, "kind": "score_predictor", "timestamp": now_iso(),
        "targets": list(predictor.models), "train_means": predictor.train_means,
        "training_params": predictor.info, "evaluation_results": {"test": test},
        "usage_instructions": "kokoro_helpers.evaluation.score_prediction.load_predictor(run_dir).rate([session text]) "
                              "-> predicted client ratings (score 0-100, criteria 0-5)"})
    return folder


def load_predictor(run_dir: str | Path) -> ScorePredictor:
    import joblib
    folder = resolve(run_dir) / "eval" / "score_predictor"
    if not (folder / "model.joblib").is_file():
        raise PredictionError(f"{folder}/model.joblib not found: train it in 03 (fit_baseline + save_predictor)")
    blob = joblib.load(folder / "model.joblib")
    return ScorePredictor(blob["vectorizer"], blob["models"], blob["train_means"], blob["name"], blob["info"])


def read_report(run_dir: str | Path) -> dict[str, Any] | None:
    path = prediction_path(run_dir)
    return read_json(path) if path.is_file() else None


def plot_test(predictor: ScorePredictor, sessions: Sequence[Session], report: Mapping[str, Any]):
    """Left: predicted vs client's overall score on the test split; right: test MAE per target,
    predictor vs train mean (as a share of the target's range)."""
    import matplotlib.pyplot as plt
    test = [s for s in sessions if s.split == "test" and s.ratings.get("score") is not None]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    if test and "score" in predictor.models:
        pred = predictor.predict([s.text for s in test])["score"]
        a.scatter([s.ratings["score"] for s in test], pred, s=14, color="#4c72b0")
        a.plot([0, 100], [0, 100], color="#999", lw=1, ls="--")
        a.axhline(predictor.train_means["score"], color="#dd8452", lw=1, label="train mean")
        a.set_xlabel("client's score (test)")
        a.set_ylabel("predicted score")
        a.legend(fontsize=8)
    a.set_title("overall score, test split")
    names = [t for t in report if "test" in report[t]]
    x = range(len(names))
    b.bar([i - 0.2 for i in x], [report[t]["test"]["mae"] / SCORE_MAX[t] for t in names], 0.4, label=predictor.name)
    b.bar([i + 0.2 for i in x], [report[t]["test"]["mae_of_mean"] / SCORE_MAX[t] for t in names], 0.4,
          label="train mean")
    b.set_xticks(list(x), names, rotation=75, fontsize=7)
    b.set_ylabel("test MAE / range")
    b.set_title("test MAE per target (lower is better)")
    b.legend(fontsize=8)
    fig.tight_layout()
    return fig
