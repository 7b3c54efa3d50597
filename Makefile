# The two quick-start commands of the README:
#   make demo   set everything up (venv, torch, build) and run the built-in default job
#   make test   set everything up and run the full test suite (what .ci/run runs)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The local CPU build of torch on these machines; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
export MAX_JOBS ?= 2

SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py
LIBRARY := fastmerge/_C.abi3.so

.PHONY: demo test bench build clean

demo: build
	$(VENV)/bin/fastmerge bench --quick

test: build
	$(PY) -m pytest -q

bench: build
	$(PY) -m pytest benchmarks -q --benchmark-json=benchmarks/latest.json
	$(PY) benchmarks/report.py benchmarks/latest.json

build: $(LIBRARY)

# Dependencies first, then the package itself: the extension compiles against this torch
# (--no-build-isolation), and `pip install -e` builds the library in place.
$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q "setuptools>=70" wheel ninja numpy scipy tqdm "pytest>=8" pytest-benchmark hypothesis expecttest
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@ $(LIBRARY)

# After source edits: an incremental (ninja) rebuild in place.
$(LIBRARY): $(VENV)/.installed $(SOURCES)
	$(PY) setup.py -q build_ext --inplace
	touch $@

clean:
	rm -rf build *.egg-info fastmerge/_C*.so
