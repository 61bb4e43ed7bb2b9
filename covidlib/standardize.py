"""Intensity and border standardization as the first layers of the inference model.

    from covidlib import models
    model = models.build_model('compact_resnet', image_size=224, crop=0.1, equalize='histogram')
    # model: 'image' -> CentralCrop 'crop' -> HistogramEqualization 'equalize' -> the network

    from covidlib import standardize
    layers = standardize.build_standardization(crop=0.1, equalize='histogram')  # a list
    x = standardize.HistogramEqualization()(images)   # float32 (B, S, S, C) in [0, 1]

Why inside the model (and not in `covidlib.preprocess`): the one preprocessing function (decode
-> gray -> resize -> [0, 1]) stays as it is, and every path that runs the model (training,
evaluation, the SavedModel signatures, every TFLite variant, `covidlib.predict`) runs these
layers too, because they are part of the model. Nothing to keep in sync, nothing to forget.

Both counter cues that tell the SOURCE of an image (issue #9): paper figures carry borders,
arrows and text markers near the edges; each hospital or archive has its own contrast and
brightness curve.

  crop=f       `CentralCrop`: cut off the fraction f of each side (rows [round(f H), H -
               round(f H)), columns alike), then resize bilinearly back to H x W. The network
               sees the central (1 - 2f)^2 of the film at the same input size.
  equalize     'histogram' -> `HistogramEqualization`, per image and channel:
                 q    = clip(round(255 x), 0, 255)             the 8-bit level of each pixel
                 cdf  = cumulative histogram of q over the N = H x W pixels (256 levels)
                 y    = (cdf[q] - cdf_min) / (N - cdf_min),  cdf_min = cdf[min(q)]
               the textbook / OpenCV `equalizeHist` mapping without its final rounding to
               8 bits (y stays float in [0, 1]; the darkest level maps to 0, the brightest to 1).
               A constant image (N == cdf_min) is returned unchanged.

No weights, no randomness: the same input gives the same output in training and inference. The
ops (strided slice, bilinear resize, cast, unsorted segment sum, cumsum, gather) all have TFLite
builtins, so the layers convert with the model; the histogram costs O(N) per image, not O(256 N)
as a one-hot or compare-with-every-level formulation would.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from covidlib import errors

EQUALIZE = ('none', 'histogram')
LEVELS = 256
MAX_CROP = 0.4


def check_crop(crop) -> float:
  """`crop` as a float in [0, MAX_CROP); UsageError naming the value otherwise."""
  ok = (isinstance(crop, (int, float)) and not isinstance(crop, bool) and math.isfinite(crop)
        and 0.0 <= crop < MAX_CROP)
  if not ok:
    raise errors.UsageError(f'crop must be a number in [0, {MAX_CROP:g}) (the fraction of each '
                            f'side cut off), got {crop!r}')
  return float(crop)


def check_equalize(equalize) -> str:
  if equalize not in EQUALIZE:
    raise errors.UsageError(f'equalize must be one of {", ".join(EQUALIZE)}, got {equalize!r}')
  return equalize


def _static_or_dynamic(x: tf.Tensor, axis: int):
  return x.shape[axis] if x.shape[axis] is not None else tf.shape(x)[axis]


@keras.saving.register_keras_serializable(package='covidlib')
class CentralCrop(keras.layers.Layer):
  """Cuts `fraction` of each side off (B, H, W, C) images and resizes back to H x W (bilinear)."""

  def __init__(self, fraction: float, **kwargs):
    kwargs.setdefault('dtype', 'float32')
    super().__init__(**kwargs)
    self.fraction = check_crop(fraction)

  def call(self, images):
    images = tf.convert_to_tensor(images, tf.float32)
    height, width = _static_or_dynamic(images, 1), _static_or_dynamic(images, 2)
    if isinstance(height, int) and isinstance(width, int):
      top, left = round(self.fraction * height), round(self.fraction * width)
    else:
      top = tf.cast(tf.round(self.fraction * tf.cast(height, tf.float32)), tf.int32)
      left = tf.cast(tf.round(self.fraction * tf.cast(width, tf.float32)), tf.int32)
    if isinstance(top, int) and top == 0 and left == 0:
      return images
    static = isinstance(height, int) and isinstance(width, int)
    cropped = images[:, top:height - top, left:width - left, :]
    size = [height, width] if static else tf.stack([height, width])
    resized = tf.image.resize(cropped, size, method='bilinear')
    return tf.clip_by_value(resized, 0.0, 1.0)

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), 'fraction': self.fraction}


def equalize_histogram(images: tf.Tensor) -> tf.Tensor:
  """Per-image, per-channel histogram equalization of float (B, H, W, C) images in [0, 1].

  See the module docstring for the formula. Plain TensorFlow ops: runs eagerly, in
  `tf.data.Dataset.map` and inside a model alike.
  """
  images = tf.convert_to_tensor(images, tf.float32)
  height, width = _static_or_dynamic(images, 1), _static_or_dynamic(images, 2)
  channels = _static_or_dynamic(images, 3)
  pixels = height * width
  # One row per (image, channel): (B x C, N). A gray image needs no transpose (the common case;
  # TFLite's transpose of a 224 x 224 image costs about as much as the histogram).
  gray = channels == 1
  rows = images if gray else tf.transpose(images, [0, 3, 1, 2])
  rows = tf.reshape(rows, tf.stack([-1, pixels]))
  # Round to the nearest of the 256 levels. Written as round(255 x), clipped in int32, for the
  # full-integer TFLite model: there 255 x is an int8 tensor of scale 1 (exactly the levels
  # when the calibration images span [0, 1]) and ROUND runs on its dequantized value; a float
  # clip or a + 0.5 before the cast would be requantized to an offset grid and shift levels.
  levels = tf.cast(tf.round(rows * (LEVELS - 1)), tf.int32)
  levels = tf.clip_by_value(levels, 0, LEVELS - 1)
  n_rows = tf.shape(levels)[0]
  ids = levels + LEVELS * tf.range(n_rows)[:, tf.newaxis]       # (row, level) -> one bin id.
  histogram = tf.math.unsorted_segment_sum(tf.ones_like(ids), ids, n_rows * LEVELS)
  cdf = tf.cumsum(tf.reshape(histogram, tf.stack([n_rows, LEVELS])), axis=1)
  at_pixel = tf.gather(tf.reshape(cdf, [-1]), ids)              # cdf[q] per pixel, int32.
  cdf_min = tf.reduce_min(at_pixel, axis=1, keepdims=True)      # cdf of the darkest level.
  span = pixels - cdf_min
  equalized = (tf.cast(at_pixel - cdf_min, tf.float32)
               / tf.cast(tf.maximum(span, 1), tf.float32))
  equalized = tf.where(span > 0, equalized, rows)               # A constant image: unchanged.
  if gray:
    return tf.reshape(equalized, tf.stack([-1, height, width, 1]))
  back = tf.reshape(equalized, tf.stack([-1, channels, height, width]))
  return tf.transpose(back, [0, 2, 3, 1])


@keras.saving.register_keras_serializable(package='covidlib')
class HistogramEqualization(keras.layers.Layer):
  """`equalize_histogram` as a layer: float32 (B, H, W, C) in [0, 1] -> same shape, in [0, 1]."""

  def __init__(self, **kwargs):
    kwargs.setdefault('dtype', 'float32')
    super().__init__(**kwargs)

  def call(self, images):
    return equalize_histogram(images)

  def compute_output_shape(self, input_shape):
    return input_shape


def build_standardization(crop: float = 0.0, equalize: str = 'none') -> list[keras.Layer]:
  """The standardization layers for `crop` and `equalize`, in that order (crop first, so the
  equalization's histogram sees the film without its borders and markers); [] for the defaults.

  Raises:
    UsageError: naming the argument and the value, for a crop outside [0, 0.4) or an unknown
      equalize method.
  """
  crop = check_crop(crop)
  check_equalize(equalize)
  layers = []
  if crop:
    layers.append(CentralCrop(crop, name='crop'))
  if equalize == 'histogram':
    layers.append(HistogramEqualization(name='equalize'))
  return layers
