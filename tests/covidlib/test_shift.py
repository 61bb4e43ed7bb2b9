"""covidlib.shift: the score against a numpy Mahalanobis reference (one depth, and the ensemble
of standardised depths), storage without pickle (format 2, and format 1 still loading),
policies, the end-of-training hook and covidlib-fit-shift.

    .venv/bin/python -m pytest tests/covidlib/test_shift.py -q
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver

from covidlib import errors
from covidlib import model_dir as md
from covidlib import models
from covidlib import reference
from covidlib import shift
from covidlib import scoring
from covidlib import shift_fit
from exporters import serving


def _features(seed=0, n=60, d=5):
  rs = np.random.RandomState(seed)
  labels = np.arange(n) % 2
  mixing = rs.normal(size=(d, d))
  features = rs.normal(size=(n, d)) @ mixing + 3.0 * labels[:, None]
  return features, labels


def _reference(features, labels, queries, a):
  """Textbook Mahalanobis: class means, pooled covariance shrunk by `a`, min over classes."""
  classes = np.unique(labels)
  means = [features[labels == c].mean(0) for c in classes]
  centred = np.concatenate([features[labels == c] - m for c, m in zip(classes, means)])
  cov = centred.T @ centred / (len(features) - len(classes))
  d = features.shape[1]
  cov = (1 - a) * cov + a * np.trace(cov) / d * np.eye(d)
  inverse = np.linalg.inv(cov)
  return np.min([[(q - m) @ inverse @ (q - m) for m in means] for q in queries], axis=1)


@pytest.mark.parametrize('a', [0.0, 0.3, 1.0])
def test_score_is_the_mahalanobis_distance_to_the_nearest_class(a):
  features, labels = _features()
  model = shift.fit_shift(features, labels, shrinkage=a)
  queries = np.random.RandomState(1).normal(size=(7, 5)) * 4
  np.testing.assert_allclose(model.score(queries), _reference(features, labels, queries, a),
                             rtol=1e-8)
  assert model.n_per_class == (30, 30)
  assert model.taps[0].shrinkage == a and model.tap_names == ('penultimate',)


def test_ledoit_wolf_matches_sklearn():
  from sklearn.covariance import ledoit_wolf_shrinkage

  features, _ = _features(n=40, d=8)
  centred = features - features.mean(0)
  assert shift.ledoit_wolf_shrinkage(centred) == pytest.approx(
      ledoit_wolf_shrinkage(centred, assume_centered=True), rel=1e-6)


def _taps(seed=0, n=60):
  """Training-like features at three depths of different widths and scales."""
  rs = np.random.RandomState(seed)
  labels = np.arange(n) % 2
  taps = {}
  for name, d, scale in (('stem', 4, 0.01), ('stage1', 6, 1.0), ('penultimate', 3, 50.0)):
    taps[name] = (rs.normal(size=(n, d)) @ rs.normal(size=(d, d)) + 2.0 * labels[:, None]) * scale
  return taps, labels


def test_ensemble_is_the_largest_standardised_distance():
  train, labels = _taps(0)
  validation, _ = _taps(1, n=40)
  queries, _ = _taps(2, n=9)
  queries = {k: v * (1 + 3 * (np.arange(9) % 3 == 0))[:, None] for k, v in queries.items()}
  model = shift.fit_shift(train, labels, shrinkage=0.1, validation=validation)
  assert model.tap_names == ('stem', 'stage1', 'penultimate')
  want = []
  for name in model.tap_names:
    v = _reference(train[name], labels, validation[name], 0.1)
    q = _reference(train[name], labels, queries[name], 0.1)
    want.append((q - v.mean()) / v.std())
  np.testing.assert_allclose(model.tap_scores(queries), np.stack(want, 1), rtol=1e-7, atol=1e-9)
  np.testing.assert_allclose(model.score(queries), np.max(want, axis=0), rtol=1e-7, atol=1e-9)
  # On the validation features, each depth is standardised: mean 0, standard deviation 1.
  z = model.tap_scores(validation)
  np.testing.assert_allclose(z.mean(0), 0, atol=1e-9)
  np.testing.assert_allclose(z.std(0), 1, rtol=1e-9)
  # The same features as a list in tap order, or with extra taps in the dict.
  np.testing.assert_array_equal(model.score([queries[n] for n in model.tap_names]),
                                model.score({**queries, 'other': np.zeros((9, 2))}))


def test_each_depth_gets_its_own_threshold_for_a_variant_that_carries_it_alone():
  train, labels = _taps()
  validation = _taps(1)[0]
  model = shift.fit_shift(train, labels, validation=validation)
  with pytest.raises(errors.UsageError, match="no threshold for tap 'stem' alone"):
    model.single_tap('stem')
  chosen = shift.choose_threshold(model, model.score(validation), 'quantile:0.9',
                                  tap_scores=model.tap_scores(validation))
  z = model.tap_scores(validation)
  for k, tap in enumerate(chosen.taps):
    assert tap.threshold == pytest.approx(np.quantile(z[:, k], 0.9))
  alone = chosen.single_tap('penultimate')
  assert alone.tap_names == ('penultimate',) and alone.threshold == chosen.taps[-1].threshold
  np.testing.assert_array_equal(alone.score(validation), z[:, -1])
  assert chosen.threshold == pytest.approx(np.quantile(z.max(1), 0.9))
  with pytest.raises(errors.UsageError, match="no tap 'stage9'"):
    chosen.single_tap('stage9')


def test_several_taps_need_validation_features():
  train, labels = _taps()
  with pytest.raises(errors.UsageError, match='3 taps need validation features'):
    shift.fit_shift(train, labels)
  model = shift.fit_shift(train, labels, validation=_taps(1)[0])
  with pytest.raises(errors.UsageError, match=r"lack the taps \['stage1'\]"):
    model.score({k: v for k, v in train.items() if k != 'stage1'})
  with pytest.raises(errors.UsageError, match='one array for the 3 taps'):
    model.score(train['stem'])


def test_score_tf_matches_numpy():
  features, labels = _features()
  model = shift.fit_shift(features, labels)
  queries = np.random.RandomState(2).normal(size=(9, 5)).astype(np.float32)
  np.testing.assert_allclose(serving.shift_score_tf(model, tf.constant(queries)).numpy(),
                             model.score(queries), rtol=1e-4)


def test_ensemble_score_tf_matches_numpy():
  train, labels = _taps(0)
  model = shift.fit_shift(train, labels, validation=_taps(1)[0])
  queries, _ = _taps(3, n=11)
  queries = {k: (v * (1 + 4 * (np.arange(11) % 4 == 0))[:, None]).astype(np.float32)
             for k, v in queries.items()}
  got = serving.shift_score_tf(model, [tf.constant(queries[n]) for n in model.tap_names])
  np.testing.assert_allclose(got.numpy(), model.score(queries), rtol=1e-3, atol=1e-3)


def test_far_points_score_higher_than_training_points():
  features, labels = _features()
  model = shift.fit_shift(features, labels)
  assert model.score(features).max() < model.score(features + 50.0).min()


def test_more_features_than_images_still_gives_finite_scores():
  rs = np.random.RandomState(0)
  model = shift.fit_shift(rs.normal(size=(6, 40)), [0, 0, 0, 1, 1, 1], shrinkage=0.0)
  assert np.all(np.isfinite(model.score(rs.normal(size=(3, 40)))))


@pytest.mark.parametrize('features, labels, error, message', [
    (np.zeros((10, 3)), np.zeros(9), errors.UsageError, '10 feature rows but 9 labels'),
    (np.zeros(10), np.zeros(10), errors.UsageError, 'shape (n, d)'),
    (np.zeros((3, 2)), [0, 1, 1], errors.DataError, 'too few'),
    (np.full((10, 2), np.nan), np.zeros(10), errors.DataError, 'NaN'),
])
def test_bad_fit_inputs(features, labels, error, message):
  with pytest.raises(error, match=message.replace('(', r'\(').replace(')', r'\)')):
    shift.fit_shift(features, labels)


def test_bad_shrinkage():
  with pytest.raises(errors.UsageError, match="'ledoit_wolf' or a number in"):
    shift.fit_shift(*_features(), shrinkage=1.5)


def test_score_checks_the_feature_dimension():
  model = shift.fit_shift(*_features())
  with pytest.raises(errors.UsageError, match=r'shape \(n, 5\), got \(2, 4\)'):
    model.score(np.zeros((2, 4)))


@pytest.mark.parametrize('policy, q', [('quantile:0.99', 0.99), (' QUANTILE:0.5 ', 0.5)])
def test_parse_policy(policy, q):
  assert shift.parse_policy(policy) == q


@pytest.mark.parametrize('policy, why', [
    ('youden', "unknown policy 'youden'"), ('quantile', 'needs a number'),
    ('quantile:x', "'x' is not a number"), ('quantile:1', 'outside (0, 1)'),
    ('quantile:0', 'outside (0, 1)'), (None, 'not a string')])
def test_bad_policies_are_one_line_usage_errors(policy, why):
  with pytest.raises(errors.UsageError) as e:
    shift.parse_policy(policy)
  assert why in str(e.value) and 'valid forms: quantile:Q' in str(e.value)
  assert '\n' not in str(e.value)


def test_threshold_is_the_quantile_of_validation_scores():
  features, labels = _features()
  model = shift.fit_shift(features, labels)
  scores = np.arange(101, dtype=float)
  chosen = shift.choose_threshold(model, scores, 'quantile:0.9', split='validation')
  assert chosen.threshold == pytest.approx(90.0)
  assert chosen.policy == 'quantile:0.9' and chosen.split == 'validation'
  assert chosen.in_distribution([90.0, 90.5]).tolist() == [True, False]
  with pytest.raises(errors.UsageError, match='no threshold'):
    model.in_distribution([1.0])


def test_save_load_round_trip_without_pickle(tmp_path):
  features, labels = _features()
  model = shift.choose_threshold(shift.fit_shift(features, labels), [1.0, 2.0, 3.0],
                                 'quantile:0.5')
  assert shift.load(tmp_path) is None
  shift.save(model, tmp_path)
  loaded = shift.load(tmp_path)
  np.testing.assert_array_equal(loaded.score(features), model.score(features))
  assert (loaded.threshold, loaded.policy, loaded.n_per_class) == (2.0, 'quantile:0.5', (30, 30))
  info = json.loads((tmp_path / shift.SHIFT_JSON).read_text())
  assert info['feature_dim'] == 5 and info['fit_split'] == 'train' and info['format'] == 2
  assert [t['name'] for t in info['taps']] == ['penultimate']
  with np.load(tmp_path / shift.SHIFT_NPZ, allow_pickle=False) as arrays:
    assert sorted(arrays.files) == ['centers_0', 'class_means_0', 'projection_0']
    assert all(arrays[k].dtype == np.float64 for k in arrays.files)


def test_ensemble_round_trip(tmp_path):
  train, labels = _taps()
  validation = _taps(1)[0]
  model = shift.fit_shift(train, labels, validation=validation)
  model = shift.choose_threshold(model, model.score(validation), 'quantile:0.9')
  shift.save(model, tmp_path)
  loaded = shift.load(tmp_path)
  assert loaded.info() == model.info()
  np.testing.assert_array_equal(loaded.tap_scores(train), model.tap_scores(train))
  assert loaded.threshold == model.threshold and loaded.normalised_on == 'validation'
  info = json.loads((tmp_path / shift.SHIFT_JSON).read_text())
  assert [t['name'] for t in info['taps']] == ['stem', 'stage1', 'penultimate']
  assert info['combine'] == 'max' and info['feature_dim'] == 13
  assert [t['offset'] for t in info['taps']] == [t.offset for t in model.taps]


def _write_format_1(folder, features, labels, threshold):
  """shift.npz and shift.json exactly as issue #10's covidlib wrote them."""
  tap = shift.fit_tap(features, labels)
  np.savez(os.path.join(folder, shift.SHIFT_NPZ), projection=tap.projection,
           centers=tap.centers, class_means=tap.class_means)
  md.write_json(os.path.join(folder, shift.SHIFT_JSON), {
      'threshold': threshold, 'policy': 'quantile:0.99', 'split': 'validation',
      'feature_dim': features.shape[1], 'n_per_class': [30, 30], 'shrinkage': tap.shrinkage,
      'fit_split': 'train', 'score': 'squared Mahalanobis distance to the nearest class mean '
      '(shared shrunk covariance)', 'description': 'shift_score: ...'})


