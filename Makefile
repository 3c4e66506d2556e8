# The two commands: `make train` (install, run the default job) and `make test` (install dev extras, run tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pins that pip resolves from local wheels where available; override for your platform.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install install-dev train test test-all clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

install: $(PY)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e .

install-dev: $(PY)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"

train: install
	$(VENV)/bin/metaseg-train $(ARGS)

test: install-dev
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: install-dev
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache
