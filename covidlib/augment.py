"""Data augmentation as Keras Random* layers, placed in front of the model during training only.

    from covidlib import augment, models
    model = models.build_model('compact_resnet', image_size=224)
    augmentation = augment.build_augmentation(seed=0)        # the article's recipe
    train_model = augment.training_model(model, augmentation)
    train_model.fit(...)          # augments: Keras layers are active when training=True
    model.save('model.keras')     # the inference model: no augmentation inside

Why inside the model and not in tf.data: the layers then run where the model runs (on the
accelerator, per replica under a tf.distribute strategy) while the CPU only decodes and feeds
cached tensors; and the inference model, with everything exported from it, never contains them.
The same layers also work inside `tf.data.Dataset.map` (tests check both).

What the article's `ImageDataGenerator(shear_range=0.2, zoom_range=0.2, horizontal_flip=True)`
really did, and how it maps here (defaults reproduce it):
  * horizontal_flip=True: mirror left-right with probability 1/2 -> `RandomFlip('horizontal')`.
    (A mirrored chest X-ray puts the heart on the wrong side: anatomically implausible, but it is
    the article's recipe; pass flip=False to turn it off.)
  * zoom_range=0.2: scale factors zx, zy drawn INDEPENDENTLY from [0.8, 1.2] per axis, about the
    centre (so it also stretches the aspect ratio by up to 1.5x) -> `RandomZoom` with
    height_factor = width_factor = (-zoom, zoom), which draws the two axes independently too.
  * shear_range=0.2: an angle in DEGREES (ImageDataGenerator converts it with np.deg2rad), drawn
    from [-0.2, 0.2]: a horizontal shear of at most tan(0.2 deg) = 0.0035, i.e. the top and
    bottom rows of a 224 px image move by at most 0.4 px relative to its centre row. Nearly
    nothing: the article's "shear" was a no-op in practice. Here `shear` is likewise in degrees
    -> `RandomShear(x_factor=tan(shear))` (pass e.g. shear=10 for a shear that does something).
    One difference: Keras shears about the top row, not the centre row, so a shear also shifts
    the image sideways by up to tan(shear) x H / 2 (0.4 px at 0.2 deg; the bottom row moves up
    to 0.8 px); use translation if you want shifts on purpose.
  * fill_mode: ImageDataGenerator's default 'nearest' (edge pixels repeated), kept here.
  * The generator combined shear and zoom into one affine resampling; Keras layers resample once
    per geometric layer (bilinear), a slight extra blur when several are on.
Optional, off by default: rotation (degrees, like ImageDataGenerator's rotation_range),
translation (fraction of the side, like width/height_shift_range), contrast and brightness
(fractions, with value_range=(0, 1) so images stay in [0, 1]).
"""

from __future__ import annotations

import math

import keras

from covidlib import errors

FILL_MODES = ('nearest', 'reflect', 'constant', 'wrap')


def _check_range(name: str, value, low: float, high: float, high_inclusive: bool = False):
  ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
  ok = ok_type and math.isfinite(value) and low <= value and (
      value <= high if high_inclusive else value < high)
  if not ok:
    bracket = ']' if high_inclusive else ')'
    raise errors.UsageError(f'{name} must be a number in [{low:g}, {high:g}{bracket}, '
                            f'got {value!r}')


