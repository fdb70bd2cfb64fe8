# Two commands set everything up on a fresh machine:
#   make demo   trains the bundled tiny example, exports it to GGUF and ships it (Ollama when reachable)
#   make test   runs the test suite (CI runs exactly this)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# llama-cpp-python compiles llama.cpp on install; its wheel is built once and cached here.
WHEEL_CACHE ?= $(HOME)/.cache/llmforge/wheels
LLAMA_CPP_VERSION := 0.3.36
SDIST_CACHE ?= $(HOME)/.cache/llmforge/sdist
SDIST := $(SDIST_CACHE)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
STAMP := $(VENV)/.installed

.PHONY: all install demo test test-fast bench clean

all: install

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# CPU machines: torch 2.13.0 lies on local disk; any looser requirement pulls a multi-GB CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q torch==2.13.0; fi
	mkdir -p $(WHEEL_CACHE) $(SDIST_CACHE)
	@# The sdist is kept too: it holds llama.cpp's convert_hf_to_gguf.py, the tests' converter anchor.
	if [ ! -f $(SDIST) ]; then $(PIP) download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_VERSION) -d $(SDIST_CACHE); fi
	if ! ls $(WHEEL_CACHE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1; then \
	  echo "building llama-cpp-python $(LLAMA_CPP_VERSION) once (compiles llama.cpp; cached in $(WHEEL_CACHE))"; \
	  CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) wheel --no-deps $(SDIST) -w $(WHEEL_CACHE); \
	fi
	$(PIP) install -q --find-links $(WHEEL_CACHE) -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llmforge train-and-ship --demo-check

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -rs

test-fast: $(STAMP)
	$(PY) -m pytest -q -x -m "not slow" -rs

bench: $(STAMP)
	$(PY) benchmarks/convert.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache out
