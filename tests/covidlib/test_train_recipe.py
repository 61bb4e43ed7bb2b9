"""Tests of the training recipe keys (issue 18): AdamW, the schedule, label smoothing, EMA,
mixup, test-time flip averaging and the fine-tuning phases, on tiny in-memory data.

    .venv/bin/python -m pytest tests/covidlib/test_train_recipe.py -q
"""

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from covidlib import augment
from covidlib import ensemble
from covidlib import errors
from covidlib import model_dir as md
from covidlib import models
from covidlib import train

SIZE = 24
PLAIN = dict(weight_decay=0.0, lr_schedule='constant', warmup_epochs=0, label_smoothing=0.0,
             ema=0.0, mixup=0.0)


def tiny_data(seed, n=16, batch=4, flip_labels=False, size=SIZE):
  """n gray images, label 1 = a bright corner square (as test_train.py)."""
  rs = np.random.RandomState(seed)
  x = rs.uniform(0, 0.5, (n, size, size, 1)).astype(np.float32)
  y = (np.arange(n) % 2).astype(np.float32)
  x[y == 1, :8, :8] = 1.0
  if flip_labels:
    y = 1 - y
  return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def tiny_config(**overrides):
  """A tiny config on the plain recipe (the one before issue 18: Adam at a constant rate,
  nothing else): each test turns on the keys it tests."""
  base = dict(model='seed_cnn', image_size=SIZE, batch_size=4, epochs=2, dataset='in-memory',
              mixed_precision='off', seed=0, **PLAIN)
  return train.make_config(**{**base, **overrides})


def fit(config, model_dir, **kwargs):
  size = config['image_size']
  kwargs.setdefault('train_data', tiny_data(0, size=size))
  kwargs.setdefault('validation_data', tiny_data(1, size=size))
  return train.train(config, model_dir, **kwargs)


class Recorder(keras.callbacks.Callback):
  """Per fit: weights and optimizer state at train begin; raw weights after every batch and
  every epoch (after validation); the learning rate and trainable count of each epoch; dies at
  (epoch, batch) if asked."""

  def __init__(self, die_at=None):
    super().__init__()
    self.die_at = die_at
    self.begins = []           # (weights, optimizer iterations, n trainable) per fit.
    self.batch_weights = []    # Trainable weights after each batch, in order.
    self.epoch_weights = {}
    self.epoch_rate = {}
    self.epoch_trainable = {}

  def on_train_begin(self, logs=None):
    self.begins.append((self.model.get_weights(), int(self.model.optimizer.iterations.numpy()),
                        len(self.model.trainable_variables)))

  def on_epoch_begin(self, epoch, logs=None):
    self.epoch = epoch + 1
    optimizer = self.model.optimizer
    self.epoch_rate[self.epoch] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    self.epoch_trainable[self.epoch] = len(self.model.trainable_variables)

  def on_train_batch_begin(self, batch, logs=None):
    if self.die_at == (self.epoch, batch + 1):
      raise KeyboardInterrupt('simulated kill')

  def on_train_batch_end(self, batch, logs=None):
    self.batch_weights.append([v.numpy() for v in self.model.trainable_variables])

  def on_epoch_end(self, epoch, logs=None):
    self.epoch_weights[epoch + 1] = self.model.get_weights()


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------------------ Config.

@pytest.mark.parametrize('overrides, message', [
    ({'weight_decay': -0.1}, r'config weight_decay must be a number in \[0, 1\) \(0 = Adam\)'),
    ({'lr_schedule': 'step'}, "config lr_schedule must be one of constant, cosine, got 'step'"),
    ({'warmup_epochs': -1}, 'config warmup_epochs must be an integer >= 0, got -1'),
    ({'label_smoothing': 0.5}, r'config label_smoothing must be a number in \[0, 0.5\)'),
    ({'ema': 1.0}, r'config ema must be a momentum in \[0, 1\) \(0 = off\), got 1.0'),
    ({'mixup': -1}, r'mixup must be a number in \[0, 10\] \(0 = off\), got -1'),
    ({'tta': 'rotate'}, "config tta must be one of none, flip, got 'rotate'"),
    ({'freeze_epochs': 1.5}, 'config freeze_epochs must be an integer >= 0, got 1.5'),
    ({'finetune_learning_rate': 0}, 'config finetune_learning_rate must be a positive number'),
])
def test_recipe_keys_name_the_bad_value(overrides, message):
  with pytest.raises(errors.UsageError, match=message):
    train.make_config(**overrides)


