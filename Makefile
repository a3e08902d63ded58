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

.PHONY: install test demo bench data clean

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

# Fashion-MNIST for the real-data sweeps: Debian's dataset-fashion-mnist package puts the four
# IDX files in $(FASHION_DIR), where the loader looks. Installed when run as root with apt;
# otherwise the command to run is printed. The other datasets need nothing: digits ships with
# scikit-learn and MNIST-1D is generated offline.
FASHION_DIR := /usr/share/datasets/fashion-mnist

data:
	@if ls $(FASHION_DIR)/train-images-idx3-ubyte* >/dev/null 2>&1; then \
		echo "Fashion-MNIST: found in $(FASHION_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update && apt-get install -y dataset-fashion-mnist; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "Fashion-MNIST is not installed. As root, run:"; \
		echo "  sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"; \
	else \
		echo "Fashion-MNIST is not installed and this system has no apt-get: put the four IDX files"; \
		echo "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz,"; \
		echo "t10k-labels-idx1-ubyte.gz) in a folder and pass --data-dir FOLDER (or set TOPODECORR_DATA)."; \
	fi

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
