# The two commands of the README: `make demo` and `make test`.
# Both create .venv, install mlsctl into it (only when pyproject.toml changed) and make sure
# Fashion-MNIST is on the machine (Debian package dataset-fashion-mnist) before doing their work.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: demo test test-long venv fmnist bench clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# Installs the Debian package when the data is missing and apt can be used (root or password-less sudo);
# otherwise says what to install and carries on (tests build their own tiny data).
fmnist:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing dataset-fashion-mnist"; \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null)); \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	  echo "installing dataset-fashion-mnist"; \
	  (sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null)); \
	else \
	  echo "Fashion-MNIST is missing and apt is not usable here: install the Debian package dataset-fashion-mnist"; \
	fi

demo: venv fmnist
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

# One pytest process per usable core (pytest-xdist), each running whole test files in their order:
# the tests run single-threaded, so on 2 cores this halves the time. TEST_PROCESSES=0 runs them in one.
TEST_PROCESSES ?= auto

test: venv fmnist
	$(BIN)/python -m pytest -q -n $(TEST_PROCESSES) --dist loadfile

# the tests over a minute each (marker long), left out of `make test`
test-long: venv fmnist
	$(BIN)/python -m pytest -q -m long

bench: venv fmnist
	$(BIN)/python benchmarks/train_throughput.py

clean-demo:
	rm -rf data/fmnist-scenes features/demo results/demo-knn-seg-*.json results/demo-search-ev00007.json \
	  data/fmnist-products runs/mile_fmnist_backbone_demo runs/demo-96-objects.csv galleries/demo-products
