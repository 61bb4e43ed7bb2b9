"""The serving model: the Keras inference model with the calibration temperature folded in.

    from exporters import serving
    model = serving.serving_model(keras_model, temperature=1.7)  # P = sigmoid(logit / 1.7)

Every exported artifact (SavedModel, each TFLite variant) is built from this model, so what a
server or a phone returns is the calibrated P(COVID-19) that evaluation chose the threshold on.
The temperature is folded into the weights of the output layer (`probability`): for a sigmoid
Dense, kernel / T and bias / T give exactly sigmoid(logit / T), with no extra op to quantize.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from covidlib import errors

OUTPUT_LAYER = 'probability'


def model_geometry(model: keras.Model) -> tuple[int, int]:
  """(image_size, channels) of an inference model's (None, S, S, C) float input."""
  shape = tuple(model.input_shape)
  if len(shape) != 4 or shape[1] is None or shape[1] != shape[2] or shape[3] not in (1, 3):
    raise errors.UsageError(
        f'model {model.name!r} has input shape {shape}: expected (None, S, S, 1) or '
        '(None, S, S, 3), the covidlib inference-model contract')
  return int(shape[1]), int(shape[3])


def check_geometry(model: keras.Model, config: dict) -> tuple[int, int]:
  """The model's (image_size, channels), checked against config.json's."""
  image_size, channels = model_geometry(model)
  want = (config.get('image_size', image_size), config.get('channels', channels))
  if (image_size, channels) != tuple(want):
    raise errors.UsageError(
        f'config.json says image_size={want[0]}, channels={want[1]} but model.keras takes '
        f'{image_size}x{image_size}x{channels}')
  return image_size, channels


def serving_model(model: keras.Model, temperature: float = 1.0) -> keras.Model:
  """Returns a model whose output is sigmoid(logit / temperature), sharing `model`'s layers.

  Temperature 1.0 returns `model` itself. Otherwise the model's output layer must be named
  'probability' and be a sigmoid Dense or a sigmoid Activation (the covidlib model contract).

  Raises:
    UsageError: for a non-positive temperature or an output layer the fold cannot handle.
  """
  temperature = float(temperature)
  if not np.isfinite(temperature) or temperature <= 0:
    raise errors.UsageError(f'temperature must be a positive number, got {temperature!r}')
  if temperature == 1.0:
    return model
  try:
    layer = model.get_layer(OUTPUT_LAYER)
  except ValueError:
    raise errors.UsageError(
        f'model {model.name!r} has no output layer named {OUTPUT_LAYER!r}: cannot apply '
        f'temperature {temperature}') from None
  activation = getattr(layer, 'activation', None)
  if getattr(activation, '__name__', '') != 'sigmoid':
    raise errors.UsageError(
        f'layer {OUTPUT_LAYER!r} of model {model.name!r} is {type(layer).__name__} without a '
        f'sigmoid activation: cannot fold temperature {temperature} into it')
  features = layer.input
  if isinstance(layer, keras.layers.Dense):
    folded = keras.layers.Dense.from_config(layer.get_config())
    folded.build(features.shape)
    kernel, *bias = layer.get_weights()
    folded.set_weights([kernel / temperature] + [b / temperature for b in bias])
    outputs = folded(features)
  elif isinstance(layer, keras.layers.Activation):
    scaled = keras.layers.Rescaling(1.0 / temperature, dtype=layer.dtype_policy,
                                    name='inverse_temperature')(features)
    outputs = keras.layers.Activation.from_config(layer.get_config())(scaled)
  else:
    raise errors.UsageError(
        f'layer {OUTPUT_LAYER!r} is a {type(layer).__name__}: temperature folding needs a '
        'Dense or Activation layer')
  return keras.Model(model.input, outputs, name=f'{model.name}_t{temperature:g}')


def shift_score_tf(shift_model, features):
  """covidlib.shift's score in TensorFlow ops (float32), for exports: tap features -> (n,).

  Args:
    shift_model: a covidlib.shift.ShiftModel.
    features: one (n, d_i) tensor per tap of shift_model, in its order (what
      `covidlib.models.tap_model(model, shift_model.tap_names)` returns after the output), or
      one tensor for a one-tap score.

  Per tap, min_c ||f W - m_c||^2 (the second form of the score in covidlib/shift.py),
  standardised, then the maximum over taps. The standardisation is folded into the constants:
  (d - offset) / scale = min_c ||f W' - m'_c||^2 - offset / scale with W' = W / sqrt(scale),
  m' = m / sqrt(scale), so each tap costs a matrix product, a subtraction, a sum of squares, a
  minimum and one subtraction.
  """
  if not isinstance(features, (list, tuple)):
    features = [features]
  if len(features) != len(shift_model.taps):
    raise errors.UsageError(f'shift_score_tf: {len(features)} feature tensors for the '
                            f'{len(shift_model.taps)} taps {list(shift_model.tap_names)}')
  scores = []
  for tap, f in zip(shift_model.taps, features):
    root = np.sqrt(tap.scale)
    projection = tf.constant(tap.projection / root, tf.float32)
    centers = tf.constant(tap.centers / root, tf.float32)
    z = tf.matmul(tf.reshape(tf.cast(f, tf.float32), [-1, tap.feature_dim]), projection)
    difference = z[:, tf.newaxis, :] - centers[tf.newaxis]
    # A product rather than tf.square: MUL has int8 kernels in every TFLite build.
    distance = tf.reduce_min(tf.reduce_sum(difference * difference, axis=-1), axis=-1)
    if tap.offset != 0.0:
      distance = distance - tf.constant(tap.offset / tap.scale, tf.float32)
    scores.append(distance)
  if len(scores) == 1:
    return scores[0]
  return tf.reduce_max(tf.stack(scores, axis=-1), axis=-1)
