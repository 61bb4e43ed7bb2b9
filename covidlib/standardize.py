"""Intensity and border standardization as the first layers of the inference model.

    from covidlib import models
    model = models.build_model('compact_resnet', image_size=224, crop=0.1, equalize='histogram')
    # model: 'image' -> CentralCrop 'crop' -> HistogramEqualization 'equalize' -> the network
    # (equalize='clahe': ContrastLimitedEqualization 'equalize'); or from the shell:
    #   covidlib-train --model_dir=runs/std --crop=0.1 --equalize=clahe ...

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
               'clahe' -> `ContrastLimitedEqualization`: OpenCV's CLAHE (`cv2.createCLAHE(
               clipLimit=2.0, tileGridSize=(8, 8))`) on the levels q, per image and channel:
                 tiles      an 8 x 8 grid of th x tw = ceil(H/8) x ceil(W/8) pixel tiles (the
                            image reflected past its bottom and right edges when H or W is not
                            a multiple of 8, OpenCV's BORDER_REFLECT_101)
                 histogram  per tile, clipped at L = max(1, floor(2.0 th tw / 256)); the excess E
                            is spread as OpenCV does: E // 256 to every bin, then one more to
                            bins 0, s, 2s, ... (s = max(1, 256 // r)) for the r = E mod 256 left
                 mapping    lut_t[k] = cdf_t[k] / (th tw) for each tile t
                 output     bilinear between the luts of the four nearest tile centres, at q:
                            tyf = y / th - 1/2, ty1 = floor(tyf), ya = tyf - ty1, the tile
                            indices clamped to the grid (x alike)
               equal to OpenCV's result up to its two roundings to 8 bits (lut and output),
               i.e. within 1/255.

No weights, no randomness: the same input gives the same output in training and inference. The
ops (strided slice, bilinear resize, round, cast, unsorted segment sum, cumsum, gather, mirror
pad) all have TFLite builtins, so the layers convert with the model, in every variant including
full-integer int8; the histograms cost O(N) per image, not O(256 N) as a one-hot or
compare-with-every-level formulation would (Keras' own Equalization layer is also a no-op at
inference and pools its histogram over the batch; its CLAHE layer one-hots every pixel).

Cost on this project's 2-core CPU at 224 x 224 x 1, batch 32, in a tf.function: crop 0.12
ms/image, histogram 0.45, clahe 3.1 (the network itself, compact_resnet: about 1 ms/image).
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from covidlib import errors

EQUALIZE = ('none', 'histogram', 'clahe')
CLAHE_CLIP_LIMIT = 2.0   # OpenCV's createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)), the setting
CLAHE_GRID = 8           # most chest X-ray papers use.
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


def equalize_clahe(images: tf.Tensor, clip_limit: float = CLAHE_CLIP_LIMIT,
                   grid: int = CLAHE_GRID) -> tf.Tensor:
  """Per-image, per-channel CLAHE of float (B, H, W, C) images in [0, 1]; H, W and C static.

  See the module docstring for the algorithm (OpenCV's). Costs two gathers and one segment sum
  over the pixels plus a (H, grid, 256) table per image; no (pixels x 256) tensor anywhere.
  """
  images = tf.convert_to_tensor(images, tf.float32)
  height, width, channels = images.shape[1], images.shape[2], images.shape[3]
  if height is None or width is None or channels is None:
    raise ValueError(f'CLAHE needs a static image shape, got {images.shape}')
  if height < grid or width < grid:
    raise ValueError(f'CLAHE needs images of at least {grid} x {grid} pixels, got {height} x '
                     f'{width}')
  tile_h, tile_w = -(-height // grid), -(-width // grid)
  tile_pixels = tile_h * tile_w
  gray = channels == 1
  planes = images[..., 0] if gray else tf.reshape(tf.transpose(images, [0, 3, 1, 2]),
                                                  [-1, height, width])       # (M, H, W)
  levels = tf.clip_by_value(tf.cast(tf.round(planes * (LEVELS - 1)), tf.int32), 0, LEVELS - 1)
  n = tf.shape(levels)[0]

  # Histograms of the tiles: (M, grid, grid, 256).
  padded = levels
  if grid * tile_h != height or grid * tile_w != width:
    padded = tf.pad(levels, [[0, 0], [0, grid * tile_h - height], [0, grid * tile_w - width]],
                    'REFLECT')
  tiles = tf.reshape(padded, [-1, grid, tile_h, grid, tile_w])
  tiles = tf.reshape(tf.transpose(tiles, [0, 1, 3, 2, 4]), [-1, tile_pixels])  # (M g g, th tw)
  ids = tiles + LEVELS * tf.range(n * grid * grid)[:, tf.newaxis]
  histogram = tf.math.unsorted_segment_sum(tf.ones_like(ids), ids, n * grid * grid * LEVELS)
  histogram = tf.reshape(histogram, [-1, grid, grid, LEVELS])

  # Clip and redistribute, exactly as OpenCV (integers).
  limit = max(int(clip_limit * tile_pixels / LEVELS), 1)
  clipped = tf.minimum(histogram, limit)
  excess = tf.reduce_sum(histogram - clipped, axis=-1, keepdims=True)
  batch = excess // LEVELS
  residual = excess - batch * LEVELS
  step = tf.maximum(LEVELS // tf.maximum(residual, 1), 1)
  bins = tf.range(LEVELS)
  extra = tf.logical_and(tf.equal(bins % step, 0), bins // step < residual)
  histogram = clipped + batch + tf.cast(extra, tf.int32)
  lut = tf.cast(tf.cumsum(histogram, axis=-1), tf.float32) / tile_pixels  # (M, g, g, 256)

  # Tile rows above and below each pixel row, and their weights (OpenCV's coordinates).
  def neighbours(size, tile):
    f = np.arange(size, dtype=np.float32) / np.float32(tile) - np.float32(0.5)
    first = np.floor(f)
    weight = (f - first).astype(np.float32)
    return (np.clip(first, 0, grid - 1).astype(np.int32),
            np.clip(first + 1, 0, grid - 1).astype(np.int32), weight)

  ty1, ty2, ya = neighbours(height, tile_h)
  tx1, tx2, xa = neighbours(width, tile_w)
  # Interpolate the luts along y first (linear in the lut, so exact): (M, H, grid, 256).
  ya = tf.constant(ya)[:, tf.newaxis, tf.newaxis]
  rows = (tf.gather(lut, ty1, axis=1) * (1.0 - ya) + tf.gather(lut, ty2, axis=1) * ya)
  flat = tf.reshape(rows, [-1])
  # Then, per pixel, look up its level in the two tile columns beside it. The index sums start
  # from the per-image offset so no (H, W) constant is folded into the graph.
  base = tf.range(n)[:, tf.newaxis, tf.newaxis] * (height * grid * LEVELS)
  base = base + tf.constant(np.arange(height, dtype=np.int32) * grid * LEVELS)[:, tf.newaxis]
  base = base + levels
  left = tf.gather(flat, base + tf.constant(tx1 * LEVELS)[tf.newaxis, :])
  right = tf.gather(flat, base + tf.constant(tx2 * LEVELS)[tf.newaxis, :])
  out = left * (1.0 - tf.constant(xa)) + right * tf.constant(xa)              # (M, H, W)
  if gray:
    return out[..., tf.newaxis]
  return tf.transpose(tf.reshape(out, [-1, channels, height, width]), [0, 2, 3, 1])


@keras.saving.register_keras_serializable(package='covidlib')
class ContrastLimitedEqualization(keras.layers.Layer):
  """`equalize_clahe` as a layer: float32 (B, H, W, C) in [0, 1] -> same, in [0, 1]."""

  def __init__(self, clip_limit: float = CLAHE_CLIP_LIMIT, grid: int = CLAHE_GRID, **kwargs):
    kwargs.setdefault('dtype', 'float32')
    super().__init__(**kwargs)
    self.clip_limit = float(clip_limit)
    self.grid = int(grid)

  def call(self, images):
    return equalize_clahe(images, self.clip_limit, self.grid)

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), 'clip_limit': self.clip_limit, 'grid': self.grid}


@keras.saving.register_keras_serializable(package='covidlib')
class FlipLeftRight(keras.layers.Layer):
  """Mirrors (B, H, W, C) images left-right, always (the flipped pass of test-time averaging,
  `covidlib.ensemble.flip_average`). Registered here so that `model_dir.load_model`, which
  imports this module, loads such models in safe mode; TFLite: one REVERSE_V2 op."""

  def __init__(self, **kwargs):
    kwargs.setdefault('dtype', 'float32')
    super().__init__(**kwargs)

  def call(self, images):
    return tf.reverse(tf.convert_to_tensor(images, self.compute_dtype), axis=[2])

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
  elif equalize == 'clahe':
    layers.append(ContrastLimitedEqualization(name='equalize'))
  return layers
