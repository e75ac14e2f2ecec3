# Two commands do all set-up on a fresh Linux machine with Python 3.11:
#   make demo   the embedded CPU training run (tiny model, real Redis, every service)
#   make test   lint + the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch 2.13.0 CPU. Where no local wheel is configured, point pip at the CPU index to avoid
# several GB of CUDA wheels:  make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=

.PHONY: demo test lint format bench-smoke clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/conspo demo $(DEMO_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest $(PYTEST_ARGS)

format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench-smoke: $(BIN)/.installed
	$(BIN)/python bench/run_all.py --smoke

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache bench/results

# `docker compose` end to end on the cpu profile: build, up, dataset through the api, scale and
# kill verifiers, kill the learner, books lost 0 / duplicated 0 (needs Docker + Compose v2).
.PHONY: compose-check
compose-check: $(BIN)/.installed
	$(BIN)/python deploy/compose_check.py $(COMPOSE_CHECK_ARGS)
