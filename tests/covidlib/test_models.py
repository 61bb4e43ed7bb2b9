"""Tests of covidlib.models: the article's network exactly, the compact one, FLOPs, save/load."""

import keras
import numpy as np
import pytest

from covidlib import errors
from covidlib import model_dir
from covidlib import models

# The networks built here from scratch; the keras.applications backbones (models.BACKBONES) are
# tested in test_backbones.py, each built as few times as possible (seconds per build).
SCRATCH = sorted(set(models.MODELS) - set(models.BACKBONES))


@pytest.fixture
def float32_policy():
  """Restores the global float32 policy after a test that changes it."""
  yield
  keras.mixed_precision.set_global_policy('float32')


def test_seed_cnn_is_the_article_network_at_224x224x3():
  model = models.build_model('seed_cnn', image_size=224, channels=3)
  # The article notebook's model.summary(): "Total params: 5,723,457".
  assert models.count_params(model) == 5_723_457
  convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
  assert [c.filters for c in convs] == [32, 128, 64, 128]
  assert all(c.kernel_size == (3, 3) and c.padding == 'valid' for c in convs)
  drops = [l.rate for l in model.layers if isinstance(l, keras.layers.Dropout)]
  assert drops == [0.25, 0.25, 0.25, 0.5]
  assert model.get_layer('flatten').output.shape[1] == 26 * 26 * 128
  assert model.get_layer('dense').units == 64
  # Hand count, multiply-add = 2 FLOPs: conv outputs 222^2, 220^2, 108^2, 52^2 positions.
  macs = (222**2 * 27 * 32 + 220**2 * 288 * 128 + 108**2 * 1152 * 64 + 52**2 * 576 * 128
          + 86528 * 64 + 64)
  assert models.count_flops(model) == 2 * macs == 5_783_321_472


@pytest.mark.parametrize('channels', [1, 3])
def test_compact_resnet_is_at_least_10x_cheaper_than_seed_cnn(channels):
  seed = models.build_model('seed_cnn', 224, channels)
  compact = models.build_model('compact_resnet', 224, channels)
  ratio = models.count_flops(seed) / models.count_flops(compact)
  assert ratio >= 10, ratio
  assert models.count_params(compact) < models.count_params(seed) / 10


def test_count_flops_matches_a_hand_count():
  inputs = keras.Input((8, 8, 2))
  x = keras.layers.Conv2D(3, 3)(inputs)                                   # 6x6x3
  x = keras.layers.Conv2D(4, 3, strides=2, padding='same')(x)             # 3x3x4
  x = keras.layers.DepthwiseConv2D(3, padding='same', depth_multiplier=2)(x)  # 3x3x8
  x = keras.layers.SeparableConv2D(5, 1)(x)                               # 3x3x5
  x = keras.layers.BatchNormalization()(x)                                # not counted
  x = keras.layers.GlobalAveragePooling2D()(x)                            # not counted
  outputs = keras.layers.Dense(2)(x)
  model = keras.Model(inputs, outputs)
  expected = 2 * (6 * 6 * 9 * 2 * 3      # conv 3x3, 2 -> 3
                  + 3 * 3 * 9 * 3 * 4    # strided conv 3x3, 3 -> 4
                  + 3 * 3 * 9 * 8        # depthwise 3x3, 4 x 2 outputs, 9 taps each
                  + 3 * 3 * 1 * 8        # separable: depthwise 1x1 on 8
                  + 3 * 3 * 8 * 5        # separable: pointwise 8 -> 5
                  + 5 * 2)               # dense
  assert models.count_flops(model) == expected
  # A model nested in another (as in augment.training_model) is counted through.
  outer_in = keras.Input((8, 8, 2))
  outer = keras.Model(outer_in, model(keras.layers.Identity()(outer_in)))
  assert models.count_flops(outer) == expected


