"""covidlib.explain: Grad-CAM finds a planted square; lung-focus score; overlay and grid PNGs."""

import keras
import numpy as np
import pytest
from PIL import Image

from covidlib import errors
from covidlib import explain
from covidlib import models

SIZE, SQUARE = 32, 6


def _squares(n, rs):
  """Noise images; label 1 ones carry a bright SQUARE x SQUARE patch at a random place."""
  x = rs.uniform(0, 0.5, (n, SIZE, SIZE, 1)).astype('float32')
  y = rs.randint(0, 2, n)
  corners = rs.randint(0, SIZE - SQUARE + 1, (n, 2))
  for i in np.flatnonzero(y):
    r, c = corners[i]
    x[i, r:r + SQUARE, c:c + SQUARE, 0] = 1.0
  return x, y.astype('float32'), corners


@pytest.fixture(scope='module')
def square_model():
  """A tiny CNN trained (about 2 s) to tell images with a bright square from plain noise."""
  keras.utils.set_random_seed(0)
  x, y, _ = _squares(512, np.random.RandomState(0))
  inputs = keras.Input((SIZE, SIZE, 1))
  h = keras.layers.Conv2D(8, 3, padding='same', activation='relu', name='conv_a')(inputs)
  h = keras.layers.Conv2D(8, 3, padding='same', activation='relu', name='feat')(h)
  h = keras.layers.GlobalMaxPooling2D(name='pool')(h)
  z = keras.layers.Dense(1, name='logit')(h)
  out = keras.layers.Activation('sigmoid', name='probability')(z)
  model = keras.Model(inputs, out)
  model.compile(keras.optimizers.Adam(1e-2), 'binary_crossentropy')
  model.fit(x, y, epochs=4, batch_size=32, verbose=0)
  return model


def test_grad_cam_puts_heat_on_the_planted_square(square_model):
  x, y, corners = _squares(80, np.random.RandomState(1))
  p = square_model.predict(x, verbose=0)[:, 0]
  assert np.mean((p >= 0.5) == (y == 1)) >= 0.95  # The model learnt the task.
  positives = np.flatnonzero(y == 1)
  cams = explain.grad_cam_batch(square_model, x[positives])
  assert cams.shape == (positives.size, SIZE, SIZE)
  assert cams.min() >= 0 and np.allclose(cams.max(axis=(1, 2)), 1.0)
  peaks_inside, masses = 0, []
  for cam, (r, c) in zip(cams, corners[positives]):
    box = np.zeros((SIZE, SIZE), bool)  # The square, 2 px of margin for the bilinear upsampling.
    box[max(r - 2, 0):r + SQUARE + 2, max(c - 2, 0):c + SQUARE + 2] = True
    peaks_inside += box[np.unravel_index(cam.argmax(), cam.shape)]
    masses.append(cam[box].sum() / cam.sum() / box.mean())  # Heat density vs a uniform map.
  assert peaks_inside >= 0.9 * positives.size
  assert np.mean(masses) > 3.0
  single = explain.grad_cam(square_model, x[positives[0]])
  np.testing.assert_allclose(single, cams[0], atol=1e-5)


def test_grad_cam_uses_the_logit_so_saturated_outputs_still_explain(square_model):
  x, y, _ = _squares(20, np.random.RandomState(2))
  image = x[np.flatnonzero(y == 1)[0]]
  reference = explain.grad_cam(square_model, image)
  saturated = keras.models.clone_model(square_model)
  saturated.set_weights(square_model.get_weights())
  logit = saturated.get_layer('logit')
  kernel, bias = logit.get_weights()
  logit.set_weights([kernel * 1000, bias * 1000])
  assert saturated.predict(image[None], verbose=0)[0, 0] == 1.0  # float32 sigmoid saturated.
  np.testing.assert_allclose(explain.grad_cam(saturated, image), reference, atol=1e-4)


def test_grad_cam_on_a_dense_sigmoid_head_matches_the_logit_layer(square_model):
  inputs = keras.Input((SIZE, SIZE, 1))
  h = keras.layers.Conv2D(8, 3, padding='same', activation='relu', name='conv_a')(inputs)
  h = keras.layers.Conv2D(8, 3, padding='same', activation='relu', name='feat')(h)
  h = keras.layers.GlobalMaxPooling2D()(h)
  out = keras.layers.Dense(1, activation='sigmoid', name='head')(h)
  plain = keras.Model(inputs, out)
  plain.set_weights(square_model.get_weights())
  x, _, _ = _squares(4, np.random.RandomState(3))
  np.testing.assert_allclose(explain.grad_cam_batch(plain, x),
                             explain.grad_cam_batch(square_model, x), atol=1e-5)


