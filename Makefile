# uniir-kit. `make reproduce` and `make test` are the two commands; each sets up what it needs.
SHELL := /bin/bash
PROFILE ?= tiny
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.uniir-kit-installed
PYTEST_ARGS ?=

.PHONY: setup test test-fast reproduce lab notebooks readme bench lock clean distclean

setup: $(STAMP)

# Idempotent: rebuilt only when the lock or pyproject change. uv when it can be had (fast), pip otherwise.
# Installed packages are compiled to bytecode: where PYTHONDONTWRITEBYTECODE is set, Python would
# otherwise recompile torch, transformers and open_clip in every kernel (about 8 s per notebook).
$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@if command -v uv >/dev/null 2>&1; then UV=uv; \
	elif $(PY) -m pip install -q --disable-pip-version-check uv >/dev/null 2>&1; then UV=$(VENV)/bin/uv; \
	else UV=; fi; \
	if [ -n "$$UV" ]; then \
	  echo "setup: installing requirements.lock into $(VENV) with uv"; \
	  $$UV pip install -q --python $(PY) --compile-bytecode -r requirements.lock && \
	  $$UV pip install -q --python $(PY) --no-deps -e .; \
	else \
	  echo "setup: installing requirements.lock into $(VENV) with pip"; \
	  $(PY) -m pip install -q -r requirements.lock && $(PY) -m pip install -q --no-deps -e . && \
	  $(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null; \
	fi
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (uniir-kit)" >/dev/null
	@touch $(STAMP)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The unit tests alone (no notebooks): minutes less than `make test`.
test-fast: setup
	$(PY) -m pytest -q -m "not notebook" $(PYTEST_ARGS)

# Knobs for one run without editing a profile: `make reproduce PROFILE=full DEVICE=cpu`, or any knob
# with SET="MAX_STEPS=20 DATA_DIR=/data/M-BEIR".
reproduce: setup
	$(PY) -m uniir_lite reproduce --profile $(PROFILE) $(if $(DEVICE),--set DEVICE=$(DEVICE)) $(foreach s,$(SET),--set $(s))

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

notebooks: setup
	$(PY) -m uniir_lite notebooks sync

# Record the wall times, metrics and README figures of the last `make reproduce` (or of RECORD=path/to/
# report.json) and regenerate the README's measured tables and figures (figures/*.png, committed).
readme: setup
	$(PY) -m uniir_lite readme --record $(or $(RECORD),runs/$(PROFILE)/report.json)

# Speed and memory benchmarks -> benchmarks/results/<device>.json (BENCH_SIZE=ci|small|full; default:
# full sizes on a GPU, small on CPU). `make readme` turns the files into the README's performance table.
bench: setup
	$(PY) benchmarks/run.py --size $(or $(BENCH_SIZE),auto)

lock:
	uv pip compile pyproject.toml --all-extras --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --no-header --no-annotate -o requirements.lock
	sed -i '1i # Pinned, tested set for Linux x86_64 + Python 3.11. Regenerate with `make lock`.' requirements.lock

clean:
	rm -rf runs .pytest_cache figures/*/
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) data
