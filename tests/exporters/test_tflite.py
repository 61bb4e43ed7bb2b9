"""TFLite variants against the Keras model on generated images, with stated tolerances; metadata
travels inside the file; unsupported options fail loudly."""

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from covidlib import calibration
from covidlib import errors
from exporters import saved_model
from exporters import tflite

# Max |P_tflite - P_keras| over the test images, per variant, for this 16 x 16 model. fp32 is the
# same arithmetic up to kernel order; fp16 rounds weights to 11 significant bits; dynamic and
# int8 quantize weights (and int8 activations) to 8 bits; int8's error on a random-weight 16 x 16
# network is larger than on trained ones (see export_report.md for those).
TOLERANCE = {'fp32': 1e-5, 'fp16': 5e-3, 'dynamic': 2e-2, 'int8': 8e-2}
MEAN_TOLERANCE = {'fp32': 1e-6, 'fp16': 2e-3, 'dynamic': 1e-2, 'int8': 3e-2}
# Decisions may flip only for images this close to the threshold.
MARGIN = TOLERANCE


@pytest.fixture(scope='module')
def variants(tiny_model, decision, calibration_images):
  return {q: tflite.convert_tflite(tiny_model, q, calibration_images if q == 'int8' else None,
                                   decision=decision)
          for q in tflite.QUANT_TYPES}


def _run(flatbuffer: bytes, x: np.ndarray) -> np.ndarray:
  interpreter = Interpreter(model_content=flatbuffer)
  interpreter.allocate_tensors()
  (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
  results = []
  for image in x:
    value = image[None]
    if inp['dtype'] != np.float32:
      scale, zero = inp['quantization']
      value = np.clip(np.round(value / scale + zero), -128, 127).astype(inp['dtype'])
    interpreter.set_tensor(inp['index'], value)
    interpreter.invoke()
    y = interpreter.get_tensor(out['index']).astype(np.float32)
    if out['dtype'] != np.float32:
      scale, zero = out['quantization']
      y = (y - zero) * scale
    results.append(y.reshape(-1)[0])
  return np.asarray(results)


@pytest.mark.parametrize('quant_type', tflite.QUANT_TYPES)
def test_variant_agrees_with_keras(quant_type, variants, tiny_model, decision, images, helpers):
  x = helpers.preprocessed(images)
  expected = calibration.apply_temperature(np.asarray(tiny_model(x)).reshape(-1),
                                           decision.temperature)
  got = _run(variants[quant_type], x)
  assert np.abs(got - expected).max() <= TOLERANCE[quant_type]
  assert np.abs(got - expected).mean() <= MEAN_TOLERANCE[quant_type]
  flipped = (got >= decision.threshold) != (expected >= decision.threshold)
  assert np.all(np.abs(expected[flipped] - decision.threshold) <= MARGIN[quant_type])


def test_quantized_files_are_smaller(variants):
  sizes = {q: len(b) for q, b in variants.items()}
  assert sizes['int8'] < 0.4 * sizes['fp32'], sizes
  assert sizes['dynamic'] < 0.4 * sizes['fp32'], sizes
  assert sizes['fp16'] < 0.7 * sizes['fp32'], sizes


@pytest.mark.parametrize('quant_type', tflite.QUANT_TYPES)
def test_labels_and_decision_are_embedded(quant_type, variants, decision):
  metadata = tflite.read_metadata(variants[quant_type])
  assert metadata[tflite.LABELS_METADATA] == b'normal\ncovid\n'
  assert tflite.read_decision(variants[quant_type]) == decision
  assert b'"temperature_applied": true' in metadata[tflite.DECISION_METADATA]
  assert 'min_runtime_version' in metadata  # The converter's own entries survive.


def test_int8_io_takes_and_returns_int8(tiny_model, calibration_images, variants, decision):
  data = tflite.convert_tflite(tiny_model, 'int8', calibration_images, int8_io=True,
                               decision=decision)
  interpreter = Interpreter(model_content=data)
  assert interpreter.get_input_details()[0]['dtype'] == np.int8
  assert interpreter.get_output_details()[0]['dtype'] == np.int8
  # The float-io int8 model quantizes its input and dequantizes its output inside; here the
  # caller does both, so the two agree up to one output step (1/256).
  x = calibration_images[:10]
  np.testing.assert_allclose(_run(data, x), _run(variants['int8'], x), atol=1.5 / 256)


def test_from_saved_model_equals_from_keras(model_dir, tmp_path, variants, calibration_images):
  out = saved_model.export_saved_model(model_dir, tmp_path / 'sm')
  data = tflite.convert_tflite(out, 'fp32')
  np.testing.assert_allclose(_run(data, calibration_images),
                             _run(variants['fp32'], calibration_images), atol=1e-6)
  assert tflite.read_decision(data) == tflite.read_decision(variants['fp32'])


def test_unknown_type_and_misused_options_are_usage_errors(tiny_model, calibration_images,
                                                           tmp_path):
  with pytest.raises(errors.UsageError, match="quantization type 'int4' is not supported"):
    tflite.convert_tflite(tiny_model, 'int4')
  with pytest.raises(errors.UsageError, match='int8 needs representative_images'):
    tflite.convert_tflite(tiny_model, 'int8')
  with pytest.raises(errors.UsageError, match="int8_io needs quantization type int8"):
    tflite.convert_tflite(tiny_model, 'fp16', int8_io=True)
  with pytest.raises(errors.UsageError, match=r'must be float32 \(N, 16, 16, 1\)'):
    tflite.convert_tflite(tiny_model, 'int8', calibration_images[..., :8, :])
  with pytest.raises(errors.UsageError, match=r'preprocessed to \[0, 1\]'):
    tflite.convert_tflite(tiny_model, 'int8', calibration_images * 255)
  with pytest.raises(errors.UsageError, match='not a SavedModel folder'):
    tflite.convert_tflite(str(tmp_path), 'fp32')


def test_read_metadata_of_garbage_is_a_model_load_error():
  with pytest.raises(errors.ModelLoadError, match='not a readable TFLite flatbuffer'):
    tflite.read_metadata(b'\x00' * 3)
