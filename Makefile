# Two entry points (see README): `make run` runs the main counting pipeline, `make test` runs the tests.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
KERNEL := grpo-venv
RUN_NAME ?= embedded-default
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "grpo_lib (.venv)" >/dev/null
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m grpo_lib.pipeline --name $(RUN_NAME) --kernel $(KERNEL)

# The browser test needs Debian's chromium (`.ci/run` installs it); without it the rest still runs, and says so.
CHROMIUM ?= /usr/bin/chromium
test: $(STAMP)
	@if [ -x $(CHROMIUM) ]; then $(PY) -m pytest -q; else \
	  echo "NOTE: $(CHROMIUM) not found: deselecting the browser test (apt-get install chromium to run it)"; \
	  $(PY) -m pytest -q -m "not browser"; fi

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf runs .pytest_cache
