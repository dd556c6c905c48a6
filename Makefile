# Two commands do everything on a fresh machine:
#   make demo   set up, then `lmforge quickstart`: pretrain -> SFT -> DPO -> evaluate -> chat on the built-in
#               data (the Python docs), about 15 minutes on a 2-core CPU
#   make test   set up, then run the test suite
#
# Set-up creates .venv, installs PyTorch first ($(TORCH), default torch==2.13.0: a CPU build here; on your
# machine pick your own, e.g. `make demo TORCH="torch>=2.5"` or a CUDA build from PyTorch's index), then
# lmforge and its test dependencies. pyproject.toml asks only for a torch *range*, so pip never swaps the
# torch you chose for a multi-GB download. Then the web UI's JavaScript libraries (`npm ci`, pinned by
# lmforge/serve/web/package-lock.json) and, when run as root on Debian, the chromium the browser tests drive.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lmforge-installed
WEB    := lmforge/serve/web

DEMO_OUT    ?= runs/quickstart
DEMO_BUDGET ?= 15

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(WEB)/package-lock.json
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@# The web UI's libraries (marked, DOMPurify, highlight.js), pinned by package-lock.json and served
	@# from node_modules by `lmforge serve` (nothing is fetched from a CDN at run time).
	@if command -v npm >/dev/null 2>&1; then \
	  npm ci --prefix $(WEB) --no-audit --no-fund || \
	  echo "WARNING: 'npm ci --prefix $(WEB)' failed: the web chat UI will not work until it succeeds"; \
	else \
	  echo "WARNING: npm not found: install Node.js, then run 'npm ci --prefix $(WEB)' for the web chat UI (its tests are skipped)"; \
	fi
	@# The browser tests drive Debian's Chromium (never a downloaded one); install it when we can.
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for the browser tests (apt-get)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "WARNING: could not install chromium with apt-get: the browser tests will be skipped"; \
	else \
	  echo "NOTE: /usr/bin/chromium not found (as root: apt-get install chromium): the browser tests will be skipped"; \
	fi
	@touch $@

demo: setup
	$(BIN)/lmforge quickstart --out $(DEMO_OUT) --budget $(DEMO_BUDGET)

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
