# Two commands do everything on a fresh machine:
#   make demo   set up, then `lmforge quickstart`: pretrain -> SFT -> DPO -> evaluate -> chat on the built-in
#               data (the Python docs), about 15 minutes on a 2-core CPU
#   make test   set up, then run the test suite
#
# Set-up creates .venv, installs PyTorch first ($(TORCH), default torch==2.13.0: a CPU build here; on your
# machine pick your own, e.g. `make demo TORCH="torch>=2.5"` or a CUDA build from PyTorch's index), then
# lmforge and its test dependencies. pyproject.toml asks only for a torch *range*, so pip never swaps the
# torch you chose for a multi-GB download.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lmforge-installed

DEMO_OUT    ?= runs/quickstart
DEMO_BUDGET ?= 15

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $@

demo: setup
	$(BIN)/lmforge quickstart --out $(DEMO_OUT) --budget $(DEMO_BUDGET)

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