def build_augmentation(flip: bool = True, zoom: float = 0.2, shear: float = 0.2,
                       rotation: float = 0.0, translation: float = 0.0, contrast: float = 0.0,
                       brightness: float = 0.0, seed: int | None = None,
                       fill_mode: str = 'nearest') -> keras.Sequential:
  """The augmentation layers, in the order flip, rotation, shear, zoom, translation, brightness,
  contrast. A zero (or False) argument leaves its layer out.

  Args:
    flip: mirror left-right with probability 1/2.
    zoom: scale each axis independently by a factor in [1 - zoom, 1 + zoom]; in [0, 1).
    shear: maximum horizontal shear angle in degrees (ImageDataGenerator's unit); in [0, 45).
    rotation: maximum rotation in degrees either way; in [0, 180].
    translation: maximum shift as a fraction of height and width; in [0, 1).
    contrast: contrast factor drawn from [1 - contrast, 1 + contrast]; in [0, 1].
    brightness: add up to +-brightness (images are in [0, 1]); in [0, 1].
    seed: fixes the random stream (each layer gets seed + its index); None = fresh randomness.
    fill_mode: how geometric transforms fill pixels from outside the image.

  Returns:
    keras.Sequential named 'augmentation': float32 (B, S, S, C) in [0, 1] -> same shape and
    range; identity unless called with training=True. It takes batches only: in tf.data, map it
    after `.batch()` (each image in a batch gets its own random transform).

  Raises:
    UsageError: naming the argument and the value, for anything out of range.
  """
  if not isinstance(flip, bool):
    raise errors.UsageError(f'flip must be True or False, got {flip!r}')
  _check_range('zoom', zoom, 0.0, 1.0)
  _check_range('shear', shear, 0.0, 45.0)
  _check_range('rotation', rotation, 0.0, 180.0, high_inclusive=True)
  _check_range('translation', translation, 0.0, 1.0)
  _check_range('contrast', contrast, 0.0, 1.0, high_inclusive=True)
  _check_range('brightness', brightness, 0.0, 1.0, high_inclusive=True)
  if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
    raise errors.UsageError(f'seed must be a non-negative integer or None, got {seed!r}')
  if fill_mode not in FILL_MODES:
    raise errors.UsageError(f'fill_mode must be one of {", ".join(FILL_MODES)}, got {fill_mode!r}')

  def layer_seed(index: int) -> int | None:
    return None if seed is None else seed + index

  # dtype='float32': under a mixed-precision policy the resampling ops would otherwise run in
  # float16/bfloat16, which some kernels lack and which would quantise [0, 1] inputs needlessly.
  common = dict(dtype='float32')
  geometric = dict(fill_mode=fill_mode, interpolation='bilinear', **common)
  layers = []
  if flip:
    layers.append(keras.layers.RandomFlip('horizontal', seed=layer_seed(0), name='flip',
                                          **common))
  if rotation:
    # RandomRotation's factor is a fraction of a full turn.
    layers.append(keras.layers.RandomRotation(rotation / 360.0, seed=layer_seed(1),
                                              name='rotation', **geometric))
  if shear:
    # (0, s) rather than s: RandomShear flips the sign at random anyway, so both draw from
    # [-s, s]; but from s it stores (-s, s) in its config, which its own from_config rejects
    # (Keras 3.15), and a saved training model would not load.
    layers.append(keras.layers.RandomShear(x_factor=(0.0, math.tan(math.radians(shear))),
                                           y_factor=(0.0, 0.0), seed=layer_seed(2),
                                           name='shear', **geometric))
  if zoom:
    layers.append(keras.layers.RandomZoom(height_factor=(-zoom, zoom), width_factor=(-zoom, zoom),
                                          seed=layer_seed(3), name='zoom', **geometric))
  if translation:
    layers.append(keras.layers.RandomTranslation(translation, translation, seed=layer_seed(4),
                                                 name='translation', **geometric))
  if brightness:
    layers.append(keras.layers.RandomBrightness(brightness, value_range=(0.0, 1.0),
                                                seed=layer_seed(5), name='brightness', **common))
  if contrast:
    layers.append(keras.layers.RandomContrast(contrast, value_range=(0.0, 1.0),
                                              seed=layer_seed(6), name='contrast', **common))
  if not layers:
    layers.append(keras.layers.Identity(name='no_augmentation'))
  # An explicit rank-4 input of any size: without it Keras' Sequential builds on the first
  # call's shape and then silently "adjusts" a gray (S, S, 1) image into (S, S, 1, 1), i.e.
  # treats an unbatched image as a batch of S. With it, an unbatched call is a clear shape error.
  return keras.Sequential([keras.Input((None, None, None), name='images')] + layers,
                          name='augmentation')


def training_model(inference_model: keras.Model, augmentation: keras.Layer) -> keras.Model:
  """`augmentation` followed by `inference_model`, as one model to compile and fit.

  The inference model is nested unchanged (same layer objects, shared weights): train the
  returned model, then save or export `inference_model` itself, which holds no augmentation.
  Its nested name is `inference_model.name`, so `training.get_layer(inference_model.name)` finds
  it again (e.g. after restoring a checkpoint).
  """
  if not isinstance(inference_model, keras.Model):
    raise errors.UsageError(
        f'inference_model must be a keras.Model, got {type(inference_model).__name__}')
  if not isinstance(augmentation, keras.Layer):
    raise errors.UsageError(
        f'augmentation must be a Keras layer, got {type(augmentation).__name__}')
  shape = tuple(inference_model.input_shape[1:])
  if len(shape) != 3:
    raise errors.UsageError(
        f'inference_model must take images (S, S, C), its input shape is {shape}')
  inputs = keras.Input(shape, dtype='float32', name='image')
  outputs = inference_model(augmentation(inputs))
  return keras.Model(inputs, outputs, name=f'{inference_model.name}_training')
