# The two commands of the README:
#   make demo   set everything up, start the local stack and the six services, run slides through
#   make test   set everything up, lint, type-check and run the test suite
# Everything installs into .venv from the project's own files.

PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export WSI_HOME ?= $(CURDIR)/.wsi

.PHONY: setup system-deps viewer-assets demo test lint typecheck unit integration e2e models bench clean stop deploy-generate experiment images containers-smoke

$(STAMP): pyproject.toml setup.py proto/wsi/v1/events.proto
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# torch: the CPU build of this exact version (a looser spec would pull CUDA packages)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[all,dev]'
	touch $(STAMP)

# The viewer's front end: OpenSeadragon from npm (package-lock.json pins it), copied into the folder the
# viewer serves itself; nothing is fetched from a CDN at run time. Needs npm (Debian's, installed if missing).
VIEWER_WEB := services/viewer/web
VIEWER_ASSETS := $(VIEWER_WEB)/public/openseadragon/openseadragon.min.js
$(VIEWER_ASSETS): $(VIEWER_WEB)/package.json $(VIEWER_WEB)/package-lock.json
	@command -v npm >/dev/null || { \
	  echo "installing Debian's npm (the viewer's front-end build)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null; }
	cd $(VIEWER_WEB) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	rm -rf $(VIEWER_WEB)/public/openseadragon
	mkdir -p $(VIEWER_WEB)/public/openseadragon
	cp $(VIEWER_WEB)/node_modules/openseadragon/build/openseadragon/openseadragon.min.js $(VIEWER_WEB)/public/openseadragon/
	cp -r $(VIEWER_WEB)/node_modules/openseadragon/build/openseadragon/images $(VIEWER_WEB)/public/openseadragon/

viewer-assets: $(VIEWER_ASSETS)

# `pip install -e` runs setup.py, which generates the contracts' Python code from proto/.
setup: $(STAMP) $(VIEWER_ASSETS)

# Debian packages the tests use as real peers: Prometheus (live dashboard/alert check) and promtool;
# PostgreSQL built with OpenSSL (the TLS test's server: the pgserver wheel's build has no TLS); Chromium
# (the viewer's browser test drives it headless over the DevTools protocol).
system-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  echo "installing Debian's prometheus (for the live observability test)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || { \
	  echo "installing Debian's postgresql (the TLS test's server)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }
	@command -v chromium >/dev/null || { \
	  echo "installing Debian's chromium (the viewer's browser test, headless)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@command -v dciodvfy >/dev/null || { \
	  echo "installing Debian's dicom3tools (dciodvfy validates the DICOM results in the tests)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dicom3tools >/dev/null; }
	@command -v Orthanc >/dev/null && test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so || { \
	  echo "installing Debian's orthanc and orthanc-dicomweb (the DICOMweb archive of the pull test)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null; }
	@command -v kubectl >/dev/null || echo "note: kubectl (1.27+, with built-in kustomize) is needed by tests/integration/test_deploy_static.py"

models: setup
	$(BIN)/wsi model init-defaults

demo: setup models
	$(BIN)/wsi demo

# The model path end to end on a labelled synthetic cohort (long form; about 15-25 min on 2 cores).
experiment: setup models
	$(BIN)/wsi experiment --promote

lint: setup
	$(BIN)/ruff check shared services tests
	$(BIN)/ruff format --check shared services tests

typecheck: setup
	$(BIN)/mypy

# The suite's three parts (folders under tests/; the folder sets the marker): unit (about a minute, no
# servers), integration (real files, models and single servers), e2e (the local stack and the services).
unit: setup
	$(BIN)/pytest tests/unit -m "not slow" -q

integration: setup
	$(BIN)/pytest tests/integration -m "not slow" -q

e2e: setup
	$(BIN)/pytest tests/e2e -m "not slow" -q

# Two pytest workers (pytest-xdist), each with its own local stack and services, a test file at a time:
# the end-to-end tests mostly wait (outages, restarts, kills), so two files at once take about 60% of
# the serial time on 2 cores. TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
test: setup system-deps lint typecheck
	$(BIN)/pytest -m "not slow" $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

# Regenerate the deployment files derived from shared/topics.toml and the dashboards/alerts.
deploy-generate: setup
	$(BIN)/python -m wsitk.shared.deploy

# The six images with podman (no Docker engine or registry needed: Debian base from debootstrap), and
# the six services as read-only, non-root containers against the local stack; see deploy/README.md.
images:
	deploy/local-images.sh base
	deploy/local-images.sh build

containers-smoke:
	deploy/local-images.sh smoke

stop:
	-$(BIN)/wsi services down
	-$(BIN)/wsi stack down

clean: stop
	rm -rf $(VENV) .wsi shared/contracts/_generated build *.egg-info $(VIEWER_WEB)/node_modules $(VIEWER_WEB)/public/openseadragon
