"""covidlib-evaluate's shift section (issue #10) on a hand-set model and a folder dataset.

    .venv/bin/python -m pytest tests/covidlib/test_evaluate_shift.py -q
"""

import os

import keras
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from covidlib import model_dir as md
from covidlib import shift
from covidlib.cli import common
from covidlib.cli import evaluate as cli
from covidlib import shift_fit

SIZE = 16


def _model() -> keras.Model:
  """P(COVID-19) rises with mean brightness; the feature is the mean brightness itself."""
  inputs = keras.Input((SIZE, SIZE, 1), name='image')
  x = keras.layers.Conv2D(1, 1, use_bias=False, name='feature')(inputs)
  x = keras.layers.GlobalAveragePooling2D(name='pool')(x)
  x = keras.layers.Dense(1, name='logit')(x)
  outputs = keras.layers.Activation('sigmoid', name='probability')(x)
  model = keras.Model(inputs, outputs)
  model.get_layer('feature').set_weights([np.ones((1, 1, 1, 1), np.float32)])
  model.get_layer('logit').set_weights([np.array([[12.0]], np.float32),
                                        np.array([-6.0], np.float32)])
  return model


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
  """Films of brightness ~0.42 (normal) / ~0.58 (COVID-19); the test split adds 6 almost black
  and 6 almost white frames, unlike anything in training."""
  from PIL import Image

  root = tmp_path_factory.mktemp('evaluate_shift')
  rs = np.random.RandomState(0)
  for split, n in (('train', 20), ('validation', 20), ('test', 10)):
    for label, centre in (('normal', 0.42), ('covid', 0.58)):
      folder = root / 'data' / split / label
      folder.mkdir(parents=True)
      for i in range(n):
        level = np.clip(centre + 0.04 * rs.randn(), 0.05, 0.95)
        pixels = np.clip(255 * (level + 0.05 * rs.randn(SIZE, SIZE)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f'{label}_{i:02d}.png')
  for label, level in (('normal', 0.02), ('covid', 0.98)):
    for i in range(6):
      Image.fromarray(np.full((SIZE, SIZE), int(255 * level), np.uint8)).save(
          root / 'data' / 'test' / label / f'odd_{i}.png')
  model_dir = root / 'model_dir'
  model_dir.mkdir()
  _model().save(model_dir / md.MODEL)
  md.write_json(model_dir / md.CONFIG, {
      'model': 'brightness', 'image_size': SIZE, 'channels': 1,
      'dataset': f'folder:{root / "data"}', 'data_dir': None, 'batch_size': 8,
      'train_split': 'train', 'validation_split': 'validation'})
  shift_fit.fit_model_dir(model_dir, policy='quantile:0.99')
  return root


def _main(**values) -> int:
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  # Every flag main() reads: another binary imported first in this process may own the flag
  # and its default (covidlib.cli.flag_util).
  defaults = dict(dataset=None, data_dir=None, split='test', folder=None, threshold_policy=None,
                  threshold_split='validation', calibrate=False, write_decision=False,
                  group_by=None, out=None, n_bootstrap=50, seed=0, bins=10, gradcam=False,
                  gradcam_layer=None, plots=True, batch_size=8, shortcuts=False)
  with flagsaver.flagsaver(**{**defaults, **values}):
    return common.call_main(cli.main, ['covidlib-evaluate'], 'covidlib-evaluate')


def test_shift_section(workspace, capsys):
  out = str(workspace / 'report')
  assert _main(model_dir=str(workspace / 'model_dir'), split='test', out=out, gradcam=False,
               shortcuts=False, n_bootstrap=50, threshold_policy=None, calibrate=False) == 0
  printed = capsys.readouterr().out
  assert 'out of distribution (shift score >' in printed
  from covidlib import report as report_lib

  report = report_lib.read_report(out)
  section = report['shift']
  assert section['n'] == 32 and section['policy'] == 'quantile:0.99'
  # The 12 black or white frames are flagged, and few of the 20 ordinary test films.
  assert 12 <= section['n_flagged'] <= 14
  assert section['answered']['n'] + section['abstained']['n'] == 32
  assert section['abstained']['n'] == section['n_flagged']
  assert set(section['answered']['figures']) == {'accuracy', 'sensitivity', 'specificity',
                                                 'roc_auc'}
  counts = section['histogram']['counts']['evaluated']
  assert sum(counts) == 32 and len(section['histogram']['edges']) == 31
  # The score reads two depths (the 1x1 convolution's stage, the penultimate features); the
  # frames are flagged at the first (their brightness spread is unlike any film's).
  assert section['taps'] == ['feature', 'penultimate']
  above = section['depths']['share_above']['evaluated']
  assert len(above) == 2 and above[0] >= 12 / 32
  assert section['unseen_sources'] == []  # A folder dataset names no sources.
  markdown = open(os.path.join(out, 'report.md')).read()
  assert '## Distribution shift (out of distribution)' in markdown
  assert 'Not flagged does not mean correct' in markdown
  if 'plots_skipped' not in report:
    assert os.path.isfile(os.path.join(out, 'shift_histogram.png'))


def test_no_section_without_a_shift_model(workspace, tmp_path):
  from covidlib import evaluate

  run = tmp_path / 'run'
  run.mkdir()
  for name in (md.MODEL, md.CONFIG):
    (run / name).write_bytes((workspace / 'model_dir' / name).read_bytes())
  result = evaluate.evaluate_model_dir(str(run), split='test', gradcam=False, n_bootstrap=0)
  assert 'shift' not in result.report


def test_unseen_source_auc_with_the_metric_helpers():
  """Standardised scores can be negative: _as_unit maps any reals into (0, 1) by rank, ties
  kept, so covidlib.metrics gives the ROC-AUC of the scores themselves."""
  from sklearn.metrics import roc_auc_score

  from covidlib import metrics

  scores = np.array([-1.5, 0.2, 0.2, 3.0, 250.0, -0.3])
  unit = shift._as_unit(scores)
  assert np.all((unit > 0) & (unit < 1)) and unit[1] == unit[2]
  assert np.array_equal(np.argsort(unit, kind='stable'), np.argsort(scores, kind='stable'))
  labels = np.array([0, 0, 1, 1, 1, 0])
  auc = metrics.compute_metrics(labels, unit, 0.5, n_bootstrap=0).figures['roc_auc'].value
  assert auc == pytest.approx(roc_auc_score(labels, scores))


def test_a_format_1_score_is_evaluated_as_it_was(workspace, tmp_path):
  """Issue 10's penultimate-only shift.npz/json: the section reads that depth alone, raw, and
  says covidlib-fit-shift refits it at several depths."""
  from covidlib import evaluate
  from covidlib import scoring

  run = tmp_path / 'run'
  run.mkdir()
  for name in (md.MODEL, md.CONFIG):
    (run / name).write_bytes((workspace / 'model_dir' / name).read_bytes())
  config = md.load_config(run)
  model = md.load_model(run)
  train = scoring.score_dataset(model, scoring.load_split(config, 'train')[0])
  tap = shift.fit_tap(train.features, train.labels)
  np.savez(run / shift.SHIFT_NPZ, projection=tap.projection, centers=tap.centers,
           class_means=tap.class_means)
  md.write_json(run / shift.SHIFT_JSON, {'threshold': 3.0, 'policy': 'quantile:0.99',
                                         'split': 'validation', 'feature_dim': 1,
                                         'n_per_class': [20, 20], 'shrinkage': tap.shrinkage,
                                         'fit_split': 'train'})
  result = evaluate.evaluate_model_dir(str(run), split='test', gradcam=False, n_bootstrap=0)
  section = result.report['shift']
  assert section['taps'] == ['penultimate'] and 'depths' not in section
  assert section['score'] == shift.SCORE_NAME_PENULTIMATE
  assert any('covidlib-fit-shift refits it at several depths' in n for n in section['notes'])
  np.testing.assert_allclose(result.shift_scores, tap.distance(result.predictions.features),
                             rtol=1e-9)
