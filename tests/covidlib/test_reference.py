"""covidlib.reference: a model_dir's training-site features saved and loaded as plain arrays.

    .venv/bin/python -m pytest tests/covidlib/test_reference.py -q
"""

import json
import os

import numpy as np
import pytest

from covidlib import errors
from covidlib import reference


def sample(n=12, seed=0):
  rs = np.random.RandomState(seed)
  return reference.from_arrays(
      ['stage1_out', 'penultimate'], [rs.randn(n, 4), rs.randn(n, 3)], np.arange(n) % 2,
      rs.uniform(size=n), split='validation')


def test_round_trip_is_exact_and_json_describes_it(tmp_path):
  ref = sample()
  reference.save(ref, tmp_path)
  back = reference.load(tmp_path)
  assert back.taps == ref.taps and back.split == 'validation'
  for a, b in zip(back.features, ref.features):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(back.labels, ref.labels)
  np.testing.assert_array_equal(back.scores, ref.scores)
  info = json.loads((tmp_path / 'reference.json').read_text())
  assert info['n'] == 12 and info['n_per_class'] == [6, 6] and info['feature_dims'] == [4, 3]
  with np.load(tmp_path / 'reference.npz', allow_pickle=False) as arrays:
    assert sorted(arrays.files) == ['labels', 'scores', 'tap_0', 'tap_1']


def test_missing_reference_says_how_to_add_it(tmp_path):
  with pytest.raises(errors.UsageError, match='holds no reference.*covidlib-fit-shift'):
    reference.load(tmp_path)


def test_malformed_files_are_data_errors(tmp_path):
  reference.save(sample(), tmp_path)
  (tmp_path / 'reference.npz').write_bytes(b'not a zip')
  with pytest.raises(errors.DataError, match='reference.npz: malformed'):
    reference.load(tmp_path)


@pytest.mark.parametrize('taps, features, labels, scores, message', [
    (['a'], [np.zeros((3, 2)), np.zeros((3, 2))], [0, 1, 0], [0, 0, 0], '1 taps but 2'),
    (['a'], [np.zeros((2, 2))], [0, 1, 0], [0, 0, 0], "tap 'a' has features of shape"),
    (['a'], [np.zeros((3, 2))], [0, 1, 0], [0, 0], '2 scores for 3 labels'),
])
def test_inconsistent_arrays_are_refused(taps, features, labels, scores, message):
  with pytest.raises(errors.UsageError, match=message):
    reference.from_arrays(taps, features, labels, scores, split='validation')


def test_choose_films_keeps_class_shares_and_is_seeded():
  labels = np.r_[np.zeros(900, int), np.ones(300, int)]
  chosen = reference.choose_films(labels, 400, seed=1)
  assert len(chosen) == 400 and np.all(np.diff(chosen) > 0)
  assert np.bincount(labels[chosen]).tolist() == [300, 100]
  np.testing.assert_array_equal(chosen, reference.choose_films(labels, 400, seed=1))
  assert not np.array_equal(chosen, reference.choose_films(labels, 400, seed=2))
  np.testing.assert_array_equal(reference.choose_films(labels[:50], 400), np.arange(50))


def test_remove(tmp_path):
  reference.save(sample(), tmp_path)
  reference.remove(tmp_path)
  assert not reference.exists(tmp_path) and not os.listdir(tmp_path)
