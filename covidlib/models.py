"""The networks: the article's `seed_cnn` and a compact residual network for this small data.

    from covidlib import models
    model = models.build_model('compact_resnet', image_size=224, channels=1, seed=0)
    print(models.count_params(model), models.count_flops(model))

Every builder returns the INFERENCE model: input float32 (S, S, C) in [0, 1] named 'image',
output (B, 1) float32 P(COVID-19) from a sigmoid layer named 'probability'. The layer before it,
'logit', is a Dense(1) without activation, so exporters can apply the temperature of
`decision.json` (P = sigmoid(logit / T)) without rebuilding the model. Both are float32 even
under a mixed-precision policy. No augmentation inside (see `covidlib.augment.training_model`),
no Lambda layers (models load with Keras safe_mode on), no downloaded weights.

`crop` and `equalize` (default off) put `covidlib.standardize` layers right after the input
('crop', then 'equalize'), inside the model, so every path that runs it (training, evaluation,
SavedModel, TFLite, predict) standardizes alike. They hold no weights: a model with them has the
same weights, in the same order, as one without.

`seed=None` draws fresh initial weights; an integer seed gives the same weights (and dropout
masks) on every build.

Loading and reading a trained model:

    model = model_dir.load_model('runs/compact_resnet')   # model.keras, Keras safe_mode on
    extractor = models.feature_model(model)                 # images -> [P, penultimate features]

The penultimate features are the input of the 'logit' Dense layer (or, in a model without one,
of a sigmoid Dense 'probability' layer): what the shift score and the source probe read.
"""

from __future__ import annotations

from typing import Callable

import keras

from covidlib import errors
from covidlib import standardize


def _seeded(seed: int | None, offset: int, kind: str = 'glorot_uniform'):
  """A kernel initializer; seeded with `seed + offset` so no two layers share a stream."""
  if seed is None:
    return kind
  cls = {'glorot_uniform': keras.initializers.GlorotUniform,
         'he_normal': keras.initializers.HeNormal}[kind]
  return cls(seed=seed + offset)


def _dropout_seed(seed: int | None, offset: int) -> int | None:
  return None if seed is None else seed + offset


def _head(x, seed: int | None):
  """Dense(1) 'logit' -> sigmoid 'probability', both float32 under any precision policy."""
  logit = keras.layers.Dense(1, kernel_initializer=_seeded(seed, 999), dtype='float32',
                             name='logit')(x)
  return keras.layers.Activation('sigmoid', dtype='float32', name='probability')(logit)


def _input(image_size: int, channels: int, crop: float, equalize: str):
  """The 'image' input and the tensor after the standardization layers (if any)."""
  inputs = keras.Input((image_size, image_size, channels), dtype='float32', name='image')
  x = inputs
  for layer in standardize.build_standardization(crop, equalize):
    x = layer(x)
  return inputs, x


def seed_cnn(image_size: int = 224, channels: int = 1, seed: int | None = None,
             crop: float = 0.0, equalize: str = 'none') -> keras.Model:
  """The network of the article ("Detecting COVID-19 using Deep Learning", D. Trehan, 2020).

  Layer for layer as in its notebook (dakshtrehan/Covid-19-Detection, `Covid-19 Detection.ipynb`),
  whose `model.summary()` prints 5,723,457 parameters at 224x224x3: note that its SECOND
  convolution has 128 filters (32 -> 128 -> 64 -> 128), not 64; the count proves that reading.
  The only change: its `Dense(1, activation='sigmoid')` is split into Dense 'logit' + sigmoid
  'probability' (same parameters, same function). Valid padding, Keras default initializers.
  About 5.8 GFLOPs per 224x224 image, 98% of the parameters in the Dense(64) after Flatten.
  """
  inputs, x = _input(image_size, channels, crop, equalize)
  x = keras.layers.Conv2D(32, 3, activation='relu', kernel_initializer=_seeded(seed, 1),
                          name='conv1')(x)
  x = keras.layers.Conv2D(128, 3, activation='relu', kernel_initializer=_seeded(seed, 2),
                          name='conv2')(x)
  x = keras.layers.MaxPooling2D(2, name='pool2')(x)
  x = keras.layers.Dropout(0.25, seed=_dropout_seed(seed, 102), name='drop2')(x)
  x = keras.layers.Conv2D(64, 3, activation='relu', kernel_initializer=_seeded(seed, 3),
                          name='conv3')(x)
  x = keras.layers.MaxPooling2D(2, name='pool3')(x)
  x = keras.layers.Dropout(0.25, seed=_dropout_seed(seed, 103), name='drop3')(x)
  x = keras.layers.Conv2D(128, 3, activation='relu', kernel_initializer=_seeded(seed, 4),
                          name='conv4')(x)
  x = keras.layers.MaxPooling2D(2, name='pool4')(x)
  x = keras.layers.Dropout(0.25, seed=_dropout_seed(seed, 104), name='drop4')(x)
  x = keras.layers.Flatten(name='flatten')(x)
  x = keras.layers.Dense(64, activation='relu', kernel_initializer=_seeded(seed, 5),
                         name='dense')(x)
  x = keras.layers.Dropout(0.5, seed=_dropout_seed(seed, 105), name='drop_dense')(x)
  return keras.Model(inputs, _head(x, seed), name='seed_cnn')


COMPACT_RESNET_WIDTHS = (16, 32, 64, 128)
# Keras' default momentum 0.99 averages the batch statistics over ~100 steps; an epoch of the
# seed data is 7 steps, so after 10-20 epochs the moving statistics still lag the weights and
# the inference model scores near chance while the training loss is low. 0.9 (~10 steps) fits.
BN_MOMENTUM = 0.9


def _conv_bn_relu(x, filters: int, strides: int, seed: int | None, offset: int, name: str,
                  relu: bool = True):
  x = keras.layers.Conv2D(filters, 3, strides=strides, padding='same', use_bias=False,
                          kernel_initializer=_seeded(seed, offset, 'he_normal'),
                          name=f'{name}_conv')(x)
  x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f'{name}_bn')(x)
  if relu:
    x = keras.layers.ReLU(name=f'{name}_relu')(x)
  return x


def _residual_block(x, filters: int, strides: int, seed: int | None, offset: int, name: str):
  """ResNet basic block: 3x3 conv-BN-ReLU, 3x3 conv-BN, plus shortcut (1x1 conv-BN if reshaped)."""
  shortcut = x
  if strides != 1 or x.shape[-1] != filters:
    shortcut = keras.layers.Conv2D(filters, 1, strides=strides, use_bias=False,
                                   kernel_initializer=_seeded(seed, offset + 2, 'he_normal'),
                                   name=f'{name}_proj_conv')(x)
    shortcut = keras.layers.BatchNormalization(momentum=BN_MOMENTUM,
                                               name=f'{name}_proj_bn')(shortcut)
  x = _conv_bn_relu(x, filters, strides, seed, offset, f'{name}_a')
  x = _conv_bn_relu(x, filters, 1, seed, offset + 1, f'{name}_b', relu=False)
  x = keras.layers.Add(name=f'{name}_add')([x, shortcut])
  return keras.layers.ReLU(name=f'{name}_out')(x)


def compact_resnet(image_size: int = 224, channels: int = 1, seed: int | None = None,
                   crop: float = 0.0, equalize: str = 'none') -> keras.Model:
  """A small ResNet for a few hundred gray X-rays: ~0.3M parameters, ~60x fewer FLOPs.

  Stem: 3x3/2 conv (16) + 2x2 max pool takes 224 -> 56 cheaply; then four stages of one basic
  residual block each (16, 32, 64, 128 channels at 56, 28, 14, 7 px for a 224 input), global
  average pooling, dropout 0.3, Dense 'logit', sigmoid 'probability'. Batch norm with momentum
  0.9 (see BN_MOMENTUM).

  Why this shape for this data: seed_cnn puts 5.5M of its 5.7M weights in one Dense layer on a
  flattened 26x26 map, which lets it memorise where things sit in ~200 training images (and
  the borders and text labels that tell the sources apart). Global pooling removes that
  position-keyed layer; batch norm makes a from-scratch net train in a few epochs on CPU; the
  whole net costs ~0.1 GFLOPs per 224x224 image against seed_cnn's ~5.8.
  """
  inputs, x = _input(image_size, channels, crop, equalize)
  x = _conv_bn_relu(x, COMPACT_RESNET_WIDTHS[0], 2, seed, 1, 'stem')
  x = keras.layers.MaxPooling2D(2, name='stem_pool')(x)
  for stage, filters in enumerate(COMPACT_RESNET_WIDTHS):
    x = _residual_block(x, filters, 1 if stage == 0 else 2, seed, 10 * (stage + 1),
                        f'stage{stage + 1}')
  x = keras.layers.GlobalAveragePooling2D(name='pool')(x)
  x = keras.layers.Dropout(0.3, seed=_dropout_seed(seed, 100), name='dropout')(x)
  return keras.Model(inputs, _head(x, seed), name='compact_resnet')


