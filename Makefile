# saq: `make demo` runs the embedded default; `make test` runs the test suite. Both set up .venv first.
PY := .venv/bin/python
STAMP := .venv/.installed
SHELL := /bin/bash

.PHONY: help setup demo test lint data tiny-sam tiny-card sweep report clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)  ## create or refresh .venv (quick when nothing changed)

demo: setup  ## FP run of sam_tiny on the synthetic instance task: prints mask AP and mIoU
	$(PY) -m saq logger=none

# tests are single-threaded, so one worker per core; loadfile keeps a module's tests (and its fixtures) on one worker
TEST_WORKERS ?= 2
test: setup  ## run the test suite (TEST_WORKERS=N parallel workers, default 2)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile tests

lint: setup  ## ruff
	$(PY) -m ruff check saq tasks tests benchmarks

data: setup  ## generate the synthetic dataset used to train sam_tiny (data/synthetic: 12,000 train scenes, about 5 min)
	$(PY) -m tasks.synthetic --out data/synthetic --n-train 12000 --n-val 500 --seed 0

tiny-sam: data  ## train one sam_tiny round into outputs/train_tiny/ (ARGS='knob=value ...'; about 2.5 h on 2 cores)
	$(PY) -m saq.sam.tiny.train $(value ARGS)

tiny-card: setup  ## evaluate the shipped sam_tiny on the synthetic val split and record it in its card
	$(PY) -m saq logger=none fp_cache=false hydra.run.dir=outputs/tiny-card
	$(PY) -m saq.sam.tiny.card outputs/tiny-card/results.json

SWEEP ?= quant_baselines
# ARGS reaches the shell as written (make does not expand it): quote an interpolation for the shell,
# e.g. ARGS="'model.checkpoint=/ckpt/\${model.name}.pth'"
ARGS ?=
sweep: setup  ## run sweeps/SWEEP.yaml (ARGS='key=value ...' overrides any key); ends by printing its report table
	$(PY) -m saq -m +sweeps=$(SWEEP) $(value ARGS)

RUNS ?= outputs/sweeps
report: setup  ## report.md/csv/tex and plots from the results.json under RUNS=PATH
	$(PY) -m saq.report $(RUNS)

clean:  ## remove run outputs and generated data (keeps .venv)
	rm -rf outputs data
