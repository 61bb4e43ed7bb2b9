"""covidlib-evaluate's report.json and report.md stay exactly as they were (issue #15).

    .venv/bin/python -m pytest tests/covidlib/test_evaluate_golden.py -q

A hand-set model (no training, so its weights are the same everywhere) is evaluated on three
small labelled_xrays datasets built from generated films: the evaluated one (sites a, b and c,
both classes each, given splits), other findings of site a (label 0 = not COVID-19) and normals
of a site d the model never saw. Every section runs: decision with temperature, per-source
groups, Grad-CAM, shortcuts (within source, unseen source, other findings, source probe, a
hold-out report read back) and shift. The reference files in golden/ were written by the code
before the scoring pass was untied (commit dc6b483, where fit_model_dir still lived in
covidlib.shift); the test fails on any change to a figure, a note or a line of the report, and
ignores only the temporary folder's name. Rewrite them only for a change meant to move figures:

    .venv/bin/python tests/covidlib/test_evaluate_golden.py tests/covidlib/golden
"""

import csv
import json
import math
import os
import sys

import keras
import numpy as np
from PIL import Image
import pytest

from covidlib import evaluate
from covidlib import model_dir as md
from covidlib import report
from covidlib import scoring
from covidlib import shift_fit
from covidlib_tfds import build

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden')
SIZE = 16
SALT = 'golden-salt'
HOLD_OUT = {
    'caveat': 'c', 'data': 'golden', 'config': {'model': 'm', 'epochs': 1, 'seed': 0},
    'threshold_policy': 'youden', 'calibrate': False,
    'held_out': [{'source': 'site_b', 'how': 'left out of training (covidlib-crossval '
                  '--hold_out=source)', 'n_normal': 9, 'n_covid': 4, 'threshold': 0.5,
                  'specificity': {'value': 0.5, 'ci95': [0.2, 0.8], 'method': 'wilson'},
                  'sensitivity': {'value': 0.75, 'ci95': [0.3, 0.95], 'method': 'wilson'},
                  'roc_auc_covid_vs_these_normals': None, 'meets_target': False,
                  'model_dir': 'x'}]}


def _model() -> keras.Model:
  """A small CNN with covidlib's head ('logit' Dense, 'probability' sigmoid), seeded weights."""
  rs = np.random.RandomState(7)
  inputs = keras.Input((SIZE, SIZE, 1), name='image')
  x = keras.layers.Conv2D(4, 3, padding='same', activation='relu', name='conv')(inputs)
  x = keras.layers.GlobalAveragePooling2D(name='pool')(x)
  x = keras.layers.Dense(1, name='logit')(x)
  outputs = keras.layers.Activation('sigmoid', name='probability')(x)
  model = keras.Model(inputs, outputs)
  model.get_layer('conv').set_weights([
      rs.normal(0, 0.5, (3, 3, 1, 4)).astype(np.float32),
      np.array([0.0, -0.2, 0.1, -0.4], np.float32)])
  model.get_layer('logit').set_weights([np.array([[6.0], [-3.0], [2.5], [4.0]], np.float32),
                                        np.array([-2.0], np.float32)])
  return model


def _write_films(root: str, name: str, rows: list[tuple]) -> str:
  """rows of (site, patient, label, split, finding, level, contrast) -> a labels CSV."""
  folder = os.path.join(root, name)
  os.makedirs(folder)
  rs = np.random.RandomState(len(rows))
  path = os.path.join(folder, 'labels.csv')
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['path', 'label', 'patient_id', 'site', 'view', 'age', 'sex', 'split',
                     'finding'])
    for i, (site, patient, label, split, finding, level, contrast) in enumerate(rows):
      yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE
      pixels = level + contrast * (np.sin(6 * xx + i) * np.cos(5 * yy)) + 0.06 * rs.randn(
          SIZE, SIZE)
      image = np.clip(255 * pixels, 0, 255).astype(np.uint8)
      file = f'{i:03d}.png'
      Image.fromarray(image).save(os.path.join(folder, file))
      writer.writerow([file, label, patient, site, ('PA', 'AP')[i % 2], 30 + i % 40,
                       ('F', 'M')[i % 3 == 0], split, finding])
  return path