def test_format_1_loads_as_a_one_tap_ensemble_with_the_same_scores(tmp_path):
  features, labels = _features()
  _write_format_1(tmp_path, features, labels, threshold=7.5)
  loaded = shift.load(tmp_path)
  assert loaded.format == 1 and loaded.tap_names == ('penultimate',)
  assert loaded.taps[0].offset == 0.0 and loaded.taps[0].scale == 1.0
  assert loaded.threshold == 7.5 and loaded.score_name == shift.SCORE_NAME_PENULTIMATE
  queries = np.random.RandomState(1).normal(size=(7, 5)) * 4
  a = loaded.taps[0].shrinkage
  np.testing.assert_allclose(loaded.score(queries), _reference(features, labels, queries, a),
                             rtol=1e-8)
  np.testing.assert_allclose(serving.shift_score_tf(loaded, tf.constant(queries, tf.float32)),
                             loaded.score(queries), rtol=1e-4)
  # Saved again, it stays format 1 (the files issue #10's readers expect).
  again = tmp_path / 'again'
  again.mkdir()
  shift.save(loaded, again)
  assert 'format' not in json.loads((again / shift.SHIFT_JSON).read_text())
  np.testing.assert_array_equal(shift.load(again).score(queries), loaded.score(queries))


def test_a_newer_format_is_refused(tmp_path):
  shift.save(shift.choose_threshold(shift.fit_shift(*_features()), [1.0], 'quantile:0.5'),
             tmp_path)
  info = json.loads((tmp_path / shift.SHIFT_JSON).read_text())
  md.write_json(tmp_path / shift.SHIFT_JSON, {**info, 'format': 3})
  with pytest.raises(errors.DataError, match='shift score format 3, newer than this covidlib'):
    shift.load(tmp_path)