MODELS: dict[str, Callable[..., keras.Model]] = {
    'seed_cnn': seed_cnn,
    'compact_resnet': compact_resnet,
}


# seed_cnn's four valid 3x3 convs and three 2x2 pools leave a 1x1 map at 24 px (0 at 23);
# compact_resnet divides by 32, so below 16 px its last stages see a single pixel.
_MIN_IMAGE_SIZE = {'seed_cnn': 24, 'compact_resnet': 16}


def build_model(name: str, image_size: int = 224, channels: int = 1,
                seed: int | None = None, crop: float = 0.0,
                equalize: str = 'none') -> keras.Model:
  """Builds the inference model `name` (a key of MODELS).

  Args:
    crop: fraction of each side cut off (then resized back) inside the model; in [0, 0.4).
    equalize: 'none', 'histogram' or 'clahe' (per-image equalization inside the model).
    See `covidlib.standardize` for both.

  Raises:
    UsageError: for an unknown name (the message lists the valid ones), a channel count other
      than 1 or 3, an image size too small for the network, or a bad crop or equalize.
  """
  if name not in MODELS:
    raise errors.UsageError(f'unknown model {name!r}; valid models: {", ".join(sorted(MODELS))}')
  if channels not in (1, 3):
    raise errors.UsageError(f'channels must be 1 or 3, got {channels!r}')
  minimum = _MIN_IMAGE_SIZE[name]
  if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < minimum:
    raise errors.UsageError(
        f'image_size must be an integer >= {minimum} for model {name!r}, got {image_size!r}')
  if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
    raise errors.UsageError(f'seed must be a non-negative integer or None, got {seed!r}')
  crop = standardize.check_crop(crop)
  standardize.check_equalize(equalize)
  return MODELS[name](image_size=image_size, channels=channels, seed=seed, crop=crop,
                      equalize=equalize)


def count_params(model: keras.Model) -> int:
  """All weights, trainable or not (batch-norm moving statistics included)."""
  return int(model.count_params())


def count_flops(model: keras.Model) -> int:
  """FLOPs for one image through `model`, counting a multiply-add as 2 FLOPs.

  Counted from the layer shapes: Conv2D (incl. strided and grouped), DepthwiseConv2D,
  SeparableConv2D and Dense, i.e. 2 x (output positions) x (kernel taps x input channels per
  group) x (output channels). Not counted: bias adds, batch norm, activations, pooling, residual
  adds and augmentation (together well under 1% for the networks here; batch norm folds into the
  convolution at export anyway). Nested models (e.g. a training model holding the inference
  model) are counted through.
  """
  total = 0
  for layer in model.layers:
    if isinstance(layer, keras.Model):
      total += count_flops(layer)
      continue
    if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D,
                          keras.layers.SeparableConv2D, keras.layers.Dense)):
      total += _layer_flops(layer)
  return total


