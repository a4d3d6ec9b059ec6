"""The benchmarks still run (tiny settings) and end on `ratio: X`: they are only ever run by
hand, so nothing else would notice when a refactor breaks one."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, tmp_path: Path) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"ratio: \d+(\.\d+)?", last), last
    return proc.stdout


def test_bench_data_quick(tmp_path):
    out = _run("bench_data.py", "--dialogues", "60", "--repeat", "1", "--corpus-dir", str(tmp_path), tmp_path=tmp_path)
    assert "dialogues_kept 60" in out


@pytest.mark.parametrize("script,args", [
    ("bench_generate.py", ["--run-dir", "{tmp}", "--prompts", "4", "--batch-size", "2", "--max-new-tokens", "3", "--repeat", "1"]),
    ("bench_train.py", ["--epochs", "1", "--repeats", "1", "--max-length", "256"]),
    ("bench_real_shapes.py", ["--quick"]),
])
def test_bench_models_quick(script, args, tmp_path):
    _run(script, *[a.replace("{tmp}", str(tmp_path)) for a in args], tmp_path=tmp_path)


def test_bench_serve_quick(tmp_path):
    out = _run("bench_serve.py", "--sizes", "40", "80", "--big-messages", "1000", tmp_path=tmp_path)
    assert "HTTP 400" in out and "truncation" in out
