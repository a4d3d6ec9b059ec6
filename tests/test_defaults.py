"""One source of defaults: params/default.yaml. Every notebook's parameters cell and the trainer's
config object hold the same values, so a notebook opened in JupyterLab runs what `make report` runs."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = yaml.safe_load((ROOT / "params" / "default.yaml").read_text(encoding="utf-8"))
# names whose notebook default deliberately differs from the file, and why
DELIBERATE = {("04_local_lora_inference", "system_prompt"): None}   # None: the run's own (01's) system prompt


def parameters_cell(path: Path) -> dict:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: exactly one cell tagged 'parameters'"
    names: dict = {}
    exec("".join(tagged[0]["source"]), {}, names)   # a parameters cell is plain assignments
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebook_parameters_match_default_yaml(path):
    names = parameters_cell(path)
    assert names, f"{path.name} declares no parameters"
    missing = sorted(set(names) - set(DEFAULTS))
    assert not missing, f"{path.name} declares {missing}, which params/default.yaml lacks"
    differ = {k: (v, DEFAULTS[k]) for k, v in names.items()
              if v != DEFAULTS[k] and DELIBERATE.get((path.stem, k), object()) != v}
    assert not differ, f"{path.name}: notebook value vs params/default.yaml: {differ}"


def test_trainer_config_defaults_match_default_yaml():
    from kokoro_helpers.local.sft_config import LoraTrainConfig

    cfg = LoraTrainConfig()
    shared = [f.name for f in dataclasses.fields(cfg) if f.name in DEFAULTS]
    assert len(shared) > 10
    differ = {n: (getattr(cfg, n), DEFAULTS[n]) for n in shared if getattr(cfg, n) != DEFAULTS[n]}
    assert not differ, f"LoraTrainConfig default vs params/default.yaml: {differ}"
