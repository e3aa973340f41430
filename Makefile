# Every developer entry point. `make run` to use the product, `make test` to check it.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# The main pass runs on this many pytest-xdist processes, each with its own test database, queue
# and session worker (worksteal: an idle process takes tests queued for a busy one, so the long
# tests do not leave the others waiting). One process: make test PYTEST_ARGS=-n0
TEST_PROCESSES ?= 3
MAIN_PYTEST_ARGS ?= -n $(TEST_PROCESSES) --dist worksteal
# When set, every pass writes its JUnit report there (main.xml, threads.xml, amqp.xml).
JUNIT_DIR ?=
# The RabbitMQ subset of `make test` (the engine's saga tests and the quick chaos run).
AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672//
AMQP_TESTS ?= tests/sagas/test_engine.py tests/chaos
AMQP_PYTEST_ARGS ?=
# The saga tests again on the provider-bound worker setup (threads pool, 32 threads).
THREADS_TESTS ?= tests/sagas/test_engine.py tests/sagas/test_transactional_steps.py \
	tests/sagas/test_shared_records.py tests/orders/test_order_outcomes.py
# e.g. make chaos CHAOS_ARGS="--quick --seed 7"; make bench BENCH_ARGS="--skip-sweep"
CHAOS_ARGS ?=
BENCH_ARGS ?=
# Dev commands need a SECRET_KEY (DEBUG stays off: it would skew the benchmark) and talk plain
# http to their own loopback servers.
DEV_KEY := SECRET_KEY=$${SECRET_KEY:-make-dev-only-not-secret} HTTPS_ONLY=$${HTTPS_ONLY:-0}

.PHONY: help venv run test chaos bench lint fmt migrate clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

# Created when missing, re-installed whenever pyproject.toml changes.
$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)  ## create or update .venv

run: $(STAMP)  ## web (port 8000) + worker + beat in the foreground; Ctrl-C stops all
	@$(VPY) scripts/run.py || [ $$? -eq 130 ]  # Ctrl-C is how it is meant to stop

# The threads-pool pass and the RabbitMQ pass run beside the main pass (each its own pytest
# session, database and queue, so they share nothing); their output lands in test-artifacts/
# and is printed when the main pass is done. make test fails if any pass fails.
# The suite starts about 250 Python processes (pytest sessions, workers, web, subprocesses). With
# PYTHONDONTWRITEBYTECODE set (as in many containers and CI images) each one compiled every
# module of the project again, and pytest rewrote the asserts of every test module in each of its
# five sessions (388 -> 357 s for make test on two cores). make test keeps the bytecode instead,
# under var/pycache (PYTHONPYCACHEPREFIX), so the checkout itself still gets no __pycache__.
TEST_ENV := unset PYTHONDONTWRITEBYTECODE; export PYTHONPYCACHEPREFIX="$(CURDIR)/var/pycache";

test: $(STAMP)  ## the whole suite against PostgreSQL, Redis and RabbitMQ, with real workers
	@$(TEST_ENV) $(VPY) scripts/preflight.py
	@mkdir -p test-artifacts $(JUNIT_DIR)
	@$(TEST_ENV) junit() { if [ -n "$(JUNIT_DIR)" ]; then echo "--junitxml=$(JUNIT_DIR)/$$1.xml"; fi; }; \
	threads_log=test-artifacts/threads-pass.log; amqp_log=test-artifacts/amqp-pass.log; \
	rm -f "$$threads_log" "$$amqp_log" $(if $(JUNIT_DIR),$(JUNIT_DIR)/*.xml); \
	echo "make test: the saga tests again on a threads-pool worker (32 threads), alongside" \
	  "-> $$threads_log"; \
	SAGA_TEST_WORKER_POOL=threads:32 $(VPY) -m pytest $(THREADS_TESTS) $$(junit threads) \
	  >"$$threads_log" 2>&1 & threads=$$!; \
	amqp=; \
	if $(VPY) -c "import socket, sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); \
	    socket.create_connection((p.hostname or '127.0.0.1', p.port or 5672), 2)" '$(AMQP_URL)' \
	    2>/dev/null; then \
	  echo "make test: the saga tests and the quick chaos run again, on RabbitMQ" \
	    "($(AMQP_URL)), alongside -> $$amqp_log"; \
	  CELERY_BROKER_URL='$(AMQP_URL)' $(VPY) -m pytest $(AMQP_TESTS) $(AMQP_PYTEST_ARGS) \
	    $$(junit amqp) >"$$amqp_log" 2>&1 & amqp=$$!; \
	else \
	  echo "make test: RabbitMQ subset SKIPPED: nothing answers at $(AMQP_URL)" \
	    "(start it with: rabbitmq-server -detached)"; \
	fi; \
	echo "$(VPY) -m pytest $(MAIN_PYTEST_ARGS) $(PYTEST_ARGS) $$(junit main)"; \
	$(VPY) -m pytest $(MAIN_PYTEST_ARGS) $(PYTEST_ARGS) $$(junit main); main=$$?; \
	wait $$threads; threads_status=$$?; \
	echo; echo "make test: threads-pool pass (exit $$threads_status), $$threads_log:"; \
	cat "$$threads_log"; \
	amqp_status=0; amqp_summary=skipped; \
	if [ -n "$$amqp" ]; then \
	  wait $$amqp; amqp_status=$$?; amqp_summary="exit $$amqp_status"; \
	  echo; echo "make test: RabbitMQ pass (exit $$amqp_status), $$amqp_log:"; cat "$$amqp_log"; \
	fi; \
	echo; echo "make test: main pass exit $$main, threads-pool pass exit $$threads_status," \
	  "RabbitMQ pass $$amqp_summary"; \
	[ "$$main" -eq 0 ] && [ "$$threads_status" -eq 0 ] && [ "$$amqp_status" -eq 0 ]

chaos: $(STAMP)  ## faults, worker kills, broker restarts, then check_invariants
	$(DEV_KEY) $(VPY) manage.py chaos $(CHAOS_ARGS)

bench: $(STAMP)  ## the headline benchmark and its plot
	$(DEV_KEY) $(VPY) manage.py saga_bench --all $(BENCH_ARGS)

# mypy's Django plugin loads the settings, which need a SECRET_KEY (any value does).
lint: $(STAMP)  ## ruff check + format check + mypy + import contracts (lint-imports)
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .
	$(DEV_KEY) $(VPY) -m mypy
	$(VENV)/bin/lint-imports --no-cache --no-logo

fmt: $(STAMP)  ## ruff format + safe fixes
	$(VPY) -m ruff check --fix .
	$(VPY) -m ruff format .

migrate: $(STAMP)  ## apply migrations to the database `make run` would use
	$(VPY) scripts/run.py --migrate-only

clean:  ## remove caches and test artifacts (keeps .venv and var/)
	rm -rf test-artifacts bench-results .hypothesis .pytest_cache .ruff_cache .mypy_cache \
	  .import_linter_cache build dist \
	  *.egg-info
	find . -path ./.venv -prune -o -name __pycache__ -type d -exec rm -rf {} +
