"""exporters.parity: figures against a reference, target verdicts, Markdown, argument checks."""

import copy
import os

import numpy as np
import pytest

from covidlib import errors
from covidlib import metrics
from covidlib import model_dir as model_dir_lib
from covidlib import predict
from exporters import parity
from exporters import tflite


@pytest.fixture(scope='module')
def setup(model_dir, tiny_model, decision, calibration_images, images, helpers,
          tmp_path_factory):
  root = tmp_path_factory.mktemp('parity')
  variants = {}
  for quant_type in ('fp32', 'int8'):
    path = root / f'model_{quant_type}.tflite'
    path.write_bytes(tflite.convert_tflite(
        tiny_model, quant_type, calibration_images if quant_type == 'int8' else None,
        decision=decision))
    variants[f'tflite_{quant_type}'] = str(path)
  x = helpers.preprocessed(images)
  p = predict.Predictor(model_dir).predict_preprocessed(x)
  labels = (p >= np.median(p)).astype(int)  # Labels the model ranks well: AUC near 1.
  labels[:3] = 1 - labels[:3]               # ... but not perfectly.
  report = parity.parity_report(model_dir, variants, x, labels, split='generated',
                                latency_runs=2, n_bootstrap=50)
  return report, variants, x, labels


def test_figures_and_deltas(setup, model_dir):
  report, variants, x, labels = setup
  p_ref = predict.Predictor(model_dir).predict_preprocessed(x)
  p_int8 = predict.Predictor(variants['tflite_int8']).predict_preprocessed(x)
  keras = report['models']['keras']
  expected_auc = metrics.compute_metrics(labels, p_ref, 0.42, n_bootstrap=0).figures['roc_auc']
  assert keras['figures']['roc_auc']['value'] == pytest.approx(expected_auc.value)
  int8 = report['models']['tflite_int8']
  assert int8['max_abs_dp'] == pytest.approx(np.abs(p_int8 - p_ref).max(), abs=1e-6)
  assert int8['mean_abs_dp'] == pytest.approx(np.abs(p_int8 - p_ref).mean(), abs=1e-6)
  agreement = np.mean((p_int8 >= 0.42) == (p_ref >= 0.42))
  assert int8['agreement'] == pytest.approx(agreement)
  assert int8['targets']['agreement']['pass'] == (agreement >= 0.98)
  auc_int8 = metrics.compute_metrics(labels, p_int8, 0.42, n_bootstrap=0).figures['roc_auc']
  assert int8['roc_auc_drop'] == pytest.approx(expected_auc.value - auc_int8.value)
  assert report['models']['tflite_fp32']['agreement'] == 1.0
  assert report['models']['tflite_fp32']['targets']['roc_auc_drop']['pass'] is True
  assert int8['file_size_bytes'] == os.path.getsize(variants['tflite_int8'])
  assert keras['file_size_bytes'] == os.path.getsize(os.path.join(model_dir, 'model.keras'))
  assert report['n'] == len(labels) and report['threshold'] == 0.42


def test_verdicts_in_markdown(setup):
  report = copy.deepcopy(setup[0])
  report['models']['tflite_fp32']['targets']['agreement']['pass'] = False
  report['all_targets_met'] = False
  markdown = parity.render_markdown(report)
  assert '| tflite_fp32 | **FAIL** | pass |  |' in markdown
  assert 'Overall: SOME TARGETS MISSED.' in markdown
  assert 'Research software, not a diagnostic device.' in markdown


def test_write_report_is_json_and_markdown(setup, tmp_path):
  json_path, md_path = parity.write_report(str(tmp_path), setup[0])
  assert model_dir_lib.read_json(json_path)['models']['keras']['format'] == 'keras'
  assert open(md_path).read() == parity.render_markdown(setup[0])


def test_bad_arguments(setup, model_dir, tmp_path, tiny_model, helpers):
  _, variants, x, labels = setup
  with pytest.raises(errors.UsageError, match='at least one exported variant'):
    parity.parity_report(model_dir, {}, x, labels)
  with pytest.raises(errors.UsageError, match='N labels'):
    parity.parity_report(model_dir, variants, x, labels[:-1])
  other = helpers.write_model_dir(tmp_path / 'other', tiny_model)  # Threshold 0.5, not 0.42.
  with pytest.raises(errors.UsageError, match="variant 'tflite_fp32' has threshold 0.42"):
    parity.parity_report(other, variants, x, labels, latency_runs=0)


def test_file_size_of_a_folder_sums_its_files(tmp_path):
  (tmp_path / 'a').mkdir()
  (tmp_path / 'a' / 'x').write_bytes(b'123')
  (tmp_path / 'y').write_bytes(b'45')
  assert parity.file_size(str(tmp_path)) == 5
  assert parity.file_size(str(tmp_path / 'y')) == 2
