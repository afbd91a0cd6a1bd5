# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first and pinned: any other torch requirement makes pip fetch a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test,eval]"
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/maskdiffusion demo

lint: setup
	$(BIN)/ruff check src tests

test: lint
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

clean:
	rm -rf $(VENV) maskdiffusion-demo maskdiffusion-out
