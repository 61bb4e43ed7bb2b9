# covidlib: `make main` (build the dataset, train, evaluate, export) and `make test`.
# Everything runs from a virtual environment made here; nothing is downloaded at run time
# except the Python packages from PyPI on first setup.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The article's archive and metadata (see ../shared/data/README.md).
SHARED ?= ../shared/data
MANUAL_DIR ?= $(SHARED)/covid_xray_seed
DATA_DIR ?= $(CURDIR)/tfds_data
RUN_DIR ?= $(CURDIR)/runs/default
PYTEST_ARGS ?=

.PHONY: setup test main dataset

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

test: setup
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

dataset: setup
	$(BIN)/tfds build covid_xray --imports=covidlib_tfds --config=seed \
	  --manual_dir=$(MANUAL_DIR) --data_dir=$(DATA_DIR)
	$(BIN)/tfds build covid_xray --imports=covidlib_tfds --config=patient_split \
	  --manual_dir=$(MANUAL_DIR) --data_dir=$(DATA_DIR)

main: dataset