@pytest.mark.parametrize('name', SCRATCH)
@pytest.mark.parametrize('channels', [1, 3])
def test_inference_model_contract(name, channels):
  model = models.build_model(name, image_size=32, channels=channels, seed=1)
  assert model.input_shape == (None, 32, 32, channels)
  assert model.output_shape == (None, 1)
  assert model.layers[-1].name == 'probability'
  assert model.get_layer('logit').units == 1
  x = np.random.RandomState(0).rand(3, 32, 32, channels).astype('float32')
  p = model.predict(x, verbose=0)
  assert p.shape == (3, 1) and p.dtype == np.float32
  assert np.all((p > 0) & (p < 1))
  # 'probability' is exactly the sigmoid of 'logit' (exporters rely on it for the temperature).
  logit_model = keras.Model(model.inputs, model.get_layer('logit').output)
  logits = logit_model.predict(x, verbose=0)
  np.testing.assert_allclose(p, 1 / (1 + np.exp(-logits)), rtol=1e-6)
  assert not any('random' in type(l).__name__.lower() for l in model.layers)


@pytest.mark.parametrize('name', SCRATCH)
def test_output_is_float32_under_mixed_precision(name, float32_policy):
  keras.mixed_precision.set_global_policy('mixed_bfloat16')
  model = models.build_model(name, image_size=32, channels=1)
  assert model.get_layer('conv1' if name == 'seed_cnn' else 'stem_conv').compute_dtype == \
      'bfloat16'
  assert model.get_layer('logit').compute_dtype == 'float32'
  assert model.get_layer('probability').compute_dtype == 'float32'
  assert model(np.zeros((1, 32, 32, 1), 'float32')).dtype == 'float32'


@pytest.mark.parametrize('name', SCRATCH)
def test_seed_fixes_the_weights(name):
  a = models.build_model(name, 32, 1, seed=7).get_weights()
  b = models.build_model(name, 32, 1, seed=7).get_weights()
  c = models.build_model(name, 32, 1, seed=8).get_weights()
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  kernels = [(x, y) for x, y in zip(a, c) if x.ndim > 1]
  assert all(not np.array_equal(x, y) for x, y in kernels)
  # Every layer gets its own stream: no two kernels of equal shape start equal.
  same_shape = [(i, j) for i in range(len(a)) for j in range(i) if a[i].ndim > 1
                and a[i].shape == a[j].shape]
  assert all(not np.array_equal(a[i], a[j]) for i, j in same_shape)


@pytest.mark.parametrize('name', SCRATCH)
def test_save_and_load_with_safe_mode_gives_identical_predictions(name, tmp_path):
  model = models.build_model(name, 32, 1, seed=3)
  x = np.random.RandomState(1).rand(4, 32, 32, 1).astype('float32')
  # Move every weight (batch-norm statistics too) off its initial value, so a variable that
  # save/load lost or re-initialised would show in the predictions.
  rs = np.random.RandomState(2)
  model.set_weights([w + np.abs(rs.normal(0, 0.05, w.shape)).astype(w.dtype)
                     for w in model.get_weights()])
  path = tmp_path / 'model.keras'
  model.save(path)
  loaded = keras.saving.load_model(path, safe_mode=True, compile=False)
  np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
  again = model_dir.load_model(path)
  np.testing.assert_array_equal(model.predict(x, verbose=0), again.predict(x, verbose=0))
  assert again.name == name


@pytest.mark.slow
@pytest.mark.parametrize('name', SCRATCH)
def test_a_few_steps_learn_a_separable_problem(name):
  rs = np.random.RandomState(0)
  y = np.tile([0.0, 1.0], 16).astype('float32')
  x = rs.rand(32, 32, 32, 1).astype('float32') * 0.3
  x[y == 1, 8:24, 8:24, :] += 0.6  # COVID-19 examples carry a bright square.
  model = models.build_model(name, 32, 1, seed=0)
  model.compile(keras.optimizers.Adam(1e-3), 'binary_crossentropy')
  before = model.evaluate(x, y, verbose=0)
  model.fit(x, y, batch_size=8, epochs=6, verbose=0, shuffle=False)
  after = model.evaluate(x, y, verbose=0)
  assert after < 0.5 * before, (before, after)


def test_unknown_model_lists_the_valid_names():
  with pytest.raises(errors.UsageError, match=r"unknown model 'resnet50'; valid models: "
                     r'compact_resnet, densenet121, efficientnetv2b0, mobilenetv3small, '
                     r'resnet50v2, seed_cnn'):
    models.build_model('resnet50')


