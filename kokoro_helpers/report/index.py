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
import html
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kokoro_helpers.jsonio import read_json, write_text_atomic
from kokoro_helpers.params import load_params, parse_overrides, run_name
from kokoro_helpers.paths import project_root, resolve

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
    write_text_atomic(out, body)
    return out


# ---- key figures for the index, read from what the notebooks wrote into run_dir ----------------

def _read_json(path: Path) -> Any:
    """The index never fails on a step's file: missing or unreadable reads as None."""
    try:
        return read_json(path)
    except ValueError:
        return None


def _table(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table class='kv'>{cells}</table>"


def key_figures(run_dir: Path) -> dict[str, str]:
    """notebook prefix (01..05) -> an HTML fragment of that step's key figures, read from what the
    notebooks wrote into run_dir: 01 dialogues, splits and tokens; 02 each model's training result
    and held-out loss, and the OpenAI request's estimate; 03 the metrics table and the human-score
    summary; 05 the cost table of cost/summary.json. A step without artefacts has no entry."""

    from kokoro_helpers.evaluation.eval_index import fmt_num as num, frame_html

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

    # 02: one row per model card (training result, held-out loss), then the OpenAI request's estimate
    models = run_dir / "models"
    rows = []
    for card_file in sorted(models.glob("*.json")) if models.is_dir() else []:
        card = _read_json(card_file) or {}
        metrics = card.get("training_metrics") or {}
        kind = card.get("kind", "openai")
        if kind == "local_lora":
            from kokoro_helpers.report.local_costs import device_label
            result = (f"{num(metrics.get('epochs'), '.1f')} epochs, {num(metrics.get('train_tokens_per_s'), ',.0f')} "
                      f"tokens/s on {device_label(card)[0]}, {num(metrics.get('wall_s'), ',.1f')} s"
                      + ("" if card.get("finished", True) else " — PARTIAL"))
            loss = (f"base {num(metrics.get('base_valid_loss'))} → adapter {num(metrics.get('adapter_valid_loss'))}"
                    if metrics else "n/a")
        else:
            actual = card.get("actual_cost") or {}
            result = f"status {card.get('status', 'n/a')}"
            if card.get("trained_tokens"):
                result += f", {int(card['trained_tokens']):,} trained tokens"
            if "usd" in actual:
                result += f", actual ${actual['usd']:,.2f}"
            valid = metrics.get("final_valid_loss", metrics.get("final_full_valid_loss"))
            loss = (f"train {num(metrics.get('final_train_loss'))}, valid {num(valid)}"
                    if metrics.get("final_train_loss") is not None or valid is not None else "n/a")
        rows.append((f"{kind}: {card.get('model_id') or card_file.stem}", f"{result}; held-out loss: {loss}"))
    request = _read_json(run_dir / "openai" / "job_request.json")
    if request:
        tag = "estimate" if request.get("is_estimate", True) else "computed"
        usd = request.get("estimated_cost_usd")
        rows.append((f"OpenAI job request ({request.get('mode', '?')})",
                     f"{tag}: ${usd:,.4f} for {request.get('billed_tokens', 0):,} billed tokens, "
                     f"{request.get('epochs', '?')} epochs" if isinstance(usd, (int, float)) else "no estimate"))
    outcome = _read_json(run_dir / "openai" / "outcome.json")   # Part A's outcome (openai_ft.PartA)
    if outcome:
        rows.append((f"Part A ({outcome.get('provider', 'openai')}): {outcome.get('status', '?')}",
                     str(outcome.get("message", ""))))
    if rows:
        out["02"] = _table(rows)

    # 03: automatic metrics and the human-score summary (score_summary.export_csv's human_summary.csv, or the
    # raw append-only scores when no CSV was exported)
    parts = []
    eval_dir = run_dir / "eval"
    metrics_csv = eval_dir / "metrics.csv"
    if metrics_csv.is_file():
        import pandas as pd
        parts.append("<h3>Automatic metrics</h3>" + frame_html(pd.read_csv(metrics_csv).round(3)))
    summary_csv = next(iter(sorted(eval_dir.rglob("*human_summary.csv"))), None) if eval_dir.is_dir() else None
    human = None
    source = ""
    if summary_csv is not None:
        import pandas as pd
        try:
            human, source = pd.read_csv(summary_csv), str(summary_csv.relative_to(run_dir))
        except (OSError, ValueError):
            human = None
    elif (eval_dir / "human_scores").is_dir() and any((eval_dir / "human_scores").glob("*.jsonl")):
        from kokoro_helpers.evaluation import score_summary
        try:
            human = score_summary.summarize(score_summary.load_scores(eval_dir / "human_scores"))
            source = "eval/human_scores/*.jsonl"
        except Exception:  # noqa: BLE001 - the index must render whatever the scores hold
            human = None
    if human is not None and len(human) and {"model", "criterion", "mean"} <= set(human.columns):
        keys = [c for c in ("split", "model") if c in human.columns and human[c].notna().any()]
        table = human.pivot_table(index=keys, columns="criterion", values="mean", aggfunc="first").round(2)
        table.columns.name = None
        if "n" in human.columns:
            table.insert(0, "n (per criterion, max)", human.groupby(keys)["n"].max())
        demo = int(human["n_demo"].sum()) if "n_demo" in human.columns else 0
        note = (f"<p>Mean 0–5 human score per criterion, from <code>{html.escape(source)}</code>"
                + (f"; includes {demo} DEMO scores (seeded by demo_scores, not human judgements)" if demo else "")
                + ".</p>")
        parts.append("<h3>Human scores</h3>" + note + table.reset_index().to_html(index=False, classes="metrics"))
    from kokoro_helpers.evaluation.eval_index import index_parts          # judge validity, score prediction, paired verdicts
    parts += index_parts(eval_dir)
    if parts:
        out["03"] = "\n".join(parts)
    batching = _read_json(run_dir / "inference" / "batching.json")
    if batching:
        rows = [(mode, f"{m['tokens/s']:,} new tokens/s ({m['calls']} calls, {m['seconds']} s)")
                for mode, m in batching.get("modes", {}).items()]
        out["04"] = _table([("model", f"{batching.get('model')} on {batching.get('device')}")] + rows
                           + [("same greedy replies", f"{batching.get('same_replies')} / {batching.get('prompts')}"),
                              ("label", batching.get("label", ""))])

    # 05: the cost table of cost/summary.json (every figure with its basis and the prices' date)
    cost = _read_json(run_dir / "cost" / "summary.json")
    if cost:
        from kokoro_helpers.report.cost_summary import key_figure_rows
        out["05"] = _table(key_figure_rows(cost))
    return out

INDEX_CSS = """body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left}
th{background:#f5f5f5}.ok{color:#1a7f37}.failed{color:#cf222e}img{max-width:100%;border:1px solid #eee;margin:.3em 0}
section{border-top:1px solid #ccc;margin-top:1.5em}code{background:#f5f5f5;padding:0 .2em}
.params{columns:3 16em;font-size:85%;margin:.5em 0}.params div{break-inside:avoid;padding:.1em 0}
.params b{font-weight:600}table.metrics{display:block;overflow-x:auto;max-width:100%}"""


def write_index(out_dir: Path, runs: list[NotebookRun], params: dict[str, Any], params_path: str) -> Path:
    """reports/<run>/index.html: the run's parameters, data sha256 and token counter first, then one
    section per notebook — linked to its HTML — with its key figures and its figures embedded."""
    run_dir = resolve(params.get("run_dir", "runs/default"))
    stats = _read_json(run_dir / "data" / "stats.json") or {}
    figures = key_figures(run_dir)
    counter = stats.get("token_counter", "n/a")
    exact = "n/a" if counter == "n/a" else ("an estimate: every token count and cost derived from it is one"
                                             if str(counter).startswith("estimate") else "exact")
    head = [("parameter file", params_path), ("run_dir", str(params.get("run_dir"))),
            ("token counter", counter), ("token counts are", exact),
            ("generated", time.strftime("%Y-%m-%d %H:%M:%S"))]
    for split, sha in (stats.get("data_sha256") or {}).items():
        head.append((f"data sha256 ({split})", sha))
    param_rows = [(k, json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v) for k, v in params.items()]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Report: {html.escape(out_dir.name)}</title>"
             f"<style>{INDEX_CSS}</style></head><body>",
             f"<h1>KokoroChat fine-tuning report — <code>{html.escape(out_dir.name)}</code></h1>",
             _table(head),
             f"<h2>Parameters <small>({len(param_rows)}, from {html.escape(str(params_path))})</small></h2>",
             "<div class='params'>" + "".join(f"<div><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</div>"
                                              for k, v in param_rows) + "</div>",
             "<h2>Notebooks</h2><ol>"
             + "".join(f"<li><a href='{html.escape(r.html.name)}'>{html.escape(r.name)}</a> — "
                       f"<span class='{r.status}'>{r.status}</span></li>" for r in runs) + "</ol>"]
    for r in runs:
        status = f"<span class='{r.status}'>{r.status}</span>" + (f" in {r.seconds:.0f} s" if r.seconds else "")
        parts.append(f"<section><h2><a href='{html.escape(r.html.name)}'>{html.escape(r.name)}</a> — {status}</h2>")
        if r.error:
            parts.append(f"<pre class='failed'>{html.escape(r.error[-3000:])}</pre>")
        parts.append(figures.get(r.name[:2], "") or "<p>No key figures recorded for this step in run_dir.</p>")
        parts.extend(f"<img src='data:image/png;base64,{png}'>" for png in r.images)
        parts.append(f"<p><a href='{html.escape(r.html.name)}'>open {html.escape(r.name)}</a></p></section>")
    parts.append("</body></html>")
    index = out_dir / "index.html"
    write_text_atomic(index, "\n".join(parts))
    return index


def run_report(params_path: str, only: list[str] | None = None, overrides: dict[str, Any] | None = None) -> int:
    import papermill as pm

    params = {**load_params(params_path), **(overrides or {})}
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
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override one parameter of the file, e.g. --set dataset_source=data/kokorochat_dialogues")
    args = ap.parse_args(argv)
    try:
        return run_report(args.params, args.only, parse_overrides(args.set))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
