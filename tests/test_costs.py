"""Cost arithmetic against hand-computed cases: the auto-epoch heuristic at its bounds, the
per-example cap, USD/JPY, estimate labels, actual and inference costs."""
from __future__ import annotations

import pytest

from kokoro_helpers.report import costs

EST = "estimate:0.6/non-ASCII char+0.25/ASCII char (no o200k_base file)"


@pytest.mark.parametrize("n, epochs", [
    (1, 25),        # 100 needed -> 100 epochs, bounded to 25
    (3, 25),        # ceil(100/3) = 34 -> 25
    (4, 25),        # ceil(100/4) = 25
    (5, 20),
    (10, 10),       # 10 x 10 = 100
    (30, 4),        # 3 x 30 = 90 < 100 -> ceil(100/30) = 4
    (33, 4),        # 99 < 100 -> ceil(100/33) = 4
    (34, 3),        # 102 >= 100: the default 3
    (40, 3),
    (8_333, 3),     # 24,999 <= 25,000
    (8_334, 2),     # 25,002 > 25,000 -> floor(25,000 / 8,334) = 2
    (12_500, 2),
    (12_501, 1),
    (20_000, 1),    # 60,000 > 25,000 -> floor(1.25) = 1
    (100_000, 1),   # floor(0.25) = 0 -> bounded to 1
])
def test_auto_epochs_heuristic_at_its_bounds(n, epochs):
    assert costs.auto_epochs(n) == epochs


def test_auto_epochs_needs_examples_and_resolve_epochs_checks_values():
    with pytest.raises(ValueError):
        costs.auto_epochs(0)
    assert costs.resolve_epochs("auto", 10) == (10, True)
    assert costs.resolve_epochs(None, 40) == (3, True)
    assert costs.resolve_epochs(7, 10) == (7, False)
    assert costs.resolve_epochs(7.0, 10) == (7, False)
    for bad in (0, -1, 2.5, "ten", True):
        with pytest.raises(ValueError, match="n_epochs"):
            costs.resolve_epochs(bad, 10)


def test_per_example_cap_and_billed_tokens():
    tokens = [100, 70_000, 65_536, 65_537]
    assert costs.capped_tokens(tokens, 65_536) == 100 + 3 * 65_536
    assert costs.capped_tokens(tokens, None) == sum(tokens)
    assert costs.billed_tokens(tokens, 2, 65_536) == 2 * (100 + 3 * 65_536)


def test_estimate_training_by_hand():
    # 10 examples of 1,000 tokens: auto -> 10 epochs -> 100,000 billed tokens; $3.00/1M -> $0.30 -> ¥46.50
    est = costs.estimate_training([1_000] * 10, "auto", 3.00, 155.0, max_tokens_per_example=65_536,
                                  base_model="gpt-4o-mini-2024-07-18", token_counter="o200k_base")
    assert (est.epochs, est.billed_tokens) == (10, 100_000)
    assert est.usd == pytest.approx(0.30) and est.jpy == pytest.approx(46.5)
    assert est.is_estimate and "auto" in est.label and "token counts" not in est.label
    d = est.as_dict()
    assert d["is_estimate"] is True and d["label"].startswith("estimate:")

    # exact counts, given epochs: computed, not an estimate
    exact = costs.estimate_training([2_000, 500], 4, 25.00, 150.0, max_tokens_per_example=1_000,
                                    token_counter="o200k_base")
    assert exact.tokens_per_epoch == 1_500 and exact.capped_examples == 1 and exact.tokens_uncapped == 2_500
    assert exact.billed_tokens == 6_000 and exact.usd == pytest.approx(0.15) and exact.jpy == pytest.approx(22.5)
    assert not exact.is_estimate and exact.label.startswith("computed")

    # the offline estimate counter makes every cost an estimate, even with given epochs
    est2 = costs.estimate_training([1_000] * 40, 3, 3.00, 155.0, token_counter=EST)
    assert est2.is_estimate and "token counts are an estimate" in est2.label
    with pytest.raises(ValueError):
        costs.estimate_training([], "auto", 3.0, 155.0)


def test_estimate_from_stats_matches_the_05_cost_rule():
    stats = {"tokens": {"train": 26_606, "valid": 2_412, "test": 2_106}, "examples": {"train": 39, "valid": 5},
             "max_example_tokens_seen": 1_157, "max_example_tokens": 65_536, "token_counter": EST}
    est = costs.estimate_from_stats(stats, "auto", 3.00, 155.0, base_model="gpt-4o-mini-2024-07-18")
    assert est.epochs == 3 and est.billed_tokens == 3 * 26_606
    assert est.usd == pytest.approx(3 * 26_606 * 3.00 / 1e6)
    assert est.is_estimate and est.capped_examples == 0
    # the seeds' corpus: 11.62 M tokens, 10 epochs, at the training price (not the $0.40 input price)
    big = costs.estimate_training_from_totals(11_620_000, 6_589, 10, 3.00, 155.0, 5_000, 65_536,
                                              token_counter="o200k_base")
    assert big.usd == pytest.approx(348.6) and big.jpy == pytest.approx(54_033.0) and not big.is_estimate
    # an example over the limit with only totals known: an upper bound, said so
    over = costs.estimate_from_stats({**stats, "max_example_tokens_seen": 70_000}, 2, 3.00, 155.0)
    assert over.is_estimate and "upper bound" in over.label and over.capped_examples == -1
    with pytest.raises(ValueError, match="re-run 01_data"):
        costs.estimate_from_stats({"tokens": {}}, 3, 3.0, 155.0)


def test_actual_and_inference_costs():
    actual = costs.actual_training_cost(1_000_000, 3.00, 155.0, "2026-11")
    assert actual.usd == pytest.approx(3.0) and actual.jpy == pytest.approx(465.0)
    assert not actual.is_estimate and "trained_tokens" in actual.label and "2026-11" in actual.label
    prices = {"model": "gpt-4o-mini-2024-07-18", "input": 0.30, "cached_input": 0.15, "output": 1.20,
              "batch": {"input": 0.15, "cached_input": 0.075, "output": 0.60}}
    # 1M in (of which 200k cached) + 500k out: 0.8 x 0.30 + 0.2 x 0.15 + 0.5 x 1.20 = 0.87
    inf = costs.inference_cost(1_000_000, 500_000, prices, 155.0, cached_input_tokens=200_000)
    assert inf.usd == pytest.approx(0.87) and inf.jpy == pytest.approx(134.85) and not inf.is_estimate
    batch = costs.inference_cost(1_000_000, 500_000, prices, 155.0, cached_input_tokens=200_000, batch=True)
    assert batch.usd == pytest.approx(0.435)
    labelled = costs.inference_cost(1_000, 1_000, prices, 155.0, is_estimate=True)
    assert labelled.is_estimate and labelled.label.startswith("estimate")
    with pytest.raises(ValueError):
        costs.inference_cost(10, 10, {**prices, "batch": None}, 155.0, batch=True)
    with pytest.raises(ValueError):
        costs.inference_cost(10, 10, prices, 155.0, cached_input_tokens=11)
