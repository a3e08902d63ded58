# topodecorr: `make demo` runs the main job, `make test` runs the test suite.
# Both bootstrap a local virtual environment (.venv) with torch and torchvision.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch and torchvision are pinned as a matched pair. The CPU-only torch wheel cannot
# be used: the index's torchvision is built against the CUDA torch and fails to import
# beside the CPU one ("operator torchvision::nms does not exist"), and timm imports
# torchvision. The CUDA build runs on a machine without a GPU (a large download once).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=15 src tests

demo: $(VENV)/.installed
	$(VENV)/bin/topodecorr reproduce --preset quick

bench: $(VENV)/.installed
	$(PY) benchmarks/kernel.py
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
