"""Tests of covidlib.augment: each augmentation eagerly and in tf.data, seeds, flip, the models."""

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from covidlib import augment
from covidlib import errors
from covidlib import models

# One augmentation at a time, strong enough to change every image.
ONLY = {
    'flip': dict(flip=True),
    'rotation': dict(rotation=30.0),
    'shear': dict(shear=20.0),
    'zoom': dict(zoom=0.3),
    'translation': dict(translation=0.2),
    'brightness': dict(brightness=0.5),
    'contrast': dict(contrast=0.5),
    'gamma': dict(gamma=0.5),
    'blur': dict(blur=2.0),
    'noise': dict(noise=0.1),
    'downscale': dict(downscale=0.6),
}
NONE = dict(flip=False, zoom=0.0, shear=0.0)


def _only(name, **extra):
  return augment.build_augmentation(**{**NONE, **ONLY[name], **extra})


def _images(n=8, size=24, channels=1, seed=0):
  """Structured images in [0, 1] that touch both ends of the range."""
  rs = np.random.RandomState(seed)
  ramp = np.linspace(0, 1, size)[None, :, None, None] * np.ones((n, size, 1, channels))
  x = 0.7 * ramp + 0.3 * rs.rand(n, size, size, 1)  # The same gray in every channel.
  x[:, 0, 0, :] = 0.0
  x[:, -1, -1, :] = 1.0
  return x.astype('float32')


def test_defaults_are_the_article_recipe():
  layers = augment.build_augmentation().layers
  assert [l.name for l in layers] == ['flip', 'shear', 'zoom']
  flip, shear, zoom = layers
  assert flip.mode == 'horizontal'
  # ImageDataGenerator's shear_range=0.2 is in degrees: a shear factor of tan(0.2 deg).
  # RandomShear draws from (0, s) and flips the sign with probability 1/2: [-s, s].
  assert shear.x_factor == pytest.approx((0.0, math.tan(math.radians(0.2))))
  assert shear.y_factor == (0.0, 0.0)
  # zoom_range=0.2: each axis scaled independently by a factor in [0.8, 1.2].
  assert (zoom.height_lower, zoom.height_upper) == (-0.2, 0.2)
  assert (zoom.width_lower, zoom.width_upper) == (-0.2, 0.2)
  assert shear.fill_mode == zoom.fill_mode == 'nearest'


def test_the_article_shear_is_a_fraction_of_a_pixel():
  # On a horizontal ramp (value = g x column), bilinear resampling is exact, so the output
  # minus the input divided by g is the horizontal shift of each pixel: s x row for a shear s.
  g = 1.0 / 256
  x = np.tile((g * np.arange(224, dtype='float32'))[None, None, :, None], (16, 224, 1, 1))
  y = np.asarray(_only('shear', shear=0.2, seed=0)(x, training=True))
  shift = (y - x)[:, :, 4:-4, 0] / g  # Away from the edges, which 'nearest' fills.
  rows = np.arange(224, dtype='float32')[None, :, None]
  s = shift[:, -1, :].mean(axis=1) / 223  # Per-image shear factor, from the bottom row.
  expected = np.broadcast_to(s[:, None, None] * rows, shift.shape)
  np.testing.assert_allclose(shift, expected, atol=2e-3)
  # 0.2 degrees: |s| <= tan(0.2 deg) = 0.0035, i.e. at most 0.8 px at the bottom of 224 px.
  assert np.all(np.abs(s) <= math.tan(math.radians(0.2)) + 1e-5)
  assert np.abs(s).max() > 0.5 * math.tan(math.radians(0.2))
  assert np.abs(shift).max() < 0.8


@pytest.mark.parametrize('name', sorted(ONLY))
@pytest.mark.parametrize('channels', [1, 3])
def test_each_augmentation_eagerly_and_inside_tf_data(name, channels):
  x = _images(channels=channels)
  layer = _only(name, seed=1)
  eager = np.asarray(layer(x, training=True))
  graph = next(iter(tf.data.Dataset.from_tensor_slices(x).batch(8).map(
      lambda b: layer(b, training=True))))
  for y in (eager, graph.numpy()):
    assert y.shape == x.shape and y.dtype == np.float32
    assert y.min() >= 0.0 and y.max() <= 1.0
    assert not np.array_equal(y, x)
    if channels == 3:  # A gray image stays gray: every transform acts on channels alike.
      np.testing.assert_array_equal(y[..., 0], y[..., 2])


def test_all_augmentations_together_keep_shape_and_range():
  x = _images()
  layer = augment.build_augmentation(rotation=15, translation=0.1, contrast=0.3,
                                     brightness=0.3, seed=0)
  assert [l.name for l in layer.layers] == [
      'flip', 'rotation', 'shear', 'zoom', 'translation', 'brightness', 'contrast']
  y = np.asarray(layer(x, training=True))
  assert y.shape == x.shape and 0.0 <= y.min() and y.max() <= 1.0


