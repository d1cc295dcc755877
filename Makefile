# One entry point for people and CI. `make test` installs everything the tests need, then runs them.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
CACHE ?= $(HOME)/.cache/m2fp-prelabel
export M2FP_CACHE := $(CACHE)

.PHONY: setup system-deps venv ls-venv ref-env test serve bench clean

setup: system-deps venv ls-venv ref-env

# Real servers and tools the tests start: redis-server, Chromium + driver, docker-compose (config check only).
system-deps:
	@bash scripts/install_system_deps.sh

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -r requirements.txt -r requirements-dev.txt
	$(VENV)/bin/pip install -q --no-deps label-studio-ml==1.0.9
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

# Label Studio lives in its own venv: it pins Django and an SDK of its own that must not constrain ours.
ls-venv:
	@bash scripts/install_label_studio.sh

# The official modelscope pipeline, the reference for parity and speed (mmcv-full compiled once, cached).
ref-env:
	@bash testing/reference/setup_env.sh

test: setup
	$(VENV)/bin/python -m pytest -q tests

serve: venv
	$(VENV)/bin/python _wsgi.py --host 0.0.0.0 --port 9090

bench: setup
	$(VENV)/bin/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) .pytest_cache
