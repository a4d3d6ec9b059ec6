"""`make report`: run the notebooks with papermill, render HTML, write an index.

    python -m kokoro_helpers.report --params params/default.yaml [--only 01 [--only 03]]

Each notebook `notebooks/NN_*.ipynb` that exists runs in order with the parameters of the file
(each notebook receives the names its `parameters` cell declares; a name that no notebook
declares is reported as a likely typo) into `reports/<run_name>/NN_*.ipynb`, is rendered to
`.html`, and `reports/<run_name>/index.html` links them with the run's key figures. A failing
cell stops the run with papermill's error and a non-zero exit (the failed notebook is still
rendered, so the error can be read in the browser).
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .params import load_params, run_name
from .paths import project_root, resolve

KERNEL_NAME = "kokoro"


@dataclass
class NotebookRun:
    name: str            # e.g. 01_data
    output: Path
    html: Path
    status: str = "not run"   # ok | failed | not run
    seconds: float = 0.0
    error: str = ""
    images: list[str] = field(default_factory=list)   # base64 PNGs from the executed notebook


def notebooks(root: Path | None = None) -> list[Path]:
    """The numbered notebooks that exist, in order."""
    folder = (root or project_root()) / "notebooks"
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb"))


def declared_parameters(path: Path) -> set[str]:
    import papermill as pm
    return set(pm.inspect_notebook(str(path)).keys())


def kernel_name() -> str:
    """The project's kernel (installed into .venv by `make setup`), else python3 with a warning."""
    from jupyter_client.kernelspec import KernelSpecManager
    if KERNEL_NAME in KernelSpecManager().find_kernel_specs():
        return KERNEL_NAME
    print(f"warning: Jupyter kernel '{KERNEL_NAME}' not found (run `make setup`); using python3", file=sys.stderr)
    return "python3"


def _images(nb_path: Path, limit: int = 6) -> list[str]:
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    out = []
    for cell in nb.get("cells", []):
        for o in cell.get("outputs", []):
            png = o.get("data", {}).get("image/png")
            if png:
                out.append(png if isinstance(png, str) else "".join(png))
    return out[:limit]


def render_html(nb_path: Path) -> Path:
    from nbconvert import HTMLExporter
    import nbformat
    body, _ = HTMLExporter().from_notebook_node(nbformat.read(str(nb_path), as_version=4))
    out = nb_path.with_suffix(".html")
    out.write_text(body, encoding="utf-8")
    return out


# ---- key figures for the index, read from what the notebooks wrote into run_dir ----------------

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table class='kv'>{cells}</table>"


def key_figures(run_dir: Path) -> dict[str, str]:
    """notebook prefix (01..05) -> an HTML fragment of that step's key figures."""
    out: dict[str, str] = {}
    stats = _read_json(run_dir / "data" / "stats.json")
    if stats:
        splits = stats.get("splits", {})
        tokens = stats.get("tokens", {})
        label = " (estimate)" if str(stats.get("token_counter", "")).startswith("estimate") else ""
        out["01"] = _table([
            ("dialogues in / kept", f"{stats.get('dialogues_in')} / {stats.get('dialogues_kept')}"),
            ("rejected", ", ".join(f"{k}: {v}" for k, v in stats.get("rejected", {}).items()) or "none"),
            ("splits (train / valid / test)", " / ".join(str(splits.get(k)) for k in ("train", "valid", "test"))),
            (f"tokens{label}", " / ".join(f"{tokens.get(k, 0):,}" for k in ("train", "valid", "test"))),
            ("format errors", sum(stats.get("format_errors", {}).values())),
        ])
    models = run_dir / "models"
    rows = []
    for card_file in sorted(models.glob("*.json")) if models.is_dir() else []:
        card = _read_json(card_file) or {}
        metrics = card.get("training_metrics") or {}
        if card.get("kind") == "local_lora" and metrics:
            detail = (f"held-out loss base {metrics.get('base_valid_loss', float('nan')):.3f} → "
                      f"adapter {metrics.get('adapter_valid_loss', float('nan')):.3f}")
        else:
            detail = f"status {card.get('status', 'n/a')}"
        rows.append((f"{card.get('kind', '?')}: {card.get('model_id', card_file.stem)}", detail))
    request = _read_json(run_dir / "openai" / "job_request.json")
    if request:
        est = request.get("estimate", request)
        rows.append(("OpenAI job request", f"estimated ${est.get('estimated_cost_usd', '?')} "
                                          f"({est.get('billed_tokens', '?')} billed tokens, {est.get('epochs', '?')} epochs)"))
    if rows:
        out["02"] = _table(rows)
    metrics_csv = run_dir / "eval" / "metrics.csv"
    if metrics_csv.is_file():
        import pandas as pd
        out["03"] = pd.read_csv(metrics_csv).round(3).to_html(index=False, classes="metrics")
    cost = _read_json(run_dir / "cost" / "summary.json")
    if cost:
        rows = [(m, f"${v.get('usd', 0):,.2f} / ¥{v.get('jpy', 0):,.0f} ({v.get('billed_tokens', 0):,} tokens, {v.get('epochs')} epochs)")
                for m, v in (cost.get("training") or {}).items()]
        out["05"] = _table(rows + [("prices as of", cost.get("prices_as_of"))])
    return out


