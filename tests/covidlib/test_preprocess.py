"""The one preprocessing function: formats, bit depths, eager vs tf.data, errors."""

import numpy as np
import pytest
import tensorflow as tf

from covidlib import errors
from covidlib import preprocess


def _variants(gray):
  rgb = np.stack([gray] * 3, axis=-1)
  rgba = np.concatenate([rgb, np.full(gray.shape + (1,), 255, np.uint8)], axis=-1)
  return {
      'gray_png': (gray, 'PNG', None),
      'rgb_png': (rgb, 'PNG', None),
      'rgba_png': (rgba, 'PNG', None),
      'gray16_png': (gray.astype(np.uint16) * 257, 'PNG', None),
      'rgb_bmp': (rgb, 'BMP', None),
      'gray_gif': (gray, 'GIF', None),
  }


@pytest.mark.parametrize('name', ['gray_png', 'rgb_png', 'rgba_png', 'gray16_png', 'rgb_bmp',
                                  'gray_gif'])
def test_lossless_formats_decode_to_the_same_gray_pixels(name, gray_image, encode):
  array, fmt, mode = _variants(gray_image)[name]
  decoded = preprocess.decode_bytes(encode(array, fmt, mode), name)
  assert decoded.dtype == np.uint8
  assert decoded.shape == gray_image.shape + (1,)
  np.testing.assert_array_equal(decoded[..., 0], gray_image)


def test_rgb_uses_bt601_luma(encode):
  rgb = np.zeros((4, 4, 3), np.uint8)
  rgb[..., 0] = 200
  rgb[..., 1] = 100
  rgb[..., 2] = 50
  decoded = preprocess.decode_bytes(encode(rgb), 'rgb.png')
  expected = round(0.2989 * 200 + 0.5870 * 100 + 0.1140 * 50)
  assert np.all(decoded == expected)


def test_16_bit_png_keeps_full_range(encode):
  array = np.array([[0, 257, 65535, 32896]], np.uint16)
  decoded = preprocess.decode_bytes(encode(array), 'deep.png')
  np.testing.assert_array_equal(decoded[..., 0], [[0, 1, 255, 128]])


def test_header_pixels_matches_declared_size(gray_image, encode):
  for fmt in ('PNG', 'JPEG', 'GIF', 'BMP'):
    contents = encode(gray_image, fmt)
    assert preprocess.header_pixels(tf.constant(contents)).numpy() == 20 * 30, fmt


def test_eager_and_tf_data_give_identical_tensors(gray_image, encode):
  """big_vision's rule: run the op eagerly and inside tf.data.map; they must agree."""
  files = [encode(v[0], v[1]) for v in _variants(gray_image).values()]
  files.append(encode(np.stack([gray_image] * 3, -1), 'JPEG'))
  eager = [preprocess.preprocess(preprocess.decode_image(f), 16, 3).numpy() for f in files]
  dataset = tf.data.Dataset.from_tensor_slices(files).map(
      lambda c: preprocess.preprocess(preprocess.decode_image(c), 16, 3))
  for expected, got in zip(eager, dataset.as_numpy_iterator(), strict=True):
    np.testing.assert_array_equal(expected, got)


def test_preprocess_range_shape_and_batch(gray_image):
  image = gray_image[..., None]
  single = preprocess.preprocess(image, 32).numpy()
  assert single.shape == (32, 32, 1) and single.dtype == np.float32
  assert 0.0 <= single.min() and single.max() <= 1.0
  batch = preprocess.preprocess(np.stack([image, image]), 32, channels=3).numpy()
  assert batch.shape == (2, 32, 32, 3)
  np.testing.assert_allclose(batch[0, ..., 2], single[..., 0], atol=1e-6)


def test_preprocess_rejects_bad_arguments(gray_image):
  with pytest.raises(errors.UsageError, match='channels must be 1 or 3, got 2'):
    preprocess.preprocess(gray_image[..., None], 32, channels=2)
  with pytest.raises(errors.UsageError, match='image_size'):
    preprocess.preprocess(gray_image[..., None], 0)


def test_resize_longest_side_caps_and_keeps_aspect():
  image = np.full((300, 150, 1), 77, np.uint8)
  capped = preprocess.resize_longest_side(image, 100).numpy()
  assert capped.shape == (100, 50, 1)
  assert np.all(capped == 77)
  small = np.zeros((10, 20, 1), np.uint8)
  assert preprocess.resize_longest_side(small, 100).numpy().shape == (10, 20, 1)


@pytest.mark.parametrize('contents,reason', [
    (b'', 'empty file'),
    (b'hello, not an image', 'not a decodable image'),
    (b'<html><body>404</body></html>', 'not a decodable image'),
])
def test_bad_bytes_raise_invalid_image_error_naming_the_file(contents, reason):
  with pytest.raises(errors.InvalidImageError, match=f'bad.png: {reason}'):
    preprocess.decode_bytes(contents, 'bad.png')


def test_truncated_files_are_refused(gray_image, encode):
  for fmt in ('PNG', 'JPEG'):
    contents = encode(np.stack([gray_image] * 3, -1), fmt)
    with pytest.raises(errors.InvalidImageError, match='cut'):
      preprocess.decode_bytes(contents[: len(contents) // 3], 'cut')


def test_missing_file_is_named(tmp_path):
  with pytest.raises(errors.InvalidImageError, match='nope.png: no such file'):
    preprocess.load_image(tmp_path / 'nope.png')
