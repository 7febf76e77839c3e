# Two set-up commands: `make serve` (main job) and `make test` (the suite). Both create the
# development virtual environment on first use: training, serving and test tools
# (`pip install -e '.[train,serve,test]'`). A serving-only install without torch is
# `pip install '.[serve]'` (docs/deploy.md); `make serve-venv` makes one in $(SERVE_VENV).
PYTHON ?= python3.11
VENV ?= .venv
SERVE_VENV ?= .venv-serve
DEV_INSTALL := -e '.[train,serve,test]'
SERVE_INSTALL := -e '.[serve]'
PY := $(VENV)/bin/python
REPOSITORY ?= $(or $(OODFLOW_MODEL_REPOSITORY),./model-repository)
HOST ?= 127.0.0.1
PORT ?= 8000
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: install serve-venv data test-tools test serve build-defaults lint bench bench-install loadtest clean

# onnxruntime and onnxruntime-gpu install the same package folder over each other; pyproject.toml
# picks one per platform. A venv that already held the other one (e.g. made before pyproject chose
# onnxruntime-gpu) gets both, so both go and the chosen one is installed again, alone.
define ONE_ONNXRUNTIME
	@if $(1)/bin/python -m pip show -q onnxruntime >/dev/null 2>&1 \
	  && $(1)/bin/python -m pip show -q onnxruntime-gpu >/dev/null 2>&1; then \
	  echo "$(1): onnxruntime and onnxruntime-gpu both installed; keeping only pyproject's choice"; \
	  $(1)/bin/python -m pip uninstall -q -y onnxruntime onnxruntime-gpu \
	  && $(1)/bin/python -m pip install -q $(2); \
	fi
endef

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(DEV_INSTALL)
	$(call ONE_ONNXRUNTIME,$(VENV),$(DEV_INSTALL))
	touch $@

install: $(VENV)/.installed

$(SERVE_VENV)/.installed: pyproject.toml
	test -x $(SERVE_VENV)/bin/python || $(PYTHON) -m venv $(SERVE_VENV) || python3 -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install -q --upgrade pip
	$(SERVE_VENV)/bin/python -m pip install -q $(SERVE_INSTALL)
	$(call ONE_ONNXRUNTIME,$(SERVE_VENV),$(SERVE_INSTALL))
	touch $@

serve-venv: $(SERVE_VENV)/.installed

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

# Installed sizes of the full and serve installs, cold start to /readyz and RSS (docs/deploy.md).
bench-install: install serve-venv build-defaults
	$(PY) benchmarks/bench_install.py --venv dev=$(VENV) --venv serve=$(SERVE_VENV) --repository $(REPOSITORY)

clean:
	rm -rf $(VENV) $(SERVE_VENV) .pytest_cache .ruff_cache .mypy_cache
