# `make demo` and `make test` bootstrap everything they need into .venv and build/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements-dev.txt | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: venv demo test clean

venv: $(STAMP)

$(STAMP): requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/python -m tools.umqtt_fetch build/cache
	rm -f $(VENV)/.installed-*
	touch $@

demo: venv
	$(BIN)/python -m tools demo

test: venv
	$(BIN)/python -m pytest host_tests $(PYTEST_ARGS)

clean:
	rm -rf build .pytest_cache
