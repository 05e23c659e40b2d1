# edge-otlp: the two README commands are `make demo` and `make test`.
# Everything is installed into ignored folders of this checkout (.tools, .venv,
# .stack); a second run finds it there and is fast.

SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.9
UV := .tools/bin/uv
VENV_STAMP := .venv/.synced
EDGE := .venv/bin/edge-otlp

.PHONY: setup stack stack-down demo test unit lint bench clean

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV_STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --quiet --compile-bytecode
	touch $@

setup: $(VENV_STAMP)

stack: setup
	$(EDGE) stack up

stack-down: setup
	$(EDGE) stack down

# Starts the stack if it is not running and stops it again afterwards only then.
test: setup
	@was_up=0; $(EDGE) stack status >/dev/null 2>&1 && was_up=1; \
	$(EDGE) stack up || exit 1; \
	REQUIRE_BROKERS=1 .venv/bin/pytest tests; rc=$$?; \
	if [ $$was_up = 0 ]; then $(EDGE) stack down; fi; \
	exit $$rc

unit: setup
	.venv/bin/pytest tests/unit

demo: setup
	$(EDGE) demo

bench: setup
	@was_up=0; $(EDGE) stack status >/dev/null 2>&1 && was_up=1; \
	$(EDGE) stack up || exit 1; \
	$(EDGE) bench all; rc=$$?; \
	if [ $$was_up = 0 ]; then $(EDGE) stack down; fi; \
	exit $$rc

lint: setup
	.venv/bin/ruff format --check .
	.venv/bin/ruff check .
	.venv/bin/mypy

clean: stack-down
	rm -rf .venv .tools out bench-results