def test_a_config_json_from_before_the_recipe_keys_reads_as_the_old_recipe():
  # The run used the behaviour before the keys existed, whatever their defaults are today.
  old = {k: v for k, v in tiny_config().items() if k not in train._PREDATING}
  completed = train.saved_config(old)
  assert {k: completed[k] for k in train._PREDATING} == train._PREDATING
  assert train._PREDATING == {'weight_decay': 0.0, 'lr_schedule': 'constant', 'warmup_epochs': 0,
                              'label_smoothing': 0.0, 'ema': 0.0, 'mixup': 0.0, 'tta': 'none',
                              'freeze_epochs': 0}


# ------------------------------------------------------------- Optimizer and schedule.

@pytest.mark.parametrize('kind', ['cosine', 'constant'])
def test_schedule_is_linear_warmup_then_cosine_or_constant(kind):
  config = tiny_config(lr_schedule=kind)
  rate, steps, warmup = 0.01, 100, 10
  schedule = train.learning_rate_schedule(config, rate, steps, warmup)
  for t in (0, 1, 5, 9, 10, 11, 50, 99, 100, 150):
    if t < warmup:
      expected = rate * t / warmup
    elif kind == 'cosine':
      expected = rate * (1 + math.cos(math.pi * min(t - warmup, 90) / 90)) / 2
    else:
      expected = rate
    assert float(schedule(t)) == pytest.approx(expected, rel=1e-5, abs=1e-9), t
  assert train.learning_rate_schedule(tiny_config(), rate, steps, 0) == rate  # Plain float.


def test_adamw_decays_kernels_but_not_biases():
  config = tiny_config(weight_decay=0.1, learning_rate=0.01)
  _, training_model = train.build_models(config)
  optimizer = training_model.optimizer
  assert isinstance(optimizer, keras.optimizers.AdamW) and optimizer.weight_decay == 0.1
  variables = training_model.trainable_variables
  before = [v.numpy() for v in variables]
  # Zero gradients: Adam's step is 0, so only the decoupled decay moves the weights.
  optimizer.apply([tf.zeros_like(v) for v in variables], variables)
  for variable, old in zip(variables, before):
    factor = 1.0 if variable.name in ('bias', 'gamma', 'beta') else 1 - 0.01 * 0.1
    np.testing.assert_allclose(variable.numpy(), old * factor, rtol=1e-6)
  assert type(train.build_models(tiny_config())[1].optimizer) is keras.optimizers.Adam


