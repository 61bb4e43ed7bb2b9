"""covidlib.crossval: grouped folds, t-intervals, and covidlib-crossval end to end."""

import json

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from PIL import Image

from covidlib import crossval
from covidlib import errors
from covidlib import model_dir as md
from covidlib.cli import common
from covidlib.cli import crossval as cli


def _pool(n_patients=12, per_patient=3, seed=0):
  """Patients with several images each; label per patient; a few images without patient id."""
  rs = np.random.RandomState(seed)
  labels, patients, images = [], [], []
  for p in range(n_patients):
    for _ in range(per_patient):
      labels.append(p % 2)
      patients.append(f'p{p}' if p % 4 else '')  # Every 4th patient unknown: own groups.
      images.append(rs.rand(16, 16, 1))
  n = len(labels)
  meta = {'patient_id': np.array(patients, dtype=object),
          'source': np.array(['ieee8023'] * n, dtype=object),
          'filename': np.array([f'f{i}.png' for i in range(n)], dtype=object)}
  return crossval.Pool(np.array(images, np.float32), np.array(labels), meta, 'made up')


def test_folds_never_split_a_patient_and_cover_every_image():
  pool = _pool()
  groups = crossval.patient_groups(pool)
  # 9 known patients (3 images each) + 3 unknown patients' 9 images, each its own group.
  assert len(set(groups)) == 9 + 9
  folds = crossval.make_folds(pool.labels, groups, n_folds=3, seed=1)
  assert len(folds) == 3
  seen = np.concatenate([va for _, va in folds])
  assert sorted(seen) == list(range(len(pool)))  # Each image validated exactly once.
  for k, (tr, va) in enumerate(folds):
    assert not set(tr) & set(va)
    assert not set(groups[tr]) & set(groups[va])
    for j, (_, other) in enumerate(folds):
      if j != k:
        assert not set(pool.metadata['patient_id'][va]) - {''} & set(
            pool.metadata['patient_id'][other])
    assert 0 < pool.labels[va].sum() < va.size  # Both classes in every validation fold.
  again = crossval.make_folds(pool.labels, groups, n_folds=3, seed=1)
  assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))


def test_near_duplicates_share_a_group():
  rs = np.random.RandomState(3)
  yy, xx = np.mgrid[0:64, 0:64] / 64.0

  def film(a, b):  # Smooth, distinct films.
    return (0.5 + 0.25 * np.sin(a * xx + b * yy) + 0.2 * np.cos(b * xx * yy))[..., None]

  images = np.stack([film(3, 5), film(3, 5) + 0.01 * rs.randn(64, 64, 1),  # A noisy copy.
                     film(7, 2), film(1, 9)]).astype(np.float32)
  meta = {'patient_id': np.array([''] * 4, dtype=object),
          'source': np.array(['ieee8023'] * 4, dtype=object)}
  pool = crossval.Pool(np.clip(images, 0, 1), np.array([1, 1, 0, 0]), meta)
  groups = crossval.patient_groups(pool)
  assert groups[0] == groups[1] and len(set(groups)) == 3
  assert len(set(crossval.patient_groups(pool, near_duplicates=False))) == 4


def test_make_folds_needs_enough_groups():
  with pytest.raises(errors.UsageError, match='5 folds need at least 5 COVID-19 patient groups; '
                                              'the data has 2'):
    crossval.make_folds([0] * 6 + [1] * 4, [0, 1, 2, 3, 4, 5, 6, 6, 7, 7], n_folds=5)
  with pytest.raises(errors.UsageError, match='integer >= 2'):
    crossval.make_folds([0, 1], [0, 1], n_folds=1)


def test_t_interval_known_values():
  # mean 0.9, sd 0.1, t(0.975, 2) = 4.302653: half-width 4.302653 * 0.1 / sqrt(3) = 0.248414.
  out = crossval.t_interval([0.8, 0.9, 1.0])
  assert out['mean'] == pytest.approx(0.9) and out['sd'] == pytest.approx(0.1)
  assert out['ci95'] == pytest.approx([0.9 - 0.248414, 0.9 + 0.248414], abs=1e-6)
  assert crossval.t_interval([0.8, 0.9, 1.0], bounds=(0, 1))['ci95'][1] == 1.0
  assert crossval.t_interval([0.7, None, 0.9])['n_folds'] == 2
  assert crossval.t_interval([0.7])['ci95'] == [None, None]
  assert crossval.t_interval([None])['mean'] is None