def test_load_refuses_pickled_arrays(tmp_path):
  model = shift.choose_threshold(shift.fit_shift(*_features()), [1.0], 'quantile:0.5')
  shift.save(model, tmp_path)
  np.savez(tmp_path / shift.SHIFT_NPZ, projection_0=np.array([{'evil': 1}], dtype=object),
           centers_0=model.taps[0].centers, class_means_0=model.taps[0].class_means)
  with pytest.raises(errors.DataError, match='shift.npz: malformed shift arrays'):
    shift.load(tmp_path)


# ------------------------------------------------------------------ Training hook and binary.

SIZE = 24


def _tiny_data(seed, n=16, batch=4):
  rs = np.random.RandomState(seed)
  x = rs.uniform(0, 0.5, (n, SIZE, SIZE, 1)).astype(np.float32)
  y = (np.arange(n) % 2).astype(np.float32)
  x[y == 1, :8, :8] = 1.0
  return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def _train(model_dir, **config):
  from covidlib import train
  config = train.make_config(**{**dict(model='compact_resnet', image_size=SIZE, batch_size=4,
                                       epochs=1, dataset='in-memory', mixed_precision='off',
                                       seed=0), **config})
  return train.train(config, str(model_dir), train_data=_tiny_data(0),
                     validation_data=_tiny_data(1))


