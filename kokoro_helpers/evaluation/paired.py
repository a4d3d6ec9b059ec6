"""Paired comparisons: is model A's gain over model B on the same items beyond noise?

For each pair (every fine-tuned model against its base, and any pair the user names) and each
per-item metric — sentence chrF, sentence BLEU over characters, ROUGE-L over characters, the
reference NLL of local models, and each LLM-judge criterion — the per-item differences A − B on
the items both answered give a mean difference with a bootstrap 95% interval
(scipy.stats.bootstrap over items, percentile method) and a verdict:

    better              the interval lies entirely on A's good side (above 0, or below 0 for NLL)
    worse               it lies entirely on the other side
    not distinguishable it contains 0
    too few items       fewer than MIN_ITEMS shared items

    per_item = per_item_metrics(generations, items, perplexity=perplexity, judge_scores=judged)
    table = paired_comparisons(per_item, default_pairs(responders) + user_pairs)
    write_paired(table, run_dir)             # run_dir/eval/paired.csv
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from kokoro_helpers.paths import resolve

MIN_ITEMS = 3
COLUMNS = ["model_a", "model_b", "metric", "n", "mean_diff", "ci_low", "ci_high", "verdict"]
LOWER_IS_BETTER = {"ref_nll"}
METRIC_NOTES = {
    "chrF": "sentence chrF vs the real reply (sacrebleu), 0-100",
    "BLEU_char": "sentence BLEU over characters (sacrebleu, tokenize='char', exp smoothing), 0-100",
    "ROUGE_L_char": "ROUGE-L F1 over characters, 0-1",
    "ref_nll": "local models: mean token NLL of the real reply (lower is better)",
}


def per_item_metrics(generations: Any, items: Sequence[Mapping[str, Any]], *,
                     perplexity: Mapping[str, Mapping[str, Any]] | None = None, judge_scores: Any = None):
    """A long DataFrame (model, item_id, metric, value): the per-item figures paired comparisons use."""
    import pandas as pd
    from sacrebleu.metrics import BLEU, CHRF

    from kokoro_helpers.evaluation.evaluate import generation_rows
    from kokoro_helpers.evaluation.metrics import rouge_l

    chrf, bleu = CHRF(), BLEU(tokenize="char", effective_order=True)
    by_id = {it["item_id"]: it for it in items}
    rows = []
    for g in generation_rows(generations):
        it = by_id.get(g.get("item_id"))
        if it is None:
            continue
        hyp = g.get("response") if isinstance(g.get("response"), str) else ""
        ref = it["reference"]
        model = g["model"]
        rows += [{"model": model, "item_id": it["item_id"], "metric": "chrF",
                  "value": float(chrf.sentence_score(hyp, [ref]).score)},
                 {"model": model, "item_id": it["item_id"], "metric": "BLEU_char",
                  "value": float(bleu.sentence_score(hyp, [ref]).score)},
                 {"model": model, "item_id": it["item_id"], "metric": "ROUGE_L_char", "value": rouge_l(hyp, ref)["f"]}]
    for model, result in (perplexity or {}).items():
        for item_id, v in (result.get("per_item") or {}).items():
            if item_id in by_id:
                rows.append({"model": model, "item_id": item_id, "metric": "ref_nll", "value": float(v["nll"])})
    if judge_scores is not None and len(judge_scores):
        js = judge_scores.dropna(subset=["score"])
        for r in js.itertuples(index=False):
            if r.item_id in by_id:
                rows.append({"model": r.model, "item_id": r.item_id, "metric": f"judge_{r.criterion}",
                             "value": float(r.score)})
    return pd.DataFrame(rows, columns=["model", "item_id", "metric", "value"])


def default_pairs(responders: Iterable[Any], run_dir: str | Path | None = None) -> list[tuple[str, str]]:
    """(fine-tuned, its base) for every adapter or fine-tuned model whose base is also evaluated
    (named "<base_model> (base)", as models_from_run names base models): from the responders'
    cards, and with `run_dir` from every card in run_dir/models (OpenAI ones too)."""
    responders = list(responders)
    names = {r.name for r in responders}
    cards = [(r.name, getattr(r, "card", None)) for r in responders if not getattr(r, "base_only", False)]
    if run_dir is not None:
        from kokoro_helpers.cards import list_cards
        cards += [(str(c.get("model_id")), c) for _, c in list_cards(run_dir)]
    pairs: list[tuple[str, str]] = []
    for name, card in cards:
        if not card or not card.get("base_model") or name not in names:
            continue
        base = f"{card['base_model']} (base)"
        if base in names and base != name and (name, base) not in pairs:
            pairs.append((name, base))
    return pairs


def named_pairs(pairs: Any, known: Iterable[str]) -> list[tuple[str, str]]:
    """The user's `compare_pairs` ([[a, b], ...]) checked against the evaluated model names."""
    known = set(known)
    out = []
    for p in pairs or []:
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise ValueError(f"compare_pairs takes [model_a, model_b] pairs, got {p!r}")
        missing = [m for m in p if m not in known]
        if missing:
            raise ValueError(f"compare_pairs names {missing}, which were not evaluated; evaluated: {sorted(known)}")
        out.append((str(p[0]), str(p[1])))
    return out


