# `make demo` and `make test` bootstrap everything they need into .venv and build/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements-dev.txt pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=
# Real boards: make flash PORT=/dev/ttyUSB0 FIRMWARE=ESP32_GENERIC-OTA.bin; make deploy PORT=... CONFIG=build/boards/<id>
PORT ?=
FIRMWARE ?=
CONFIG ?=

# Distribution packages the tests use (Debian/Ubuntu), pinned, each as <file it provides>:<package>;
# installed when missing and root.
APT_DEPS := mosquitto:mosquitto=2.0.11-1.2+deb12u2 \
	/usr/lib/postgresql/15/bin/initdb:postgresql-15=15.18-0+deb12u1 \
	chromium:chromium=150.0.7871.100-1~deb12u1 \
	chromedriver:chromium-driver=150.0.7871.100-1~deb12u1

.PHONY: venv system-deps demo test test-fast bench screenshots flash deploy hil clean

venv: $(STAMP)

$(STAMP): requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(BIN)/python -m tools.board.umqtt_fetch build/cache
	rm -f $(VENV)/.installed-*
	touch $@

demo: venv
	$(BIN)/python -m tools demo

# The pinned versions, or (if the mirror has moved on) the distribution's current ones, said so.
system-deps:
	@missing=""; for dep in $(APT_DEPS); do \
		f=$${dep%%:*}; { command -v $$f || test -x $$f; } >/dev/null 2>&1 || missing="$$missing $${dep#*:}"; done; \
	[ -z "$$missing" ] && exit 0; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "note: not installed:$$missing; their tests will skip (apt-get install them)"; exit 0; fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get install -y -q $$missing >/dev/null 2>&1 \
	|| { apt-get update -q >/dev/null && apt-get install -y -q $$missing >/dev/null 2>&1; } \
	|| { names=$$(for p in $$missing; do printf ' %s' $${p%%=*}; done); \
	     echo "note:$$missing unavailable; installing the distribution's$$names"; \
	     apt-get install -y -q $$names >/dev/null; } \
	|| echo "note: could not install$$missing; their tests will skip"

test: venv system-deps
	$(BIN)/python -m pytest host_tests $(PYTEST_ARGS)

# The edit-test loop: what is neither slow nor hardware in the loop, in well under a minute.
test-fast: venv
	$(BIN)/python -m pytest host_tests -m "not slow and not hil" $(PYTEST_ARGS)

# Measurements, not tests: each prints its figures with a reference from the same run and
# writes JSON under build/bench/.
bench: venv system-deps
	$(BIN)/python -m tools.bench.ota_throughput
	$(BIN)/python -m tools.bench.ota_throughput --flash-mb 16 --size 8000000 --runs 11 --json build/bench/ota_throughput_8mb.json
	$(BIN)/python -m tools.bench.memory
	$(BIN)/python -m tools.bench.signing
	$(BIN)/python -m tools.bench.emulator_cost --devices 1,10,50
	$(BIN)/python -m tools.bench.replica --runs 3
	$(BIN)/python -m tools.bench.control_plane --devices 10000 --workers 2
	$(BIN)/python -m tools.bench.fleet_rollout --devices 200 --boot-wave 25
	$(BIN)/python -m tools.bench.dashboard --devices 10000

# The dashboard's pictures in docs/, taken by its browser tests.
screenshots: venv system-deps
	mkdir -p docs/img
	DASHBOARD_SCREENSHOTS=$(CURDIR)/docs/img $(BIN)/python -m pytest host_tests/test_dashboard.py -k "rollout or phone" $(PYTEST_ARGS)

flash: venv
	@test -n "$(PORT)" -a -n "$(FIRMWARE)" || { echo "usage: make flash PORT=/dev/ttyUSB0 FIRMWARE=firmware.bin"; exit 2; }
	$(BIN)/python -m tools flash --port $(PORT) --firmware $(FIRMWARE)

deploy: venv
	@test -n "$(PORT)" || { echo "usage: make deploy PORT=/dev/ttyUSB0 [CONFIG=build/boards/<id>]"; exit 2; }
	$(BIN)/python -m tools deploy --port $(PORT) $(if $(CONFIG),--config $(CONFIG))

# The end-to-end tests against a board: PORT empty = an emulated board behind mpremote's bridge.
hil: venv
	$(BIN)/python -m pytest host_tests/test_hil.py $(if $(PORT),--port $(PORT)) $(PYTEST_ARGS)

clean:
	rm -rf build .pytest_cache
