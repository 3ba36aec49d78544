# `make test` sets up .venv (once) and runs the whole suite; `.ci/run` calls exactly this.
PYTHON ?= python3
VENV ?= .venv
# Linux: the CPU build of torch on this machine's disk (an unpinned torch pulls a CUDA
# build of several GB). macOS: whatever torch pip picks. MLX: `mlx[cpu]` on Linux, `mlx` on
# macOS, chosen by the markers of the `mlx` extra in pyproject.toml.
TORCH_PIN := $(if $(filter Linux,$(shell uname -s)),torch==2.13.0,)

.PHONY: test lint setup demo bench openblas

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet $(TORCH_PIN) -e '.[torch,mlx,demo,dev]'
	touch $@

test: setup openblas
	$(VENV)/bin/pytest

# Linux: MLX's CPU wheel bundles the reference BLAS (~70x slower matmuls than OpenBLAS); the
# real-model parity test runs MLX with Debian's OpenBLAS preloaded, installed here if missing.
OPENBLAS := /usr/lib/x86_64-linux-gnu/libblas.so.3
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
openblas:
	@if [ "$$(uname -s)" = Linux ] && [ ! -e $(OPENBLAS) ]; then \
		$(SUDO) apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq libopenblas0-pthread; }; \
	fi

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The main job: the embedded benchmark, SFT vs DPO vs TAB-PO, offline (report in tabpo-demo/).
demo: setup
	$(VENV)/bin/tabpo demo --out tabpo-demo --force

# The speed benchmark against TRL and mlx-lm-lora (benchmarks/RESULTS.md); ~35 min on 2 cores.
# On Linux, MLX is also timed with the system OpenBLAS preloaded if it is installed
# (Debian: apt-get install libopenblas0-pthread).
bench: setup
	$(VENV)/bin/python -m pip install --quiet $(TORCH_PIN) -e '.[torch,mlx,bench]'
	$(VENV)/bin/python -m benchmarks.bench --out bench-results --steps 5 --warmup 2