def paired_difference(diffs: Sequence[float], *, lower_is_better: bool = False, n_resamples: int = 2000,
                      seed: int = 42, level: float = 0.95) -> dict[str, Any]:
    """n, mean_diff, ci_low, ci_high (bootstrap of the mean of the paired differences) and the verdict."""
    import numpy as np
    from scipy import stats
    d = np.asarray([x for x in diffs if x == x], float)
    n = int(len(d))
    out: dict[str, Any] = {"n": n, "mean_diff": float(d.mean()) if n else float("nan"),
                           "ci_low": float("nan"), "ci_high": float("nan"), "verdict": "too few items"}
    if n < MIN_ITEMS:
        return out
    if np.ptp(d) == 0:                      # every difference the same: the interval is that point
        lo = hi = float(d[0])
    else:
        res = stats.bootstrap((d,), np.mean, n_resamples=n_resamples, confidence_level=level,
                              method="percentile", random_state=np.random.default_rng(seed))
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    out["ci_low"], out["ci_high"] = lo, hi
    good_side = (hi < 0) if lower_is_better else (lo > 0)
    bad_side = (lo > 0) if lower_is_better else (hi < 0)
    out["verdict"] = "better" if good_side else "worse" if bad_side else "not distinguishable"
    return out


def paired_comparisons(per_item: Any, pairs: Iterable[tuple[str, str]], *, n_resamples: int = 2000,
                       seed: int = 42):
    """One row per (pair, metric) with COLUMNS; the verdict is model_a's against model_b."""
    import pandas as pd
    rows = []
    seen = set()
    for a, b in pairs:
        if (a, b) in seen or a == b:
            continue
        seen.add((a, b))
        for metric in sorted(per_item["metric"].unique()) if len(per_item) else []:
            m = per_item[per_item["metric"] == metric]
            va = m[m["model"] == a].set_index("item_id")["value"]
            vb = m[m["model"] == b].set_index("item_id")["value"]
            shared = va.index.intersection(vb.index)
            if not len(va) or not len(vb):
                continue
            diffs = (va.loc[shared] - vb.loc[shared]).tolist()
            rows.append({"model_a": a, "model_b": b, "metric": metric,
                         **paired_difference(diffs, lower_is_better=metric in LOWER_IS_BETTER,
                                             n_resamples=n_resamples, seed=seed)})
    return pd.DataFrame(rows, columns=COLUMNS)


def write_paired(table: Any, run_dir: str | Path) -> Path:
    """run_dir/eval/paired.csv (atomically)."""
    path = resolve(run_dir) / "eval" / "paired.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    table.to_csv(tmp, index=False, float_format="%.6g")
    tmp.replace(path)
    return path


def verdict_summary(table: Any) -> str:
    """One sentence per pair: how many metrics are better / not distinguishable / worse."""
    if not len(table):
        return "No pair to compare: paired comparisons need a fine-tuned model and its base, or compare_pairs."
    parts = []
    for (a, b), g in table.groupby(["model_a", "model_b"], sort=False):
        c = g["verdict"].value_counts()
        parts.append(f"{a} vs {b} on {int(g['n'].max())} items: better on {int(c.get('better', 0))}, "
                     f"not distinguishable on {int(c.get('not distinguishable', 0))}, worse on "
                     f"{int(c.get('worse', 0))} of {len(g)} metrics (paired bootstrap 95% CI of the mean difference).")
    return " ".join(parts)
