# `make demo` and `make test` work on a fresh machine with Python 3.10+ and make:
# both create .venv when it is missing and install the project into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# A second venv without torch: the slim runtime install (plus the service extra and pytest).
# tests/test_packaging.py installs the current wheel into it and runs the runtime's tests there.
RUNTIME_VENV := .venv-runtime
RUNTIME_STAMP := $(RUNTIME_VENV)/.installed

.PHONY: demo test install browser clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[train,serve,ray,demo,dev]'
	touch $(STAMP)

$(RUNTIME_STAMP): setup.cfg pyproject.toml
	test -x $(RUNTIME_VENV)/bin/python || $(PYTHON) -m venv $(RUNTIME_VENV)
	$(RUNTIME_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(RUNTIME_VENV)/bin/python -m pip install --quiet '.[serve]' pytest httpx
	touch $(RUNTIME_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/anomaly demo

# The review page is tested in a real headless Chromium (Debian's chromium + chromium-driver).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	elif command -v sudo >/dev/null && command -v apt-get >/dev/null; then \
	  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "note: cannot install chromium here; the browser tests will be skipped (install chromium + chromedriver)"; fi

test: $(STAMP) $(RUNTIME_STAMP) browser
	$(BIN)/python -m pytest -q

clean:
	rm -rf demo_out .pytest_cache build dist
