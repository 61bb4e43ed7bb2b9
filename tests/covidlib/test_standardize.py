"""Tests of covidlib.standardize: crop and histogram equalization inside the model, against
numpy references, eagerly, in tf.data and in the model; config round trip, safe-mode load in a
fresh process, and TFLite parity of a standardized model.

    .venv/bin/python -m pytest tests/covidlib/test_standardize.py -q
"""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from covidlib import errors
from covidlib import models
from covidlib import standardize


def _images(n=4, size=32, channels=1, seed=0):
  """Skewed gray images (mostly dark, like an X-ray's background), some with a frame."""
  rs = np.random.RandomState(seed)
  x = rs.rand(n, size, size, 1) ** 3
  x[0, :3] = 1.0                    # A white border band, as in a paper figure.
  x[1] = np.round(x[1] * 7) / 7     # Few levels: ties everywhere.
  x = np.repeat(x, channels, axis=-1)
  return x.astype('float32')


def reference_equalize(image: np.ndarray) -> np.ndarray:
  """Plain numpy histogram equalization of one (H, W) float image in [0, 1], as documented:
  q = clip(round(255 x), 0, 255), y = (cdf[q] - cdf_min) / (N - cdf_min)."""
  q = np.clip(np.round(image.astype(np.float32) * np.float32(255)), 0, 255).astype(np.int64)
  cdf = np.cumsum(np.bincount(q.ravel(), minlength=256))
  cdf_min = cdf[q.min()]
  if q.size == cdf_min:
    return image
  return (cdf[q] - cdf_min) / (q.size - cdf_min)


