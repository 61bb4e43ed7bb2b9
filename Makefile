# covidlib: `make main` (build the dataset, train, evaluate, export) and `make test`.
# Everything runs from a virtual environment made here; the only downloads are Python packages
# from PyPI on first setup. Each step writes a file that later runs reuse, so `make main` run
# again (or after an interruption) goes on where it stopped: training itself resumes mid-run.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The article's archive and manifest (see ../shared/data/README.md).
SHARED ?= ../shared/data
MANUAL_DIR ?= $(SHARED)/covid_xray_seed
DATA_DIR ?= $(CURDIR)/tfds_data
RUN_DIR ?= $(CURDIR)/runs/default
# The default job: the compact network on the patient-level split, judged on its test split.
DATASET ?= covid_xray/patient_split
MODEL ?= compact_resnet
EPOCHS ?= 30
SEED ?= 0
# Judged on the untouched test split, at a threshold and temperature fitted on validation.
# covid_xray/seed has no test split: EVAL_SPLIT=validation EVAL_FLAGS= (the article's fixed 0.5).
EVAL_SPLIT ?= test
EVAL_FLAGS ?= --threshold_policy=youden --calibrate
PYTEST_ARGS ?=

MODEL_DIR := $(RUN_DIR)/$(MODEL)
PREPARED := $(DATA_DIR)/.built-seed $(DATA_DIR)/.built-patient_split

.PHONY: setup test main dataset train evaluate export audit clean-run

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

test: setup
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

# Our offline copy lacks one image the manifest lists: --allow_missing builds anyway and
# reports it by name (see covidlib_tfds/covid_xray/README.md).
$(DATA_DIR)/.built-%: $(VENV)/.installed
	$(BIN)/python -m covidlib_tfds.build --config=$* --manual_dir=$(MANUAL_DIR) \
	  --data_dir=$(DATA_DIR) --allow_missing
	touch $@

dataset: $(PREPARED)

audit: $(PREPARED)
	$(BIN)/python -m covidlib_tfds.audit --config=seed --data_dir=$(DATA_DIR) --allow_leakage
	$(BIN)/python -m covidlib_tfds.audit --config=patient_split --data_dir=$(DATA_DIR)

$(MODEL_DIR)/model.keras: $(PREPARED)
	$(BIN)/covidlib-train --model_dir=$(MODEL_DIR) --dataset=$(DATASET) --data_dir=$(DATA_DIR) \
	  --model=$(MODEL) --epochs=$(EPOCHS) --seed=$(SEED)

train: $(MODEL_DIR)/model.keras

$(RUN_DIR)/report/report.md: $(MODEL_DIR)/model.keras
	$(BIN)/covidlib-evaluate --model_dir=$(MODEL_DIR) --dataset=$(DATASET) --data_dir=$(DATA_DIR) \
	  --split=$(EVAL_SPLIT) $(EVAL_FLAGS) --out=$(RUN_DIR)/report

evaluate: $(RUN_DIR)/report/report.md

$(RUN_DIR)/export/export_report.md: $(RUN_DIR)/report/report.md
	$(BIN)/covidlib-export --model_dir=$(MODEL_DIR) --out=$(RUN_DIR)/export --dataset=$(DATASET) \
	  --data_dir=$(DATA_DIR) --eval_report=$(RUN_DIR)/report/report.json --overwrite

export: $(RUN_DIR)/export/export_report.md

main: audit export
	@echo "Done: model $(MODEL_DIR), report $(RUN_DIR)/report/report.md, exports $(RUN_DIR)/export"

clean-run:
	rm -rf $(RUN_DIR)
