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

Image-quality and intensity augmentations (off by default; issue #9: every model trained on our
public data learns the SOURCE of an image, and sources differ in resolution, sharpness, noise
and tone curve, so these make such cues unreliable within one class):
  * downscale=d: resample each image down by a factor drawn from {1 - d, ..., 1} (5 steps) and
    back up, bilinear: the blockiness of a small paper figure enlarged to 224 px.
  * blur=s: Gaussian blur with sigma drawn per image from {0, s/4, s/2, 3s/4, s} pixels.
  * gamma=g: x -> x ** gamma, gamma log-uniform in [1 / (1 + g), 1 + g]: another tone curve.
  * noise=n: additive Gaussian noise, its standard deviation uniform in [0, n] per image.
  All four are small registered Keras layers (below): Keras 3.15's RandomGaussianBlur draws one
  sigma per BATCH and caps sigma at 1; ours draw per image. Downscale and blur choose each
  image's level from a few fixed ones and compute every level for the whole batch, so every
  shape is static (XLA compiles it; 4 extra resizes or convolutions per batch, cheap next to
  the network). All keep images in [0, 1] and are the identity unless training=True.

Presets (PRESETS; `covidlib-train --augment=article|strong`):
  article  the article's recipe above (the default; results stay comparable with it).
  strong   the article's flip, shear and zoom plus rotation 10 deg and translation 0.1 (patient
           positioning varies that much between films), contrast 0.3, brightness 0.1 and gamma
           0.3 (exposure and tone-curve differences between sites), blur 1 px, noise 0.02
           (about 5 of 255 gray levels) and downscale 0.5 (a 224 px input from a 112 px figure,
           which is what small paper figures give). Strong enough to blur the cues that tell
           sources apart at 224 px, mild enough that the lungs stay readable (checked by eye on
           samples).
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from covidlib import errors

FILL_MODES = ('nearest', 'reflect', 'constant', 'wrap')

# Number of levels (the identity included) the downscale and blur layers choose from per image.
_STEPS = 5

# The arguments of build_augmentation that a preset sets (not seed or fill_mode).
KEYS = ('flip', 'zoom', 'shear', 'rotation', 'translation', 'contrast', 'brightness', 'gamma',
        'blur', 'noise', 'downscale')
PRESETS = {
    'article': dict(flip=True, zoom=0.2, shear=0.2, rotation=0.0, translation=0.0, contrast=0.0,
                    brightness=0.0, gamma=0.0, blur=0.0, noise=0.0, downscale=0.0),
    'strong': dict(flip=True, zoom=0.2, shear=0.2, rotation=10.0, translation=0.1, contrast=0.3,
                   brightness=0.1, gamma=0.3, blur=1.0, noise=0.02, downscale=0.5),
}


def _per_image(images, shape_tail=(1, 1, 1)):
  """(B,) + shape_tail for per-image random draws."""
  return (tf.shape(images)[0],) + tuple(shape_tail)


def _select(candidates: list, index):
  """Per image b, candidates[index[b]][b]; candidates are (B, H, W, C) tensors."""
  weights = tf.one_hot(index, len(candidates), dtype=candidates[0].dtype)  # (B, K)
  stacked = tf.stack(candidates, axis=1)                                   # (B, K, H, W, C)
  return tf.einsum('bk,bkhwc->bhwc', weights, stacked)


class _RandomLayer(keras.layers.Layer):
  """A float32 random augmentation: identity unless training=True; `seed` fixes its draws."""

  def __init__(self, seed: int | None = None, **kwargs):
    kwargs.setdefault('dtype', 'float32')
    super().__init__(**kwargs)
    self.seed = seed
    self.seed_generator = keras.random.SeedGenerator(seed)

  def call(self, images, training=False):
    if not training:
      return images
    images = tf.convert_to_tensor(images, tf.float32)
    return tf.clip_by_value(self.augment(images), 0.0, 1.0)

  def augment(self, images):
    raise NotImplementedError

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), 'seed': self.seed}


