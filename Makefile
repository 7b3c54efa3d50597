# The two quick-start commands of the README:
#   make demo   set everything up (venv, torch, build) and run the built-in default job
#   make test   set everything up and run the full test suite (what .ci/run runs)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is the CPU build these machines provide locally (an unpinned torch would pull a
# multi-GB CUDA build). Elsewhere preinstall torch in .venv or set TORCH_SPEC.
TORCH_SPEC ?= torch==2.13.0
export MAX_JOBS ?= 2

SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py
LIBRARY := fastmerge/_C.abi3.so

.PHONY: demo test bench build clean

demo: build
	$(VENV)/bin/fastmerge demo

test: build
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q

bench: build
	$(PY) -m pytest benchmarks -q --benchmark-json=benchmarks/latest.json
	$(PY) benchmarks/report.py benchmarks/latest.json

build: $(LIBRARY)

# torch first, then the build requirements (--no-build-isolation does not install them), then the
# package with its dependencies and test extras (pyproject.toml); the extension compiles against
# this torch and `pip install -e` builds the library in place.
$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q "setuptools>=70" wheel ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test,demo]"
	test -s $(LIBRARY)
	touch $@
	touch -c $(LIBRARY)

# After source edits: an incremental (ninja) rebuild in place.
$(LIBRARY): $(VENV)/.installed $(SOURCES)
	$(PY) setup.py -q build_ext --inplace
	touch $@

clean:
	rm -rf build *.egg-info fastmerge/_C*.so
