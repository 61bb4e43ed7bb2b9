"""Tests of covidlib.ensemble and covidlib-ensemble: flip averaging and ensembles as one model.

    .venv/bin/python -m pytest tests/covidlib/test_ensemble.py -q
"""

import os
import re

import keras
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from covidlib import ensemble
from covidlib import errors
from covidlib import explain
from covidlib import model_dir as md
from covidlib import models
from covidlib.cli import common
from covidlib.cli import ensemble as ensemble_cli

SIZE = 32


def images(n=6, seed=0):
  return np.random.RandomState(seed).uniform(0, 1, (n, SIZE, SIZE, 1)).astype(np.float32)


def logits(model, x):
  return keras.Model(model.input, model.get_layer('logit').output)(x).numpy()


def sigmoid(z):
  return 1 / (1 + np.exp(-z))


def member(seed, name='compact_resnet'):
  return models.build_model(name, SIZE, 1, seed=seed)


def save_load(model, tmp_path, name='m.keras'):
  path = os.path.join(tmp_path, name)
  model.save(path)
  return md.load_model(path)  # Safe mode: no Lambda, registered layers only.


def test_flip_average_is_the_mean_of_the_two_passes_and_keeps_the_members_layers(tmp_path):
  base = member(0)
  x = images()
  tta = save_load(ensemble.flip_average(base), tmp_path)
  expected = sigmoid((logits(base, x) + logits(base, x[:, :, ::-1])) / 2)
  np.testing.assert_allclose(tta(x).numpy(), expected, rtol=1e-5, atol=1e-7)
  assert ensemble.is_averaged(tta) and not ensemble.is_averaged(base)
  # Member 0 (the unflipped pass) is what features, taps and Grad-CAM read.
  assert models.feature_layer(tta).name == 'logit'
  assert models.feature_taps(tta) == models.feature_taps(base)
  _, features = models.feature_model(tta)(x)
  np.testing.assert_allclose(features.numpy(), models.feature_model(base)(x)[1].numpy(),
                             rtol=1e-5, atol=1e-6)
  assert explain.find_target_layer(tta) == explain.find_target_layer(base) == 'stage4_out'
  np.testing.assert_allclose(explain.grad_cam_batch(tta, x), explain.grad_cam_batch(base, x),
                             atol=1e-5)
  assert models.count_params(tta) == 2 * models.count_params(base)  # The flipped copy.
  with pytest.raises(errors.UsageError, match='is averaged already'):
    ensemble.flip_average(tta)


def test_ensemble_output_is_the_mean_of_the_members_logits(tmp_path):
  members = [member(0), member(1), member(2, 'seed_cnn')]
  x = images()
  ens = save_load(ensemble.average(members), tmp_path)
  expected = sigmoid(np.mean([logits(m, x) for m in members], axis=0))
  np.testing.assert_allclose(ens(x).numpy(), expected, rtol=1e-5, atol=1e-7)
  assert models.feature_taps(ens) == models.feature_taps(members[0])
  assert explain.find_target_layer(ens) == 'stage4_out'
  # A flip-averaged member contributes its averaged logit.
  mixed = ensemble.average([ensemble.flip_average(members[1]), members[0]])
  expected = sigmoid(((logits(members[1], x) + logits(members[1], x[:, :, ::-1])) / 2
                      + logits(members[0], x)) / 2)
  np.testing.assert_allclose(mixed(x).numpy(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('make, message', [
    (lambda: [member(0)], 'needs at least two members, got 1'),
    (lambda: [member(0), models.build_model('compact_resnet', 48, 1)],
     r'takes input \(48, 48, 1\), member 0 takes \(32, 32, 1\)'),
    (lambda: [ensemble.average([member(0), member(1)]), member(2)], 'is an ensemble itself'),
])
def test_average_refuses_what_cannot_be_averaged(make, message):
  with pytest.raises(errors.UsageError, match=message):
    ensemble.average(make())


def _write_member(path, seed, **config):
  model = member(seed)
  os.makedirs(path, exist_ok=True)
  model.save(os.path.join(path, md.MODEL))
  md.write_json(os.path.join(path, md.CONFIG),
                {'model': 'compact_resnet', 'image_size': SIZE, 'channels': 1, 'seed': seed,
                 'dataset': 'folder:/nowhere', **config})
  return str(path), model


def _cli(**values):
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(**values):
    return common.call_main(ensemble_cli.main, [ensemble_cli.PROG], ensemble_cli.PROG)


def test_covidlib_ensemble_writes_a_model_dir(tmp_path, capsys):
  dirs, built = zip(*[_write_member(tmp_path / f'seed{s}', s) for s in range(3)])
  (tmp_path / 'seed0' / 'shift.json').write_text('{"threshold": 1}')
  (tmp_path / 'seed0' / md.DECISION).write_text('{"threshold": 0.3, "policy": "youden"}')
  out = tmp_path / 'ens'
  assert _cli(members=list(dirs), out=str(out)) == 0
  assert 'Ensemble of 3 models' in capsys.readouterr().out
  config = md.load_config(out)
  assert config['ensemble'] == [os.path.abspath(d) for d in dirs] and config['seed'] == 0
  assert (out / 'shift.json').read_text() == '{"threshold": 1}'  # Member 0's features.
  assert not (out / md.DECISION).exists()  # Chosen for member 0, not for the ensemble.
  x = images()
  expected = sigmoid(np.mean([logits(m, x) for m in built], axis=0))
  np.testing.assert_allclose(md.load_model(out)(x).numpy(), expected, rtol=1e-5, atol=1e-7)
  assert _cli(members=list(dirs[:2]), out=str(out)) == 0  # Rewritten in place.
  assert len(md.load_config(out)['ensemble']) == 2


def test_covidlib_ensemble_usage_errors(tmp_path, capsys):
  a, _ = _write_member(tmp_path / 'a', 0)
  b, _ = _write_member(tmp_path / 'b', 1, image_size=48)
  c, _ = _write_member(tmp_path / 'c', 2, class_names=['normal', 'pneumonia'])
  (tmp_path / 'busy').mkdir()
  (tmp_path / 'busy' / 'notes.txt').write_text('mine')
  cases = [
      (dict(members=[a], out=str(tmp_path / 'o')), 'needs at least two members, got 1'),
      (dict(members=[a, b], out=str(tmp_path / 'o')), "has image_size=48, member .* has 32"),
      (dict(members=[a, c], out=str(tmp_path / 'o')), r"names its classes \['normal', "
                                                      r"'pneumonia'\]"),
      (dict(members=[a, str(tmp_path / 'none')], out=str(tmp_path / 'o')), 'does not exist'),
      (dict(members=[a, a], out=str(tmp_path / 'busy')), 'is not empty and holds no ensemble'),
      (dict(members=[a, c], out=a), 'is one of the members'),
      (dict(members=None, out=str(tmp_path / 'o')), '--members is required'),
  ]
  for values, message in cases:
    assert _cli(**values) == common.EXIT_USAGE, values
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('covidlib-ensemble: error: ')
    assert re.search(message, err), err
  assert (tmp_path / 'busy' / 'notes.txt').read_text() == 'mine'
