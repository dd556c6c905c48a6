# Two commands do everything on a fresh machine:
#   make demo   set up, then train a small model on the built-in corpus (the Python docs) and print samples
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

DEMO_OUT   ?= runs/demo
DEMO_STEPS ?= 300

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $@

demo: setup
	$(BIN)/lmforge pretrain --preset small --data builtin:pydocs --out $(DEMO_OUT) \
		--max-steps $(DEMO_STEPS) --batch-size 8 --lr 2e-3 --eval-interval 50 --samples 3

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
