"""05_cost's logic (kokoro_helpers.report's cost modules) against hand-computed cases: summary.json
equals stats.json × the training price, estimate labels, the per-example cap with per-example counts,
the "auto" epochs of scaled datasets at the heuristic's bounds, the seeds' comparison, local GPU
hours, inference measured from 03's files or estimated from the test split, and the notebook's
contract. The heuristic itself and the cost primitives are tested in tests/test_costs.py.

Only the project's embedded sample and tiny invented snippets are used (no KokoroChat text)."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
import yaml

from kokoro_helpers import cards
from kokoro_helpers.report.cost_inputs import CostReportError, load_inputs
from kokoro_helpers.report.cost_plots import plot_inference, plot_training, plot_what_if
from kokoro_helpers.report.cost_summary import build_summary, key_figure_rows
from kokoro_helpers.report.inference_costs import inference_costs, measure_workload
from kokoro_helpers.report.local_costs import device_label, local_costs
from kokoro_helpers.report.seeds_comparison import seeds_comparison, seeds_table
from kokoro_helpers.report.training_costs import actual_costs, actual_table, training_costs, training_table
from kokoro_helpers.report.what_if_costs import what_if, what_if_table
from kokoro_helpers.data.pipeline import prepare_data, write_example_tokens
from kokoro_helpers.jsonio import file_sha256
from kokoro_helpers.data.tokens import ESTIMATE_NAME, get_token_counter

ROOT = Path(__file__).resolve().parents[1]
MINI = "gpt-4o-mini-2024-07-18"
EST = ESTIMATE_NAME


class CharEncoding:
    """One token per character: exact, offline, and easy to count by hand."""

    name = "chars-test"

    @staticmethod
    def encode(text: str) -> list[int]:
        return [ord(c) for c in text]


@pytest.fixture
def chars():
    return get_token_counter(encoding=CharEncoding())


@pytest.fixture
def embedded_run(tmp_path, counter):
    run_dir = tmp_path / "run"
    prepare_data("embedded", run_dir=run_dir, token_counter=counter, progress=False)
    return run_dir


def _stats(run_dir: Path) -> dict:
    return json.loads((run_dir / "data" / "stats.json").read_text(encoding="utf-8"))


def _example(n_user: int, n_assistant: int) -> dict:
    return {"messages": [{"role": "user", "content": "あ" * n_user}, {"role": "assistant", "content": "い" * n_assistant}]}


def _hand_run(run_dir: Path, counter, train: list[dict], test: list[dict] | None = None, *,
              limit: int = 65_536, dialogues: int | None = None, **extra) -> Path:
    """A run_dir written by hand: data/{train,valid,test}.jsonl and a stats.json counted with `counter`."""
    data = run_dir / "data"
    data.mkdir(parents=True)
    test = test if test is not None else [_example(5, 4)]
    splits = {"train": train, "valid": [], "test": test}
    tokens = {}
    per = []
    counted = {}
    for name, rows in splits.items():
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                            encoding="utf-8")
        counts = [counter.count_messages(r["messages"]) for r in rows]
        tokens[name] = sum(counts)
        per.extend(counts)
        counted[name] = (file_sha256(data / f"{name}.jsonl"), counts)
    write_example_tokens(data, counter.name, counted)
    n_dlg = dialogues or len(train)
    stats = {"dialogues_in": n_dlg + len(test), "dialogues_kept": n_dlg + len(test),
             "splits": {"train": n_dlg, "valid": 0, "test": len(test)},
             "examples": {k: len(v) for k, v in splits.items()}, "tokens": tokens,
             "max_example_tokens_seen": max(per), "max_example_tokens": limit, "token_counter": counter.name,
             "split_ratios": [0.8, 0.1, 0.1], "source": "hand-made", "data_sha256": {}}
    stats.update(extra)
    (data / "stats.json").write_text(json.dumps(stats), encoding="utf-8")
    return run_dir


# --------------------------------------------------------------------------- training and summary.json

@pytest.mark.parametrize("n_epochs, epochs", [("auto", 3), (10, 10)])
def test_summary_json_equals_stats_tokens_times_epochs_times_the_training_price(embedded_run, n_epochs, epochs):
    path, summary = build_summary(embedded_run, n_epochs=n_epochs)
    assert path == embedded_run / "cost" / "summary.json" and json.loads(path.read_text()) == summary
    stats = _stats(embedded_run)
    train_tokens = stats["tokens"]["train"]
    assert stats["max_example_tokens_seen"] <= stats["max_example_tokens"]     # no cap applies
    mini = summary["training"][MINI]
    assert mini["epochs"] == epochs                     # 39 examples: auto -> 3
    assert mini["billed_tokens"] == epochs * train_tokens
    assert mini["usd"] == mini["billed_tokens"] * 3.00 / 1_000_000
    assert mini["jpy"] == pytest.approx(mini["usd"] * 155.0)
    assert mini["epochs_from_heuristic"] is (n_epochs == "auto")
    prices = {"gpt-4.1-mini-2025-04-14": 5.00, "gpt-4.1-nano-2025-04-14": 1.50, "gpt-4.1-2025-04-14": 25.00,
              "gpt-4o-2024-08-06": 25.00}
    for model, price in prices.items():
        assert summary["training"][model]["usd"] == pytest.approx(epochs * train_tokens * price / 1e6)
    assert summary["prices_as_of"] == "2026-11" and summary["token_counter"] == stats["token_counter"]
    assert summary["fx"]["jpy_per_usd"] == 155.0 and "assumption" in summary["fx"]["label"]
    assert summary["data_sha256"] == stats["data_sha256"]
    assert {"training", "inference", "local", "seeds", "what_if", "service_window"} <= set(summary)
    assert "NaN" not in path.read_text()


def test_every_cost_says_estimate_when_the_counter_is_one(embedded_run):
    _, summary = build_summary(embedded_run, n_epochs=10)     # given epochs: only the counter
    assert summary["token_counter"] == EST and summary["is_estimate"] is True
    assert any("token counts are an estimate" in r for r in summary["estimate_reasons"])
    for model, entry in summary["training"].items():
        assert entry["is_estimate"] is True, model
        assert entry["label"].startswith("estimate:") and "token counts are an estimate" in entry["label"]
    inf = summary["inference"]
    assert inf["is_estimate"] is True and "token counts are an estimate" in inf["label"]
    for costs in inf["models"].values():
        assert costs["evaluation"]["is_estimate"] and costs["per_replies"]["label"].startswith("estimate")
    assert all(row["is_estimate"] for row in summary["what_if"])
    inputs = load_inputs(embedded_run)
    table = training_table(training_costs(inputs, 10), inputs.prices)
    assert set(table["basis"]) == {"estimate"}
    assert any("2026-11" in c for c in table.columns)                # the price column shows its date
    rows = dict(key_figure_rows(summary))
    assert all("estimate" in v for k, v in rows.items() if k.startswith(("training:", "inference:")))


def test_exact_counts_and_given_epochs_are_computed_not_estimated(tmp_path, chars):
    run_dir = _hand_run(tmp_path / "run", chars, [_example(100, 50)] * 12)
    inputs = load_inputs(run_dir)
    training = training_costs(inputs, 4)
    mini = training[MINI]
    per_example = chars.count_messages(_example(100, 50)["messages"])
    assert per_example == (3 + 4 + 100) + (3 + 9 + 50) + 3                  # role "user" 4, "assistant" 9 chars
    assert mini.billed_tokens == 4 * 12 * per_example and not mini.is_estimate
    assert mini.label.startswith("computed")
    assert training_table(training)["basis"].eq("computed").all()
    auto = training_costs(inputs, "auto")[MINI]  # 12 examples -> ceil(100/12) = 9
    assert auto.epochs == 9 and auto.is_estimate and "auto" in auto.label and "token counts" not in auto.label


def test_per_example_cap_uses_per_example_counts_when_an_example_is_over_the_limit(tmp_path, chars):
    train = [_example(10, 10), _example(200, 100), _example(30, 5)]
    run_dir = _hand_run(tmp_path / "run", chars, train, limit=150)
    tokens = [chars.count_messages(e["messages"]) for e in train]
    assert tokens == [42, 322, 57]                   # (3 + 4 + user) + (3 + 9 + assistant) + 3
    inputs = load_inputs(run_dir)
    mini = training_costs(inputs, 2)[MINI]
    assert mini.tokens_per_epoch == 42 + 150 + 57 and mini.capped_examples == 1
    assert mini.billed_tokens == 2 * 249 and mini.usd == pytest.approx(498 * 3.00 / 1e6)
    assert not mini.is_estimate                                      # exact counts, exact cap
    # train.jsonl edited after 01 counted it: only totals can be used -> an upper bound, said so
    with open(run_dir / "data" / "train.jsonl", "a", encoding="utf-8") as f:
        f.write("\n")
    other = load_inputs(run_dir)
    bound = training_costs(other, 2)[MINI]
    assert bound.billed_tokens == 2 * min(421, 3 * 150) and bound.is_estimate and "upper bound" in bound.label
    assert any("per-example cap" in n and "changed after 01_data" in n for n in other.notes)
    (run_dir / "data" / "example_tokens.json").unlink()                 # an older 01 wrote no counts
    older = load_inputs(run_dir)
    assert training_costs(older, 2)[MINI].is_estimate
    assert any("no train counts" in n for n in older.notes)


def test_what_if_scales_tokens_per_dialogue_and_applies_auto_epochs_at_the_heuristic_bounds(tmp_path, chars):
    # 10 training dialogues, 2 examples each (windows): this run auto -> 20 examples -> ceil(100/20) = 5;
    # Low 3,870 x 0.8 = 3,096 dialogues -> 6,192 examples -> 3; Full 6,471 x 0.8 = 5,177 -> 10,354 -> 2
    train = [_example(20, 10)] * 20
    run_dir = _hand_run(tmp_path / "run", chars, train, dialogues=10)
    inputs = load_inputs(run_dir)
    frame = what_if(inputs, MINI, [1, 10])
    per_dlg = inputs.stats["tokens"]["train"] / 10
    auto = frame[frame["epochs_setting"] == "auto"].set_index("dataset")
    assert auto.loc["this run", "epochs"] == 5 and not auto.loc["this run", "scaled"]
    assert auto.loc["Low (<70)", "train_dialogues"] == 3_096 and auto.loc["Low (<70)", "examples"] == 6_192
    assert auto.loc["Low (<70)", "epochs"] == 3
    assert auto.loc["Full (<=98)", "examples"] == 10_354 and auto.loc["Full (<=98)", "epochs"] == 2
    assert auto.loc["High (70-98)", "dialogues"] == 2_601
    ten = frame[frame["epochs_setting"] == "10"].set_index("dataset")
    assert ten.loc["Full (<=98)", "tokens_per_epoch"] == round(per_dlg * 5_177)
    assert ten.loc["Full (<=98)", "openai_usd"] == pytest.approx(10 * round(per_dlg * 5_177) * 3.00 / 1e6)
    assert "scaled from this run" in ten.loc["Full (<=98)", "label"] and ten.loc["Full (<=98)", "is_estimate"]
    assert ten.loc["this run", "label"] == "computed"                # exact counter, given epochs, measured
    grid = what_if_table(frame)
    assert list(grid.columns.get_level_values(1)) == ["1", "10", "auto"]
    assert grid.loc["this run (11 dlg)", ("OpenAI USD", "auto")].endswith("(5 ep)")
    assert grid.loc["Full (<=98) (6,471 dlg, scaled)", ("OpenAI USD", "auto")].endswith("(2 ep)")


# --------------------------------------------------------------------------- the seeds

def test_the_seeds_figures_beside_the_corrected_ones():
    from kokoro_helpers.report.prices import load_prices
    cmp = seeds_comparison(load_prices())
    s, c = cmp["seeds"], cmp["corrected"]
    assert s["billed_tokens"] == 116_200_000 and s["training_usd"] == pytest.approx(46.48)
    assert (s["training_jpy"], s["inference_jpy"], s["total_jpy"]) == (6_823, 1_091, 7_914)
    assert s["implied_jpy_per_usd"] == pytest.approx(6_823 / 46.48)        # ≈ 146.8
    assert c["billed_tokens"] == 116_200_000 and c["price_per_1m"] == 3.00
    assert c["training_usd"] == pytest.approx(348.60) and c["training_jpy"] == pytest.approx(54_033.0)
    assert c["total_jpy"] == pytest.approx(54_033.0 + 1_091) and c["is_estimate"]
    assert cmp["price_ratio"] == pytest.approx(7.5)
    sentence = cmp["sentence"]
    for part in ("$0.40/1M", "$3.00/1M", "7.5 times", "¥54,033", "¥6,823", "¥55,124", "¥7,914", "2026-11"):
        assert part in sentence, part
    assert sentence.count(".") >= 1 and "\n" not in sentence
    table = seeds_table(cmp)
    assert table.loc["total (JPY)", "seeds"] == "¥7,914" and table.loc["total (JPY)", "corrected"] == "¥55,124"
    assert "13.81 M o200k_base tokens" in sentence and "utterance text alone" in sentence


def test_the_quoted_tokens_beside_this_runs_true_total_per_split(embedded_run):
    from kokoro_helpers.report.prices import load_prices
    stats = _stats(embedded_run)
    cmp = seeds_comparison(load_prices(), stats=stats)
    tw = cmp["tokens_with_overhead"]
    assert tw["this_run"] == stats["tokens"] and tw["this_run_total"] == sum(stats["tokens"].values())
    assert tw["quoted_text_only"] == 11_620_000 and tw["token_counter"] == stats["token_counter"]
    for name, n in stats["tokens"].items():
        assert f"{name} {n:,}" in cmp["sentence"]
        assert seeds_table(cmp).loc[f"tokens with message overhead: {name}", "corrected"] == f"{n:,}"
    _, summary = build_summary(embedded_run, n_epochs=10)
    assert summary["seeds"]["tokens_with_overhead"]["this_run"] == stats["tokens"]


# --------------------------------------------------------------------------- local LoRA

def _local_card(run_dir: Path, name: str = "lora-test", *, tps: float = 1_000.0, wall_s: float = 36.0,
                params: dict | None = None, local_tokens: int | None = 360_000, **extra) -> Path:
    card = cards.new_card("local_lora", name, extra.pop("base_model", "Qwen/Qwen2.5-7B-Instruct"),
                          params if params is not None else {"device": "cuda", "world_size": 2},
                          training_metrics={"train_tokens_per_s": tps, "wall_s": wall_s, "epochs": 3,
                                            "base_valid_loss": 2.5, "adapter_valid_loss": 1.9},
                          training_data={"train": {"tokens": local_tokens}} if local_tokens else {}, **extra)
    return cards.save_card(cards.card_path(run_dir, name), card)


def test_local_gpu_hours_from_measured_tokens_per_second(embedded_run):
    _local_card(embedded_run, params={"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "world_size": 2})
    inputs = load_inputs(embedded_run)
    local = local_costs(inputs, epochs=10)
    # 360,000 tokens/epoch x 10 / 1,000 tokens/s = 3,600 s = 1 h, x 2 processes = 2 GPU hours x $2.50
    assert local["available"] and local["train_tokens"] == 3_600_000
    assert local["hours"] == pytest.approx(1.0) and local["gpu_hours"] == pytest.approx(2.0)
    assert local["usd"] == pytest.approx(5.0) and local["jpy"] == pytest.approx(775.0)
    assert local["device"] == "NVIDIA H100 80GB HBM3 x2" and local["device_named"]
    assert "NVIDIA H100" in local["label"] and local["label"].startswith("estimate:")
    assert "GPU price is an assumption" in local["label"]
    run = local["measured_run"]                                        # 36 s x 2 processes
    assert run["gpu_hours"] == pytest.approx(0.02) and run["usd"] == pytest.approx(0.05)
    paid = local_costs(inputs, epochs=10, gpu_hourly_usd=4.0)
    assert paid["usd"] == pytest.approx(8.0) and "parameter gpu_hourly_usd" in paid["gpu_price_label"]
    assert "GPU price is an assumption" not in paid["label"]
    # the what-if uses the same arithmetic, scaled by the local tokens per stats.json token
    frame = what_if(inputs, MINI, [10], local)
    this = frame[(frame["dataset"] == "this run") & (frame["epochs_setting"] == "10")].iloc[0]
    assert this["local_usd"] == pytest.approx(5.0) and this["local_gpu_hours"] == pytest.approx(2.0)
    assert "local GPU USD" in what_if_table(frame).columns.get_level_values(0)


def test_local_labels_the_device_and_falls_back_honestly(embedded_run):
    inputs = load_inputs(embedded_run)
    none = local_costs(inputs, epochs=3)
    assert not none["available"] and "02 Part B" in none["reason"]
    assumed = local_costs(inputs, epochs=3, tokens_per_s=2_000.0)
    tokens = inputs.stats["tokens"]["train"]
    assert assumed["available"] and assumed["tokens_per_s_source"].startswith("parameter")
    assert assumed["hours"] == pytest.approx(3 * tokens / 2_000 / 3_600)
    assert "assumed" in assumed["label"] and "proxy" in assumed["label"]

    _local_card(embedded_run, "lora-tiny", tps=500.0, params={"device": "cpu", "world_size": 1},
                local_tokens=None, base_model="embedded:tiny", smoke_model=True)
    smoke = local_costs(load_inputs(embedded_run), epochs=3)
    assert smoke["device"] == "CPU (embedded smoke model)"
    assert "arithmetic only" in smoke["label"] and "proxy" in smoke["label"]
    assert smoke["tokens_per_epoch"] == tokens and smoke["gpu_hours"] == pytest.approx(3 * tokens / 500 / 3_600)
    label, named = device_label({"training_params": {"device": "cuda"}})
    assert (label, named) == ("GPU (model not recorded)", False)
    assert device_label({"device_name": "NVIDIA L4"})[0] == "NVIDIA L4"


# --------------------------------------------------------------------------- inference

def _eval_files(run_dir: Path, generations: list[dict]) -> None:
    ev = run_dir / "eval"
    ev.mkdir(parents=True, exist_ok=True)
    items = [{"item_id": "test:a", "split": "test", "context": [{"role": "user", "content": "あいう"}],
              "reference": "えお"},
             {"item_id": "test:b", "split": "test", "context": [{"role": "user", "content": "か" * 10}],
              "reference": "き" * 6}]
    (ev / "items.jsonl").write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
    (ev / "generations.jsonl").write_text("".join(json.dumps(g, ensure_ascii=False) + "\n" for g in generations),
                                          encoding="utf-8")


def test_inference_measured_from_03s_generations(tmp_path, chars):
    run_dir = _hand_run(tmp_path / "run", chars, [_example(10, 10)] * 10)
    ft = "ft:gpt-4o-mini-2024-07-18:org:kokoro-chat:abc"
    _eval_files(run_dir, [
        {"item_id": "test:a", "model": ft, "response": "x", "settings": {"model": ft},
         "prompt_tokens": 100, "completion_tokens": 10},
        {"item_id": "test:b", "model": ft, "response": "y", "settings": {"model": ft},
         "prompt_tokens": 200, "completion_tokens": 30},
        {"item_id": "test:a", "model": "lora-tiny", "response": "abcd", "settings": {"kind": "local"}},
    ])
    inputs = load_inputs(run_dir)
    work = measure_workload(inputs, counter=chars)
    assert (work.n_replies, work.input_tokens, work.output_tokens) == (2, 300, 40)
    assert not work.is_estimate and work.label.startswith("measured") and "reported by the API" in work.output_source
    by_model = {r["model"]: r for r in work.per_model}
    assert by_model[ft]["priced_as"] == MINI and by_model[ft]["usd"] == pytest.approx(300 * 0.30e-6 + 40 * 1.20e-6)
    assert by_model["lora-tiny"]["output_tokens"] == 4 and by_model["lora-tiny"]["priced_as"] is None
    assert by_model["lora-tiny"]["input_tokens"] == 3 + 4 + 3 + 3               # "user" + 3 chars + priming
    rows = {r["model"]: r for r in inference_costs(inputs, work, replies=1_000)}
    mini = rows[MINI]
    # evaluation: 300 x $0.30/1M + 40 x $1.20/1M; 1,000 replies: 150,000 in + 20,000 out
    assert mini["evaluation"]["usd"] == pytest.approx(0.000138)
    assert mini["evaluation_batch"]["usd"] == pytest.approx(0.000069)
    assert mini["per_replies"]["usd"] == pytest.approx(0.045 + 0.024)
    assert mini["per_replies"]["jpy"] == pytest.approx(0.069 * 155)
    assert rows["gpt-4o-2024-08-06"]["evaluation_batch"] is None            # no batch rates listed
    assert not mini["is_estimate"]


def test_inference_without_api_usage_uses_the_reference_replies_and_says_so(tmp_path, chars):
    run_dir = _hand_run(tmp_path / "run", chars, [_example(10, 10)] * 10)
    _eval_files(run_dir, [{"item_id": "test:a", "model": "lora-tiny", "response": "abcd"}])
    work = measure_workload(load_inputs(run_dir), counter=chars)
    assert work.input_tokens == (3 + 4 + 3 + 3) + (3 + 4 + 10 + 3) and work.output_tokens == 2 + 6
    assert work.is_estimate and "reference counselor replies" in work.label
    assert "token counts are an estimate" not in work.label                 # the counter is exact here


def test_inference_is_estimated_from_the_test_split_before_03_runs(embedded_run):
    from kokoro_helpers.evaluation.evaluate import build_eval_items
    inputs = load_inputs(embedded_run)
    work = measure_workload(inputs)
    expected = build_eval_items(embedded_run, splits=("test",), max_eval_items=None, log=None)
    assert work.n_replies == len(expected) > 0
    assert "test split" in work.label and "token counts are an estimate" in work.label
    assert work.mean_input > work.mean_output > 0
    assert "03_eval has not run" in work.table().loc["replies (requests)", "note"]


# --------------------------------------------------------------------------- what 02 recorded

def test_actual_cost_from_trained_tokens_and_the_pre_flight_request(embedded_run):
    done = cards.new_card("openai", "ft:gpt-4o-mini-2024-07-18:org:kokoro-chat:abc", MINI, {"epochs": 3},
                          job_id="ftjob-1", status="succeeded", trained_tokens=1_000_000)
    cards.save_card(cards.card_path(embedded_run, "openai-kokoro-chat-ftjob-1"), done)
    running = cards.new_card("openai", None, MINI, {"epochs": 3}, job_id="ftjob-2", status="running",
                             trained_tokens=None)
    cards.save_card(cards.card_path(embedded_run, "openai-kokoro-chat-ftjob-2"), running)
    (embedded_run / "openai").mkdir()
    (embedded_run / "openai" / "job_request.json").write_text(json.dumps(
        {"mode": "dry_run", "request": {"model": MINI}, "billed_tokens": 79_818, "epochs": 3,
         "estimated_cost_usd": 0.239454, "estimated_cost_jpy": 37.12, "is_estimate": True,
         "estimate": {"label": "estimate: token counts are an estimate"}, "prices": {"as_of": "2026-11"}}))
    rows = {r["job_id"]: r for r in actual_costs(load_inputs(embedded_run))}
    assert rows["ftjob-1"]["usd"] == pytest.approx(3.00) and rows["ftjob-1"]["jpy"] == pytest.approx(465.0)
    assert not rows["ftjob-1"]["is_estimate"] and "trained_tokens" in rows["ftjob-1"]["label"]
    assert rows["ftjob-2"]["usd"] is None and "no trained_tokens yet" in rows["ftjob-2"]["label"]
    assert rows[None]["what"] == "02 pre-flight (dry_run)" and rows[None]["is_estimate"]
    table = actual_table(list(rows.values()))
    assert table.loc["job openai-kokoro-chat-ftjob-1", "basis"] == "actual"
    _, summary = build_summary(embedded_run)
    assert dict(key_figure_rows(summary))["actual: job ftjob-1"].startswith("$3.00")


def test_missing_stats_is_a_clear_error(tmp_path):
    with pytest.raises(CostReportError, match="run 01_data"):
        load_inputs(tmp_path / "nothing")


def test_torn_lines_of_03s_files_are_skipped_and_counted(embedded_run):
    ev = embedded_run / "eval"
    ev.mkdir(parents=True, exist_ok=True)
    (ev / "items.jsonl").write_text('{"item_id": "a"}\n{"item_id": "b"\n[1, 2]\n\n{"item_id": "c"}\n',
                                    encoding="utf-8")
    inputs = load_inputs(embedded_run)
    assert [it["item_id"] for it in inputs.items] == ["a", "c"] and inputs.generations is None
    assert inputs.notes == ["items.jsonl: 2 unreadable line(s) skipped"]


# --------------------------------------------------------------------------- plots and the notebook

def test_plots_use_ascii_labels(embedded_run):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    inputs = load_inputs(embedded_run)
    _local_card(embedded_run)
    inputs = load_inputs(embedded_run)
    training = training_costs(inputs, "auto")
    local = local_costs(inputs, training[MINI].epochs)
    work = measure_workload(inputs)
    figs = [plot_training(training, local),
            plot_what_if(what_if(inputs, MINI, [1, 3], local)),
            plot_inference(inference_costs(inputs, work))]
    try:
        for fig in figs:
            for ax in fig.axes:
                texts = [ax.get_title(), ax.get_xlabel(), ax.get_ylabel(),
                         *[t.get_text() for t in ax.get_yticklabels() + ax.texts]]
                if ax.get_legend():
                    texts += [t.get_text() for t in ax.get_legend().get_texts()]
                assert all(t.isascii() for t in texts), [t for t in texts if not t.isascii()]
        assert "(estimate)" in figs[0].axes[0].get_title()
    finally:
        for fig in figs:
            plt.close(fig)


NEW_05_NAMES = {"gpu_hourly_usd", "local_tokens_per_s", "replies_per_estimate", "what_if_epochs"}


def test_notebook_05_contract():
    path = ROOT / "notebooks" / "05_cost.ipynb"
    nb = nbformat.read(str(path), as_version=4)
    assert nb.metadata["kernelspec"] == {"name": "kokoro", "display_name": "Python (kokoro .venv)",
                                         "language": "python"}
    assert [c["id"] for c in nb.cells] == [f"nb05-{i:02d}" for i in range(len(nb.cells))]
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    for line in params[0].source.splitlines():
        if "#" in line:
            comment = line.split("#", 1)[1]
            assert "'" not in comment and "=" not in comment, line      # papermill cannot parse them
    from kokoro_helpers.report.index import declared_parameters
    names = declared_parameters(path)
    assert {"run_dir", "seed", "prices_file", "n_epochs", "openai_base_model", "max_example_tokens"} | NEW_05_NAMES <= names
    for params_file in ("default.yaml", "kokorochat.yaml"):
        text = (ROOT / "params" / params_file).read_text(encoding="utf-8")
        block = yaml.safe_load(text.split("# --- 05_cost ---", 1)[1])
        assert set(block) == NEW_05_NAMES, params_file
        assert set(yaml.safe_load(text)) >= NEW_05_NAMES


def test_key_figure_rows_name_the_date_and_the_counter(embedded_run):
    _, summary = build_summary(embedded_run)
    rows = dict(key_figure_rows(summary))
    assert "2026-11" in rows["prices as of"] and "assumption" in rows["prices as of"]
    assert rows["token counter"] == EST
    assert rows["seeds' estimate → corrected (JPY total)"].startswith("¥7,914 → ¥55,124")
    assert any(k.startswith(f"training: {MINI}") for k in rows)
