# The README's two commands are `make demo` (the main job) and `make test`. Each sets up what it
# needs (venv, torch, the extension build) and is idempotent: a second run reuses all of it.
PYTHON ?= python3
VENV   ?= .venv
# A CUDA build of torch, so the CUDA kernels are compiled too (they need no GPU to compile);
# TORCH=2.13.0 gives a CPU-only build (1 GB instead of 5.5 GB).
TORCH  ?= 2.14.1
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastkd-deps-$(TORCH)

.PHONY: demo test build bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=23" setuptools wheel
	$(PY) -m pip install -q "torch==$(TORCH)" numpy ninja pybind11 pytest pytest-benchmark expecttest matplotlib scikit-learn tqdm
	FASTKD_SKIP_EXTENSION=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	rm -f $(VENV)/.fastkd-deps-* && touch $@

# Incremental (ninja keeps its objects in build/); compiles csrc/**/*.cu too when torch has CUDA.
build: $(STAMP)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) setup.py -q build_ext --inplace

test: build
	FASTKD_REQUIRE_EXTENSION=1 $(PY) -m pytest -q
	FASTKD_DISABLE_EXTENSION=1 $(PY) -m pytest -q

demo: build
	$(PY) -m fastkd demo

bench: build
	$(PY) -m bench

clean:
	rm -rf build fastkd/_C*.so