def test_label_smoothing_is_keras_formula():
  _, training_model = train.build_models(tiny_config(label_smoothing=0.2))
  y = np.array([[1.0], [0.0], [1.0], [0.0]], np.float32)
  p = np.array([[0.9], [0.2], [0.4], [0.7]], np.float32)
  target = y * (1 - 0.2) + 0.2 / 2
  expected = np.mean(-(target * np.log(p) + (1 - target) * np.log(1 - p)))
  assert float(training_model.loss(y, p)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_cosine_schedule_resumes_at_the_step_it_stopped(tmp_path):
  config = tiny_config(epochs=3, lr_schedule='cosine', warmup_epochs=1, learning_rate=0.01)
  first = Recorder(die_at=(3, 2))
  with pytest.raises(KeyboardInterrupt):
    fit(config, tmp_path / 'run', callbacks=[first])
  second = Recorder()
  fit(config, tmp_path / 'run', callbacks=[second])
  assert second.begins[0][1] == 8  # Two committed epochs of 4 steps.
  # The rate at each epoch's first step: the formula at steps 0, 4 and 8 (warm-up 4, decay 8).
  expected = {1: 0.0, 2: 0.01, 3: 0.01 * (1 + math.cos(math.pi * 4 / 8)) / 2}
  for epoch, rate in {**first.epoch_rate, **second.epoch_rate}.items():
    assert rate == pytest.approx(expected[epoch], abs=1e-8), epoch


# -------------------------------------------------------------------------------- EMA.

def ema_reference(batch_weights, momentum):
  """Keras' moving average: the first step's weights, then m a + (1 - m) w per step."""
  average = [np.array(w, np.float64) for w in batch_weights[0]]
  for weights in batch_weights[1:]:
    average = [momentum * a + (1 - momentum) * w for a, w in zip(average, weights)]
  return average


@pytest.mark.slow
def test_ema_weights_are_saved_validated_and_survive_a_resume(tmp_path):
  model_dir = tmp_path / 'run'
  config = tiny_config(epochs=3, ema=0.8, keep='best', learning_rate=0.01)
  first = Recorder(die_at=(2, 3))  # Dies in epoch 2: its two batches are lost.
  with pytest.raises(KeyboardInterrupt):
    fit(config, model_dir, callbacks=[first])
  second = Recorder()
  history = fit(config, model_dir, callbacks=[second])
  # Training goes on from the raw weights, not the averages: epoch 1's raw weights are what
  # the resumed run starts from.
  assert_same(second.begins[0][0], first.epoch_weights[1])
  steps = first.batch_weights[:4] + second.batch_weights  # The committed steps only.
  assert len(steps) == 12
  # model.keras: the average over the steps up to the kept epoch (keep='best').
  kept = history['kept_epoch']
  assert kept == int(np.argmax(history['val_auc'])) + 1
  saved = md.load_model(model_dir)
  expected = ema_reference(steps[:4 * kept], 0.8)
  for got, want in zip(saved.trainable_weights, expected):
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-6)
  raw = steps[4 * kept - 1]
  assert not all(np.allclose(a, b) for a, b in zip(raw, expected))  # The average differs.
  # Validation judged the average: its loss is the saved model's loss on the validation data.
  saved.compile(loss=keras.losses.BinaryCrossentropy())
  assert saved.evaluate(tiny_data(1), verbose=0) == pytest.approx(
      history['val_loss'][kept - 1], rel=1e-4)


# ------------------------------------------------------------------------------ Mixup.

def one_hot_batch(n=8):
  """Image i has a single 1 at pixel i, so a mix shows its two sources and their weights."""
  x = np.zeros((n, 4, 4, 1), np.float32)
  for i in range(n):
    x[i].flat[i] = 1.0
  y = np.linspace(0.0, 0.7, n).astype(np.float32)  # Distinct, to check the label mixing.
  return x, y


def mixed_batches(seed, epochs=2):
  x, y = one_hot_batch()
  dataset = augment.mixup(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), 0.4, seed)
  return [(xb.numpy(), yb.numpy()) for _ in range(epochs) for xb, yb in dataset]


def test_mixup_mixes_pairs_and_labels_with_the_same_seeded_weights():
  x, y = one_hot_batch()
  batches = mixed_batches(seed=3)
  for images, labels in batches:
    flat = images.reshape(8, -1)[:, :8]
    np.testing.assert_allclose(flat.sum(axis=1), 1.0, atol=1e-6)  # Weights lam and 1 - lam.
    for i in range(8):
      others = [k for k in np.flatnonzero(flat[i] > 1e-6) if k != i]
      assert len(others) <= 1  # Image i and at most one partner.
      lam, j = flat[i, i], (others[0] if others else i)
      assert labels[i] == pytest.approx(lam * y[i] + (1 - lam) * y[j], abs=1e-5)
  assert not np.allclose(batches[0][0], batches[1][0])  # Each epoch draws anew.
  same = mixed_batches(seed=3)
  assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
             for a, b in zip(batches, same))
  other = mixed_batches(seed=4)
  assert not np.allclose(batches[0][0], other[0][0])


