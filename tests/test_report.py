"""make report's runner: parameters routed per notebook, failures stop with non-zero exit, index."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from kokoro_helpers import report
from kokoro_helpers.data import prepare_data


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
