"""SavedModel export: both signatures against Keras, in a process without covidlib; bytes path
against the Python preprocessing path; TF Serving's base64 JSON; bad images in a batch."""

import base64
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from covidlib import calibration
from covidlib import errors
from covidlib import model_dir as model_dir_lib
from covidlib import preprocess
from exporters import saved_model


@pytest.fixture(scope='module')
def exported(model_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('sm') / 'saved_model')
  saved_model.export_saved_model(model_dir, out)
  return out


@pytest.fixture(scope='module')
def loaded(exported):
  return tf.saved_model.load(exported)


def _keras_probability(model, decision, images):
  """The reference: Keras model, then the stored temperature, in NumPy."""
  p = np.asarray(model(images)).reshape(-1)
  return calibration.apply_temperature(p, decision.temperature)


@pytest.mark.slow
def test_loads_without_covidlib_and_matches_keras(exported, tiny_model, decision, images,
                                                  helpers, encode, tmp_path):
  x = helpers.preprocessed(images)
  np.save(tmp_path / 'x.npy', x)
  png = encode(images[0])
  (tmp_path / 'image.png').write_bytes(png)
  script = textwrap.dedent(f'''
      import sys
      import numpy as np
      import tensorflow as tf
      m = tf.saved_model.load({exported!r})
      x = np.load({str(tmp_path / 'x.npy')!r})
      tensor = m.signatures['serving_preprocessed'](images=tf.constant(x))
      raw = open({str(tmp_path / 'image.png')!r}, 'rb').read()
      encoded = m.signatures['serving_default'](image_bytes=tf.constant([raw]))
      np.savez({str(tmp_path / 'out.npz')!r},
               **{{'tensor_' + k: v.numpy() for k, v in tensor.items()}},
               **{{'bytes_' + k: v.numpy() for k, v in encoded.items()}})
      assert 'covidlib' not in sys.modules and 'exporters' not in sys.modules, sorted(
          m for m in sys.modules if m.startswith(('covidlib', 'exporters')))
  ''')
  env = dict(os.environ, PYTHONPATH='', TF_CPP_MIN_LOG_LEVEL='3')
  done = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  out = np.load(tmp_path / 'out.npz')
  expected = _keras_probability(tiny_model, decision, x)
  np.testing.assert_allclose(out['tensor_probability'], expected, atol=2e-6)
  np.testing.assert_array_equal(out['tensor_label'], (out['tensor_probability'] >= 0.42))
  assert 0 < out['tensor_label'].sum() < len(x)  # The threshold splits these images.
  np.testing.assert_allclose(out['tensor_threshold'], np.full(len(x), 0.42, np.float32))
  assert out['tensor_label'].dtype == np.int32
  np.testing.assert_allclose(out['bytes_probability'], expected[:1], atol=2e-6)


def _variants(gray):
  rgb = np.stack([gray, np.roll(gray, 1, 0), np.roll(gray, 1, 1)], axis=-1)  # Real colour.
  rgba = np.concatenate([rgb, np.full(gray.shape + (1,), 200, np.uint8)], axis=-1)
  return {
      'gray8_png': (gray, 'PNG'),
      'gray16_png': (gray.astype(np.uint16) * 251 + 7, 'PNG'),  # Not a multiple of 257.
      'rgb_png': (rgb, 'PNG'),
      'rgba_png': (rgba, 'PNG'),
      'gray_jpeg': (gray, 'JPEG'),
      'rgb_jpeg': (rgb, 'JPEG'),
      'rgb_bmp': (rgb, 'BMP'),
      'gray_gif': (gray, 'GIF'),
  }


@pytest.mark.parametrize('name', list(_variants(np.zeros((2, 2), np.uint8))))
def test_bytes_signature_equals_python_preprocessing(name, loaded, tiny_model, decision, images,
                                                     encode):
  array, fmt = _variants(images[3])[name]
  contents = encode(array, fmt)
  python_path = preprocess.preprocess(preprocess.decode_bytes(contents, name), 16).numpy()
  expected = _keras_probability(tiny_model, decision, python_path[None])
  got = loaded.signatures['serving_default'](image_bytes=tf.constant([contents]))
  np.testing.assert_allclose(got['probability'].numpy(), expected, atol=2e-6)
  via_tensor = loaded.signatures['serving_preprocessed'](images=tf.constant(python_path[None]))
  # Graph and eager float kernels may differ in the last bit (1e-7), never more.
  np.testing.assert_allclose(got['probability'].numpy(), via_tensor['probability'].numpy(),
                             atol=1e-6)


