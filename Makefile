# topodecorr: `make demo` runs the main job, `make test` runs the test suite.
# Both bootstrap a local virtual environment (.venv) with a CPU build of torch.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q src tests

demo: $(VENV)/.installed
	$(VENV)/bin/topodecorr reproduce --preset quick

bench: $(VENV)/.installed
	$(PY) benchmarks/kernel.py
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
