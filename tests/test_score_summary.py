"""Reading the human scores back (kokoro_helpers.evaluation: score_summary, score_cards): means and
t-intervals, plots, CSV, Krippendorff's alpha on a published table, seeded demo scores, and
evaluation_results written into model cards. All texts are invented (see test_scoring's items)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kokoro_helpers import cards
from kokoro_helpers.evaluation.score_cards import write_evaluation_results
from kokoro_helpers.evaluation.score_store import CRITERIA_PRESETS, append_record
from kokoro_helpers.evaluation.score_summary import (MIN_SCORES_FOR_INTERVAL, agreement, agreement_table, export_csv,
                                                     load_scores, mean_ci, plot_distributions, plot_means, summarize,
                                                     summary_table, t_critical)
from kokoro_helpers.evaluation.scoring_widget import ScoringWidget, demo_scores
from test_scoring import GOOD, MODELS, make_items


# --------------------------------------------------------------------------- summary

def _write(store: Path, rater: str, item_id: str, model: str, **scores) -> None:
    append_record(store / f"{rater}.jsonl", {"item_id": item_id, "model": model, "rater": rater,
                                              "scores": scores, "comment": "", "time": "2025-01-01T00:00:00+00:00"})


@pytest.mark.parametrize("confidence, df, expected", [
    (0.95, 1, 12.7062), (0.95, 2, 4.3027), (0.95, 4, 2.7764), (0.95, 5, 2.5706), (0.95, 10, 2.2281),
    (0.95, 30, 2.0423), (0.95, 200, 1.9719), (0.99, 5, 4.0321), (0.90, 3, 2.3534)])
def test_t_critical_matches_tables(confidence, df, expected):
    assert t_critical(confidence, df) == pytest.approx(expected, abs=2e-4)
    with pytest.raises(ValueError):
        t_critical(confidence, 0)


def test_summarize_means_and_t_interval(tmp_path):
    for i, s in enumerate([1, 2, 3, 4, 5]):
        _write(tmp_path, f"r{i}", "item-000", "A", accuracy=s, relevance=3)
    _write(tmp_path, "r0", "item-001", "B", accuracy=4, relevance=2)
    summary = summarize(load_scores(tmp_path))
    assert list(summary.columns[:4]) == ["model", "criterion", "n", "mean"]
    a = summary[(summary.model == "A") & (summary.criterion == "accuracy")].iloc[0]
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)
    assert (a.n, a["mean"], a.n_raters, a.n_items) == (5, 3.0, 5, 1)
    assert a.sd == pytest.approx(math.sqrt(2.5))
    assert (a.ci_low, a.ci_high) == (pytest.approx(3 - half, abs=1e-5), pytest.approx(3 + half, abs=1e-5))
    r = summary[(summary.model == "A") & (summary.criterion == "relevance")].iloc[0]
    assert r.sd == 0 and r.ci_low == r.ci_high == 3
    b = summary[(summary.model == "B") & (summary.criterion == "accuracy")].iloc[0]
    assert b.n == 1 and math.isnan(b.ci_low) and math.isnan(b.sd)     # one score: no interval


def test_empty_store_gives_empty_tables(tmp_path):
    df = load_scores(tmp_path / "none")
    assert len(df) == 0 and "item_id" in df.columns
    assert len(summarize(df)) == 0
    assert len(agreement_table(df)) == 0
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.close(plot_distributions(df))
    plt.close(plot_means(summarize(df)))


def _krippendorff_2011(store: Path) -> None:
    """Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability": 4 observers × 12
    units, values 1..5, missing as None. Published: ordinal alpha = 0.815 (nominal 0.743)."""
    table = {"A": [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
             "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
             "C": [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
             "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None]}
    for rater, values in table.items():
        for unit, v in enumerate(values, 1):
            if v is not None:
                _write(store, rater, f"u{unit:02d}", "m", accuracy=v)


def test_agreement_on_a_published_table(tmp_path):
    _krippendorff_2011(tmp_path)
    res = agreement(load_scores(tmp_path), "accuracy")
    assert res.alpha == pytest.approx(0.815, abs=5e-4)
    assert (res.n_raters, res.n_units, res.reason) == (4, 11, "")    # unit 12 has one value only


def test_agreement_edge_cases(tmp_path):
    for i in range(4):                                                  # perfect agreement
        for r in ("x", "y"):
            _write(tmp_path / "perfect", r, f"i{i}", "m", accuracy=i + 1)
    assert agreement(load_scores(tmp_path / "perfect"), "accuracy").alpha == pytest.approx(1.0)
    _write(tmp_path / "one", "x", "i0", "m", accuracy=3)
    res = agreement(load_scores(tmp_path / "one"), "accuracy")
    assert res.alpha is None and "two or more raters" in res.reason
    _write(tmp_path / "apart", "x", "i0", "m", accuracy=3)
    _write(tmp_path / "apart", "y", "i1", "m", accuracy=4)
    res = agreement(load_scores(tmp_path / "apart"), "accuracy")
    assert res.alpha is None and "no item scored by two" in res.reason
    for r in ("x", "y"):
        _write(tmp_path / "same", r, "i0", "m", accuracy=4)
        _write(tmp_path / "same", r, "i1", "m", accuracy=4)
    res = agreement(load_scores(tmp_path / "same"), "accuracy")
    assert res.alpha is None and "no variation" in res.reason
    with pytest.raises(ValueError, match="no scores for criterion"):
        agreement(load_scores(tmp_path / "same"), "expertise")
    # the same (item, model) under two models is two units
    _write(tmp_path / "models", "x", "i0", "m1", accuracy=1)
    _write(tmp_path / "models", "y", "i0", "m1", accuracy=1)
    _write(tmp_path / "models", "x", "i0", "m2", accuracy=5)
    _write(tmp_path / "models", "y", "i0", "m2", accuracy=5)
    res = agreement(load_scores(tmp_path / "models"), "accuracy")
    assert res.n_units == 2 and res.alpha == pytest.approx(1.0)


def test_plots_have_ascii_labels(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    items = make_items(4, MODELS[:2])
    demo_scores(items, tmp_path, criteria="kokorochat")
    df = load_scores(tmp_path)
    fig = plot_distributions(df)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == list(CRITERIA_PRESETS["kokorochat"])
    texts = [t.get_text() for ax in fig.axes for t in ax.texts + ax.get_xticklabels() + [ax.title, ax.xaxis.label]]
    texts += [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert all(s.isascii() for s in texts)
    fig2 = plot_means(summarize(df))
    assert all(t.get_text().isascii() for ax in fig2.axes for t in ax.get_xticklabels())
    plt.close(fig)
    plt.close(fig2)


def test_export_csv(tmp_path):
    import pandas as pd
    w = ScoringWidget(make_items(), tmp_path / "s", "tanaka")
    w.submit(GOOD, comment="優しい、でも短い")
    paths = export_csv(load_scores(tmp_path / "s"), tmp_path / "eval")
    assert {p.name for p in paths.values()} == {"human_scores.csv", "human_summary.csv", "human_agreement.csv"}
    scores = pd.read_csv(paths["scores"])
    assert scores.loc[0, "comment"] == "優しい、でも短い" and scores.loc[0, "accuracy"] == 4
    assert ",4," in paths["scores"].read_text(encoding="utf-8")        # integers, not 4.0
    agree = pd.read_csv(paths["agreement"])
    assert agree["alpha"].isna().all() and agree["reason"].str.contains("two or more raters").all()
    assert not list((tmp_path / "eval").glob("*.tmp"))


# --------------------------------------------------------------------------- demo scores

def test_demo_scores_seeded_and_marked(tmp_path):
    items = make_items(6, MODELS)
    assert demo_scores(items, tmp_path / "a", seed=7) == 2 * len(items)
    assert demo_scores(items, tmp_path / "a", seed=7) == 0                 # already complete
    demo_scores(items, tmp_path / "b", seed=7)
    demo_scores(items, tmp_path / "c", seed=8)
    cols = ["item_id", "model", "rater", "accuracy", "relevance", "expertise"]

    def table(d):
        return load_scores(tmp_path / d)[cols].sort_values(cols[:3]).reset_index(drop=True)

    assert table("a").equals(table("b"))
    assert not table("a").equals(table("c"))
    df = load_scores(tmp_path / "a", items)
    assert set(df["rater"]) == {"demo-a", "demo-b"} and df["demo"].all() and (df["comment"] == "demo").all()
    assert set(df["split"]) == {"test", "valid"}
    assert df[["accuracy", "relevance", "expertise"]].isin(range(6)).all().all()
    assert len(load_scores(tmp_path / "a", include_demo=False)) == 0
    summary = summarize(df)
    assert len(summary) == 3 * 3 and (summary["n_demo"] == summary["n"]).all()
    assert all(a.alpha is not None for a in (agreement(df, c) for c in ("accuracy", "relevance", "expertise")))


# --------------------------------------------------------------------------- into the cards

def test_write_evaluation_results_into_cards(tmp_path):
    run_dir = tmp_path / "run"
    model_a, model_b = "ft:gpt-4o-mini:org:kokoro:abc", "local-lora-tiny"
    pa = cards.save_card(cards.card_path(run_dir, model_a), {
        **cards.new_card("openai", model_a, "gpt-4o-mini", {"n_epochs": 1}),
        "evaluation_results": {"test_evaluation": {"automatic": {"chrf": 12.5}}, "note": "kept"}})
    pb = cards.save_card(cards.card_path(run_dir, "my-adapter"),
                         cards.new_card("local_lora", model_b, "tiny-base", {"r": 8}))
    items = make_items(4, (model_a, model_b, "tiny-base"))     # the base model has no card
    demo_scores(items, tmp_path / "s", seed=3)
    df = load_scores(tmp_path / "s", items)
    by_split = summarize(df, by=("split", "model"))
    result = write_evaluation_results(run_dir, by_split, agreement=agreement_table(df),
                                      metrics={model_a: {"chrF": 31.25, "bleu_char": 10.0}})
    assert set(result["written"]) == {model_a, model_b}
    assert set(result["skipped"]) == {"tiny-base"} and "no model card" in result["skipped"]["tiny-base"]

    card = cards.load_card(pa)
    er = card["evaluation_results"]
    assert {"test_evaluation", "valid_evaluation", "summary", "timestamp"} <= set(er)
    assert er["note"] == "kept" and er["test_evaluation"]["automatic"] == {"chrf": 12.5}   # others' results kept
    human_test = er["test_evaluation"]["human_scores"]
    row = by_split[(by_split.split == "test") & (by_split.model == model_a) & (by_split.criterion == "accuracy")].iloc[0]
    assert human_test["criteria"]["accuracy"]["mean"] == pytest.approx(row["mean"], abs=1e-4)
    assert human_test["criteria"]["accuracy"]["n"] == row["n"]
    assert human_test["demo"] is True and "DEMO" in human_test["note"]
    assert er["valid_evaluation"]["human_scores"]["criteria"]["accuracy"]["n"] > 0
    # summary pools test and valid exactly: the same as summarising by model alone
    pooled = er["summary"]["human_scores"]["criteria"]["expertise"]
    whole = summarize(df)
    w = whole[(whole.model == model_a) & (whole.criterion == "expertise")].iloc[0]
    assert (pooled["n"], pooled["mean"]) == (w["n"], pytest.approx(w["mean"], abs=1e-4))
    assert (pooled["ci_low"], pooled["ci_high"]) == (pytest.approx(w.ci_low, abs=1e-4), pytest.approx(w.ci_high, abs=1e-4))
    assert er["summary"]["automatic_metrics"] == {"chrF": 31.25, "bleu_char": 10.0}
    assert set(er["summary"]["human_agreement"]) == {"accuracy", "relevance", "expertise"}
    assert "human_scores" in cards.load_card(pb)["evaluation_results"]["summary"]
    json.dumps(card)                                                     # plain JSON (no NaN objects)

    # writing again replaces the human block but keeps the rest; a model→card mapping works
    again = write_evaluation_results(run_dir, summarize(df), models={"tiny-base": model_b})
    assert set(again["written"]) == {model_a, model_b, "tiny-base"}
    assert cards.load_card(pa)["evaluation_results"]["test_evaluation"]["automatic"] == {"chrf": 12.5}


def test_write_evaluation_results_with_metrics_only(tmp_path):
    """Before anyone has scored, the automatic metrics still land in the card, per split and pooled."""
    import pandas as pd
    run_dir = tmp_path / "run"
    path = cards.save_card(cards.card_path(run_dir, "lora-x"), cards.new_card("local_lora", "lora-x", "tiny", {}))
    pooled = pd.DataFrame([{"model": "lora-x", "chrf": 20.0}, {"model": "tiny (base)", "chrf": 5.0}])
    by_split = pd.DataFrame([{"model": "lora-x", "split": "test", "chrf": 18.0},
                             {"model": "lora-x", "split": "valid", "chrf": 22.0}])
    result = write_evaluation_results(run_dir, None, metrics=pooled, metrics_by_split=by_split)
    assert set(result["written"]) == {"lora-x"} and set(result["skipped"]) == {"tiny (base)"}
    er = cards.load_card(path)["evaluation_results"]
    assert er["test_evaluation"]["automatic_metrics"] == {"chrf": 18.0}
    assert er["valid_evaluation"]["automatic_metrics"] == {"chrf": 22.0}
    assert er["summary"]["automatic_metrics"] == {"chrf": 20.0}
    assert "human_scores" not in er["summary"] and er["timestamp"]


def test_few_scores_give_counts_and_means_only_and_intervals_stay_in_0_5(tmp_path):
    _write(tmp_path, "r0", "item-000", "A", accuracy=0, relevance=5)
    _write(tmp_path, "r1", "item-000", "A", accuracy=5, relevance=5)
    summary = summarize(load_scores(tmp_path))
    assert summary.attrs["min_scores_for_interval"] == MIN_SCORES_FOR_INTERVAL > 2
    for row in summary.itertuples():                       # two scores: no interval (was -9.7 … 15.7)
        assert row.n == 2 and math.isnan(row.ci_low) and math.isnan(row.ci_high) and not math.isnan(row.mean)
    for values in ([0, 5, 0, 5, 0], [5, 5, 5, 5, 4], [0] * 6 + [1], list(range(6)) * 3):
        mean, sd, lo, hi = mean_ci(values)
        assert 0 <= lo <= mean <= hi <= 5
    assert mean_ci([0, 5, 0, 5, 0])[2] == 0.0               # clipped at the bottom of the scale


def test_summary_table_shows_counts_and_means_only_below_the_stated_number(tmp_path):
    for i, s in enumerate([1, 2, 3, 4, 5]):
        _write(tmp_path, f"r{i}", "item-000", "A", accuracy=s, relevance=3)
    _write(tmp_path, "r0", "item-001", "B", accuracy=0, relevance=5)
    _write(tmp_path, "r1", "item-001", "B", accuracy=5, relevance=5)
    table = summary_table(summarize(load_scores(tmp_path)))
    a = table[(table.model == "A") & (table.criterion == "accuracy")].iloc[0]
    b = table[(table.model == "B") & (table.criterion == "accuracy")].iloc[0]
    low, high = (float(x) for x in a["95% CI"].split("–"))
    assert 0 <= low < 3 < high <= 5 and a["sd"] != "—"
    assert (b.n, b["mean"], b.sd, b["95% CI"]) == (2, 2.5, "—", "— (n < 5)")
    assert "nan" not in table.to_string().lower()