@pytest.fixture
def parsed_flags():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@pytest.mark.slow
def test_crossval_binary_end_to_end(tmp_path, parsed_flags, capsys):
  """2 folds x 1 epoch of compact_resnet at 32 px on a folder dataset with planted copies."""
  rs = np.random.RandomState(0)
  root = tmp_path / 'data'
  copies = []
  for split in ('train', 'validation'):
    for label in ('normal', 'covid'):
      folder = root / split / label
      folder.mkdir(parents=True, exist_ok=True)
      for i in range(8):
        pixels = (rs.rand(32, 32) * 160).astype(np.uint8)
        if label == 'covid':
          pixels[8:20, 8:20] = 250
        Image.fromarray(pixels).save(folder / f'{i}.png')
      # A near-duplicate of image 0 (slight noise) in the OTHER split: must share its fold.
      other = 'validation' if split == 'train' else 'train'
      base = np.asarray(Image.open(folder / '0.png'), np.int16)
      copy = np.clip(base + rs.randint(-2, 3, base.shape), 0, 255).astype(np.uint8)
      (root / other / label).mkdir(parents=True, exist_ok=True)
      Image.fromarray(copy).save(root / other / label / f'copy_of_{split}_0.png')
      copies.append((str(folder / '0.png'), str(root / other / label / f'copy_of_{split}_0.png')))
  out = tmp_path / 'cv'
  values = dict(out=str(out), dataset=f'folder:{root}', data_dir=None,
                splits=['train', 'validation'], folds=2, fold_seed=0, near_duplicates=True,
                threshold=0.5, n_bootstrap=50, overwrite=False, model='compact_resnet',
                image_size=32, channels=1, epochs=1, batch_size=8, learning_rate=None, seed=0,
                class_weight=None, verbose=0)
  with flagsaver.flagsaver(**values):
    assert common.call_main(cli.main, ['covidlib-crossval'], 'covidlib-crossval') == 0
  printed = capsys.readouterr().out
  assert 'roc_auc: ' in printed and 'over 2 folds' in printed
  report = json.loads((out / crossval.CROSSVAL_JSON).read_text())
  assert report['data']['n'] == 36 and report['n_folds'] == 2
  assert [f['fold'] for f in report['folds']] == [1, 2]
  assert sum(f['n_validation'] for f in report['folds']) == 36
  assert all(f['n_train'] + f['n_validation'] == 36 for f in report['folds'])
  assert set(report['summary']) >= {'accuracy', 'sensitivity', 'roc_auc', 'brier', 'ece'}
  for name, s in report['summary'].items():
    defined = [f['figures'][name] for f in report['folds'] if f['figures'][name] is not None]
    assert s['n_folds'] == len(defined), name
    if defined:
      assert s['mean'] == pytest.approx(np.mean(defined)), name
  assert report['pooled_out_of_fold']['n'] == 36
  for f in report['folds']:
    md.check_model_dir(f['model_dir'])  # Each fold is a normal, finished model_dir.
  assert (out / crossval.CROSSVAL_MD).read_text().startswith('# Cross-validation: compact_resnet')

  # Planted near-duplicate pairs share a validation fold. Recompute the folds from the pool.
  pool = crossval.load_pool(f'folder:{root}', ['train', 'validation'], image_size=32)
  groups = crossval.patient_groups(pool)
  folds = crossval.make_folds(pool.labels, groups, 2, 0)
  fold_of = {name: k for k, (_, va) in enumerate(folds) for name in pool.metadata['filename'][va]}
  for original, copy in copies:
    assert fold_of[original] == fold_of[copy]
  assert [va.size for _, va in folds] == [f['n_validation'] for f in report['folds']]

  # Same command again: finished folds are reused, the figures are the same.
  with flagsaver.flagsaver(**values):
    assert common.call_main(cli.main, ['covidlib-crossval'], 'covidlib-crossval') == 0
  again = json.loads((out / crossval.CROSSVAL_JSON).read_text())
  assert [f['reused'] for f in again['folds']] == [True, True]
  assert again['summary'] == report['summary']


def test_crossval_binary_usage_errors(tmp_path, parsed_flags, capsys):
  values = dict(out=str(tmp_path / 'cv'), dataset=f'folder:{tmp_path}', data_dir=None,
                splits=['train'], folds=2, model='nonet', image_size=32, channels=1, epochs=1,
                batch_size=8, learning_rate=None, seed=0, class_weight=None)
  with flagsaver.flagsaver(**values):
    assert common.call_main(cli.main, ['covidlib-crossval'], 'covidlib-crossval') == 2
  err = capsys.readouterr().err
  assert err.startswith("covidlib-crossval: error: unknown model 'nonet'")
  with flagsaver.flagsaver(**{**values, 'model': 'compact_resnet'}):
    assert common.call_main(cli.main, ['covidlib-crossval'], 'covidlib-crossval') == 2
  assert 'split folder' in capsys.readouterr().err


def test_crossval_binary_hold_out_usage_errors(tmp_path, parsed_flags, capsys):
  values = dict(out=str(tmp_path / 'cv'), dataset=f'folder:{tmp_path}', data_dir=None,
                model='compact_resnet', image_size=32, epochs=1, batch_size=8, seed=0,
                hold_out='patients', recipe=None, threshold_policy='youden')
  with flagsaver.flagsaver(**values):
    assert common.call_main(cli.main, ['covidlib-crossval'], 'covidlib-crossval') == 2
  assert ("--hold_out must be 'none' or 'source', got 'patients'"
          in capsys.readouterr().err)
  with flagsaver.flagsaver(**{**values, 'hold_out': 'source', 'threshold_policy': 'best'}):
    assert common.call_main(cli.main, ['covidlib-crossval'], 'covidlib-crossval') == 2
  assert "threshold policy 'best'" in capsys.readouterr().err.lower()
  with flagsaver.flagsaver(**{**values, 'hold_out': 'source', 'recipe': str(tmp_path / 'no')}):
    assert common.call_main(cli.main, ['covidlib-crossval'], 'covidlib-crossval') == 2
  assert str(tmp_path / 'no') in capsys.readouterr().err


def test_images_without_a_patient_id_are_grouped_by_series():
  """extubation-1/-8/-13 (no patient id) are one case's films: one group, never two folds."""
  names = ['extubation-1.jpg', 'extubation-8.jpg', 'extubation-13.jpg', 'other-1.png',
           'lone.png', 'known-1.png']
  meta = {'patient_id': np.array([''] * 5 + ['p7'], dtype=object),
          'source': np.array(['ieee8023'] * 6, dtype=object),
          'filename': np.array(names, dtype=object)}
  images = np.random.RandomState(0).rand(6, 16, 16, 1).astype(np.float32)
  pool = crossval.Pool(images, np.array([1, 1, 1, 0, 0, 1]), meta)
  groups = crossval.patient_groups(pool, near_duplicates=False)
  assert groups[0] == groups[1] == groups[2] and len(set(groups)) == 4