def build_workspace(root: str) -> dict:
  """The datasets and the model_dir; returns {'model_dir', 'data_dir', 'hold_out'}."""
  data_dir = os.path.join(root, 'tfds')
  rs = np.random.RandomState(3)
  rows = []
  for split, n in (('train', 5), ('validation', 4), ('test', 4)):
    for site, contrast in (('site_a', 0.05), ('site_b', 0.12), ('site_c', 0.2)):
      for label, level in (('covid', 0.58), ('normal', 0.42)):
        for k in range(n):
          rows.append((site, f'{site}-{split}-{label}-{k // 2}', label, split, '',
                       level + 0.05 * rs.randn(), contrast))
  other = [('site_a', f'o{k}', 'normal', 'test', ('sars', 'bacterial')[k % 2],
            0.5 + 0.06 * rs.randn(), 0.05) for k in range(8)]
  unseen = [('site_d', f'd{k}', 'normal', ('train', 'test')[k % 2], '',
             0.45 + 0.05 * rs.randn(), 0.3) for k in range(10)]
  for name, r in (('golden_main', rows), ('golden_other', other), ('golden_unseen', unseen)):
    build.build_labelled(_write_films(root, name, r), name, data_dir=data_dir, salt=SALT)
  model_dir = os.path.join(root, 'model_dir')
  os.makedirs(model_dir)
  _model().save(os.path.join(model_dir, md.MODEL))
  md.write_json(os.path.join(model_dir, md.CONFIG), {
      'model': 'golden', 'image_size': SIZE, 'channels': 1,
      'dataset': 'labelled_xrays/golden_main', 'data_dir': data_dir, 'batch_size': 8,
      'train_split': 'train', 'validation_split': 'validation'})
  hold_out = os.path.join(root, 'hold_out.json')
  md.write_json(hold_out, HOLD_OUT)
  return {'model_dir': model_dir, 'data_dir': data_dir, 'hold_out': hold_out}


def evaluate_workspace(paths: dict, out: str) -> None:
  """What `covidlib-evaluate` runs, with every section on; writes report.json/.md into out."""
  result = evaluate.evaluate_model_dir(
      paths['model_dir'], split='test', threshold_policy='youden', calibrate=True,
      group_by=['source', 'view'], n_bootstrap=100, seed=0, batch_size=8,
      shortcut_options={'other_dataset': 'labelled_xrays/golden_other',
                        'unseen': ['labelled_xrays/golden_unseen:site_d'],
                        'held_out_reports': [paths['hold_out']], 'probe': True})
  report.write_report(out, result, plots=False)


def _normalized(path: str, root: str) -> str:
  with open(path) as f:
    return f.read().replace(root, '<ROOT>')


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('golden'))
  paths = build_workspace(root)
  shift_fit.fit_model_dir(paths['model_dir'])
  return root, paths


def _assert_same(got, want, where='report'):
  """Equal structure, strings and integers; floats equal to 1e-6 relative.

  Grad-CAM's gradients and the probe's features come from oneDNN kernels whose reduction order
  depends on how the 2 cores are partitioned at that moment: on a loaded machine they move in
  the 9th digit (0.33180781455 against 0.33180781681), which is not a change of behaviour.
  """
  if isinstance(want, dict):
    assert isinstance(got, dict) and sorted(got) == sorted(want), where
    for key in want:
      _assert_same(got[key], want[key], f'{where}.{key}')
  elif isinstance(want, list):
    assert isinstance(got, list) and len(got) == len(want), where
    for k, (a, b) in enumerate(zip(got, want)):
      _assert_same(a, b, f'{where}[{k}]')
  elif isinstance(want, float) and not isinstance(got, bool):
    assert isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=1e-6,
                                                          abs_tol=1e-9), (where, got, want)
  else:
    assert got == want, (where, got, want)


def test_report_is_unchanged(workspace):
  root, paths = workspace
  out = os.path.join(root, 'eval')
  evaluate_workspace(paths, out)
  got = json.loads(_normalized(os.path.join(out, report.REPORT_JSON), root))
  with open(os.path.join(GOLDEN, report.REPORT_JSON)) as f:
    want = json.load(f)
  _assert_same(got, want)
  with open(os.path.join(GOLDEN, report.REPORT_MD)) as f:
    assert _normalized(os.path.join(out, report.REPORT_MD), root) == f.read()


