# Two commands a fresh clone needs: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-test
STAMP_RUN := $(VENV)/.installed
export JAX_PLATFORMS ?= cpu
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: demo demo-train test test-slow lint format bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP_RUN): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	touch $@

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e ".[test]"
	touch $@ $(STAMP_RUN)

demo: $(STAMP_RUN)
	$(PY) -m free_jax.demo

# Reproduces the shipped demo model: train (resumes after a crash), then export the best step.
DEMO_RUN ?= gin_configs/runs/demo_cpu.gin
DEMO_DIR ?= runs/demo_cpu
DEMO_OUT ?= demo/model
demo-train: $(STAMP_RUN)
	$(PY) -m free_jax.train --gin_file=$(DEMO_RUN) --gin.MODEL_DIR=\"$(DEMO_DIR)\"
	$(PY) -m free_jax.export --model_dir=$(DEMO_DIR) --out=$(DEMO_OUT) --dtype=bfloat16

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: lint
	$(PY) -m pytest -q -n 2 --dist loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) -m free_jax.benchmarks.decode

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