def reference_clahe(image: np.ndarray, clip_limit: float = 2.0, grid: int = 8) -> np.ndarray:
  """Plain numpy, with loops: OpenCV's CLAHE (as documented in covidlib.standardize) without
  its two roundings to 8 bits. (Checked once against cv2.createCLAHE(2.0, (8, 8)) 5.0.0 on
  random and X-ray-like images from 32 x 32 to 224 x 224: within 1.0/255 everywhere, 0.29/255 on
  average; OpenCV is not a test dependency.)"""
  q = np.clip(np.round(image.astype(np.float32) * np.float32(255)), 0, 255).astype(np.int64)
  h, w = q.shape
  th, tw = -(-h // grid), -(-w // grid)
  padded = np.pad(q, ((0, grid * th - h), (0, grid * tw - w)), mode='reflect')
  limit = max(int(clip_limit * th * tw / 256), 1)
  luts = np.zeros((grid, grid, 256))
  for i in range(grid):
    for j in range(grid):
      hist = np.bincount(padded[i * th:(i + 1) * th, j * tw:(j + 1) * tw].ravel(), minlength=256)
      clipped = np.minimum(hist, limit)
      excess = int((hist - clipped).sum())
      clipped += excess // 256
      residual = excess % 256
      if residual:
        step = max(256 // residual, 1)
        k = 0
        while k < 256 and residual > 0:
          clipped[k] += 1
          k += step
          residual -= 1
      luts[i, j] = np.cumsum(clipped) / (th * tw)

  def neighbours(pos, tile):
    f = pos / tile - 0.5
    first = int(np.floor(f))
    return max(first, 0), min(first + 1, grid - 1), f - first

  out = np.zeros((h, w))
  for y in range(h):
    y1, y2, ya = neighbours(y, th)
    for x in range(w):
      x1, x2, xa = neighbours(x, tw)
      v = q[y, x]
      out[y, x] = ((luts[y1, x1, v] * (1 - xa) + luts[y1, x2, v] * xa) * (1 - ya)
                   + (luts[y2, x1, v] * (1 - xa) + luts[y2, x2, v] * xa) * ya)
  return out


def reference_crop(image: np.ndarray, fraction: float) -> np.ndarray:
  """Central crop of one (H, W, C) image, resized back with tf's bilinear resize."""
  h, w = image.shape[:2]
  top, left = round(fraction * h), round(fraction * w)
  cropped = image[top:h - top, left:w - left]
  return tf.image.resize(cropped, [h, w], method='bilinear').numpy()


@pytest.mark.parametrize('channels', [1, 3])
def test_histogram_equalization_matches_numpy(channels):
  x = _images(channels=channels)
  y = standardize.HistogramEqualization()(x).numpy()
  assert y.shape == x.shape and y.dtype == np.float32
  for i in range(len(x)):
    for c in range(channels):
      np.testing.assert_allclose(y[i, ..., c], reference_equalize(x[i, ..., c]), atol=1e-6)
  assert y.min() == 0.0 and y.max() == 1.0
  # An equalized image's 8-bit levels fill [0, 1] about evenly: its mean is near 1/2 even
  # though the input is dark.
  assert x.mean() < 0.3 and 0.4 < y.mean() < 0.6


@pytest.mark.parametrize('size', [(32, 32), (36, 44)])  # 36 x 44: reflected to 40 x 48.
@pytest.mark.parametrize('channels', [1, 3])
def test_clahe_matches_numpy(size, channels):
  rs = np.random.RandomState(1)
  x = rs.rand(2, *size, 1) ** 3
  x[0, :4] = 1.0
  x = np.repeat(x, channels, axis=-1).astype('float32')
  y = standardize.ContrastLimitedEqualization()(x).numpy()
  assert y.shape == x.shape and y.dtype == np.float32
  for i in range(2):
    expected = reference_clahe(x[i, ..., 0])
    for c in range(channels):
      np.testing.assert_allclose(y[i, ..., c], expected, atol=1e-6)
  assert 0.0 <= y.min() and y.max() <= 1.0


def test_clahe_needs_a_static_size_of_at_least_the_grid():
  with pytest.raises(ValueError, match='at least 8 x 8 pixels, got 4 x 16'):
    standardize.equalize_clahe(np.zeros((1, 4, 16, 1), np.float32))


def test_equalization_maps_the_darkest_level_to_0_and_keeps_order():
  x = _images()[2:3]
  y = standardize.equalize_histogram(x).numpy()
  order = np.argsort(x.ravel(), kind='stable')
  assert np.all(np.diff(y.ravel()[order]) >= 0)  # Monotone: never swaps two pixels' order.
  assert np.all(y.ravel()[x.ravel() == x.min()] == 0.0)


def test_constant_image_is_unchanged():
  x = np.full((2, 8, 8, 1), 0.3, np.float32)
  np.testing.assert_array_equal(standardize.HistogramEqualization()(x).numpy(), x)


def test_crop_matches_numpy_and_keeps_the_size():
  x = _images(n=2, size=40, channels=3)
  y = standardize.CentralCrop(0.1)(x).numpy()
  assert y.shape == x.shape
  for i in range(2):
    np.testing.assert_allclose(y[i], reference_crop(x[i], 0.1), atol=1e-6)
  # The white border band (rows 0-2 of image 0) is gone: the top row is now row 4's content.
  assert y[0, 0].mean() < 0.9


@pytest.mark.parametrize('layer', [standardize.CentralCrop(0.15),
                                   standardize.HistogramEqualization(),
                                   standardize.ContrastLimitedEqualization()],
                         ids=['crop', 'histogram', 'clahe'])
def test_eager_tf_data_and_model_agree(layer):
  x = _images(n=4, size=32)
  eager = layer(x).numpy()
  graph = next(iter(tf.data.Dataset.from_tensor_slices(x).batch(4).map(layer))).numpy()
  inputs = keras.Input((32, 32, 1))
  in_model = keras.Model(inputs, layer(inputs)).predict(x, verbose=0)
  np.testing.assert_allclose(graph, eager, atol=1e-6)
  np.testing.assert_allclose(in_model, eager, atol=1e-6)


def test_build_standardization_order_and_defaults():
  assert standardize.build_standardization() == []
  layers = standardize.build_standardization(crop=0.1, equalize='histogram')
  assert [l.name for l in layers] == ['crop', 'equalize']
  assert isinstance(layers[1], standardize.HistogramEqualization)
  clahe, = standardize.build_standardization(equalize='clahe')
  assert isinstance(clahe, standardize.ContrastLimitedEqualization) and clahe.name == 'equalize'
  assert (clahe.clip_limit, clahe.grid) == (2.0, 8)


@pytest.mark.parametrize('kwargs, message', [
    (dict(crop=0.4), 'crop must be a number in [0, 0.4) (the fraction of each side cut off), '
                     'got 0.4'),
    (dict(crop=-0.1), 'crop must be a number in [0, 0.4)'),
    (dict(crop='0.1'), "got '0.1'"),
    (dict(equalize='adaptive'), "equalize must be one of none, histogram, clahe, got "
                                "'adaptive'"),
])
def test_bad_arguments_are_named(kwargs, message):
  with pytest.raises(errors.UsageError) as e:
    standardize.build_standardization(**kwargs)
  assert message in str(e.value)
  with pytest.raises(errors.UsageError):
    models.build_model('compact_resnet', 32, **kwargs)


@pytest.mark.parametrize('name', sorted(set(models.MODELS) - set(models.BACKBONES)))
def test_model_starts_with_the_layers_and_keeps_its_weights(name):
  plain = models.build_model(name, image_size=32, seed=0)
  model = models.build_model(name, image_size=32, seed=0, crop=0.1, equalize='histogram')
  assert [l.name for l in model.layers[:3]] == ['image', 'crop', 'equalize']
  assert model.get_layer('logit') and model.layers[-1].name == 'probability'
  for a, b in zip(plain.get_weights(), model.get_weights()):
    np.testing.assert_array_equal(a, b)
  x = _images(n=3, size=32)
  layers = standardize.build_standardization(0.1, 'histogram')
  np.testing.assert_allclose(model.predict(x, verbose=0),
                             plain.predict(layers[1](layers[0](x)).numpy(), verbose=0),
                             atol=1e-5)


def test_config_round_trip():
  layers = (standardize.build_standardization(0.2, 'histogram')
            + [standardize.ContrastLimitedEqualization(3.0, 4)])
  for layer in layers:
    config = json.loads(json.dumps(layer.get_config()))
    clone = type(layer).from_config(config)
    assert clone.get_config() == layer.get_config()
  assert standardize.CentralCrop.from_config(
      standardize.CentralCrop(0.2).get_config()).fraction == 0.2


_LOAD_IN_FRESH_PROCESS = """
import sys
import numpy as np
from covidlib import model_dir
model = model_dir.load_model(sys.argv[1])
x = np.load(sys.argv[2])
np.save(sys.argv[3], model.predict(x, verbose=0))
print([l.name for l in model.layers[:3]])
"""


def test_saved_model_loads_with_safe_mode_in_a_fresh_process(tmp_path):
  model = models.build_model('compact_resnet', image_size=32, seed=0, crop=0.1,
                             equalize='histogram')
  path = tmp_path / 'model.keras'
  model.save(path)
  x = _images(n=3, size=32)
  loaded = keras.saving.load_model(path, safe_mode=True)
  np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                             atol=1e-6)
  np.save(tmp_path / 'x.npy', x)
  result = subprocess.run(
      [sys.executable, '-c', _LOAD_IN_FRESH_PROCESS, str(path), str(tmp_path / 'x.npy'),
       str(tmp_path / 'y.npy')], capture_output=True, text=True, timeout=300,
      env={'TF_CPP_MIN_LOG_LEVEL': '3', **__import__('os').environ})
  assert result.returncode == 0, result.stderr[-3000:]
  assert "['image', 'crop', 'equalize']" in result.stdout
  np.testing.assert_allclose(np.load(tmp_path / 'y.npy'), model.predict(x, verbose=0),
                             atol=1e-6)


def _run_tflite(flatbuffer: bytes, x: np.ndarray) -> np.ndarray:
  from ai_edge_litert.interpreter import Interpreter
  interpreter = Interpreter(model_content=flatbuffer)
  interpreter.allocate_tensors()
  (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
  results = []
  for image in x:
    interpreter.set_tensor(inp['index'], image[None])
    interpreter.invoke()
    results.append(interpreter.get_tensor(out['index']).reshape(-1)[0])
  return np.asarray(results)


# Max |P_tflite - P_keras| of a standardized 32 px compact_resnet on 12 images. Equalization is
# discontinuous (a pixel whose level rounds the other way moves its cdf by one bin), so fp32 is
# exact only where crop's resize rounds alike; measured: see the report in the commit message.
TFLITE_TOLERANCE = {'fp32': 1e-4, 'fp16': 1e-2, 'dynamic': 5e-2}


@pytest.fixture(scope='module', params=['histogram', 'clahe'])
def standardized_model(request):
  return models.build_model('compact_resnet', image_size=32, seed=0, crop=0.1,
                            equalize=request.param)


@pytest.mark.parametrize('quant_type', sorted(TFLITE_TOLERANCE))
def test_tflite_variants_agree_with_keras(standardized_model, quant_type):
  exporters_tflite = pytest.importorskip('exporters.tflite')
  x = _images(n=12, size=32, seed=3)
  expected = standardized_model.predict(x, verbose=0).reshape(-1)
  got = _run_tflite(exporters_tflite.convert_tflite(standardized_model, quant_type), x)
  assert np.abs(got - expected).max() <= TFLITE_TOLERANCE[quant_type], (got, expected)


def test_tflite_int8_agrees_with_keras(standardized_model):
  """Full-integer int8: the equalization's levels survive quantization (255 x is an int8 tensor
  of scale 1 when the calibration images span [0, 1]); measured max error 0.012 (histogram)
  here, against 0.095 for the same network without standardization (random weights quantize
  badly)."""
  exporters_tflite = pytest.importorskip('exporters.tflite')
  x = _images(n=12, size=32, seed=3)
  calibration = _images(n=16, size=32, seed=4)
  data = exporters_tflite.convert_tflite(standardized_model, 'int8', calibration)
  expected = standardized_model.predict(x, verbose=0).reshape(-1)
  got = _run_tflite(data, x)
  assert np.abs(got - expected).max() <= 0.05, (got, expected)


def test_saved_model_bytes_signature_runs_the_standardization(standardized_model, tmp_path,
                                                              encode):
  """Encoded PNG -> the SavedModel's one preprocessing + the model's standardization layers ==
  covidlib.preprocess then the Keras model."""
  saved_model = pytest.importorskip('exporters.saved_model')
  from covidlib import model_dir as model_dir_lib
  from covidlib import preprocess

  archive = saved_model.build_archive(standardized_model, model_dir_lib.Decision())
  archive.write_out(str(tmp_path / 'sm'), verbose=False)
  serve = tf.saved_model.load(str(tmp_path / 'sm')).signatures['serving_default']
  rs = np.random.RandomState(5)
  pngs = [encode((rs.rand(40 + 5 * i, 36) ** 2 * 255).astype(np.uint8)) for i in range(3)]
  got = serve(image_bytes=tf.constant(pngs))['probability'].numpy()
  x = np.stack([preprocess.preprocess(preprocess.decode_image(p), 32).numpy() for p in pngs])
  np.testing.assert_allclose(got, standardized_model.predict(x, verbose=0).reshape(-1),
                             atol=1e-5)
