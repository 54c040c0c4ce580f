# Two entry points (see README): `make run` runs the main counting pipeline, `make test` runs the tests.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
KERNEL := grpo-venv
RUN_NAME ?= embedded-default
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast showo2-env clean

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
# Show-o2's real-code tests run in Show-o2's own env (`make showo2-env`), in a second pytest run; the main
# run deselects them (tests/conftest.py), and without that env they are not run, with a note.
SHOWO2_VENV ?= .venv-showo2
SHOWO2_PY := $(SHOWO2_VENV)/bin/python
# in that env also: the adapter's fake-checkout tests, and the two grpo_lib fixes its versions needed
# (diffusers 0.31: LoRA merge then re-add; accelerate 0.23: end_training after a 2-process run)
SHOWO2_TESTS := tests/test_showo2_real.py tests/test_showo2.py \
  tests/test_policy_tiny.py::test_lora_reference_merge_and_grads tests/test_train.py::test_two_processes_match_one_process
test: $(STAMP)
	@if [ -x $(CHROMIUM) ]; then $(PY) -m pytest -q; else \
	  echo "NOTE: $(CHROMIUM) not found: deselecting the browser test (apt-get install chromium to run it)"; \
	  $(PY) -m pytest -q -m "not browser"; fi
	@if [ -x $(SHOWO2_PY) ]; then $(SHOWO2_PY) -m pytest -q -p no:cacheprovider $(SHOWO2_TESTS); else \
	  echo "NOTE: $(SHOWO2_PY) not found: Show-o2 real-code tests not run (make showo2-env to build Show-o2's env)"; fi

# Show-o2's own environment (envs/showo2-constraints.txt) with grpo_lib in it; ~6 GB, kept while pins are unchanged
showo2-env:
	bash scripts/showo2_env.sh $(SHOWO2_VENV)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf runs .pytest_cache
