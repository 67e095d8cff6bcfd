# The README's two commands: `make demo` and `make test`. Each sets up what it needs.
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml scripts/setup.sh
	@bash scripts/setup.sh

setup: $(STAMP)

# The demo's private MQTT broker: when mosquitto is missing, setup.sh installs it (as root or
# with password-less sudo; otherwise it prints the command) and the demo runs either way,
# without a broker if need be, so a failed install does not stop it.
demo: $(STAMP)
	@command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto || bash scripts/setup.sh || true
	@$(BIN)/qrgate demo $(if $(REEL),--reel "$(REEL)") $(if $(CAMERA),--camera "$(CAMERA)")

test: $(STAMP)
	@bash scripts/setup.sh --test
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python scripts/bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
