# The two commands a newcomer types: `make report` and `make test` (both set up .venv first).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PARAMS ?= params/default.yaml
SET ?=
REPORT = $(PY) -m kokoro_helpers.report --params $(PARAMS) $(foreach kv,$(SET),--set $(kv))
KERNEL := kokoro
STAMP := $(VENV)/.kokoro-installed

.DEFAULT_GOAL := help
.PHONY: help setup report test test-unit test-notebooks lab data finetune eval inference cost bench clean

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m kokoro_helpers.tokens install
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (kokoro .venv)" >/dev/null
	@touch $@
	@echo "set up $(VENV) (torch: $(TORCH_SPEC)); kernel '$(KERNEL)' runs $(abspath $(PY))"

setup: $(STAMP)  ## create .venv: torch ($(TORCH_SPEC), override with TORCH_SPEC=...), the package editable with dev extras, the o200k_base file (hash-checked), the Jupyter kernel

report: $(STAMP)  ## run every notebook with PARAMS (+ SET="key=value ...") via papermill into reports/<run>/ (+ HTML, index.html)
	$(REPORT)

test: export KOKORO_OPENAI_DRY_RUN=1
test: $(STAMP)  ## unit tests, then every notebook under nbval (OpenAI forced to dry run: tests never spend money)
	$(PY) -m pytest -q tests
	cd notebooks && ../$(PY) -m pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env --nbval-cell-timeout=900 .

test-unit: $(STAMP)  ## unit tests only
	$(PY) -m pytest -q tests

lab: $(STAMP)  ## open JupyterLab on the repo
	$(VENV)/bin/jupyter lab --notebook-dir=.

data: $(STAMP)  ## run 01_data alone with PARAMS
	$(REPORT) --only 01
finetune: $(STAMP)  ## run 02_finetune alone with PARAMS
	$(REPORT) --only 02
eval: $(STAMP)  ## run 03_eval alone with PARAMS
	$(REPORT) --only 03
inference: $(STAMP)  ## run 04_local_lora_inference alone with PARAMS
	$(REPORT) --only 04
cost: $(STAMP)  ## run 05_cost alone with PARAMS
	$(REPORT) --only 05

bench: $(STAMP)  ## run every benchmark (each prints `ratio: X` last)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:  ## remove runs/ and reports/ outputs (keeps .venv and caches)
	rm -rf runs reports/*/
