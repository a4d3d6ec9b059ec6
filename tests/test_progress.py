"""Progress bars in a real kernel: a finished bar is saved as its final text, not as a widget."""
from __future__ import annotations

import nbformat
from nbclient import NotebookClient

from kokoro_helpers.progress import tqdm


def run_cells(*sources: str) -> list[dict]:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    return [out for cell in nb.cells for out in cell.outputs]


def test_a_finished_bar_is_stored_as_text_and_an_unfinished_one_too():
    outputs = run_cells(
        "from kokoro_helpers.progress import tqdm\nfor _ in tqdm(range(5), desc='encode'): pass",
        "bar = tqdm(total=4, desc='judge', unit='item'); bar.update(2); bar.close()",
        "for _ in tqdm(range(3), desc='quiet', leave=False): pass",
    )
    assert outputs, "the bars displayed nothing"
    bundles = [o.get("data", {}) for o in outputs if o["output_type"] in ("display_data", "execute_result")]
    assert not any("application/vnd.jupyter.widget-view+json" in b for b in bundles)   # nothing to break on reopen
    texts = [b.get("text/plain", "") for b in bundles]
    assert any(t.startswith("encode: 100%") and "5/5" in t for t in texts), texts
    assert any(t.startswith("judge:  50%") and "2/4" in t for t in texts), texts
    assert not any("quiet" in t for t in texts)                                         # leave=False leaves nothing


def test_outside_a_notebook_it_is_the_terminal_bar(capsys):
    for _ in tqdm(range(3), desc="cli"):
        pass
    assert "cli: 100%" in capsys.readouterr().err
    from tqdm.notebook import tqdm as notebook_tqdm
    assert not issubclass(tqdm, notebook_tqdm)
