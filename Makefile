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
# ccache, when installed, through Debian's masquerading folder (c++ -> ccache c++): a rebuild after
# `make clean` or in a fresh clone of the same sources compiles nothing
CCACHE_BIN := $(firstword $(wildcard /usr/lib/ccache /usr/local/lib/ccache))
ifneq ($(CCACHE_BIN),)
export PATH := $(CCACHE_BIN):$(PATH)
endif

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
# package with its dependencies and test extras (pyproject.toml), without compiling: the engine is
# compiled once, by the rule below (pip would compile it again in a throwaway folder).
# Quiet: the installers' output goes to build/setup.log, shown when a step fails.
$(VENV)/.installed: pyproject.toml setup.py
	@mkdir -p build
	@echo "setting up $(VENV) (torch, dependencies; log: build/setup.log)"
	@{ test -x $(PY) || $(PYTHON) -m venv $(VENV); } > build/setup.log 2>&1 \
	  && $(PY) -m pip install -q --upgrade pip >> build/setup.log 2>&1 \
	  && { $(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"; } >> build/setup.log 2>&1 \
	  && $(PY) -m pip install -q "setuptools>=77" wheel ninja >> build/setup.log 2>&1 \
	  && FASTMERGE_SKIP_EXTENSION=1 $(PY) -m pip install -q --no-build-isolation -e ".[test,demo]" >> build/setup.log 2>&1 \
	  || { tail -n 60 build/setup.log; exit 1; }
	@touch $@

# The engine, compiled in place against the venv's torch: incremental (ninja, objects kept in
# build/), quiet unless it fails (the full log is build/engine.log).
$(LIBRARY): $(VENV)/.installed $(SOURCES)
	@mkdir -p build
	@echo "compiling the engine (fastmerge/_C; a few minutes the first time, log: build/engine.log)"
	@$(PY) setup.py build_ext --inplace > build/engine.log 2>&1 || { tail -n 60 build/engine.log; exit 1; }
	@touch $@

clean:
	rm -rf build *.egg-info fastmerge/_C*.so
