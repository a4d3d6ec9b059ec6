"""Both widgets in a real browser: JupyterLab driven by Debian's chromium through playwright.

Score an item with the mouse and submit it with Ctrl+Enter, save, restart the kernel and reload
the page (the saved notebook shows "run this cell to score" where the widget was), run the cell
again and see scoring resume; send a chat message with Ctrl+Enter and watch the reply stream in.

Skipped where chromium or playwright is missing (CI installs both: ``apt-get install chromium``
and the ``playwright`` package; playwright's own browser download is not used).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import stop

CHROMIUM = next((p for p in (os.environ.get("KOKORO_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser"), "/usr/bin/chromium") if p and Path(p).exists()), None)
if CHROMIUM is None:
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("jupyterlab")

ROOT = Path(__file__).resolve().parents[1]
PIECES = ["最近", "眠れない", "のですね。", "お話を", "聞かせてください。"]

SCORE_CELL = """\
from kokoro_helpers.evaluation.scoring_widget import ScoringWidget
context = [{"role": ("user", "assistant")[k % 2], "content": f"発話{k}。" + "長い話です。" * 60} for k in range(7)]
items = [{"item_id": f"item-{i}", "model": m, "context": context + [{"role": "user", "content": f"相談{i}です。"}],
          "reference": "参照の応答です。" * 20, "response": f"{m} の応答 {i}。" + "丁寧な返答です。" * 80}
         for i in range(3) for m in ("x", "y")]
ScoringWidget(items, STORE, "browser")"""

CHAT_CELL = f"""\
import time
from kokoro_helpers.models.base import FunctionChatModel
from kokoro_helpers.models.chat_widget import ChatWidget

class SlowStream(FunctionChatModel):  # streams like a local model, slowly enough to watch
    streams = True

    def stream(self, messages, **settings):
        for piece in {PIECES!r}:
            time.sleep(0.4)
            yield piece

ChatWidget(models={{"slow": SlowStream(lambda messages, **s: "", name="slow")}}, system_prompt="", stream_refresh_s=0.0)"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a free loopback port, serving a folder with the test notebook."""
    folder = tmp_path_factory.mktemp("lab")
    nb = nbformat.v4.new_notebook()
    score_cell = SCORE_CELL.replace("STORE", repr(str(folder / "scores")))
    nb.cells = [nbformat.v4.new_code_cell(score_cell), nbformat.v4.new_code_cell(CHAT_CELL)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / "widgets.ipynb")
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "JUPYTER_PLATFORM_DIRS": "1",
           "JUPYTER_CONFIG_DIR": str(folder / ".jupyter-config"), "JUPYTER_RUNTIME_DIR": str(folder / ".runtime")}
    proc = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
                             "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
                             f"--ServerApp.root_dir={folder}", "--LabApp.expose_app_in_browser=True",
                             "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                             "--allow-root"],
                            cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    import urllib.request
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"JupyterLab did not start: {proc.stdout.read()[-3000:]}")
        time.sleep(0.3)
    try:
        yield {"url": url, "token": token, "folder": folder}
    finally:
        stop(proc, 15)


@pytest.fixture(scope="module")
def page(lab):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        context = browser.new_context(viewport={"width": 1280, "height": 1000})
        # nothing leaves the machine (the HTML export links a CDN): refuse every other address at once
        context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(
            (lab["url"], "file:")) else route.abort())
        pg = context.new_page()
        pg.set_default_timeout(60_000)
        try:
            yield pg
        finally:
            browser.close()


def _open(page, lab) -> None:
    page.goto(f"{lab['url']}/lab/tree/widgets.ipynb?token={lab['token']}")
    page.wait_for_function("window.jupyterapp && window.jupyterapp.shell.currentWidget "
                           "&& window.jupyterapp.shell.currentWidget.sessionContext "
                           "&& window.jupyterapp.shell.currentWidget.sessionContext.session "
                           "&& window.jupyterapp.shell.currentWidget.sessionContext.session.kernel "
                           "&& window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'",
                           timeout=120_000)


def _run_cell(page, index: int) -> None:
    page.evaluate(f"""async () => {{
        const panel = window.jupyterapp.shell.currentWidget;
        panel.content.activeCellIndex = {index};
        await window.jupyterapp.commands.execute('notebook:run-cell');
    }}""")


