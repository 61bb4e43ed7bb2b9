"""An ensemble model_dir (covidlib-ensemble) through evaluation, export, parity and predict: the
averaged model is one ordinary covidlib model, a calibration temperature included.

    .venv/bin/python -m pytest tests/exporters/test_ensemble_export.py -q
"""

import os

import keras
import numpy as np
import pytest

from covidlib import ensemble
from covidlib import evaluate
from covidlib import model_dir as md
from covidlib import models
from covidlib import predict
from covidlib import data
from exporters import export

SIZE = 16


def _member(seed: int, calibration: np.ndarray) -> keras.Model:
  """compact_resnet with its logit spread to mean 0, sd 2 over the calibration images (so the
  decisions do not all sit at the threshold)."""
  model = models.build_model('compact_resnet', SIZE, 1, seed=seed)
  logit = model.get_layer('logit')
  features = keras.Model(model.input, logit.input)(calibration).numpy()
  kernel, bias = logit.get_weights()
  z = features @ kernel + bias
  scale = 2.0 / max(float(z.std()), 1e-6)
  logit.set_weights([kernel * scale, (bias - float(z.mean())) * scale])
  return model


@pytest.mark.slow
def test_an_ensemble_evaluates_exports_and_predicts(tmp_path, helpers, folder_dataset,
                                                    calibration_images):
  members = []
  for seed in (0, 1):
    path = str(tmp_path / f'seed{seed}')
    helpers.write_model_dir(path, _member(seed, calibration_images))
    members.append(path)
  out = str(tmp_path / 'ensemble')
  ensemble.write_ensemble(members, out)
  dataset = f'folder:{folder_dataset}'

  # covidlib-evaluate: threshold and temperature chosen on validation, Grad-CAM (member 0's).
  result = evaluate.evaluate_model_dir(out, split='validation', dataset=dataset,
                                       threshold_policy='youden', calibrate=True, gradcam=True,
                                       n_bootstrap=50)
  decision = md.load_decision(out)
  assert decision.policy == 'youden' and result.report['metrics']['figures']['roc_auc']
  if decision.temperature == 1.0:  # Make sure a temperature travels through the fold.
    md.save_decision(out, md.Decision(decision.threshold, 'youden', 1.5, 'validation'))

  report = export.export_model_dir(out, str(tmp_path / 'export'), dataset=dataset,
                                   formats=['saved_model', 'tflite_fp32', 'tflite_int8'],
                                   calibration_images=20, latency_runs=0,
                                   allow_parity_miss=True)
  assert report['models']['saved_model']['max_abs_dp'] < 1e-5
  assert report['models']['tflite_fp32']['max_abs_dp'] < 1e-5
  assert report['models']['tflite_int8']['agreement'] >= 0.9

  # predict: the model_dir (Keras, calibrated) and the SavedModel give the same P.
  paths, _ = data.list_folder(os.path.join(folder_dataset, 'validation'))
  keras_p = [r.probability for r in predict.Predictor(out).predict_files(paths)]
  saved_p = [r.probability for r in
             predict.Predictor(str(tmp_path / 'export' / 'saved_model')).predict_files(paths)]
  np.testing.assert_allclose(keras_p, saved_p, atol=1e-5)