def test_training_writes_the_shift_files(tmp_path):
  _train(tmp_path)
  fitted = shift.load(tmp_path)
  assert fitted is not None and fitted.policy == 'quantile:0.99'
  assert fitted.n_per_class == (8, 8) and fitted.split == 'validation'
  model = md.load_model(tmp_path)
  assert fitted.tap_names == tuple(models.feature_taps(model)) and fitted.format == 2
  scores = fitted.score(scoring.score_dataset(model, _tiny_data(1), taps=True).taps)
  assert np.mean(fitted.in_distribution(scores)) >= 15 / 16
  ref = reference.load(tmp_path)  # Written with it, from the same scoring passes.
  assert ref.taps[-1] == 'penultimate' and ref.split == 'validation+train' and ref.n == 32


def test_a_failed_fit_keeps_the_model_and_writes_no_shift_files(tmp_path, monkeypatch, caplog):
  def broken(*args, **kwargs):
    raise errors.DataError('simulated failure')
  monkeypatch.setattr(shift, 'fit_shift', broken)
  _train(tmp_path)
  assert os.path.isfile(tmp_path / md.MODEL)
  assert not os.path.exists(tmp_path / shift.SHIFT_NPZ)
  assert not os.path.exists(tmp_path / shift.SHIFT_JSON)
  assert 'covidlib-fit-shift' in caplog.text