def _scores(lab) -> list[dict]:
    path = lab["folder"] / "scores" / "browser.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def test_score_restart_reopen_and_resume_then_chat_streams(lab, page):
    _open(page, lab)
    _run_cell(page, 0)
    form = page.locator(".kokoro-live").first
    form.locator("text=項目 1 / 6").wait_for()
    # one click per criterion; the chosen button is filled and reads "✔ n"; a second click clears it
    rows = form.locator(".widget-hbox:has(> .widget-hbox > button.widget-button)")
    rows.nth(0).locator("button", has_text="4").click()
    expect(rows.nth(0).locator("button.mod-primary")).to_have_text("✔ 4")
    rows.nth(0).locator("button", has_text="4").click()
    expect(rows.nth(0).locator("button.mod-primary")).to_have_count(0)
    for i, score in enumerate((4, 3, 5)):
        rows.nth(i).locator("button", has_text=str(score)).click()
        expect(rows.nth(i).locator("button.mod-primary")).to_have_text(f"✔ {score}")
    # long texts: the reply to score and the submit button are on screen without scrolling (1000-px
    # window); the earlier context is collapsed and opens on a click
    earlier = form.locator("details summary")
    expect(earlier).to_contain_text("6")
    submit = form.locator("button.kokoro-primary")
    box = submit.bounding_box()
    assert box is not None and box["y"] + box["height"] <= 1000
    assert form.locator("button", has_text="参照応答 (reference)").evaluate("b => b.scrollWidth <= b.clientWidth")
    if os.environ.get("KOKORO_BROWSER_SHOTS"):
        page.screenshot(path=os.path.join(os.environ["KOKORO_BROWSER_SHOTS"], "scoring.png"))
    form.locator("textarea").fill("丁寧")
    form.locator("textarea").press("Control+Enter")                 # submit from the keyboard
    form.locator("text=採点済み (scored) 1 / 6").wait_for()
    [record] = _scores(lab)
    assert record["scores"] == {"accuracy": 4, "relevance": 3, "expertise": 5} and record["comment"] == "丁寧"

    # save, restart the kernel, reopen the page: the saved widget output explains itself
    page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
    page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.restart()")
    page.reload()
    _open(page, lab)
    note = page.locator(".kokoro-offline-note").first
    note.wait_for(state="visible")
    assert "run this cell to score" in note.inner_text()
    error = page.locator(".jp-OutputArea-output.jupyter-widgets", has_text="Error displaying widget")
    error.first.wait_for(state="attached")                           # JupyterLab's own line is there...
    expect(error.first).to_be_hidden()                               # ...but the note stands in its place
    if os.environ.get("KOKORO_BROWSER_SHOTS"):
        page.screenshot(path=os.path.join(os.environ["KOKORO_BROWSER_SHOTS"], "reopened.png"))
    _run_cell(page, 0)                                               # resumes where it stopped
    form = page.locator(".kokoro-live").first
    form.locator("text=採点済み (scored) 1 / 6").wait_for()
    expect(page.locator(".kokoro-offline-note:visible")).to_have_count(0)
    assert len(_scores(lab)) == 1
    # Ctrl+Enter with the focus on a score button submits too, and JupyterLab does not re-run the cell
    rows = form.locator(".widget-hbox:has(> .widget-hbox > button.widget-button)")
    for i, score in enumerate((1, 2, 0)):
        rows.nth(i).locator("button", has_text=str(score)).click()
        expect(rows.nth(i).locator("button.mod-primary")).to_have_text(f"✔ {score}")
    rows.nth(2).locator("button.mod-primary").press("Control+Enter")
    form.locator("text=採点済み (scored) 2 / 6").wait_for()
    assert [r["scores"] for r in _scores(lab)][1] == {"accuracy": 1, "relevance": 2, "expertise": 0}
    expect(page.locator(".jp-Cell").first.locator(".jp-InputPrompt")).to_contain_text("[1]")

    # the chat: Ctrl+Enter sends, and the reply arrives piece by piece
    _run_cell(page, 1)
    chat = page.locator(".kokoro-live").nth(1)
    chat.locator("textarea").wait_for()
    chat.evaluate("""root => {
        window.__kokoroSeen = [];
        new MutationObserver(() => window.__kokoroSeen.push(root.innerText))
            .observe(root, {subtree: true, childList: true, characterData: true});
    }""")
    chat.locator("textarea").fill("眠れません")
    chat.locator("textarea").press("Control+Enter")
    full = "".join(PIECES)
    chat.locator(f"text={full}").wait_for()
    seen = page.evaluate("window.__kokoroSeen")
    partial = [t for t in seen if PIECES[0] in t and full not in t]
    assert partial, "the reply appeared all at once: it did not stream"
    assert chat.locator("textarea").input_value() == ""
    if os.environ.get("KOKORO_BROWSER_SHOTS"):
        page.screenshot(path=os.path.join(os.environ["KOKORO_BROWSER_SHOTS"], "chat.png"), full_page=True)

    # the HTML report of the saved notebook (as `make report` renders it): both notes, no blank widget
    page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
    from kokoro_helpers.report.index import render_html
    deadline = time.monotonic() + 30
    while "run this cell to chat" not in (lab["folder"] / "widgets.ipynb").read_text(encoding="utf-8"):
        assert time.monotonic() < deadline, "the notebook was not saved"
        time.sleep(0.2)
    html_path = render_html(lab["folder"] / "widgets.ipynb")
    page.goto(html_path.as_uri(), wait_until="domcontentloaded")
    notes = page.locator(".kokoro-offline-note")
    expect(notes).to_have_count(2)
    expect(notes.nth(0)).to_contain_text("run this cell to score")
    expect(notes.nth(1)).to_contain_text("run this cell to chat")
    expect(page.locator(".jp-OutputArea-output.jupyter-widgets").first).to_be_hidden()