INDEX_CSS = """body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left}
th{background:#f5f5f5}.ok{color:#1a7f37}.failed{color:#cf222e}img{max-width:100%;border:1px solid #eee;margin:.3em 0}
section{border-top:1px solid #ccc;margin-top:1.5em}code{background:#f5f5f5;padding:0 .2em}"""


def write_index(out_dir: Path, runs: list[NotebookRun], params: dict[str, Any], params_path: str) -> Path:
    run_dir = resolve(params.get("run_dir", "runs/default"))
    stats = _read_json(run_dir / "data" / "stats.json") or {}
    figures = key_figures(run_dir)
    head = [("parameter file", params_path), ("run_dir", str(params.get("run_dir"))),
            ("token counter", stats.get("token_counter", "n/a")),
            ("generated", time.strftime("%Y-%m-%d %H:%M:%S"))]
    for split, sha in (stats.get("data_sha256") or {}).items():
        head.append((f"data sha256 ({split})", sha))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Report: {html.escape(out_dir.name)}</title>"
             f"<style>{INDEX_CSS}</style></head><body>",
             f"<h1>KokoroChat fine-tuning report — <code>{html.escape(out_dir.name)}</code></h1>",
             _table(head),
             "<details><summary>all parameters</summary><pre>"
             + html.escape(json.dumps(params, ensure_ascii=False, indent=2)) + "</pre></details>"]
    for r in runs:
        status = f"<span class='{r.status}'>{r.status}</span>" + (f" in {r.seconds:.0f} s" if r.seconds else "")
        parts.append(f"<section><h2><a href='{html.escape(r.html.name)}'>{html.escape(r.name)}</a> — {status}</h2>")
        if r.error:
            parts.append(f"<pre class='failed'>{html.escape(r.error[-3000:])}</pre>")
        parts.append(figures.get(r.name[:2], ""))
        parts.extend(f"<img src='data:image/png;base64,{png}'>" for png in r.images)
        parts.append("</section>")
    parts.append("</body></html>")
    index = out_dir / "index.html"
    index.write_text("\n".join(parts), encoding="utf-8")
    return index


def run_report(params_path: str, only: list[str] | None = None) -> int:
    import papermill as pm

    params = load_params(params_path)
    root = project_root()
    out_dir = root / "reports" / run_name(params, params_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    books = [p for p in notebooks(root) if not only or p.name[:2] in only]
    if not books:
        print(f"no notebooks match {only}", file=sys.stderr)
        return 2
    declared = {p: declared_parameters(p) for p in notebooks(root)}
    unused = set(params) - set().union(*declared.values()) - {"run_name"}
    if unused:
        print(f"warning: no notebook declares {sorted(unused)} — a typo in {params_path}?", file=sys.stderr)
    kernel = kernel_name()
    runs: list[NotebookRun] = []
    code = 0
    for nb in books:
        r = NotebookRun(nb.stem, out_dir / nb.name, out_dir / f"{nb.stem}.html")
        runs.append(r)
        if code:
            continue
        print(f"== {nb.stem}", flush=True)
        t0 = time.perf_counter()
        try:
            pm.execute_notebook(str(nb), str(r.output), kernel_name=kernel, cwd=str(nb.parent),
                                parameters={k: v for k, v in params.items() if k in declared[nb]},
                                progress_bar=sys.stderr.isatty(), log_output=False)
            r.status = "ok"
        except pm.PapermillExecutionError as exc:
            r.status, r.error, code = "failed", str(exc), 1
            print(f"{nb.name} failed: {exc}", file=sys.stderr)
        r.seconds = time.perf_counter() - t0
        if r.output.is_file():
            render_html(r.output)
            r.images = _images(r.output)
    index = write_index(out_dir, runs, params, params_path)
    print(f"report: {index}" + (" (FAILED)" if code else ""))
    return code


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the notebooks with a parameter file (papermill) and write reports/<run>/.")
    ap.add_argument("--params", default="params/default.yaml")
    ap.add_argument("--only", action="append", help="notebook number(s) to run, e.g. --only 01")
    args = ap.parse_args(argv)
    try:
        return run_report(args.params, args.only)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