def test_fit_shift_binary_on_a_folder_dataset(tmp_path):
  from PIL import Image

  from covidlib.cli import common
  from covidlib.cli import fit_shift

  root = tmp_path / 'data'
  rs = np.random.RandomState(0)
  for split in ('train', 'validation'):
    for name in ('normal', 'covid'):
      (root / split / name).mkdir(parents=True)
      for i in range(6):
        Image.fromarray(rs.randint(0, 255, (20, 20), np.uint8)).save(
            root / split / name / f'{i}.png')
  run = tmp_path / 'run'
  run.mkdir()
  models.build_model('compact_resnet', image_size=16, channels=1, seed=0).save(run / md.MODEL)
  md.write_json(run / md.CONFIG, {'image_size': 16, 'channels': 1, 'dataset': f'folder:{root}',
                                  'train_split': 'train', 'validation_split': 'validation'})
  # A model_dir with issue #10's penultimate-only score: refitted in the new format.
  _write_format_1(run, *_features(d=128), threshold=1.0)
  assert shift.load(run).format == 1
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(model_dir=str(run), policy='quantile:0.9', shrinkage='ledoit_wolf'):
    assert common.call_main(fit_shift.main, ['prog'], fit_shift.PROG) == 0
  fitted = shift.load(run)
  assert fitted.policy == 'quantile:0.9' and fitted.n_per_class == (6, 6)
  assert fitted.format == 2 and fitted.tap_names == tuple(
      models.feature_taps(md.load_model(run)))
  assert reference.load(run).n == 24  # 12 validation films, topped up by the 12 training.
  with flagsaver.flagsaver(model_dir=str(run), policy='median'):
    assert common.call_main(fit_shift.main, ['prog'], fit_shift.PROG) == 2
  with flagsaver.flagsaver(model_dir=str(tmp_path / 'nowhere'), policy='quantile:0.9'):
    assert common.call_main(fit_shift.main, ['prog'], fit_shift.PROG) == 2


def test_mixed_precision_training_fits_on_the_float32_model(tmp_path):
  """bfloat16 features differ from the float32 model.keras that serving runs: fit on that."""
  _train(tmp_path, model='seed_cnn', mixed_precision='mixed_bfloat16')
  stored = shift.load(tmp_path)
  features, labels = shift_fit.features_and_labels(md.load_model(tmp_path), _tiny_data(0))
  np.testing.assert_allclose(stored.taps[-1].class_means,
                             shift.fit_tap(features, labels).class_means, rtol=1e-5, atol=1e-6)
