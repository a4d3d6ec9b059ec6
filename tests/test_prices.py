"""The dated price table: its schema, the exact figures of the cost issue, model lookup, and the
service-window warning relative to a given day."""
from __future__ import annotations

import copy
from datetime import date

import pytest
import yaml

from kokoro_helpers.report import prices
from kokoro_helpers.report.prices import PriceError, load_prices

# issue 7 §1, as published on OpenAI's pricing page (copy seen Aug-Nov 2026)
EXPECTED = {
    "gpt-4o-mini-2024-07-18": (3.00, 0.30, 0.15, 1.20, (0.15, 0.075, 0.60)),
    "gpt-4.1-mini-2025-04-14": (5.00, 0.80, 0.20, 3.20, (0.40, 0.10, 1.60)),
    "gpt-4.1-nano-2025-04-14": (1.50, 0.20, 0.05, 0.80, (0.10, 0.025, 0.40)),
    "gpt-4.1-2025-04-14": (25.00, 3.00, 0.75, 12.00, (1.50, 0.50, 6.00)),
    "gpt-4o-2024-08-06": (25.00, 3.75, 1.875, 15.00, None),
}


@pytest.fixture(scope="module")
def table():
    return load_prices()


def test_the_shipped_table_has_every_model_with_its_source_and_date(table):
    assert set(table.models) == set(EXPECTED)
    for model, (training, inp, cached, out, batch) in EXPECTED.items():
        e = table.entry(model)
        assert (e["training"], e["input"], e["cached_input"], e["output"]) == (training, inp, cached, out)
        if batch:
            assert (e["batch"]["input"], e["batch"]["cached_input"], e["batch"]["output"]) == batch
        else:
            assert "batch" not in e
        assert e["source"].startswith("OpenAI") and e["as_of"] == "2026-11"
    assert table.jpy_per_usd == 155.0 and "assumption" in table.fx_label and "2026-11" in table.fx_label
    assert table.gpu_hourly_usd == 2.50 and "assumption" in table.gpu_label
    sw = table.raw["service_window"]
    assert sw["status"] == "reported" and sw["source"]
    assert sw["no_new_jobs_after"] == "2027-01-06"
    assert sw["retirements"]["gpt-4.1-nano-2025-04-14"] == "2026-10-23"
    for m in ("gpt-4o-mini-2024-07-18", "gpt-4o-2024-08-06", "gpt-4.1-2025-04-14", "gpt-4.1-mini-2025-04-14"):
        assert sw["retirements"][m] == "2027-01-14"


def test_lookup_by_fine_tuned_id_checkpoint_and_alias(table):
    ft = "ft:gpt-4o-mini-2024-07-18:my-org:kokoro-chat:AbC123"
    assert prices.base_model_of(ft) == "gpt-4o-mini-2024-07-18"
    assert table.entry(ft)["model"] == "gpt-4o-mini-2024-07-18"
    assert table.training_price(ft + ":ckpt-step-88") == 3.00
    assert table.resolve_model("gpt-4.1") == "gpt-4.1-2025-04-14"        # undated alias, one match
    assert table.resolve_model("gpt-4.1-mini") == "gpt-4.1-mini-2025-04-14"
    with pytest.raises(PriceError, match="no prices for 'gpt-3.5-turbo'.*priced base models"):
        table.entry("gpt-3.5-turbo")


def _write(tmp_path, raw):
    p = tmp_path / "prices.yaml"
    p.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return p


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["openai"]["models"]["gpt-4o-mini-2024-07-18"].pop("training"), r"gpt-4o-mini-2024-07-18: missing `training`"),
    (lambda r: r["openai"]["models"]["gpt-4o-2024-08-06"].update(output=-1), r"output must be a non-negative number"),
    (lambda r: r["openai"]["models"]["gpt-4o-2024-08-06"].update(outptu=1.0), r"unknown keys \['outptu'\]"),
    (lambda r: r["openai"].pop("as_of"), r"openai: missing `as_of`"),
    (lambda r: r.pop("exchange_rate"), r"missing `exchange_rate`"),
    (lambda r: r["exchange_rate"].update(jpy_per_usd="155"), r"jpy_per_usd must be a non-negative number"),
    (lambda r: r["service_window"].update(no_new_jobs_after="early 2027"), r"is not a date"),
    (lambda r: r["service_window"]["retirements"].update({"gpt-4o-2024-08-06": "2027-13-01"}), r"is not a date"),
    (lambda r: r["openai"]["models"]["gpt-4o-mini-2024-07-18"].update(batch={"inptu": 1}), r"batch must map"),
])
def test_schema_errors_are_clear(tmp_path, table, mutate, message):
    raw = copy.deepcopy(table.raw)
    mutate(raw)
    with pytest.raises(PriceError, match=message):
        load_prices(_write(tmp_path, raw))


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(PriceError, match="price table not found"):
        load_prices(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("openai: [unclosed", encoding="utf-8")
    with pytest.raises(PriceError, match="not valid YAML"):
        load_prices(bad)


def test_service_window_warning_relative_to_today(table):
    warn = prices.service_window_warning("gpt-4o-mini-2024-07-18", today="2026-11-21", prices=table)
    assert warn and "2027-01-14" in warn and "54 days" in warn
    assert "2027-01-06" in warn and "46 days" in warn
    assert "reported" in warn and "local LoRA" in warn
    # a fine-tuned id warns like its base model
    assert prices.service_window_warning("ft:gpt-4o-mini-2024-07-18:org:x:1", today=date(2026, 11, 21),
                                         prices=table) == warn
    # far from both dates: nothing to say
    assert prices.service_window_warning("gpt-4o-mini-2024-07-18", today="2026-06-01", prices=table) is None
    # exactly 60 days before the job cutoff: warned; 61: not
    assert prices.service_window_warning("gpt-4o-2024-08-06", today="2026-11-07", prices=table)
    assert prices.service_window_warning("gpt-4o-2024-08-06", today="2026-11-06", prices=table) is None
    # past dates
    past = prices.service_window_warning("gpt-4.1-nano-2025-04-14", today="2026-11-21", prices=table)
    assert "were reportedly retired on 2026-10-23" in past and "29 days ago" in past
    after = table.service_window("gpt-4.1-2025-04-14", today="2027-02-01")
    assert after.warn and "accepts no new fine-tuning jobs after 2027-01-06" in after.warning()
    # using a model (not training) ignores the job cutoff
    assert table.service_window("gpt-4o-2024-08-06", today="2026-11-07", new_jobs=False).warning() is None
    # default today: today's date
    assert table.service_window("gpt-4o-mini-2024-07-18").today == date.today()