@pytest.mark.parametrize('kwargs', [{}, dict(rotation=15, translation=0.1, contrast=0.3,
                                             brightness=0.3), NONE])
def test_identity_at_inference(kwargs):
  x = _images()
  layer = augment.build_augmentation(**kwargs, seed=0)
  np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)


def test_same_seed_same_output_other_seed_other_output():
  x = _images()
  kwargs = dict(rotation=10, translation=0.1, contrast=0.2, brightness=0.2)
  a = augment.build_augmentation(**kwargs, seed=5)(x, training=True)
  b = augment.build_augmentation(**kwargs, seed=5)(x, training=True)
  c = augment.build_augmentation(**kwargs, seed=6)(x, training=True)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))


def test_successive_calls_draw_new_transforms():
  x = _images()
  layer = _only('zoom', seed=0)
  assert not np.allclose(np.asarray(layer(x, training=True)), np.asarray(layer(x, training=True)))


def test_flip_mirrors_left_right_for_some_images_only():
  planted = np.zeros((16, 12, 12, 1), 'float32')
  planted[:, 2:5, 1:3, :] = 1.0  # A block near the left edge, nowhere symmetric.
  y = np.asarray(_only('flip', seed=3)(planted, training=True))
  mirrored = planted[:, :, ::-1, :]
  flipped = [np.array_equal(y[i], mirrored[i]) for i in range(16)]
  kept = [np.array_equal(y[i], planted[i]) for i in range(16)]
  assert all(f or k for f, k in zip(flipped, kept))
  assert any(flipped) and any(kept)
  np.testing.assert_array_equal(y[flipped][:, :, 9:11, :].max(), 1.0)


def test_unbatched_image_is_refused_not_misread():
  with pytest.raises(ValueError, match='shape'):
    augment.build_augmentation(seed=0)(_images()[0], training=True)


@pytest.mark.parametrize('kwargs, message', [
    (dict(zoom=1.0), 'zoom must be a number in [0, 1), got 1.0'),
    (dict(zoom=-0.1), 'zoom must be a number in [0, 1), got -0.1'),
    (dict(shear=45), 'shear must be a number in [0, 45), got 45'),
    (dict(rotation=200), 'rotation must be a number in [0, 180], got 200'),
    (dict(translation=float('nan')), 'translation must be a number in [0, 1), got nan'),
    (dict(contrast='0.2'), "contrast must be a number in [0, 1], got '0.2'"),
    (dict(brightness=1.5), 'brightness must be a number in [0, 1], got 1.5'),
    (dict(flip='yes'), "flip must be True or False, got 'yes'"),
    (dict(gamma=1.5), 'gamma must be a number in [0, 1], got 1.5'),
    (dict(blur=-1), 'blur must be a number in [0, 3], got -1'),
    (dict(noise=0.5), 'noise must be a number in [0, 0.2], got 0.5'),
    (dict(downscale=0.95), 'downscale must be a number in [0, 0.9], got 0.95'),
    (dict(seed=-3), 'seed must be a non-negative integer or None, got -3'),
    (dict(fill_mode='mirror'), "fill_mode must be one of nearest, reflect, constant, wrap, "
                               "got 'mirror'"),
])
def test_bad_arguments_are_named(kwargs, message):
  with pytest.raises(errors.UsageError) as e:
    augment.build_augmentation(**kwargs)
  assert str(e.value) == message


def test_training_model_augments_in_training_only_and_shares_weights():
  model = models.build_model('compact_resnet', image_size=24, channels=1, seed=0)
  training = augment.training_model(model, augment.build_augmentation(rotation=20, seed=0))
  assert training.get_layer(model.name) is model
  assert not any(type(l).__name__.startswith('Random') for l in model.layers)
  x = _images()
  np.testing.assert_array_equal(training.predict(x, verbose=0), model.predict(x, verbose=0))
  assert not np.allclose(np.asarray(training(x, training=True)),
                         np.asarray(model(x, training=True)))
  before = [w.copy() for w in model.get_weights()]
  training.compile(keras.optimizers.SGD(0.1), 'binary_crossentropy')
  training.fit(x, np.tile([0.0, 1.0], 4).astype('float32'), epochs=1, verbose=0)
  assert not all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
  assert models.count_flops(training) == models.count_flops(model)


def test_training_model_saves_and_loads_with_safe_mode(tmp_path):
  model = models.build_model('compact_resnet', image_size=24, channels=1, seed=0)
  layer = augment.build_augmentation(rotation=5, translation=0.1, contrast=0.1, brightness=0.1,
                                     seed=3)
  training = augment.training_model(model, layer)
  training.save(tmp_path / 'training.keras')
  loaded = keras.saving.load_model(tmp_path / 'training.keras', safe_mode=True)
  def configs(layers):  # Through JSON, as the .keras file stores them (tuples become lists).
    return json.loads(json.dumps([l.get_config() for l in layers]))

  assert configs(loaded.get_layer('augmentation').layers) == configs(layer.layers)
  x = _images()
  np.testing.assert_array_equal(loaded.predict(x, verbose=0), training.predict(x, verbose=0))


