# Make targets are the interface for humans and CI alike. `make test` works from a fresh clone:
# it builds its own virtualenv and installs the Debian tools it needs (promtool, wrk, nginx, node, npm, curl)
# and the openai npm package the Node end-to-end test drives (tests/e2e/node).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
APT_TOOLS := promtool:prometheus wrk:wrk nginx:nginx node:nodejs npm:npm curl:curl
NODE_DIR := tests/e2e/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed-stamp

.PHONY: install tools apt-tools demo run test unit lint typecheck bench check-deploy clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,demo,bench]'
	touch $@

# Debian packages the checks use; installed once with apt-get when missing (root on CI machines).
# nginx is the compiled-limit row of `make bench`; it lives in /usr/sbin, not on every PATH.
# Then the Node test's npm packages, exactly as package-lock.json pins them (once, stamped).
tools: apt-tools $(NODE_STAMP)

apt-tools:
	@missing=""; for pair in $(APT_TOOLS); do cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || test -x /usr/sbin/$$cmd || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -q >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing >/dev/null; \
	fi

$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json | apt-tools
	cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

demo: install
	$(BIN)/cb-proxy demo

run: install
	$(BIN)/cb-proxy serve

lint: install
	$(BIN)/ruff check proxy tests bench deploy
	$(BIN)/ruff format --check proxy tests bench deploy

typecheck: install
	$(BIN)/mypy

DEPLOY_TESTS := tests/deploy/test_static.py tests/deploy/test_live.py

unit: install
	$(BIN)/pytest -q -p no:cacheprovider --cov --cov-report=term:skip-covered \
	  $(addprefix --ignore=,$(DEPLOY_TESTS))

# promtool, offline Kubernetes schemas, and the live Prometheus scrape of a proxy under an outage.
check-deploy: install tools
	PATH="$(abspath $(BIN)):$$PATH" bash deploy/check.sh
	$(BIN)/pytest -q -p no:cacheprovider $(DEPLOY_TESTS)

test: install tools lint typecheck unit check-deploy

# One run, one summary table: wrk rows (pass-through, nginx, proxy), memory per open stream,
# latency under 3,000 open streams, routing and the SSE-writer row (bench/run.py).
bench: install tools
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
