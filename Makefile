# The README's two commands are `make demo` (the main job) and `make test`. Each sets up what it
# needs (venv, torch, the extension build) and is idempotent: a second run reuses all of it.
# Long steps write their output to build/logs/<step>.log; the terminal gets one line per step, and a
# failing step prints the tail of its log.
PYTHON ?= python3
VENV   ?= .venv
# `make test` (and CI): a CUDA build of torch, so that the CUDA kernels are compiled too (they need
# no GPU to compile). TORCH=2.13.0 gives the CPU-only build (1 GB instead of 5.5 GB).
TORCH  ?= 2.14.1
# `make demo` runs on the CPU: on a venv without torch it installs the CPU-only build; a venv that
# already has a torch (e.g. from `make test`) keeps it.
DEMO_TORCH ?= 2.13.0
RUFF   ?= 0.17.6
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.fastkd-deps-
STAMP  := $(DEPS)$(TORCH)
DEMO_STAMP := $(or $(firstword $(wildcard $(DEPS)*)),$(DEPS)$(DEMO_TORCH))
LOGS   := build/logs
SOURCES := setup.py fastkd/_env.py $(shell find csrc -type f)
# The extension as the demo needs it (the C++ CPU kernels), and as the tests need it (the CUDA kernels
# compiled too, where torch is a CUDA build). A full build serves the demo as well.
EXT_CPU  := build/.ext-cpu
EXT_FULL := build/.ext-full
BUILD   = MAX_JOBS=$${MAX_JOBS:-2} $(PY) setup.py -q build_ext --inplace --force

# $(call logged,STEP,COMMAND): COMMAND's output goes to $(LOGS)/STEP.log; on failure its tail is shown.
logged = mkdir -p $(LOGS); if ! { $(2); } > $(LOGS)/$(1).log 2>&1; then tail -n 40 $(LOGS)/$(1).log; \
	echo "*** make: step '$(1)' failed; its whole log is $(LOGS)/$(1).log"; exit 1; fi

.PHONY: demo test lint build bench clean
.PRECIOUS: $(DEPS)%

# The venv with torch $* and every dependency; its stamp names the torch version.
$(DEPS)%: pyproject.toml
	@echo "[1/3] environment: $(VENV) with torch $* and the dependencies ($(LOGS)/venv.log)"
	@$(call logged,venv,test -x $(PY) || $(PYTHON) -m venv $(VENV); \
		$(PY) -m pip install -q --upgrade "pip>=23" setuptools wheel && \
		$(PY) -m pip install -q "torch==$*" numpy safetensors ninja pybind11 pytest pytest-benchmark expecttest \
			matplotlib scikit-learn tqdm "ruff==$(RUFF)" && \
		FASTKD_SKIP_EXTENSION=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .)
	@rm -f $(DEPS)* && touch $@

$(EXT_CPU): $(DEMO_STAMP) $(SOURCES)
	@echo "[2/3] build: fastkd._C, C++ CPU kernels ($(LOGS)/build.log)"
	@$(call logged,build,FASTKD_NO_CUDA=1 $(BUILD))
	@rm -f $(EXT_FULL) && touch $@

$(EXT_FULL): $(STAMP) $(SOURCES)
	@echo "[2/3] build: fastkd._C, C++ CPU kernels and, with a CUDA build of torch, the CUDA kernels ($(LOGS)/build.log)"
	@$(call logged,build,$(BUILD))
	@touch $@ $(EXT_CPU)

build: $(EXT_FULL)

demo: $(EXT_CPU)
	@echo "[3/3] fastkd demo"
	@$(PY) -m fastkd demo

# The trainers the integrations adapt, and peft for LoRA students (tests/integrations; pyproject.toml's extras
# hf, trl, lightning, peft): the test command installs them, the demo does not.
TEST_EXTRAS := $(VENV)/.fastkd-test-extras
INTEGRATIONS := .[hf,trl,lightning,peft]
$(TEST_EXTRAS): pyproject.toml $(STAMP)
	@echo "[test] the integrations' trainers: transformers, accelerate, trl, lightning, peft ($(LOGS)/test-extras.log)"
	@$(call logged,test-extras,FASTKD_SKIP_EXTENSION=1 $(PY) -m pip install -q --no-build-isolation -e "$(INTEGRATIONS)" && \
		$(PY) -c "import transformers; import accelerate; import trl; import lightning; import peft")
	@touch $@

test: $(EXT_FULL) $(TEST_EXTRAS)
	FASTKD_REQUIRE_EXTENSION=1 $(PY) -m pytest -q
	FASTKD_DISABLE_EXTENSION=1 $(PY) -m pytest -q -m "not backend_independent"

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(EXT_FULL)
	$(PY) -m bench

clean:
	rm -rf build fastkd/_C*.so