@keras.saving.register_keras_serializable(package='covidlib')
class RandomGamma(_RandomLayer):
  """x -> x ** gamma per image, gamma log-uniform in [1 / (1 + factor), 1 + factor]."""

  def __init__(self, factor: float, seed: int | None = None, **kwargs):
    super().__init__(seed=seed, **kwargs)
    self.factor = float(factor)

  def augment(self, images):
    bound = math.log1p(self.factor)
    log_gamma = keras.random.uniform(_per_image(images), -bound, bound, seed=self.seed_generator)
    return tf.pow(tf.clip_by_value(images, 0.0, 1.0), tf.exp(log_gamma))

  def get_config(self):
    return {**super().get_config(), 'factor': self.factor}


@keras.saving.register_keras_serializable(package='covidlib')
class RandomNoise(_RandomLayer):
  """Adds Gaussian noise, standard deviation uniform in [0, stddev] per image, then clips.

  The same noise field for every channel, so a gray image in 3 channels stays gray."""

  def __init__(self, stddev: float, seed: int | None = None, **kwargs):
    super().__init__(seed=seed, **kwargs)
    self.stddev = float(stddev)

  def augment(self, images):
    sigma = keras.random.uniform(_per_image(images), 0.0, self.stddev, seed=self.seed_generator)
    # One noise field per image, shared by its channels: a gray image (repeated into 3
    # channels for some networks) stays gray.
    shape = tf.concat([tf.shape(images)[:-1], [1]], axis=0)
    noise = keras.random.normal(shape, seed=self.seed_generator)
    return images + sigma * noise

  def get_config(self):
    return {**super().get_config(), 'stddev': self.stddev}


@keras.saving.register_keras_serializable(package='covidlib')
class RandomDownscale(_RandomLayer):
  """Per image, bilinear resize down by a factor from {1 - factor, ..., 1} and back up."""

  def __init__(self, factor: float, seed: int | None = None, **kwargs):
    super().__init__(seed=seed, **kwargs)
    self.factor = float(factor)

  def augment(self, images):
    height, width = images.shape[1], images.shape[2]
    if height is None or width is None:
      raise ValueError(f'RandomDownscale needs a static image size, got shape {images.shape}')
    candidates = [images]
    for step in range(1, _STEPS):
      scale = 1.0 - self.factor * step / (_STEPS - 1)
      small = tf.image.resize(images, [max(1, round(height * scale)), max(1, round(width * scale))],
                              method='bilinear')
      candidates.append(tf.image.resize(small, [height, width], method='bilinear'))
    index = keras.random.randint((tf.shape(images)[0],), 0, _STEPS, seed=self.seed_generator)
    return _select(candidates, index)

  def get_config(self):
    return {**super().get_config(), 'factor': self.factor}


def _gaussian_kernel(sigma: float) -> tf.Tensor:
  radius = max(1, math.ceil(2.0 * sigma))
  taps = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-radius, radius + 1)]
  total = sum(taps)
  return tf.constant([t / total for t in taps], tf.float32)


@keras.saving.register_keras_serializable(package='covidlib')
class RandomBlur(_RandomLayer):
  """Per image, Gaussian blur with sigma from {0, sigma/4, ..., sigma} px; edges reflected."""

  def __init__(self, sigma: float, seed: int | None = None, **kwargs):
    super().__init__(seed=seed, **kwargs)
    self.sigma = float(sigma)

  def augment(self, images):
    channels = images.shape[-1]
    if channels is None:
      raise ValueError(f'RandomBlur needs a static channel count, got shape {images.shape}')
    candidates = [images]
    for step in range(1, _STEPS):
      kernel = _gaussian_kernel(self.sigma * step / (_STEPS - 1))
      radius = (int(kernel.shape[0]) - 1) // 2
      padded = tf.pad(images, [[0, 0], [radius, radius], [radius, radius], [0, 0]], 'REFLECT')
      rows = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
      cols = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, channels, 1])
      blurred = tf.nn.depthwise_conv2d(padded, rows, [1, 1, 1, 1], 'VALID')
      candidates.append(tf.nn.depthwise_conv2d(blurred, cols, [1, 1, 1, 1], 'VALID'))
    index = keras.random.randint((tf.shape(images)[0],), 0, _STEPS, seed=self.seed_generator)
    return _select(candidates, index)

  def get_config(self):
    return {**super().get_config(), 'sigma': self.sigma}