def test_training_model_rejects_what_is_not_a_model():
  with pytest.raises(errors.UsageError, match='inference_model must be a keras.Model, got str'):
    augment.training_model('seed_cnn', augment.build_augmentation())
  model = models.build_model('compact_resnet', image_size=24)
  with pytest.raises(errors.UsageError, match='augmentation must be a Keras layer, got dict'):
    augment.training_model(model, {})


def test_augmentation_stays_float32_under_mixed_precision():
  try:
    keras.mixed_precision.set_global_policy('mixed_bfloat16')
    layer = augment.build_augmentation(contrast=0.2, seed=0)
    y = layer(_images(), training=True)
  finally:
    keras.mixed_precision.set_global_policy('float32')
  assert y.dtype == 'float32'


# ---------------------------------------------------------------------------------------------
# Image-quality and intensity augmentations, presets.

def test_presets():
  article = augment.build_augmentation(**augment.PRESETS['article'])
  assert [l.name for l in article.layers] == ['flip', 'shear', 'zoom']
  assert augment.PRESETS['article'] == dict(zip(augment.KEYS, [True, 0.2, 0.2] + [0.0] * 8))
  strong = augment.build_augmentation(**augment.PRESETS['strong'], seed=0)
  assert [l.name for l in strong.layers] == [
      'flip', 'rotation', 'shear', 'zoom', 'translation', 'downscale', 'blur', 'brightness',
      'contrast', 'gamma', 'noise']
  x = _images(n=8, size=32)
  y = np.asarray(strong(x, training=True))
  assert y.shape == x.shape and 0.0 <= y.min() and y.max() <= 1.0
  np.testing.assert_array_equal(np.asarray(strong(x, training=False)), x)


def test_gamma_stays_within_its_range():
  x = np.full((64, 4, 4, 1), 0.5, np.float32)
  y = np.asarray(_only('gamma', gamma=0.3, seed=0)(x, training=True))[:, 0, 0, 0]
  gammas = np.log(y) / np.log(0.5)
  assert gammas.min() >= 1 / 1.3 - 1e-5 and gammas.max() <= 1.3 + 1e-5
  assert gammas.min() < 0.9 and gammas.max() > 1.1   # Both darker and brighter.


def test_noise_is_per_image_and_bounded():
  x = np.full((32, 24, 24, 1), 0.5, np.float32)
  y = np.asarray(_only('noise', noise=0.05, seed=0)(x, training=True))
  stds = (y - x).std(axis=(1, 2, 3))
  assert stds.max() <= 0.05 * 1.2 and stds.min() < 0.02 < stds.max()


def test_downscale_and_blur_keep_some_images_and_soften_others():
  checker = (np.indices((24, 24)).sum(axis=0) % 2).astype('float32')  # Finest detail.
  x = np.tile(checker[None, :, :, None], (16, 1, 1, 1))
  for name in ('downscale', 'blur'):
    y = np.asarray(_only(name, seed=2)(x, training=True))
    kept = [np.array_equal(y[i], x[i]) for i in range(16)]
    assert any(kept) and not all(kept), name   # Level 0 (identity) is one of five.
    softened = [i for i in range(16) if not kept[i]]
    assert all(np.abs(y[i] - 0.5).mean() < np.abs(x[i] - 0.5).mean() for i in softened), name


def test_new_layers_round_trip_and_load_with_safe_mode(tmp_path):
  layer = augment.build_augmentation(gamma=0.3, blur=1.0, noise=0.02, downscale=0.5, seed=4)
  for sub in layer.layers[-4:]:
    config = json.loads(json.dumps(sub.get_config()))
    assert type(sub).from_config(config).get_config() == sub.get_config()
  model = models.build_model('compact_resnet', image_size=24, channels=1, seed=0)
  training = augment.training_model(model, layer)
  training.save(tmp_path / 'training.keras')
  loaded = keras.saving.load_model(tmp_path / 'training.keras', safe_mode=True)
  assert [l.name for l in loaded.get_layer('augmentation').layers] == [
      'flip', 'shear', 'zoom', 'downscale', 'blur', 'gamma', 'noise']
  x = _images()
  np.testing.assert_array_equal(loaded.predict(x, verbose=0), training.predict(x, verbose=0))


def test_new_layers_compile_with_xla():
  """Static shapes only: unlike Keras' geometric layers these do not turn off jit_compile."""
  layer = augment.build_augmentation(flip=False, zoom=0.0, shear=0.0, gamma=0.3, blur=1.0,
                                     noise=0.02, downscale=0.5, seed=0)
  assert all(l.supports_jit for l in layer.layers)
  run = tf.function(lambda b: layer(b, training=True), jit_compile=True)
  y = run(tf.constant(_images())).numpy()
  assert y.shape == (8, 24, 24, 1) and 0.0 <= y.min() and y.max() <= 1.0
