# The two commands of the README:
#   make demo   set everything up, start the local stack and the six services, run slides through
#   make test   set everything up, lint, type-check and run the test suite
# Everything installs into .venv from the project's own files.

PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export WSI_HOME ?= $(CURDIR)/.wsi

.PHONY: setup demo test lint typecheck unit e2e models bench clean stop

$(STAMP): pyproject.toml setup.py proto/wsi/v1/events.proto
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# torch: the CPU build of this exact version (a looser spec would pull CUDA packages)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[all,dev]'
	touch $(STAMP)

# `pip install -e` runs setup.py, which generates the contracts' Python code from proto/.
setup: $(STAMP)

models: setup
	$(BIN)/wsi model init-defaults

demo: setup models
	$(BIN)/wsi demo

lint: setup
	$(BIN)/ruff check shared services tests
	$(BIN)/ruff format --check shared services tests

typecheck: setup
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -m "not e2e and not slow" -q

e2e: setup
	$(BIN)/pytest -m "e2e and not slow" -q

test: setup lint typecheck
	$(BIN)/pytest -m "not slow"

stop:
	-$(BIN)/wsi services down
	-$(BIN)/wsi stack down

clean: stop
	rm -rf $(VENV) .wsi shared/contracts/_generated build *.egg-info