def _check_range(name: str, value, low: float, high: float, high_inclusive: bool = False):
  ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
  ok = ok_type and math.isfinite(value) and low <= value and (
      value <= high if high_inclusive else value < high)
  if not ok:
    bracket = ']' if high_inclusive else ')'
    raise errors.UsageError(f'{name} must be a number in [{low:g}, {high:g}{bracket}, '
                            f'got {value!r}')


def check_arguments(flip: bool = True, zoom: float = 0.2, shear: float = 0.2,
                    rotation: float = 0.0, translation: float = 0.0, contrast: float = 0.0,
                    brightness: float = 0.0, gamma: float = 0.0, blur: float = 0.0,
                    noise: float = 0.0, downscale: float = 0.0, seed: int | None = None,
                    fill_mode: str = 'nearest') -> None:
  """Validates `build_augmentation`'s arguments without building anything.

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
  _check_range('gamma', gamma, 0.0, 1.0, high_inclusive=True)
  _check_range('blur', blur, 0.0, 3.0, high_inclusive=True)
  _check_range('noise', noise, 0.0, 0.2, high_inclusive=True)
  _check_range('downscale', downscale, 0.0, 0.9, high_inclusive=True)
  if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
    raise errors.UsageError(f'seed must be a non-negative integer or None, got {seed!r}')
  if fill_mode not in FILL_MODES:
    raise errors.UsageError(f'fill_mode must be one of {", ".join(FILL_MODES)}, got {fill_mode!r}')


def build_augmentation(flip: bool = True, zoom: float = 0.2, shear: float = 0.2,
                       rotation: float = 0.0, translation: float = 0.0, contrast: float = 0.0,
                       brightness: float = 0.0, gamma: float = 0.0, blur: float = 0.0,
                       noise: float = 0.0, downscale: float = 0.0, seed: int | None = None,
                       fill_mode: str = 'nearest') -> keras.Sequential:
  """The augmentation layers, in the order flip, rotation, shear, zoom, translation, downscale,
  blur, brightness, contrast, gamma, noise (geometry, then resolution, then tone, then sensor
  noise). A zero (or False) argument leaves its layer out.

  Args:
    flip: mirror left-right with probability 1/2.
    zoom: scale each axis independently by a factor in [1 - zoom, 1 + zoom]; in [0, 1).
    shear: maximum horizontal shear angle in degrees (ImageDataGenerator's unit); in [0, 45).
    rotation: maximum rotation in degrees either way; in [0, 180].
    translation: maximum shift as a fraction of height and width; in [0, 1).
    contrast: contrast factor drawn from [1 - contrast, 1 + contrast]; in [0, 1].
    brightness: add up to +-brightness (images are in [0, 1]); in [0, 1].
    gamma: x ** gamma, gamma log-uniform in [1 / (1 + gamma), 1 + gamma]; in [0, 1].
    blur: maximum Gaussian blur sigma in pixels; in [0, 3].
    noise: maximum standard deviation of additive Gaussian noise; in [0, 0.2].
    downscale: resample down by a factor in [1 - downscale, 1] and back up; in [0, 0.9].
    seed: fixes the random stream (each layer gets seed + its index); None = fresh randomness.
    fill_mode: how geometric transforms fill pixels from outside the image.

  Returns:
    keras.Sequential named 'augmentation': float32 (B, S, S, C) in [0, 1] -> same shape and
    range; identity unless called with training=True. It takes batches only: in tf.data, map it
    after `.batch()` (each image in a batch gets its own random transform).

  Raises:
    UsageError: naming the argument and the value, for anything out of range.
  """
  check_arguments(flip=flip, zoom=zoom, shear=shear, rotation=rotation, translation=translation,
                  contrast=contrast, brightness=brightness, gamma=gamma, blur=blur, noise=noise,
                  downscale=downscale, seed=seed, fill_mode=fill_mode)

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
  if downscale:
    layers.append(RandomDownscale(downscale, seed=layer_seed(7), name='downscale'))
  if blur:
    layers.append(RandomBlur(blur, seed=layer_seed(8), name='blur'))
  if brightness:
    layers.append(keras.layers.RandomBrightness(brightness, value_range=(0.0, 1.0),
                                                seed=layer_seed(5), name='brightness', **common))
  if contrast:
    layers.append(keras.layers.RandomContrast(contrast, value_range=(0.0, 1.0),
                                              seed=layer_seed(6), name='contrast', **common))
  if gamma:
    layers.append(RandomGamma(gamma, seed=layer_seed(9), name='gamma'))
  if noise:
    layers.append(RandomNoise(noise, seed=layer_seed(10), name='noise'))
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


def check_mixup(alpha) -> float:
  """alpha of mixup as a float: 0 (off) or a positive number up to 10.

  Raises:
    UsageError: naming the value.
  """
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or \
      not 0.0 <= alpha <= 10.0:
    raise errors.UsageError(f'mixup must be a number in [0, 10] (0 = off), got {alpha!r}')
  return float(alpha)


def mixup_draw(seeds: tf.Tensor, n, alpha: float) -> tuple[tf.Tensor, tf.Tensor]:
  """(lam (n,), partner (n,)) of one batch from three stateless seeds (a (2, 3) tensor, as
  `tf.random.Generator.make_seeds(3)` gives): lam ~ Beta(alpha, alpha) per example (a / (a + b),
  a and b Gamma(alpha)), partner a random permutation of 0..n-1."""
  a = tf.random.stateless_gamma([n], seeds[:, 0], alpha=alpha)
  b = tf.random.stateless_gamma([n], seeds[:, 1], alpha=alpha)
  lam = a / tf.maximum(a + b, 1e-12)  # Both draws underflow to 0 only for tiny alpha.
  partner = tf.argsort(tf.random.stateless_uniform([n], seeds[:, 2]))
  return lam, partner


def mixup(dataset: tf.data.Dataset, alpha: float, seed: int | None) -> tf.data.Dataset:
  """Mixup (Zhang et al., 2018) of a batched training dataset of (images, labels[, ...]).

  Each example i of a batch becomes lam_i x_i + (1 - lam_i) x_j, its label lam_i y_i +
  (1 - lam_i) y_j, with j = partner[i] (a random permutation of the batch) and lam_i ~
  Beta(alpha, alpha) (`mixup_draw`); further elements (e.g. metadata) pass unchanged. The
  draws come from one `tf.random.Generator` seeded with `seed`: the same seed gives the same
  pairs and weights in every run, and every batch of every epoch gets new ones (the map runs
  sequentially, so the order is fixed). For the training split only: evaluation never mixes.
  Labels become fractions; Keras' class_weight rounds them to the nearer class.
  """
  alpha = check_mixup(alpha)
  generator = (tf.random.Generator.from_seed(seed) if seed is not None
               else tf.random.Generator.from_non_deterministic_state())

  def mix(images, labels, *rest):
    lam, partner = mixup_draw(generator.make_seeds(3), tf.shape(images)[0], alpha)
    lam = tf.cast(lam, images.dtype)
    mixed = (lam[:, None, None, None] * images
             + (1 - lam[:, None, None, None]) * tf.gather(images, partner))
    labels = tf.cast(labels, images.dtype)
    lam_y = tf.reshape(lam, [-1] + [1] * (len(labels.shape) - 1))
    mixed_labels = lam_y * labels + (1 - lam_y) * tf.gather(labels, partner)
    return (mixed, mixed_labels, *rest)

  return dataset.map(mix)
