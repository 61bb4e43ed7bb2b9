"""The one preprocessing function: encoded image -> gray uint8 -> model input in [0, 1].

Every path that feeds a model goes through here: the tf.data pipeline (`covidlib.data`), the
dataset builder (`covidlib_tfds`), the SavedModel signatures, TFLite calibration data and
`covidlib.predict`. Two steps, both plain TensorFlow ops, so they run eagerly, inside
`tf.data.Dataset.map` and inside an exported graph alike:

    gray = decode_image(tf.io.read_file('xray.png'))   # uint8 (H, W, 1)
    x = preprocess(gray, image_size=224)               # float32 (224, 224, 1) in [0, 1]

`load_image(path)` is the eager, file-level entry point: it raises
`covidlib.errors.InvalidImageError` naming the file for anything that is not a decodable image.

Why grayscale: in the source data every normal image is a grayscale JPEG while COVID-19 images
are a mix of RGB JPEG, RGBA PNG and gray JPEG. A model fed raw channels can learn the file format
instead of the lungs, so every decode canonicalises to one 8-bit channel.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from covidlib import errors

# A decompression-bomb guard: a few-KB PNG can declare 30000 x 30000 pixels. The largest real
# X-ray in our data is 4280 x 3520 (15 MP); 64 MP leaves room for 16-bit detector images while
# refusing a bomb before a single pixel is decoded.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024

# ITU-R BT.601 luma, the weights of tf.image.rgb_to_grayscale.
_LUMA = (0.2989, 0.5870, 0.1140)

_PNG_MAGIC = b'\x89PNG'
_GIF_MAGIC = b'GIF8'
_BMP_MAGIC = b'BM'
_JPEG_MAGIC = b'\xff\xd8\xff'


def _read_uint(contents: tf.Tensor, start: int, length: int, little_endian: bool) -> tf.Tensor:
  """Reads an unsigned integer of `length` bytes at `start` from a scalar string tensor."""
  raw = tf.io.decode_raw(tf.strings.substr(contents, start, length), tf.uint8)
  raw = tf.cast(raw, tf.int64)
  if little_endian:
    raw = tf.reverse(raw, [0])
  weights = tf.constant([256**i for i in reversed(range(length))], tf.int64)
  return tf.reduce_sum(raw * weights)


def header_pixels(contents: tf.Tensor) -> tf.Tensor:
  """Pixel count (width x height) declared in an image header, read without decoding pixels.

  Returns -1 for a format it does not recognise (the decoder will then reject it).
  """
  contents = tf.convert_to_tensor(contents, tf.string)
  long_enough = tf.strings.length(contents) >= 26

  def png():
    return _read_uint(contents, 16, 4, False) * _read_uint(contents, 20, 4, False)

  def gif():
    return _read_uint(contents, 6, 2, True) * _read_uint(contents, 8, 2, True)

  def bmp():
    width = _read_uint(contents, 18, 4, True)
    height = _read_uint(contents, 22, 4, True)
    height = tf.where(height >= 2**31, 2**32 - height, height)  # Negative = top-down rows.
    return width * height

  def jpeg():
    shape = tf.image.extract_jpeg_shape(contents, output_type=tf.int64)
    return shape[0] * shape[1]

  def unknown():
    return tf.constant(-1, tf.int64)

  magic4 = tf.strings.substr(contents + b'\0' * 4, 0, 4)
  return tf.case(
      [
          (tf.logical_and(long_enough, tf.equal(magic4, _PNG_MAGIC)), png),
          (tf.logical_and(long_enough, tf.equal(magic4, _GIF_MAGIC)), gif),
          (tf.logical_and(long_enough, tf.equal(tf.strings.substr(magic4, 0, 2), _BMP_MAGIC)),
           bmp),
          (tf.equal(tf.strings.substr(magic4, 0, 3), _JPEG_MAGIC), jpeg),
      ],
      default=unknown,
      exclusive=False,
  )


def _is_png16(contents: tf.Tensor) -> tf.Tensor:
  padded = contents + b'\0' * 26  # substr fails past the end; short files are simply not PNG16.
  return tf.logical_and(
      tf.equal(tf.strings.substr(padded, 0, 4), _PNG_MAGIC),
      tf.equal(tf.strings.substr(padded, 24, 1), b'\x10'),  # IHDR bit depth = 16.
  )


def _to_gray(image: tf.Tensor) -> tf.Tensor:
  """uint8 (H, W, C) with C in {1, 2, 3, 4} -> uint8 (H, W, 1). Alpha is dropped."""
  channels = tf.shape(image)[-1]

  def from_rgb():
    rgb = tf.cast(image[..., :3], tf.float32)
    gray = tf.tensordot(rgb, tf.constant(_LUMA, tf.float32), axes=[[2], [0]])[..., tf.newaxis]
    return tf.cast(tf.clip_by_value(tf.round(gray), 0.0, 255.0), tf.uint8)

  return tf.cond(channels >= 3, from_rgb, lambda: image[..., :1])


def decode_image(contents: tf.Tensor, max_pixels: int = DEFAULT_MAX_PIXELS) -> tf.Tensor:
  """Decodes PNG, JPEG, BMP or GIF bytes (any bit depth; gray, RGB, RGBA, palette, CMYK).

  Args:
    contents: scalar string tensor, the encoded file.
    max_pixels: refuse images whose header declares more pixels than this, before decoding.

  Returns:
    uint8 tensor of shape (H, W, 1). 16-bit images are scaled to 8 bits (v / 257, rounded);
    colour is converted with BT.601 luma weights; alpha is dropped; a GIF gives its first frame.

  Raises:
    tf.errors.InvalidArgumentError (at run time) for undecodable or oversized data.
  """
  contents = tf.convert_to_tensor(contents, tf.string)
  pixels = header_pixels(contents)
  check = tf.debugging.assert_less_equal(
      pixels, tf.constant(max_pixels, tf.int64),
      message=f'image declares more pixels than the limit of {max_pixels}')
  with tf.control_dependencies([check]):
    contents = tf.identity(contents)

  def decode16():
    image = tf.io.decode_png(contents, channels=0, dtype=tf.uint16)
    scaled = tf.round(tf.cast(image, tf.float32) / 257.0)
    return tf.cast(scaled, tf.uint8)

  def decode8():
    return tf.io.decode_image(contents, channels=0, dtype=tf.uint8, expand_animations=False)

  image = tf.cond(_is_png16(contents), decode16, decode8)
  image = _to_gray(image)
  image.set_shape([None, None, 1])
  return image


def preprocess(image: tf.Tensor, image_size: int, channels: int = 1) -> tf.Tensor:
  """Gray uint8 image(s) -> float32 model input in [0, 1].

  The resize does not keep the aspect ratio: like the article's `flow_from_directory`, the whole
  film is squeezed into a square. Padding to a square would keep anatomy proportions but paint
  borders whose width depends on where the image came from (paper figure, scanner, crop): a
  source shortcut of exactly the kind this data already suffers from. Antialiasing keeps the
  heavy downscale (up to 4280 -> 224) from aliasing rib and line patterns.

  Args:
    image: uint8 (H, W, 1) or a batch (B, H, W, 1).
    image_size: side of the square output.
    channels: 1, or 3 to repeat the gray channel for networks that want RGB.

  Returns:
    float32 (image_size, image_size, channels), or with the batch dimension in front.
  """
  if channels not in (1, 3):
    raise errors.UsageError(f'channels must be 1 or 3, got {channels!r}')
  if not isinstance(image_size, int) or image_size < 8:
    raise errors.UsageError(f'image_size must be an integer >= 8, got {image_size!r}')
  x = tf.cast(image, tf.float32) / 255.0
  x = tf.image.resize(x, [image_size, image_size], method='bilinear', antialias=True)
  x = tf.clip_by_value(x, 0.0, 1.0)
  if channels == 3:
    x = tf.concat([x, x, x], axis=-1)
  return x


def resize_longest_side(image: tf.Tensor, max_side: int) -> tf.Tensor:
  """Shrinks a uint8 (H, W, 1) image so its longest side is at most `max_side`; keeps aspect."""
  image = tf.convert_to_tensor(image, tf.uint8)
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  longest = tf.maximum(height, width)

  def shrink():
    scale = max_side / tf.cast(longest, tf.float64)
    new_h = tf.maximum(1, tf.cast(tf.round(tf.cast(height, tf.float64) * scale), tf.int32))
    new_w = tf.maximum(1, tf.cast(tf.round(tf.cast(width, tf.float64) * scale), tf.int32))
    resized = tf.image.resize(tf.cast(image, tf.float32), [new_h, new_w], method='area',
                              antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)

  return tf.cond(longest > max_side, shrink, lambda: image)


def decode_bytes(contents: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Eager `decode_image` of in-memory bytes; raises InvalidImageError naming `name`."""
  if not contents:
    raise errors.InvalidImageError(name, 'empty file (0 bytes)')
  try:
    return decode_image(tf.constant(contents), max_pixels=max_pixels).numpy()
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
    raise errors.InvalidImageError(name, _short_reason(e)) from None


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Reads and decodes one image file to uint8 (H, W, 1).

  Raises:
    InvalidImageError: naming `path`, for a missing, empty, truncated, oversized or non-image file.
  """
  path = os.fspath(path)
  try:
    with open(path, 'rb') as f:
      contents = f.read()
  except FileNotFoundError:
    raise errors.InvalidImageError(path, 'no such file') from None
  except IsADirectoryError:
    raise errors.InvalidImageError(path, 'is a directory, not an image file') from None
  except OSError as e:
    raise errors.InvalidImageError(path, f'cannot read: {e.strerror}') from None
  return decode_bytes(contents, path, max_pixels=max_pixels)


def _short_reason(error: tf.errors.OpError) -> str:
  """The first meaningful line of a TF error, without graph node names."""
  message = error.message.strip()
  if 'more pixels than the limit' in message:
    start = message.index('image declares')
    return message[start:].split('\n')[0].split(']')[0].split('.')[0].strip()
  for marker in ('Unknown image file format', 'Invalid JPEG data', 'Invalid PNG data',
                 'jpeg::Uncompress failed', 'Premature end', 'Input is empty', 'Truncated',
                 'PNG', 'JPEG', 'GIF', 'BMP'):
    if marker in message:
      line = next(line for line in message.splitlines() if marker in line)
      return f'not a decodable image ({_clean(line)})'
  return f'not a decodable image ({_clean(message.splitlines()[0])})'


def _clean(line: str) -> str:
  line = line.split('}}')[-1].split(' [Op:')[0].strip()
  return line[:160]