def test_mixup_weights_follow_beta():
  seeds = tf.random.Generator.from_seed(0).make_seeds(3)
  lam, partner = augment.mixup_draw(seeds, 20000, 0.4)
  lam = lam.numpy()
  assert sorted(partner.numpy().tolist()) == list(range(20000))
  # Beta(0.4, 0.4): mean 1/2, variance ab / ((a + b)^2 (a + b + 1)) = 0.16 / (0.64 * 1.8).
  assert lam.min() >= 0 and lam.max() <= 1
  assert lam.mean() == pytest.approx(0.5, abs=0.01)
  assert lam.var() == pytest.approx(0.16 / (0.64 * 1.8), rel=0.05)


@pytest.mark.slow
def test_mixup_trains_on_mixed_batches_and_validates_on_plain_ones(tmp_path, monkeypatch):
  calls = []
  original = augment.mixup

  def spy(dataset, alpha, seed):
    calls.append((alpha, seed))
    return original(dataset, alpha, seed)

  monkeypatch.setattr(augment, 'mixup', spy)
  history = fit(tiny_config(epochs=1, mixup=0.3, keep='last'), tmp_path / 'run')
  assert calls == [(0.3, 0)]  # Once, on the training data, seeded by the config's seed.
  # Validation saw the plain images: its loss is the saved model's loss on them.
  saved = md.load_model(tmp_path / 'run')
  saved.compile(loss=keras.losses.BinaryCrossentropy())
  assert saved.evaluate(tiny_data(1), verbose=0) == pytest.approx(history['val_loss'][-1],
                                                                  rel=1e-4)


# -------------------------------------------------------------------------------- TTA.

@pytest.mark.slow
def test_tta_flip_saves_the_mean_of_the_two_passes(tmp_path):
  recorder = Recorder()
  fit(tiny_config(epochs=1, tta='flip', keep='last'), tmp_path / 'run', callbacks=[recorder])
  saved = md.load_model(tmp_path / 'run')  # Safe mode.
  assert ensemble.is_averaged(saved)
  plain = models.build_model('seed_cnn', SIZE, 1)
  plain.set_weights(recorder.epoch_weights[1])
  logit = keras.Model(plain.input, plain.get_layer('logit').output)
  x = np.random.RandomState(0).uniform(0, 1, (5, SIZE, SIZE, 1)).astype(np.float32)
  mean = (logit(x).numpy() + logit(x[:, :, ::-1]).numpy()) / 2
  np.testing.assert_allclose(saved(x).numpy(), 1 / (1 + np.exp(-mean)), rtol=1e-5, atol=1e-7)
  # The shift score fitted at the end reads the unflipped pass's features, as the model does.
  assert models.feature_layer(saved).name == 'logit'
  assert json.loads((tmp_path / 'run' / 'config.json').read_text())['tta'] == 'flip'


# ------------------------------------------------------------------- Fine-tuning phases.

def resnet_config(**overrides):
  return tiny_config(model='compact_resnet', image_size=32, **overrides)


def head_weights(model):
  """Indices in get_weights() order of the head's weights (Dense 'logit')."""
  names = [v.path for v in model.weights]
  return {i for i, n in enumerate(names) if n.split('/')[-2] == 'logit'}


@pytest.mark.slow
def test_freeze_epochs_train_the_head_with_batch_norm_frozen_then_everything(tmp_path):
  config = resnet_config(epochs=3, freeze_epochs=1, learning_rate=0.01,
                         finetune_learning_rate=0.002, keep='last')
  recorder = Recorder()
  fit(config, tmp_path / 'run', callbacks=[recorder])
  inference = models.build_model('compact_resnet', 32, 1)
  head = head_weights(inference)
  begin = recorder.begins[0][0]
  after_head = recorder.epoch_weights[1]
  for i, (a, b) in enumerate(zip(begin, after_head)):
    if i in head:
      assert not np.array_equal(a, b)
    else:  # Convolutions, BN scales and offsets AND BN moving statistics: inference mode.
      np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for i, (a, b) in
             enumerate(zip(after_head, recorder.epoch_weights[2])) if i not in head)
  assert recorder.epoch_trainable == {1: 2, 2: len(inference.trainable_variables),
                                      3: len(inference.trainable_variables)}
  assert recorder.epoch_rate == {1: pytest.approx(0.01), 2: pytest.approx(0.002),
                                 3: pytest.approx(0.002)}
  assert [b[1] for b in recorder.begins] == [0, 0]  # A fresh optimizer for the full phase.
  assert_same(md.load_model(tmp_path / 'run').get_weights(), recorder.epoch_weights[3])


