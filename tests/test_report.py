"""make report's runner: parameters routed per notebook, failures stop with non-zero exit, index."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from kokoro_helpers.report import index as report
from kokoro_helpers.params import parse_overrides
from kokoro_helpers.data.pipeline import prepare_data


def _notebook(path: Path, params_src: str, body: str) -> None:
    cell = nbformat.v4.new_code_cell(params_src)
    cell.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_code_cell(body)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


@pytest.fixture
def mini_project(tmp_path, monkeypatch):
    """A throwaway project root: pyproject.toml, params/, notebooks/ — the runner's whole world."""
    (tmp_path / "pyproject.toml").write_text("[project]\nname='x'\n")
    (tmp_path / "params").mkdir()
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_runs_notebooks_in_order_with_their_own_parameters(mini_project):
    nbs = mini_project / "notebooks"
    _notebook(nbs / "01_first.ipynb", "a = 1\nrun_dir = 'runs/x'",
              "import pathlib; pathlib.Path('../seen_a.txt').write_text(str(a))")
    _notebook(nbs / "02_second.ipynb", "b = 1",
              "import pathlib; assert pathlib.Path('../seen_a.txt').exists(); pathlib.Path('../seen_b.txt').write_text(str(b))")
    (mini_project / "params" / "p.yaml").write_text("run_dir: runs/x\na: 7\nb: 8\ntypo_name: 1\n")
    assert report.run_report("params/p.yaml") == 0
    assert (mini_project / "seen_a.txt").read_text() == "7"
    assert (mini_project / "seen_b.txt").read_text() == "8"
    out = mini_project / "reports" / "x"
    for stem in ("01_first", "02_second"):
        assert (out / f"{stem}.ipynb").is_file() and (out / f"{stem}.html").is_file()
    index = (out / "index.html").read_text()
    assert "01_first.html" in index and "02_second.html" in index
    executed = json.loads((out / "02_second.ipynb").read_text())
    injected = [c for c in executed["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert "b = 8" in "".join(injected[0]["source"]) and "a = " not in "".join(injected[0]["source"])


def test_failing_cell_stops_with_nonzero_exit_and_keeps_the_error(mini_project, capsys):
    nbs = mini_project / "notebooks"
    _notebook(nbs / "01_fails.ipynb", "x = 1", "raise RuntimeError('boom in cell')")
    _notebook(nbs / "02_never.ipynb", "y = 1", "open('../ran_02', 'w').close()")
    (mini_project / "params" / "p.yaml").write_text("run_dir: runs/f\n")
    assert report.run_report("params/p.yaml") == 1
    assert "boom in cell" in capsys.readouterr().err
    assert not (mini_project / "ran_02").exists()
    out = mini_project / "reports" / "f"
    assert (out / "01_fails.html").is_file()
    index = (out / "index.html").read_text()
    assert "failed" in index and "boom in cell" in index and "02_never" in index


def test_missing_params_file_is_a_clear_error(mini_project, capsys):
    assert report.main(["--params", "params/nope.yaml"]) == 2
    assert "parameter file not found" in capsys.readouterr().err


def test_key_figures_and_index_list_every_notebook(tmp_path):
    run_dir = tmp_path / "run"
    prepare_data(run_dir=str(run_dir), progress=False)
    figs = report.key_figures(run_dir)
    assert "49 / 49" in figs["01"]
    runs = [report.NotebookRun(n, tmp_path / f"{n}.ipynb", tmp_path / f"{n}.html", status="ok")
            for n in ("01_data", "02_finetune", "03_eval", "04_local_lora_inference", "05_cost")]
    index = report.write_index(tmp_path, runs, {"run_dir": str(run_dir)}, "params/x.yaml").read_text()
    for r in runs:
        assert f"href='{r.name}.html'" in index
    stats = json.loads((run_dir / "data" / "stats.json").read_text())
    assert stats["data_sha256"]["train"] in index and stats["token_counter"] in index


def test_project_notebooks_declare_the_shared_names():
    for nb in report.notebooks():
        names = report.declared_parameters(nb)
        assert {"run_dir", "seed"} <= names, nb.name


def _write_artefacts_of_every_step(run_dir: Path) -> None:
    """What 02, 03 and 05 write, in their contract shapes (invented numbers, no KokoroChat text)."""
    from kokoro_helpers import cards
    from kokoro_helpers.report.cost_summary import build_summary

    local = cards.new_card("local_lora", "lora-tiny", "embedded:tiny", {"device": "cpu", "world_size": 1},
                           training_metrics={"train_tokens_per_s": 800.0, "wall_s": 12.5, "epochs": 3.0,
                                             "base_valid_loss": 5.432, "adapter_valid_loss": 4.321},
                           training_data={"train": {"tokens": 20_000}}, smoke_model=True, finished=True)
    cards.save_card(cards.card_path(run_dir, "lora-tiny"), local)
    ft = cards.new_card("openai", "ft:gpt-4o-mini-2024-07-18:org:kokoro-chat:abc", "gpt-4o-mini-2024-07-18",
                        {"epochs": 3}, job_id="ftjob-1", status="succeeded", trained_tokens=80_000,
                        actual_cost={"usd": 0.24, "jpy": 37.2},
                        training_metrics={"final_train_loss": 1.234, "final_valid_loss": 1.567})
    cards.save_card(cards.card_path(run_dir, "openai-kokoro-chat-ftjob-1"), ft)
    (run_dir / "openai").mkdir(parents=True, exist_ok=True)
    (run_dir / "openai" / "job_request.json").write_text(json.dumps(
        {"mode": "dry_run", "billed_tokens": 79_818, "epochs": 3, "estimated_cost_usd": 0.239454,
         "is_estimate": True}))
    ev = run_dir / "eval"
    ev.mkdir(parents=True, exist_ok=True)
    (ev / "metrics.csv").write_text("model,chrf,bleu,rouge_l\nlora-tiny,12.3456,1.2,0.2345\n")
    (ev / "human_summary.csv").write_text(
        "model,criterion,n,mean,sd,ci_low,ci_high,n_raters,n_items,n_demo\n"
        "lora-tiny,accuracy,4,2.5,0.5,1.7,3.3,2,2,0\nlora-tiny,empathy,4,3.25,0.5,2.4,4.1,2,2,0\n")
    build_summary(run_dir)


def test_index_opens_with_parameters_and_shows_key_figures_of_every_step(tmp_path):
    run_dir = tmp_path / "run"
    prepare_data(run_dir=str(run_dir), progress=False)
    _write_artefacts_of_every_step(run_dir)
    figs = report.key_figures(run_dir)
    assert set(figs) == {"01", "02", "03", "05"}
    assert "held-out loss: base 5.432 → adapter 4.321" in figs["02"] and "800 tokens/s on CPU (embedded smoke model)" in figs["02"]
    assert "80,000 trained tokens" in figs["02"] and "valid 1.567" in figs["02"]
    assert "OpenAI job request (dry_run)" in figs["02"] and "estimate" in figs["02"]
    assert "chrf" in figs["03"] and "12.346" in figs["03"]
    assert "Human scores" in figs["03"] and "empathy" in figs["03"] and "3.25" in figs["03"]
    assert "gpt-4o-mini-2024-07-18" in figs["05"] and "prices as of" in figs["05"] and "2026-11" in figs["05"]
    assert "estimate" in figs["05"] and "CPU (embedded smoke model)" in figs["05"]

    runs = [report.NotebookRun(n, tmp_path / f"{n}.ipynb", tmp_path / f"{n}.html", status="ok")
            for n in ("01_data", "02_finetune", "03_eval", "04_local_lora_inference", "05_cost")]
    params = {"run_dir": str(run_dir), "seed": 42, "n_epochs": "auto", "what_if_epochs": [1, 2]}
    index = report.write_index(tmp_path, runs, params, "params/x.yaml").read_text()
    stats = json.loads((run_dir / "data" / "stats.json").read_text())
    first_section = index.index("<section>")
    for head in ("params/x.yaml", stats["token_counter"], stats["data_sha256"]["train"], "n_epochs", "[1, 2]"):
        assert -1 < index.index(head) < first_section, head
    for r in runs:
        assert index.count(f"href='{r.name}.html'") >= 2, r.name       # the list and its section
    sections = index.split("<section>")[1:]
    assert [s.split("</a>")[0].rsplit(">", 1)[1] for s in sections] == [r.name for r in runs]
    assert "Human scores" in sections[2] and "prices as of" in sections[4]
    assert "No key figures recorded" in sections[3]


def test_index_summarizes_raw_human_scores_when_no_csv_was_exported(tmp_path):
    run_dir = tmp_path / "run"
    scores = run_dir / "eval" / "human_scores"
    scores.mkdir(parents=True)
    lines = [{"item_id": f"test:{i}", "model": "m1", "rater": "r1", "scores": {"empathy": 3 + i % 2},
              "comment": "", "time": "2026-11-01T00:00:00"} for i in range(4)]
    (scores / "r1.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    figs = report.key_figures(run_dir)
    assert "Human scores" in figs["03"] and "empathy" in figs["03"] and "3.5" in figs["03"]
    assert "eval/human_scores/*.jsonl" in figs["03"] and "DEMO" not in figs["03"]


def test_overrides_parse_as_yaml_and_reject_nonsense():
    assert parse_overrides(["max_samples=10", "dataset_source=data/x y", "min_score=null",
                                   "split_ratios=[8, 1, 1]"]) == {
        "max_samples": 10, "dataset_source": "data/x y", "min_score": None, "split_ratios": [8, 1, 1]}
    for bad in ("novalue", "=3", "bad key=1"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            parse_overrides([bad])


def test_override_reaches_the_notebook(mini_project):
    _notebook(mini_project / "notebooks" / "01_only.ipynb", "a = 1",
              "import pathlib; pathlib.Path('../seen.txt').write_text(repr(a))")
    (mini_project / "params" / "p.yaml").write_text("run_dir: runs/o\na: 7\n")
    assert report.main(["--params", "params/p.yaml", "--set", "a=[1, 2]"]) == 0
    assert (mini_project / "seen.txt").read_text() == "[1, 2]"


def test_index_shows_04_batching_demo(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "inference").mkdir(parents=True)
    (run_dir / "inference" / "batching.json").write_text(json.dumps({
        "model": "lora-tiny", "device": "cpu", "prompts": 16, "same_replies": 16, "label": "demo timing",
        "modes": {"batched (8 prompts per call)": {"calls": 2, "seconds": 0.5, "new tokens": 300, "tokens/s": 600.0},
                  "one prompt per call": {"calls": 16, "seconds": 1.5, "new tokens": 300, "tokens/s": 200.0}}}))
    fig = report.key_figures(run_dir)["04"]
    assert "600.0 new tokens/s" in fig and "16 / 16" in fig and "demo timing" in fig
