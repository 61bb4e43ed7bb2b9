"""covidlib-evaluate end to end: main() under flagsaver on a tiny model_dir and folder dataset."""

import json
import os

import keras
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from sklearn import metrics as sk

from covidlib import calibration
from covidlib import model_dir as md
from covidlib import preprocess
from covidlib import threshold
from covidlib.cli import common
from covidlib.cli import evaluate as cli

SIZE = 32
SLOPE = 12.0  # P(COVID-19) = sigmoid(SLOPE * (mean brightness - 0.5)).


def _model() -> keras.Model:
  """A hand-set model: brighter film -> higher P(COVID-19). Has a 4-D feature map for Grad-CAM."""
  inputs = keras.Input((SIZE, SIZE, 1), name='image')
  x = keras.layers.Conv2D(1, 1, use_bias=False, name='feature')(inputs)
  x = keras.layers.GlobalAveragePooling2D(name='pool')(x)
  x = keras.layers.Dense(1, name='logit')(x)
  outputs = keras.layers.Activation('sigmoid', name='probability')(x)
  model = keras.Model(inputs, outputs)
  model.get_layer('feature').set_weights([np.ones((1, 1, 1, 1), np.float32)])
  model.get_layer('logit').set_weights([np.array([[SLOPE]], np.float32),
                                        np.array([-SLOPE / 2], np.float32)])
  return model


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
  """model_dir/ (model.keras, config.json, history.json) and data/<split>/{covid,normal}/*.png.

  Brightness overlaps between classes (normal ~ 0.42, COVID-19 ~ 0.58, sd 0.08), so neither
  split is perfectly separable and every figure has something to measure.
  """
  from PIL import Image

  root = tmp_path_factory.mktemp('evaluate_cli')
  rs = np.random.RandomState(0)
  for split, n in (('train', 4), ('validation', 24), ('test', 30)):
    for label, centre in (('normal', 0.42), ('covid', 0.58)):
      folder = root / 'data' / split / label
      folder.mkdir(parents=True)
      for i in range(n):
        level = np.clip(centre + 0.08 * rs.randn(), 0.05, 0.95)
        pixels = np.clip(255 * (level + 0.05 * rs.randn(SIZE, SIZE)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f'{label}_{i:02d}.png')
  model_dir = root / 'model_dir'
  model_dir.mkdir()
  _model().save(model_dir / md.MODEL)
  md.write_json(model_dir / md.CONFIG, {
      'model': 'brightness', 'image_size': SIZE, 'channels': 1,
      'dataset': f'folder:{root / "data"}', 'data_dir': None, 'batch_size': 8})
  md.write_json(model_dir / md.HISTORY, {'loss': [0.7, 0.6], 'val_loss': [0.71, 0.65],
                                         'accuracy': [0.5, 0.6], 'val_accuracy': [0.5, 0.55]})
  return root


def _reference(root, split):
  """Labels and P(COVID-19) computed file by file, without covidlib.data or covidlib.evaluate."""
  model = _model()
  labels, images = [], []
  for label_name, label in (('normal', 0), ('covid', 1)):
    folder = root / 'data' / split / label_name
    for name in sorted(os.listdir(folder)):
      images.append(preprocess.preprocess(preprocess.load_image(folder / name), SIZE).numpy())
      labels.append(label)
  p = model.predict(np.stack(images), verbose=0)[:, 0].astype(np.float64)
  return np.array(labels), p


@pytest.fixture
def parsed_flags():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _run(parsed_flags, **values):
  defaults = dict(dataset=None, data_dir=None, split='test', folder=None, threshold_policy=None,
                  threshold_split='validation', calibrate=False, write_decision=True,
                  group_by=None, out=None, n_bootstrap=200, seed=0, bins=10, gradcam=True,
                  gradcam_layer=None, plots=True, batch_size=8)
  with flagsaver.flagsaver(**{**defaults, **values}):
    return common.call_main(cli.main, ['covidlib-evaluate'], 'covidlib-evaluate')


def test_choose_threshold_calibrate_and_report(workspace, parsed_flags, tmp_path, capsys):
  model_dir = str(workspace / 'model_dir')
  out = tmp_path / 'report'
  status = _run(parsed_flags, model_dir=model_dir, threshold_policy='youden', calibrate=True,
                out=str(out))
  assert status == 0
  printed = capsys.readouterr().out
  assert 'report: ' in printed and 'decision written to' in printed

  names = sorted(os.listdir(out))
  assert names == ['confusion_matrix.png', 'gradcam_grid.png', 'pr.png', 'predictions.csv',
                   'reliability.png', 'report.json', 'report.md', 'roc.png',
                   'training_curves.png']
  report = json.loads((out / 'report.json').read_text())

  # The operating point, recomputed from independent predictions on the validation split.
  y_val, p_val = _reference(workspace, 'validation')
  fit = calibration.fit_temperature(y_val, p_val)
  expected = threshold.choose_threshold(y_val, calibration.apply_temperature(p_val,
                                                                             fit.temperature),
                                        'youden')
  decision = md.load_decision(model_dir)
  assert decision.policy == 'youden' and decision.split == 'validation'
  assert decision.temperature == pytest.approx(fit.temperature, rel=1e-4)
  assert decision.threshold == pytest.approx(expected.threshold, abs=1e-6)
  assert report['decision']['threshold'] == decision.threshold
  assert report['decision']['written_to'] == os.path.join(model_dir, md.DECISION)

  # The test-split figures against scikit-learn on those independent predictions.
  y, p = _reference(workspace, 'test')
  q = calibration.apply_temperature(p, decision.temperature)
  predicted = q >= decision.threshold
  figures = report['metrics']['figures']
  assert report['data']['n'] == 60 and report['data']['n_covid'] == 30
  tn, fp, fn, tp = sk.confusion_matrix(y, predicted).ravel()
  assert report['metrics']['confusion']['matrix'] == [[tn, fp], [fn, tp]]
  assert figures['sensitivity']['value'] == pytest.approx(sk.recall_score(y, predicted))
  assert figures['roc_auc']['value'] == pytest.approx(sk.roc_auc_score(y, p), abs=1e-6)
  assert figures['brier']['value'] == pytest.approx(sk.brier_score_loss(y, q), abs=1e-6)
  low, high = figures['roc_auc']['ci95']
  assert low < figures['roc_auc']['value'] < high
  assert report['groups'] == {}  # A folder has no source to group by.
  assert report['calibration']['temperature'] == decision.temperature
  assert report['gradcam']['layer'] == 'feature' and len(report['gradcam']['grid_items']) == 8
  n_errors = fp + fn
  assert report['gradcam']['selection'] == (
      f'the {min(n_errors, 8)} most confident errors'
      + (f', then the {8 - n_errors} most confident correct predictions' if n_errors < 8 else ''))

  text = (out / 'report.md').read_text()
  lines = [line for line in text.splitlines() if line]
  assert lines[1].startswith('> **Research software, not a diagnostic device.')
  sens = figures['sensitivity']
  assert (f'| Sensitivity (COVID-19 recall) | {sens["value"]:.3f} | '
          f'[{sens["ci95"][0]:.3f}, {sens["ci95"][1]:.3f}] | {tp}/{tp + fn} | wilson |') in text
  assert f'| **true COVID-19** | {fn} (FN) | {tp} (TP) |' in text
  assert 'Written to `' in text and 'gradcam_grid.png' in text
  assert 'T = ' in text  # Calibration section reports the fitted temperature.


def test_stored_decision_is_used_on_a_folder(workspace, parsed_flags, tmp_path):
  model_dir = tmp_path / 'model_dir'
  model_dir.mkdir()
  for name in (md.MODEL, md.CONFIG):
    (model_dir / name).write_bytes((workspace / 'model_dir' / name).read_bytes())
  md.save_decision(model_dir, md.Decision(threshold=0.6, policy='fixed:0.6', temperature=2.0,
                                          split='validation'))
  status = _run(parsed_flags, model_dir=str(model_dir),
                folder=str(workspace / 'data' / 'test'), gradcam=False, plots=False)
  assert status == 0
  out = model_dir / 'eval_folder'
  report = json.loads((out / 'report.json').read_text())
  assert report['decision']['chosen_now'] is False
  assert report['decision']['loaded_from'] == os.path.join(str(model_dir), md.DECISION)
  y, p = _reference(workspace, 'test')
  predicted = calibration.apply_temperature(p, 2.0) >= 0.6
  tn, fp, fn, tp = sk.confusion_matrix(y, predicted).ravel()
  assert report['metrics']['confusion']['matrix'] == [[tn, fp], [fn, tp]]
  assert 'gradcam' not in report
  assert sorted(os.listdir(out)) == ['predictions.csv', 'report.json', 'report.md']
  assert 'Plots skipped: plots turned off.' in (out / 'report.md').read_text()


@pytest.mark.parametrize('values,status,message', [
    (dict(threshold_policy='youdn'), 2, "bad threshold policy 'youdn'"),
    (dict(group_by=['hospital']), 2, "cannot group by ['hospital']: valid features are"),
    (dict(split='nope'), 2, 'split folder'),
    (dict(model_dir='/nonexistent/run'), 2, "model_dir '/nonexistent/run' does not exist"),
])
def test_usage_errors_are_one_line(workspace, parsed_flags, tmp_path, capsys, values, status,
                                   message):
  values = {'model_dir': str(workspace / 'model_dir'), 'out': str(tmp_path / 'o'), **values}
  assert _run(parsed_flags, **values) == status
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('covidlib-evaluate: error: ')
  assert message in err
  assert not (tmp_path / 'o').exists()


def test_policy_on_a_one_class_split_fails_with_data_error(workspace, parsed_flags, tmp_path,
                                                          capsys):
  one_class = tmp_path / 'data'
  (one_class / 'validation' / 'normal').mkdir(parents=True)
  (one_class / 'validation' / 'covid').mkdir(parents=True)
  source = workspace / 'data' / 'validation' / 'normal'
  for name in sorted(os.listdir(source))[:3]:
    (one_class / 'validation' / 'normal' / name).write_bytes((source / name).read_bytes())
  status = _run(parsed_flags, model_dir=str(workspace / 'model_dir'),
                dataset=f'folder:{one_class}', threshold_policy='youden',
                out=str(tmp_path / 'o'))
  assert status == 1
  assert 'needs both classes, it has 0 COVID-19 and 3 normal' in capsys.readouterr().err