@pytest.mark.slow
def test_a_run_killed_in_each_phase_resumes_across_the_phase_change(tmp_path):
  model_dir = tmp_path / 'run'
  # A full-phase rate too small to move any weight: its epochs tie with the head phase's last
  # one in val_auc, so keep='best' keeps a head-phase epoch (ties go to the earlier epoch), and
  # saving loads a checkpoint that holds the head phase's optimizer state.
  config = tiny_config(epochs=4, freeze_epochs=2, learning_rate=0.01,
                       finetune_learning_rate=1e-12)
  first = Recorder(die_at=(2, 2))  # Head phase.
  with pytest.raises(KeyboardInterrupt):
    fit(config, model_dir, callbacks=[first])
  second = Recorder(die_at=(3, 3))  # Full phase, after the change.
  with pytest.raises(KeyboardInterrupt):
    fit(config, model_dir, callbacks=[second])
  third = Recorder()
  history = fit(config, model_dir, callbacks=[third])

  n_all = len(models.build_model('seed_cnn', SIZE, 1).trainable_variables)
  # Second run: resumed in the head phase (its optimizer: 4 steps), changed phase after epoch 2.
  assert_same(second.begins[0][0], first.epoch_weights[1])
  assert second.begins[0][1:] == (4, 2)
  assert [b[1:] for b in second.begins[1:]] == [(0, n_all)]
  # Third run: resumed in the full phase from epoch 2's weights: a fresh optimizer then.
  assert_same(third.begins[0][0], second.epoch_weights[2])
  assert third.begins[0][1:] == (0, n_all)
  assert third.epoch_rate == {3: pytest.approx(1e-12), 4: pytest.approx(1e-12)}
  assert len(history['loss']) == 4
  best = int(np.argmax(history['val_auc'])) + 1
  assert history['kept_epoch'] == best <= 2, history['val_auc']
  epochs = {**first.epoch_weights, **second.epoch_weights, **third.epoch_weights}
  assert_same(md.load_model(model_dir).get_weights(), epochs[best])

  # Extended: the full phase's last checkpoint goes on with its own optimizer state.
  fourth = Recorder()
  fit({**config, 'epochs': 5}, model_dir, callbacks=[fourth])
  assert fourth.begins[0][1:] == (8, n_all)  # Epochs 3 and 4 of the full phase.
  assert_same(fourth.begins[0][0], third.epoch_weights[4])


@pytest.mark.slow
def test_freeze_epochs_freeze_a_keras_applications_backbone_and_its_batch_norm(tmp_path):
  # The use the phases are for: a (pretrained) backbone under a new head.
  config = tiny_config(model='mobilenetv3small', image_size=32, epochs=2, freeze_epochs=1,
                       keep='last')
  recorder = Recorder()
  fit(config, tmp_path / 'run', callbacks=[recorder])
  model = models.build_model('mobilenetv3small', 32, 1)
  head = head_weights(model)
  moving = {i for i, v in enumerate(model.weights) if 'moving' in v.path}
  assert moving and len(head) == 2
  begin, after_head, after_full = (recorder.begins[0][0], recorder.epoch_weights[1],
                                   recorder.epoch_weights[2])
  for i, (a, b) in enumerate(zip(begin, after_head)):
    if i not in head:  # BN moving statistics included: inference mode.
      np.testing.assert_array_equal(a, b, err_msg=model.weights[i].path)
  # (A random backbone in inference mode gives near-zero features, and P = 0.5 on balanced
  # batches leaves the bias's gradient at 0: the kernel is what must move.)
  assert any(not np.array_equal(begin[i], after_head[i]) for i in head)
  assert any(not np.array_equal(after_head[i], after_full[i]) for i in moving)  # BN trains now.
