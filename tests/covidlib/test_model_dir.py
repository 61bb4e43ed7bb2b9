"""The model_dir contract: atomic JSON, the stored decision, safe model loading."""

import json
import os

import keras
import numpy as np
import pytest

from covidlib import errors
from covidlib import model_dir


def _tiny_model(lambda_layer: bool = False) -> keras.Model:
  inputs = keras.Input((8, 8, 1))
  x = keras.layers.Flatten()(inputs)
  if lambda_layer:
    x = keras.layers.Lambda(lambda t: t * 2.0)(x)
  outputs = keras.layers.Dense(1, activation='sigmoid', name='probability')(x)
  return keras.Model(inputs, outputs)


def test_write_json_is_atomic_and_leaves_no_temp_files(tmp_path):
  path = tmp_path / 'sub' / 'x.json'
  model_dir.write_json(path, {'b': 1, 'a': [1, 2]})
  model_dir.write_json(path, {'b': 2})
  assert json.loads(path.read_text()) == {'b': 2}
  assert os.listdir(path.parent) == ['x.json']


def test_failed_write_keeps_the_old_file(tmp_path):
  path = tmp_path / 'x.json'
  model_dir.write_json(path, {'ok': True})
  with pytest.raises(TypeError):
    model_dir.write_json(path, {'bad': object()})
  assert json.loads(path.read_text()) == {'ok': True}
  assert os.listdir(tmp_path) == ['x.json']


def test_decision_defaults_and_round_trip(tmp_path):
  assert model_dir.load_decision(tmp_path) == model_dir.Decision(0.5, 'fixed:0.5', 1.0, '')
  decision = model_dir.Decision(threshold=0.31, policy='youden', temperature=1.7,
                                split='validation')
  model_dir.save_decision(tmp_path, decision)
  assert model_dir.load_decision(tmp_path) == decision


def test_malformed_files_are_named(tmp_path):
  (tmp_path / 'decision.json').write_text('{"policy": "youden"}')
  with pytest.raises(errors.DataError, match='decision.json: malformed'):
    model_dir.load_decision(tmp_path)
  (tmp_path / 'config.json').write_text('{oops')
  with pytest.raises(errors.DataError, match='config.json: not valid JSON'):
    model_dir.read_json(tmp_path / 'config.json')


def test_check_model_dir_names_what_is_missing(tmp_path):
  with pytest.raises(errors.UsageError, match='does not exist'):
    model_dir.check_model_dir(tmp_path / 'absent')
  with pytest.raises(errors.UsageError, match='holds no config.json'):
    model_dir.check_model_dir(tmp_path)


def test_load_model_round_trip_with_safe_mode(tmp_path):
  model = _tiny_model()
  path = tmp_path / 'model.keras'
  model.save(path)
  loaded = model_dir.load_model(path)
  x = np.random.RandomState(0).rand(2, 8, 8, 1).astype(np.float32)
  np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6)


def test_lambda_layer_is_refused(tmp_path):
  path = tmp_path / 'evil.keras'
  _tiny_model(lambda_layer=True).save(path)
  with pytest.raises(errors.ModelLoadError, match='evil.keras: refused to load'):
    model_dir.load_model(path)


def test_non_model_files_are_refused(tmp_path):
  fake = tmp_path / 'fake.keras'
  fake.write_bytes(b'this is not a zip archive')
  with pytest.raises(errors.ModelLoadError, match='fake.keras: not a loadable Keras model'):
    model_dir.load_model(fake)
  with pytest.raises(errors.ModelLoadError, match='weights.h5: not a .keras file'):
    (tmp_path / 'weights.h5').write_bytes(b'x')
    model_dir.load_model(tmp_path / 'weights.h5')
