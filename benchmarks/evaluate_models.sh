#!/usr/bin/env bash
# Issue 4's closing figures: covidlib-evaluate on the two trained model_dirs, and a copy of each
# report.md and Grad-CAM grid in benchmarks/results/evaluate/.
#
#   benchmarks/evaluate_models.sh RUNS_DIR TFDS_DATA_DIR
#   benchmarks/evaluate_models.sh /work/runs tfds_data
#
# Expects RUNS_DIR/compact_resnet (trained on covid_xray/patient_split) and RUNS_DIR/seed_cnn
# (the article's recipe on covid_xray/seed, 3 channels, 10 epochs), e.g. from covidlib-train:
#   covidlib-train --model_dir=RUNS_DIR/compact_resnet --dataset=covid_xray/patient_split \
#       --data_dir=TFDS_DATA_DIR --model=compact_resnet --epochs=15
#   covidlib-train --model_dir=RUNS_DIR/seed_cnn --dataset=covid_xray/seed \
#       --data_dir=TFDS_DATA_DIR --model=seed_cnn --channels=3 --epochs=10
#
# compact_resnet: threshold by Youden's J and a temperature, both fitted on patient_split's
# validation split (written to its decision.json), then measured on the untouched test split.
# seed_cnn: the seed config has no test split, so it is measured on its validation split at the
# article's fixed 0.5 with no temperature (fitting either there would grade it on its own
# answers).
#
# CROSSVAL=1 also runs 5-fold patient-grouped cross-validation of compact_resnet over
# patient_split's train+validation (about 3 minutes on 2 CPU cores) into RUNS_DIR/cv_compact_resnet.
set -euo pipefail

RUNS=${1:?usage: $0 RUNS_DIR TFDS_DATA_DIR}
DATA=${2:?usage: $0 RUNS_DIR TFDS_DATA_DIR}
PYTHON=${PYTHON:-.venv/bin/python}
RESULTS=benchmarks/results/evaluate
mkdir -p "$RESULTS"

"$PYTHON" -m covidlib.cli.evaluate --model_dir="$RUNS/compact_resnet" \
  --dataset=covid_xray/patient_split --data_dir="$DATA" --split=test \
  --threshold_policy=youden --calibrate --group_by=source,view \
  --out="$RUNS/compact_resnet/eval_test"

"$PYTHON" -m covidlib.cli.evaluate --model_dir="$RUNS/seed_cnn" \
  --dataset=covid_xray/seed --data_dir="$DATA" --split=validation --group_by=source,view \
  --out="$RUNS/seed_cnn/eval_validation"

cp "$RUNS/compact_resnet/eval_test/report.md" "$RESULTS/compact_resnet_patient_split_test.md"
cp "$RUNS/compact_resnet/eval_test/gradcam_grid.png" \
  "$RESULTS/compact_resnet_patient_split_test_gradcam.png"
cp "$RUNS/seed_cnn/eval_validation/report.md" "$RESULTS/seed_cnn_seed_validation.md"
cp "$RUNS/seed_cnn/eval_validation/gradcam_grid.png" \
  "$RESULTS/seed_cnn_seed_validation_gradcam.png"

if [[ "${CROSSVAL:-0}" == 1 ]]; then
  "$PYTHON" -m covidlib.cli.crossval --out="$RUNS/cv_compact_resnet" --model=compact_resnet \
    --dataset=covid_xray/patient_split --data_dir="$DATA" --splits=train,validation \
    --folds=5 --epochs=15
  cp "$RUNS/cv_compact_resnet/crossval.md" "$RESULTS/compact_resnet_crossval.md"
fi
echo "reports and Grad-CAM grids copied to $RESULTS/"
