"""The README's real run on a CPU-only machine without a key: `make report
PARAMS=params/kokorochat.yaml SET="dataset_source=<folder>"` — here on a folder of the project's
sample dialogues. Nothing is trained (a Hub-size model needs a GPU, OpenAI stays in dry run), so
03 has no model to evaluate: it must pass, say what it skipped and why, and still run the
dialogue-level steps. Runs the project's own notebooks through the report runner (papermill)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kokoro_helpers.report import index as report
from kokoro_helpers.paths import SAMPLE_DIR

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project_copy(tmp_path, monkeypatch):
    """A throwaway project root with the real params and notebooks, and a folder of sample dialogues
    named like the release's."""
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    shutil.copytree(ROOT / "params", tmp_path / "params")
    (tmp_path / "notebooks").mkdir()
    for nb in sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):      # every step, as make report
        shutil.copy(ROOT / "notebooks" / nb, tmp_path / "notebooks" / nb)
    folder = tmp_path / "kokorochat_dialogues"
    shutil.copytree(SAMPLE_DIR, folder)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))          # the kernels import this checkout's package
    monkeypatch.setenv("KOKORO_OPENAI_DRY_RUN", "1")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    return tmp_path, folder


def _outputs(nb_path: Path) -> dict[str, str]:
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    out = {}
    for cell in nb["cells"]:
        texts = []
        for o in cell.get("outputs", []):
            t = o.get("text") or o.get("data", {}).get("text/plain") or ""
            texts.append("".join(t) if isinstance(t, list) else t)
        out[cell.get("id")] = "\n".join(texts)
    return out


def test_kokorochat_params_on_a_folder_without_gpu_or_key(project_copy):
    root, folder = project_copy
    code = report.run_report("params/kokorochat.yaml",
                             overrides={"dataset_source": str(folder), "run_dir": str(root / "runs" / "kokorochat"),
                                        "local_mode": "auto"})
    assert code == 0
    out = _outputs(root / "reports" / "kokorochat" / "03_eval.ipynb")
    assert "No model replied: no model card" in out["nb03-07"] and "02_finetune trained or submitted nothing" in out["nb03-07"]
    assert "Automatic metrics skipped: no model replied" in out["nb03-10"]
    assert "no LLM judge configured" in out["nb03-15"]
    assert "Judge validity skipped: no judge configured" in out["nb03-29"]
    assert "Paired comparisons skipped" in out["nb03-39"]
    assert "test sessions the predictor's MAE" in out["nb03-33"]          # dialogue-level steps still run
    assert "LLM score regressor: SKIPPED" in out["nb03-41"] and "needs a GPU" in out["nb03-41"]
    run = root / "runs" / "kokorochat" / "eval"
    pred = json.loads((run / "score_prediction.json").read_text())
    assert pred["targets"]["score"]["test"]["n"] == 5
    assert not (run / "paired.csv").exists() and not (run / "metrics.csv").exists()
    index = (root / "reports" / "kokorochat" / "index.html").read_text(encoding="utf-8")
    assert "Score prediction" in index