def test_bytes_batch_of_mixed_sizes_and_formats(loaded, tiny_model, decision, images, encode):
  files = [encode(images[i], fmt) for i, fmt in zip(range(6), ['PNG', 'JPEG', 'BMP'] * 2)]
  x = np.stack([preprocess.preprocess(preprocess.decode_bytes(f, 'f'), 16).numpy()
                for f in files])
  got = loaded.signatures['serving_default'](image_bytes=tf.constant(files))
  np.testing.assert_allclose(got['probability'].numpy(),
                             _keras_probability(tiny_model, decision, x), atol=2e-6)
  assert got['label'].shape == (6,) and got['threshold'].shape == (6,)


def _serve_rest(signature, body: str) -> str:
  """What TF Serving's REST predict API does with a row-format body, for one `*_bytes` input:
  {"b64": ...} values are base64-decoded into the string tensor; outputs come back per row."""
  instances = json.loads(body)['instances']
  values = [base64.b64decode(i['b64']) if isinstance(i, dict) else i for i in instances]
  outputs = {k: v.numpy().tolist() for k, v in signature(image_bytes=tf.constant(values)).items()}
  rows = [{k: outputs[k][i] for k in outputs} for i in range(len(values))]
  return json.dumps({'predictions': rows})


def test_rest_base64_request_runs_through_the_signature(loaded, images, encode):
  signature = loaded.signatures['serving_default']
  assert list(signature.structured_input_signature[1]) == ['image_bytes']  # Ends in _bytes.
  files = [encode(images[0]), encode(images[1], 'JPEG')]
  body = saved_model.rest_request(files)
  assert json.loads(body)['instances'][1] == {'b64': base64.b64encode(files[1]).decode()}
  response = json.loads(_serve_rest(signature, body))['predictions']
  direct = signature(image_bytes=tf.constant(files))
  assert [r['label'] for r in response] == direct['label'].numpy().tolist()
  np.testing.assert_allclose([r['probability'] for r in response], direct['probability'].numpy())
  assert all(r['threshold'] == pytest.approx(0.42) for r in response)


@pytest.mark.parametrize('bad, message', [
    (b'this is not an image', 'Unknown image file format'),
    (b'', 'Input is empty'),
    ('bomb', 'image declares more pixels than the limit'),
    ('truncated', 'PNG'),
])
def test_bad_image_in_batch_fails_the_request_not_the_process(bad, message, loaded, images,
                                                              encode):
  good = encode(images[0])
  if bad == 'bomb':  # A valid header declaring 30000 x 30000 pixels.
    bad = bytearray(encode(images[0]))
    bad[16:24] = (30000).to_bytes(4, 'big') * 2
    bad = bytes(bad)
  elif bad == 'truncated':
    bad = good[:len(good) // 2]
  signature = loaded.signatures['serving_default']
  with pytest.raises(tf.errors.InvalidArgumentError, match=message):
    signature(image_bytes=tf.constant([good, bad]))
  after = signature(image_bytes=tf.constant([good]))  # The same process serves on.
  assert after['probability'].shape == (1,)


def test_assets_extra_hold_labels_and_decision(exported, decision):
  with open(os.path.join(exported, 'assets.extra', 'labels.txt')) as f:
    assert f.read() == 'normal\ncovid\n'
  assert model_dir_lib.load_decision(os.path.join(exported, 'assets.extra')) == decision


def test_default_decision_without_decision_json(tmp_path, tiny_model, calibration_images,
                                                helpers):
  model_dir = helpers.write_model_dir(tmp_path / 'run', tiny_model)
  out = saved_model.export_saved_model(model_dir, tmp_path / 'sm', model=tiny_model)
  got = tf.saved_model.load(out).signatures['serving_preprocessed'](
      images=tf.constant(calibration_images))
  expected = np.asarray(tiny_model(calibration_images)).reshape(-1)
  np.testing.assert_allclose(got['probability'].numpy(), expected, atol=1e-6)
  np.testing.assert_array_equal(got['label'].numpy(), expected >= 0.5)


def test_existing_output_and_bad_model_dir_are_usage_errors(model_dir, exported, tmp_path):
  with pytest.raises(errors.UsageError, match='already exists'):
    saved_model.export_saved_model(model_dir, exported)
  with pytest.raises(errors.UsageError, match='does not exist'):
    saved_model.export_saved_model(tmp_path / 'missing', tmp_path / 'out')
