# Walsh developer entry points (GNU make).
#
#   make quickstart   install, then build the tiny model, train a few steps, print a sample
#   make test         install, then run the test suite
#   make lint         ruff check
#
# Everything installs into the Python environment that $(PYTHON) belongs to (a venv is best).
# torch is installed first, on its own: an unpinned torch from the package index is the CUDA
# build with several GB of nvidia-* wheels. The default is the CPU build; on a GPU machine pick
# your own build, e.g.
#   make install TORCH_SPEC="torch==2.11.0 --index-url https://download.pytorch.org/whl/cu128"
# A torch that is already importable is kept unless TORCH_SPEC is given explicitly. Whatever
# torch ends up installed is then pinned (build/constraints-*.txt, passed as PIP_CONSTRAINT so
# that it also holds inside isolated build environments) while the project is installed.

PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
# the 20 slowest tests listed after the run: CI's log shows where its time goes (a run of
# dfa6506 on the 2-core machine: 2,355 s, the slowest test 344 s)
PYTEST_ARGS ?= --durations=20

PIP := $(PYTHON) -m pip
BUILD_DIR := build
# One install stamp per Python environment, keyed by its sys.prefix.
PY_ID := $(shell $(PYTHON) -c 'import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:12])')
STAMP := $(BUILD_DIR)/.installed-$(PY_ID)
CONSTRAINTS := $(abspath $(BUILD_DIR)/constraints-$(PY_ID).txt)
SCRIPTS_DIR := $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
WALSH := $(SCRIPTS_DIR)/walsh

# TORCH_SPEC given on the command line or in the environment: (re)install torch even if one is
# already importable.
ifneq ($(origin TORCH_SPEC),file)
FORCE_TORCH := 1
endif

.PHONY: install quickstart test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@mkdir -p $(BUILD_DIR)
	@if [ -n "$(FORCE_TORCH)" ] || ! $(PYTHON) -c 'import torch' 2>/dev/null; then \
		echo "+ $(PIP) install $(TORCH_SPEC)"; \
		$(PIP) install $(TORCH_SPEC); \
	else \
		echo "torch $$($(PYTHON) -c 'import torch; print(torch.__version__)') is already installed; keeping it"; \
	fi
	$(PYTHON) -c 'import torch; print(f"torch=={torch.__version__}")' > $(CONSTRAINTS)
	PIP_CONSTRAINT="$(CONSTRAINTS)$${PIP_CONSTRAINT:+ $$PIP_CONSTRAINT}" $(PIP) install -e ".[dev]"
	@# cache the GPT-2 ranks while the package index is reachable, so staging works offline later
	@$(PYTHON) -c 'from data_prep.tokenizer import load; load("r50k_base")' \
		&& echo "GPT-2 tokenizer (r50k_base) cached" \
		|| echo "warning: could not cache the GPT-2 tokenizer now; staging will fetch it"
	@touch $@

quickstart: install
	$(WALSH) quickstart

test: install
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

lint:
	$(PYTHON) -m ruff check .

clean:
	rm -rf $(BUILD_DIR) .pytest_cache .ruff_cache *.egg-info