def test_target_normal_and_per_image_labels(square_model):
  x, _, _ = _squares(6, np.random.RandomState(4))
  covid = explain.grad_cam_batch(square_model, x, target='covid')
  normal = explain.grad_cam_batch(square_model, x, target='normal')
  mixed = explain.grad_cam_batch(square_model, x, target=[1, 0, 1, 0, 1, 0])
  np.testing.assert_allclose(mixed[0::2], covid[0::2], atol=1e-6)
  np.testing.assert_allclose(mixed[1::2], normal[1::2], atol=1e-6)
  with pytest.raises(errors.UsageError, match='target must be one of'):
    explain.grad_cam_batch(square_model, x, target='pneumonia')
  with pytest.raises(errors.UsageError, match='target labels must be 6 values'):
    explain.grad_cam_batch(square_model, x, target=[1, 0])


@pytest.mark.parametrize('name,layer', [('compact_resnet', 'stage4_out'), ('seed_cnn', 'drop4')])
def test_covidlib_models_pick_their_last_feature_map(name, layer):
  model = models.build_model(name, image_size=32, channels=1, seed=0)
  assert explain.find_target_layer(model) == layer
  heat = explain.grad_cam(model, np.random.RandomState(0).rand(32, 32, 1))
  assert heat.shape == (32, 32) and heat.dtype == np.float32
  assert 0.0 <= heat.min() and heat.max() <= 1.0


def test_bad_layer_names_are_named(square_model):
  image = np.zeros((SIZE, SIZE, 1), np.float32)
  with pytest.raises(errors.UsageError,
                     match="target layer 'logit' has no 4-D .* output; layers with a 4-D "
                           'output: conv_a, feat'):
    explain.grad_cam(square_model, image, layer_name='logit')
  with pytest.raises(errors.UsageError, match="'nope' is not a layer of the model"):
    explain.grad_cam(square_model, image, layer_name='nope')
  with pytest.raises(errors.UsageError, match='image must be'):
    explain.grad_cam(square_model, image[..., 0])
  dense = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation='sigmoid')])
  with pytest.raises(errors.UsageError, match='no layer with a 4-D'):
    explain.find_target_layer(dense)
  # An explicit earlier layer works and differs from the default.
  early = explain.grad_cam(square_model, image + 0.3, layer_name='conv_a')
  assert early.shape == (SIZE, SIZE)


def test_lung_focus_score():
  size = 100
  share = explain.lung_region_share(size, size)
  # Two ellipses of semi-axes 0.17 x 0.30: area 2 * pi * 0.17 * 0.30 = 0.3204 of the image.
  assert share == pytest.approx(2 * np.pi * 0.17 * 0.30, abs=0.01)
  assert explain.lung_focus_score(np.ones((size, size))) == pytest.approx(share)
  inside = np.zeros((size, size))
  inside[45:50, 28:32] = 1.0  # Around the left ellipse's centre (0.30, 0.48).
  assert explain.lung_focus_score(inside) == 1.0
  outside = np.zeros((size, size))
  outside[:, 48:52] = 1.0  # The mediastinum column between the ellipses...
  outside[0:5, :] = 1.0  # ...and the top border.
  assert explain.lung_focus_score(outside) == 0.0
  half = inside + outside * (inside.sum() / outside.sum())
  assert explain.lung_focus_score(half) == pytest.approx(0.5)
  assert explain.lung_focus_score(np.zeros((8, 8))) is None
  with pytest.raises(errors.UsageError, match='heatmap must be 2-D'):
    explain.lung_focus_score(np.ones((2, 8, 8)))


def test_overlay_and_grid_pngs(tmp_path):
  image = np.full((32, 32, 1), 0.5, np.float32)
  heat = np.zeros((32, 32), np.float32)
  heat[10:20, 10:20] = 1.0
  rgb = explain.overlay(image, heat, alpha=0.5)
  assert rgb.dtype == np.uint8 and rgb.shape == (32, 32, 3)
  assert tuple(rgb[0, 0]) == (128, 128, 128)  # No heat: the gray image.
  r, g, b = rgb[15, 15].astype(int)
  assert r > 180 and g < 100 and b < 100  # Full heat: red.
  explain.save_overlay(tmp_path / 'one.png', image, heat)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'one.png')), rgb)
  explain.save_grid(tmp_path / 'grid.png', [image] * 5, [heat] * 5,
                    ['a\nP=0.99'] * 5, columns=2, cell=64)
  grid = Image.open(tmp_path / 'grid.png')
  assert grid.size[0] == 2 * (64 + 4) + 4
  assert grid.size[1] == 3 * (64 + 4 + 12 * 2 + 4) + 4
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []  # No temp left.
  with pytest.raises(errors.UsageError, match='as many images'):
    explain.save_grid(tmp_path / 'bad.png', [image], [heat, heat], ['x'])
  with pytest.raises(errors.UsageError, match='differ in size'):
    explain.overlay(image, heat[:16])
