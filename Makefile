# Two set-up commands: `make serve` (main job) and `make test` (the suite). Both create the
# virtual environment on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
REPOSITORY ?= $(or $(OODFLOW_MODEL_REPOSITORY),./model-repository)
HOST ?= 127.0.0.1
PORT ?= 8000
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: install data test-tools test serve build-defaults lint bench loadtest clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST ships as a Debian package; install it when missing and we are allowed to
# (root with apt-get). Otherwise the tools say which package or variable provides it.
data:
	@if [ -z "$$OODFLOW_DATA_DIR" ] && [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null; \
	  else echo "Fashion-MNIST missing: apt-get install dataset-fashion-mnist, or set OODFLOW_DATA_DIR"; fi; \
	fi

# promtool (Debian's prometheus package) lets the tests check every dashboard and alert query.
test-tools:
	@if ! command -v promtool >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus) >/dev/null 2>&1 || true; \
	fi

test: install data test-tools
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check models training service tests benchmarks deploy
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

build-defaults: install data
	$(VENV)/bin/oodflow build-defaults --repository $(REPOSITORY)

serve: build-defaults
	$(VENV)/bin/oodflow serve --repository $(REPOSITORY) --host $(HOST) --port $(PORT)

LOADTEST_ARGS ?= --users 16 --run-time 60s --max-requests 20000

# Starts the service on the default models, runs Locust headless, writes out/loadtest/report.{md,json}.
loadtest: build-defaults
	$(PY) deploy/loadtest/run.py --repository $(REPOSITORY) --out out/loadtest $(LOADTEST_ARGS)

bench: install data
	$(PY) benchmarks/bench_flows.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