@pytest.mark.parametrize('kwargs, message', [
    (dict(channels=2), 'channels must be 1 or 3, got 2'),
    (dict(image_size=23), "image_size must be an integer >= 24 for model 'seed_cnn', got 23"),
    (dict(image_size=224.0), 'image_size must be an integer'),
    (dict(seed=-1), 'seed must be a non-negative integer or None, got -1'),
])
def test_bad_arguments_are_named(kwargs, message):
  with pytest.raises(errors.UsageError, match=message.replace('(', r'\(')):
    models.build_model('seed_cnn', **kwargs)


def test_seed_cnn_works_at_its_minimum_size():
  model = models.build_model('seed_cnn', image_size=24)
  assert model.get_layer('flatten').output.shape[1] == 128


# --------------------------------------------------------------------------------------------
# Feature taps at several depths.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize('name, size, expected', [
    ('compact_resnet', 64, ['stem_relu', 'stage1_out', 'stage2_out', 'stage3_out', 'stage4_out',
                            'penultimate']),
    # Valid convolutions: conv1 62, conv2 60 | pool2 30, conv3 28 | pool3 14, conv4 12 | pool4 6.
    ('seed_cnn', 64, ['conv2', 'conv3', 'conv4', 'drop4', 'penultimate']),
])
def test_feature_taps_one_per_resolution_stage(name, size, expected):
  model = models.build_model(name, size, 1, seed=0, crop=0.1, equalize='histogram')
  assert models.feature_taps(model) == expected  # The weightless crop/equalize layers: no tap.


def test_tap_model_pools_mean_and_std_per_channel():
  model = models.build_model('compact_resnet', 32, 1, seed=0)
  images = np.random.RandomState(0).uniform(size=(3, 32, 32, 1)).astype(np.float32)
  outputs = models.tap_model(model)(images)
  np.testing.assert_allclose(outputs[0], model(images), atol=1e-6)
  maps = keras.Model(model.input, model.get_layer('stage2_out').output)(images).numpy()
  expected = np.concatenate([maps.mean((1, 2)), maps.std((1, 2))], -1)
  np.testing.assert_allclose(outputs[1 + 2], expected, rtol=1e-4, atol=1e-5)
  penultimate = models.feature_model(model)(images)[1]
  np.testing.assert_allclose(outputs[-1], penultimate, atol=1e-6)
  assert [int(o.shape[-1]) for o in outputs[1:]] == [32, 32, 64, 128, 256, 128]


def test_tap_model_with_a_subset_of_taps():
  model = models.build_model('compact_resnet', 32, 1, seed=0)
  images = np.random.RandomState(1).uniform(size=(2, 32, 32, 1)).astype(np.float32)
  every = models.tap_model(model)(images)
  some = models.tap_model(model, ['stage2_out', 'penultimate'])(images)
  assert len(some) == 3
  np.testing.assert_allclose(some[1], every[3], rtol=1e-6)
  np.testing.assert_allclose(some[2], every[-1], rtol=1e-6)
  with pytest.raises(errors.UsageError, match=r"has no taps \['stage9_out'\]"):
    models.tap_model(model, ['stage9_out'])
  assert len(models.tap_model(model, ['stage2_out'], [64]).outputs) == 2
  with pytest.raises(errors.UsageError, match="tap 'stage2_out' of model .* has 64 features, "
                     'not 63'):
    models.tap_model(model, ['stage2_out'], [63])


def test_tap_std_of_a_nearly_constant_channel_does_not_cancel():
  """mean((x - mean)^2), not E[x^2] - E[x]^2: a channel at 300 +- 0.001 keeps its spread in
  float32 (the other form loses it to cancellation, and a TFLite kernel's order of summation
  or 8-bit rounding then decides a "standard deviation" the shift score's whitening amplifies)."""
  rs = np.random.RandomState(0)
  x = (300.0 + 1e-3 * rs.randn(2, 16, 16, 3)).astype(np.float32)
  got = np.asarray(models._moments(x))
  want = np.asarray(x, np.float64).std((1, 2))
  np.testing.assert_allclose(got[:, 3:], want, rtol=1e-2)
