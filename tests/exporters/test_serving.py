"""The temperature fold: the serving model equals sigmoid(logit / T) computed from the logits."""

import keras
import numpy as np
import pytest

from covidlib import errors
from exporters import serving


def _logits(model, images):
  layer = model.get_layer('probability')
  features = keras.Model(model.input, layer.input)(images)
  if isinstance(layer, keras.layers.Dense):
    kernel, bias = layer.get_weights()
    return (np.asarray(features) @ kernel + bias).reshape(-1)
  return np.asarray(features).reshape(-1)


def _activation_model():
  """covidlib.models' head: Dense 'logit' then Activation('sigmoid') 'probability'."""
  keras.utils.set_random_seed(3)
  inputs = keras.Input((16, 16, 1))
  x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
  logit = keras.layers.Dense(1, name='logit', bias_initializer=keras.initializers.Constant(0.3))(x)
  return keras.Model(inputs, keras.layers.Activation('sigmoid', name='probability')(logit))


@pytest.mark.parametrize('head', ['dense', 'activation'])
@pytest.mark.parametrize('temperature', [0.5, 2.5])
def test_fold_gives_sigmoid_of_logit_over_temperature(head, temperature, tiny_model,
                                                      calibration_images):
  model = tiny_model if head == 'dense' else _activation_model()
  folded = serving.serving_model(model, temperature)
  expected = 1 / (1 + np.exp(-_logits(model, calibration_images) / temperature))
  got = np.asarray(folded(calibration_images)).reshape(-1)
  np.testing.assert_allclose(got, expected, atol=1e-6)
  # The original model is untouched.
  np.testing.assert_allclose(np.asarray(model(calibration_images)).reshape(-1),
                             1 / (1 + np.exp(-_logits(model, calibration_images))), atol=1e-6)


def test_temperature_one_is_the_model_itself(tiny_model):
  assert serving.serving_model(tiny_model, 1.0) is tiny_model


@pytest.mark.parametrize('temperature', [0.0, -1.0, float('nan'), float('inf')])
def test_bad_temperature_is_a_usage_error(temperature, tiny_model):
  with pytest.raises(errors.UsageError, match='temperature must be a positive number'):
    serving.serving_model(tiny_model, temperature)


def test_model_without_sigmoid_output_layer_is_refused():
  inputs = keras.Input((16, 16, 1))
  outputs = keras.layers.Dense(1, name='probability')(keras.layers.Flatten()(inputs))
  with pytest.raises(errors.UsageError, match="without a sigmoid activation"):
    serving.serving_model(keras.Model(inputs, outputs), 2.0)


def test_geometry_checks_config(tiny_model):
  assert serving.check_geometry(tiny_model, {'image_size': 16, 'channels': 1}) == (16, 1)
  with pytest.raises(errors.UsageError, match='config.json says image_size=32, channels=1 but '
                     'model.keras takes 16x16x1'):
    serving.check_geometry(tiny_model, {'image_size': 32, 'channels': 1})
