# Every target bootstraps .venv itself: a fresh machine needs nothing but Python.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lowbit-installed
TORCH_CPU := torch==2.13.0
DEV_PKGS := setuptools wheel ninja numpy pytest torchao==0.18.0 triton==3.7.1 matplotlib
# Training stack: DeepSpeed without its JIT ops (DS_BUILD_OPS=0), Hugging Face models and tokenizers, configs, logging.
TRAIN_PKGS := deepspeed==0.19.8 transformers==5.23.0 tokenizers==0.23.3 omegaconf==2.4.0 tqdm tensorboard rich bitsandbytes==0.50.2
NATIVE := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cuh' -o -name '*.cu' 2>/dev/null)

.PHONY: all demo test bench cuda-check gpu-check gpu-wheels env clean

all: test

# Reuse a CUDA build of torch that the system already has; otherwise the CPU build.
$(PY):
	@if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi

$(STAMP): $(PY) setup.py pyproject.toml Makefile $(NATIVE)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q $(DEV_PKGS)
	DS_BUILD_OPS=0 $(PY) -m pip install -q $(TRAIN_PKGS)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@touch $@

env: $(STAMP)
	$(PY) -m lowbit.env

demo: $(STAMP)
	$(PY) -m lowbit.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/bench_quantize.py

# Compiles every .cu file for the default targets of setup.py (sm_80, sm_89, sm_90a, sm_100a, sm_120a + PTX)
# against the CUDA build of torch (no GPU needed).
cuda-check:
	bash scripts/cuda_check.sh

# On a GPU machine (no network, its own python3 with a CUDA torch): build for the GPU's arch, the cuda
# and Triton tests, GPU-vs-CPU loss curves per recipe, the bench; at most 8 minutes, output in $OUT or
# gpu-check-out/ (scripts/gpu_check.sh). DRY=1 runs every stage on CPU at tiny sizes in .venv (CI does).
gpu-check: $(if $(filter 1 yes true,$(DRY)),$(STAMP))
	$(if $(filter 1 yes true,$(DRY)),PYTHON=$(PY) bash scripts/gpu_check.sh --dry,bash scripts/gpu_check.sh)

# Here, with network: the wheels the GPU machine lacks, into .gpu-wheels/ (carried with the tree).
gpu-wheels:
	bash scripts/gpu_check.sh wheels

clean:
	rm -rf build lowbit/*.so *.egg-info
