"""covidlib.shift_fit: one scoring pass per split feeds the shift score and the reference, which
is drawn from the validation split (topped up from training only below the minimum).

    .venv/bin/python -m pytest tests/covidlib/test_shift_fit.py -q
"""

import os

import numpy as np
import pytest
import tensorflow as tf

from covidlib import errors
from covidlib import model_dir as md
from covidlib import models
from covidlib import reference
from covidlib import scoring
from covidlib import shift
from covidlib import shift_fit
from covidlib.scored import Scored

SIZE = 24


def _scored(n, seed, offset=0.0):
  rs = np.random.RandomState(seed)
  labels = np.arange(n) % 2
  taps = {'stage1_out': rs.normal(size=(n, 4)).astype(np.float32) + offset,
          'penultimate': rs.normal(size=(n, 3)).astype(np.float32) + offset + labels[:, None]}
  return Scored(labels=labels, scores=rs.uniform(size=n), metadata={}, taps=taps,
                features=taps['penultimate'])


def test_reference_is_validation_only_when_it_has_enough_films():
  validation, train = _scored(700, 0), _scored(900, 1, offset=100.0)
  ref = shift_fit.make_reference(validation, train)
  assert ref.split == 'validation' and ref.n == reference.MAX_FILMS
  assert ref.taps == ('stage1_out', 'penultimate')
  assert np.bincount(ref.labels).tolist() == [250, 250]
  assert ref.features[1].max() < 50  # No training film (those sit at +100).
  chosen = reference.choose_films(validation.labels)
  np.testing.assert_array_equal(ref.features[0], validation.taps['stage1_out'][chosen])
  np.testing.assert_array_equal(ref.scores, validation.scores[chosen])
  small = shift_fit.make_reference(_scored(120, 2), train)
  assert small.split == 'validation' and small.n == 120


def test_reference_is_topped_up_from_training_only_to_the_minimum():
  validation, train = _scored(40, 0), _scored(900, 1, offset=100.0)
  ref = shift_fit.make_reference(validation, train)
  assert ref.split == 'validation+train' and ref.n == shift_fit.MIN_REFERENCE_FILMS == 100
  from_train = ref.features[1][:, 0] > 50
  assert from_train.sum() == 60
  # Every validation film is in it, as scored.
  np.testing.assert_array_equal(np.sort(ref.scores[~from_train]), np.sort(validation.scores))


def test_reference_needs_taps():
  part = _scored(10, 0)
  part.taps = None
  with pytest.raises(errors.UsageError, match='validation split was scored without taps'):
    shift_fit.make_reference(part)


# ------------------------------------------------------------------ On a model.


def _tiny_data(seed, n=16, batch=4):
  rs = np.random.RandomState(seed)
  x = rs.uniform(0, 0.5, (n, SIZE, SIZE, 1)).astype(np.float32)
  y = (np.arange(n) % 2).astype(np.float32)
  x[y == 1, :8, :8] = 1.0
  return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


@pytest.fixture()
def model_dir(tmp_path):
  """A finished model_dir of an untrained compact_resnet (fit_model_dir needs model.keras)."""
  models.build_model('compact_resnet', image_size=SIZE, channels=1, seed=0).save(
      tmp_path / md.MODEL)
  md.write_json(tmp_path / md.CONFIG, {'image_size': SIZE, 'channels': 1, 'batch_size': 4,
                                       'dataset': 'in-memory', 'validation_split': 'validation'})
  return tmp_path


def test_one_scoring_pass_per_split_feeds_the_score_and_the_reference(model_dir, monkeypatch):
  calls = []
  original = scoring.score_dataset

  def counted(*args, **kwargs):
    calls.append(kwargs.get('taps'))
    return original(*args, **kwargs)
  monkeypatch.setattr(scoring, 'score_dataset', counted)
  fitted = shift_fit.fit_model_dir(model_dir, train_data=_tiny_data(0),
                                   validation_data=_tiny_data(1))
  assert calls == [True, True]
  monkeypatch.setattr(scoring, 'score_dataset', original)

  model = md.load_model(model_dir)
  ref = reference.load(model_dir)
  validation = scoring.score_dataset(model, _tiny_data(1), taps=True)
  train = scoring.score_dataset(model, _tiny_data(0), taps=True)
  assert ref.taps == tuple(models.feature_taps(model))
  assert ref.split == 'validation+train' and ref.n == 32  # 16 validation + all 16 training.
  # The 16 validation films first, as scored, then the training films.
  for k, tap in enumerate(ref.taps):
    np.testing.assert_allclose(ref.features[k][:16], validation.taps[tap], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref.features[k][16:], train.taps[tap], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ref.scores[:16], validation.scores, rtol=1e-5)
  np.testing.assert_array_equal(ref.labels, np.r_[validation.labels, train.labels])
  assert fitted.split == 'validation' and shift.load(model_dir).threshold == fitted.threshold


def test_a_failed_save_leaves_neither_file(model_dir, monkeypatch):
  def broken(*args, **kwargs):
    raise OSError('disk full')
  reference.save(reference.from_arrays(['penultimate'], [np.zeros((2, 2))], [0, 1], [0, 1],
                                       split='validation'), model_dir)
  monkeypatch.setattr(shift, 'save', broken)
  with pytest.raises(OSError, match='disk full'):
    shift_fit.fit_model_dir(model_dir, train_data=_tiny_data(0), validation_data=_tiny_data(1))
  assert not reference.exists(model_dir) and not shift.exists(model_dir)


def test_the_training_hook_removes_a_stale_reference_when_fitting_fails(model_dir, monkeypatch,
                                                                         caplog):
  shift_fit.fit_model_dir(model_dir, train_data=_tiny_data(0), validation_data=_tiny_data(1))
  assert reference.exists(model_dir) and shift.exists(model_dir)

  def broken(*args, **kwargs):
    raise errors.DataError('simulated failure')
  monkeypatch.setattr(shift, 'fit_shift', broken)
  config = md.load_config(model_dir)
  assert shift_fit.fit_after_training(str(model_dir), md.load_model(model_dir), config,
                                      _tiny_data(0), _tiny_data(1)) is None
  assert not reference.exists(model_dir) and not shift.exists(model_dir)
  assert os.path.isfile(model_dir / md.MODEL)
  assert 'covidlib-fit-shift' in caplog.text


def test_no_validation_split_removes_a_stale_reference(model_dir):
  shift_fit.fit_model_dir(model_dir, train_data=_tiny_data(0), validation_data=_tiny_data(1))
  config = {**md.load_config(model_dir), 'validation_split': None}
  assert shift_fit.fit_after_training(str(model_dir), None, config) is None
  assert not reference.exists(model_dir) and not shift.exists(model_dir)