def test_each_dataset_is_scored_once(workspace, monkeypatch):
  """One pass per split: threshold split, evaluated split, other findings, the unseen source's
  two splits; no second run over images for features, the probe or the shift score."""
  root, paths = workspace
  scored_splits = []
  real = scoring.score_dataset

  def counting(model, dataset, **kwargs):
    result = real(model, dataset, **kwargs)
    scored_splits.append((len(result), tuple(sorted(set(result.column('source'))))))
    return result

  def forbidden(*args, **kwargs):
    raise AssertionError('the model was run a second time over images already scored')

  monkeypatch.setattr(scoring, 'score_dataset', counting)
  monkeypatch.setattr(scoring, 'penultimate_features', forbidden)
  monkeypatch.setattr(scoring, 'score_images', forbidden)
  evaluate_workspace(paths, os.path.join(root, 'eval_once'))
  assert scored_splits == [(24, ('site_a', 'site_b', 'site_c')),  # validation: the threshold
                           (24, ('site_a', 'site_b', 'site_c')),  # test: evaluated
                           (5, ('site_d',)), (5, ('site_d',)),    # unseen: test, train
                           (8, ('site_a',))]                      # other findings: test


def test_predictions_csv_has_a_row_per_image(workspace):
  root, paths = workspace
  out = os.path.join(root, 'eval_csv')
  evaluate_workspace(paths, out)
  with open(os.path.join(out, report.REPORT_JSON)) as f:
    written = json.load(f)
  with open(os.path.join(out, report.PREDICTIONS_CSV), newline='') as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == list(report.PREDICTION_COLUMNS)
  assert len(rows) == written['data']['n'] == 24
  threshold = written['decision']['threshold']
  for row in rows:
    assert row['decision'] == ('covid' if float(row['probability']) >= threshold else 'normal')
    assert row['in_distribution'] == str(float(row['shift_score'])
                                         <= written['shift']['threshold']).lower()
    assert len(row['patient']) == 16 and row['patient'] not in open(
        os.path.join(root, 'golden_main', 'labels.csv')).read()
  confusion = written['metrics']['confusion']
  assert sum(r['label'] == '1' and r['decision'] == 'covid' for r in rows) == confusion['tp']
  assert sum(r['label'] == '0' and r['decision'] == 'covid' for r in rows) == confusion['fp']
  assert sum(r['in_distribution'] == 'false' for r in rows) == written['shift']['n_flagged']
  by_source = {s: sum(r['source'] == s for r in rows) for s in ('site_a', 'site_b', 'site_c')}
  assert by_source == {s: g['n'] for s, g in written['groups']['source'].items()}
  # Two films per patient in the CSV: every patient hash appears exactly twice.
  counts = {}
  for r in rows:
    counts[r['patient']] = counts.get(r['patient'], 0) + 1
  assert set(counts.values()) == {2}


def test_confounds_section_from_the_same_pass(workspace):
  """--confounds=view: within each view, the model's ROC-AUC on exactly the rows of
  predictions.csv with that view (an independent recount with scikit-learn)."""
  from sklearn.metrics import roc_auc_score

  root, paths = workspace
  out = os.path.join(root, 'eval_confounds')
  result = evaluate.evaluate_model_dir(paths['model_dir'], split='test', n_bootstrap=0,
                                       gradcam=False, batch_size=8, confounds=['view'])
  report.write_report(out, result, plots=False)
  with open(os.path.join(out, report.PREDICTIONS_CSV), newline='') as f:
    rows = list(csv.DictReader(f))
  section = result.report['confounds']['view']
  for view in ('AP', 'PA'):
    mine = [r for r in rows if r['view'] == view]
    want = roc_auc_score([int(r['label']) for r in mine], [float(r['probability']) for r in mine])
    assert section['within'][view]['roc_auc']['value'] == pytest.approx(want, abs=1e-6)
  with open(os.path.join(out, report.REPORT_MD)) as f:
    assert '## Confounds' in f.read()


if __name__ == '__main__':  # Writes the reference files: python test_evaluate_golden.py OUT
  target = os.path.abspath(sys.argv[1])
  import tempfile

  with tempfile.TemporaryDirectory() as work:
    work = os.path.realpath(work)
    made = build_workspace(work)
    shift_fit.fit_model_dir(made['model_dir'])
    evaluate_workspace(made, os.path.join(work, 'eval'))
    os.makedirs(target, exist_ok=True)
    for name in (report.REPORT_JSON, report.REPORT_MD):
      with open(os.path.join(target, name), 'w') as f:
        f.write(_normalized(os.path.join(work, 'eval', name), work))