def _layer_flops(layer) -> int:
  in_shape = tuple(layer.input.shape)
  out_shape = tuple(layer.output.shape)
  positions = 1
  for d in out_shape[1:-1]:
    positions *= int(d)
  c_in, c_out = int(in_shape[-1]), int(out_shape[-1])
  if isinstance(layer, keras.layers.Dense):
    return 2 * positions * c_in * c_out
  taps = 1
  for k in layer.kernel_size:
    taps *= int(k)
  if isinstance(layer, keras.layers.SeparableConv2D):
    depthwise = positions * taps * c_in * layer.depth_multiplier
    pointwise = positions * c_in * layer.depth_multiplier * c_out
    return 2 * (depthwise + pointwise)
  if isinstance(layer, keras.layers.DepthwiseConv2D):
    return 2 * positions * taps * c_out  # c_out = c_in x depth_multiplier, one tap set each.
  groups = getattr(layer, 'groups', 1)
  return 2 * positions * taps * (c_in // groups) * c_out


# --------------------------------------------------------------------------------------------
# The penultimate features of a trained model.
# --------------------------------------------------------------------------------------------


def feature_layer(model: keras.Model):
  """The layer whose input is the penultimate features: Dense 'logit', else 'probability'."""
  for name in ('logit', 'probability'):
    try:
      return model.get_layer(name)
    except ValueError:
      continue
  raise errors.UsageError(f'model {model.name!r} has no layer named "logit" or "probability": '
                          'the shift score needs the covidlib model head')


def has_feature_layer(model) -> bool:
  """True when `model` is a Keras model with covidlib's head (feature_layer finds it)."""
  if not isinstance(model, keras.Model):
    return False
  try:
    feature_layer(model)
  except errors.UsageError:
    return False
  return True


def feature_model(model: keras.Model) -> keras.Model:
  """A Keras model: images -> [the model's output, penultimate features (n, d)].

  Shares `model`'s layers (no copy); works on a temperature-folded serving model too, whose
  graph holds the same layers.
  """
  return keras.Model(model.input, [model.output, feature_layer(model).input],
                     name=f'{model.name}_features')


# --------------------------------------------------------------------------------------------
# Features at several depths (the shift score and the site check).
# --------------------------------------------------------------------------------------------
#
# Early layers carry acquisition style (scanner, film digitisation, processing), the penultimate
# layer what the network learned about the finding; a shift between two sites can show at any
# depth. The taps are chosen by a rule that needs no per-network list, so every network
# (keras.applications backbones built flat into the model included) gets them:
#   among the layers from the first one with weights on (after the input and the weightless
#   standardization layers) whose output is 4-D (batch, h, w, c), group by floor(log2(h)) (one
#   group per resolution stage; seed_cnn's valid convolutions shave pixels within a stage); the
#   LAST layer of each group is a tap, shallow to deep; the penultimate features (the input of
#   'logit') are the last tap.
# Each 4-D tap is pooled to 2c numbers: the mean and the standard deviation over h x w of each
# channel (the first two moments: brightness and contrast of each learned pattern).

PENULTIMATE_TAP = 'penultimate'


def feature_taps(model: keras.Model) -> list[str]:
  """Names of the tap layers of `model`, shallow to deep, PENULTIMATE_TAP last (see above).

  Raises:
    UsageError: the model has no covidlib head (feature_layer).
  """
  head = feature_layer(model)
  groups: dict[int, str] = {}
  seen_weights = False
  for layer in model.layers:
    if layer is head:
      break
    seen_weights = seen_weights or bool(layer.weights)
    if not seen_weights or isinstance(layer, (keras.layers.InputLayer, keras.Model)):
      continue
    try:
      shape = layer.output.shape
    except (AttributeError, ValueError):  # A layer used twice has no single output.
      continue
    if len(shape) == 4 and shape[1]:
      groups[int(shape[1]).bit_length()] = layer.name  # Later layers of a stage replace earlier.
  return [groups[k] for k in sorted(groups, reverse=True)] + [PENULTIMATE_TAP]


def _moments(x):
  """(n, h, w, c) -> (n, 2c): per-channel mean and standard deviation over h x w.

  The variance in two passes, mean((x - mean)^2), not E[x^2] - E[x]^2: the latter cancels
  catastrophically for channels that are nearly constant over the image (common after a ReLU),
  where float32 rounding, a TFLite kernel's order of summation or int8 quantization then give a
  different "standard deviation" of pure noise, which the shift score's whitening amplifies.
  The product rather than a square keeps to ops with int8 kernels in every TFLite build.
  """
  x = keras.ops.cast(x, 'float32')
  mean = keras.ops.mean(x, axis=(1, 2), keepdims=True)
  centred = x - mean
  var = keras.ops.mean(centred * centred, axis=(1, 2))
  return keras.ops.concatenate([keras.ops.squeeze(mean, axis=(1, 2)),
                                keras.ops.sqrt(var + 1e-12)], axis=-1)


def tap_model(model: keras.Model, taps: list[str] | tuple[str, ...] | None = None
              ) -> keras.Model:
  """A Keras model: images -> [the model's output, pooled tap 0, ..., penultimate features].

  Tap i (feature_taps(model)[i]) is (n, 2c) for a 4-D layer (mean and std per channel), and
  (n, d) for the penultimate features. With `taps`, only those (names of feature_taps, in the
  order given): what a fitted shift score reads. Shares `model`'s layers (no copy); built anew
  per call.

  Raises:
    UsageError: a name in `taps` that is not a tap of the model.
  """
  names = feature_taps(model)
  if taps is not None:
    unknown = [t for t in taps if t not in names]
    if unknown:
      raise errors.UsageError(f'model {model.name!r} has no taps {unknown}; its taps are '
                              f'{names}')
    names = list(taps)
  outputs = [model.output]
  for name in names:
    if name == PENULTIMATE_TAP:
      f = feature_layer(model).input
      outputs.append(keras.ops.reshape(keras.ops.cast(f, 'float32'), (-1, int(f.shape[-1]))))
    else:
      outputs.append(_moments(model.get_layer(name).output))
  return keras.Model(model.input, outputs, name=f'{model.name}_taps')
