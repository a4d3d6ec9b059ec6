"""02_finetune in its own kernel (papermill), with a key whose job creation is refused: Part A ends in
one message, Part B still runs, and Part A's outcome is recorded for the report index.

The fake (tests/fake_openai.py) is served over loopback HTTP; the notebook's SDK reaches it through
OPENAI_BASE_URL, exactly as `make report` would reach OpenAI. Part B runs with local_mode="off" here
(its cells still execute) to keep the test short on a CPU."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fake_openai import FakeOpenAI, serve

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-" + "proj-REFUSEDkeyREFUSEDkey0123456789abcd"


@pytest.fixture
def refused_server():
    fake = FakeOpenAI(refuse_creation=True)
    url, stop = serve(fake)
    yield fake, url
    stop()


def test_a_refused_part_a_never_stops_part_b(tmp_path, refused_server, monkeypatch):
    papermill = pytest.importorskip("papermill")
    fake, url = refused_server
    run_dir = tmp_path / "run"
    monkeypatch.setenv("KOKORO_TIKTOKEN_OFFLINE", "1")
    monkeypatch.delenv("KOKORO_OPENAI_DRY_RUN", raising=False)
    from kokoro_helpers.data.pipeline import prepare_data
    from kokoro_helpers.data.tokens import estimate_counter
    prepare_data(run_dir=str(run_dir), progress=False, token_counter=estimate_counter())
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "02.ipynb"
    papermill.execute_notebook(str(ROOT / "notebooks" / "02_finetune.ipynb"), str(out), cwd=str(ROOT / "notebooks"),
                               parameters={"run_dir": str(run_dir), "local_mode": "off", "poll_seconds": 0},
                               kernel_name="python3", progress_bar=False)
    nb = json.loads(out.read_text(encoding="utf-8"))
    text = "".join("".join(o.get("text", "")) + json.dumps(o.get("data", {}), ensure_ascii=False)
                   + "".join(o.get("traceback", []))
                   for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", []))
    assert fake.count("POST", "/fine_tuning/jobs") == 1 and not fake.jobs
    assert "refused to create the fine-tuning job" in text and "2027-01-06" in text
    assert "Traceback" not in text and "BadRequestError" not in text
    assert KEY not in text and KEY not in out.read_text(encoding="utf-8")
    outcome = json.loads((run_dir / "openai" / "outcome.json").read_text(encoding="utf-8"))
    assert outcome["status"] == "refused"
    # the last cell (Part B's) ran
    last = [c for c in nb["cells"] if c["cell_type"] == "code"][-1]
    assert last.get("execution_count") is not None


def test_the_same_cells_fine_tune_on_azure(tmp_path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    from fake_openai import AZURE_API_VERSION
    azure_key = "azure-KOKORO-notebook-key-77777777"
    fake = FakeOpenAI(azure=True, key=azure_key)
    url, stop = serve(fake)
    try:
        run_dir = tmp_path / "run"
        monkeypatch.setenv("KOKORO_TIKTOKEN_OFFLINE", "1")
        monkeypatch.delenv("KOKORO_OPENAI_DRY_RUN", raising=False)
        from kokoro_helpers.data.pipeline import prepare_data
        from kokoro_helpers.data.tokens import estimate_counter
        prepare_data(run_dir=str(run_dir), progress=False, token_counter=estimate_counter())
        monkeypatch.setenv("OPENAI_API_KEY", "")
        monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", url.removesuffix("/v1"))
        monkeypatch.setenv("AZURE_OPENAI_API_KEY", azure_key)
        monkeypatch.setenv("OPENAI_API_VERSION", AZURE_API_VERSION)
        monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = tmp_path / "02.ipynb"
        papermill.execute_notebook(str(ROOT / "notebooks" / "02_finetune.ipynb"), str(out),
                                   cwd=str(ROOT / "notebooks"), kernel_name="python3", progress_bar=False,
                                   parameters={"run_dir": str(run_dir), "local_mode": "off", "poll_seconds": 0,
                                               "openai_provider": "azure", "azure_deployment": "kokoro-ft"})
    finally:
        stop()
    nb_text = out.read_text(encoding="utf-8")
    assert fake.count("POST", "/fine_tuning/jobs") == 1 and fake.count("POST", "/files") == 2
    (card_file,) = (run_dir / "models").glob("openai-*.json")
    card = json.loads(card_file.read_text(encoding="utf-8"))
    assert card["provider"] == "azure" and card["status"] == "succeeded" and card["azure_deployment"] == "kokoro-ft"
    assert json.loads((run_dir / "openai" / "outcome.json").read_text())["status"] == "succeeded"
    assert "Azure OpenAI" in nb_text and "Traceback" not in nb_text and azure_key not in nb_text
