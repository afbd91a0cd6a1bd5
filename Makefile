# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first and pinned: any other torch requirement makes pip fetch a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint browser clean

# `make demo` needs only the package; `make test` adds the test, evaluation and web extras.
setup: $(VENV)/.installed

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed: $(VENV)/.base
	$(BIN)/pip install -q -e ".[test,eval,web]"
	touch $@

demo: $(VENV)/.base
	HF_HUB_OFFLINE=1 $(BIN)/maskdiffusion demo

lint: setup
	$(BIN)/ruff check src tests research benchmarks

test: lint browser
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

# The web demo's end-to-end test drives Debian's chromium through Playwright (which downloads
# no browser here); installed with apt when missing (needs root, as on CI).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

clean:
	rm -rf $(VENV) maskdiffusion-demo maskdiffusion-out

# ---------------------------------------------------------------------------------------------
# The original project's workflow: `make run` evaluates on DATASET_DIR and writes
# outputs/<timestamp>/; `make build` / `make bash` build and enter a CUDA Docker image.
# Override any variable: `make run DATASET=cocostuff27 EVAL_ARGS="--limit 50"`.
DATASET_DIR ?= ./datasets
DATASET ?= cityscapes19
MODEL ?= stable-diffusion-v1-5/stable-diffusion-v1-5
RUN_DIR ?= outputs/$(shell date +%Y%m%d-%H%M%S)
EVAL_ARGS ?=
IMAGE ?= maskdiffusion
# Inside the Docker image (IN_CONTAINER=1) the package is installed system-wide: no venv.
MASKDIFFUSION := $(if $(IN_CONTAINER),maskdiffusion,$(BIN)/maskdiffusion)

.PHONY: run build bash

run: $(if $(IN_CONTAINER),,setup)
	$(MASKDIFFUSION) evaluate --dataset $(DATASET) --root $(DATASET_DIR) --model $(MODEL) --out $(RUN_DIR) $(EVAL_ARGS)

# Docker targets are not exercised by CI (no Docker engine runs on the project's machines).
build:
	docker build -t $(IMAGE) .

bash:
	mkdir -p outputs
	docker run --rm -it --gpus all --ipc=host \
		-v $(abspath $(DATASET_DIR)):/app/datasets:ro \
		-v $(CURDIR)/outputs:/app/outputs \
		-v $(HOME)/.cache/huggingface:/root/.cache/huggingface \
		$(IMAGE) bash
