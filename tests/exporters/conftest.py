"""Fixtures for the exporter tests: a tiny trained-looking model_dir and X-ray-like images.

The model is small (16 x 16 input) so that conversions take a second, but real: two
convolutions, a Dense layer big enough for weight quantization to matter (> 1024 weights), and an
output layer rescaled so P(COVID-19) spreads over (0, 1) on the test images rather than sitting
at 0.5, which would make every decision-agreement test trivially pass or fail.
"""

import os
import types

import keras
import numpy as np
import pytest

from covidlib import model_dir as model_dir_lib

IMAGE_SIZE = 16


def xray_like(n: int, seed: int = 0, min_side: int = 20, max_side: int = 48) -> list[np.ndarray]:
  """`n` uint8 (H, W) images of assorted sizes: smooth blobs plus noise, varied brightness."""
  rs = np.random.RandomState(seed)
  images = []
  for _ in range(n):
    h, w = rs.randint(min_side, max_side + 1, size=2)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    image = np.zeros((h, w))
    for _ in range(3):
      cy, cx, s = rs.rand(), rs.rand(), 0.1 + 0.3 * rs.rand()
      image += rs.rand() * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    image = image / max(image.max(), 1e-6) * rs.uniform(100, 255) + rs.normal(0, 8, (h, w))
    images.append(np.clip(image, 0, 255).astype(np.uint8))
  return images


def build_tiny_model(channels: int = 1, image_size: int = IMAGE_SIZE, seed: int = 0,
                     calibration: np.ndarray | None = None) -> keras.Model:
  """A covidlib-contract inference model; with `calibration` images, logits are spread to
  mean 0 and standard deviation 2 over them."""
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((image_size, image_size, channels), name='image')
  x = keras.layers.Conv2D(8, 3, strides=2, activation='relu')(inputs)
  x = keras.layers.Conv2D(8, 3, activation='relu')(x)
  x = keras.layers.Flatten()(x)
  x = keras.layers.Dense(64, activation='relu')(x)
  outputs = keras.layers.Dense(1, activation='sigmoid', name='probability')(x)
  model = keras.Model(inputs, outputs, name='tiny')
  if calibration is not None:
    features = keras.Model(inputs, model.get_layer('probability').input)(calibration)
    kernel, bias = model.get_layer('probability').get_weights()
    logits = np.asarray(features) @ kernel + bias
    scale = 2.0 / max(float(logits.std()), 1e-6)
    model.get_layer('probability').set_weights(
        [kernel * scale, (bias - float(logits.mean())) * scale])
  return model


def preprocessed(images, image_size=IMAGE_SIZE, channels=1) -> np.ndarray:
  from covidlib import preprocess
  return np.stack([preprocess.preprocess(i[..., None], image_size, channels).numpy()
                   for i in images])


def write_model_dir(path, model: keras.Model, decision=None) -> str:
  os.makedirs(path, exist_ok=True)
  model.save(os.path.join(path, model_dir_lib.MODEL))
  size, channels = model.input_shape[1], model.input_shape[3]
  model_dir_lib.write_json(os.path.join(path, model_dir_lib.CONFIG), {
      'model': 'tiny', 'image_size': size, 'channels': channels, 'dataset': 'covid_xray/seed',
      'data_dir': None, 'batch_size': 4, 'epochs': 1, 'learning_rate': 1e-3, 'seed': 0,
      'strategy': 'default', 'mixed_precision': False, 'augment': {}})
  if decision is not None:
    model_dir_lib.save_decision(path, decision)
  return str(path)


@pytest.fixture(scope='session')
def images():
  """24 X-ray-like uint8 gray images of assorted sizes."""
  return xray_like(24, seed=1)


@pytest.fixture(scope='session')
def calibration_images():
  """Preprocessed float32 (40, 16, 16, 1) images, standing in for the training split."""
  return preprocessed(xray_like(40, seed=2))


@pytest.fixture(scope='session')
def tiny_model(calibration_images):
  return build_tiny_model(calibration=calibration_images)


@pytest.fixture(scope='session')
def decision():
  """A non-default operating point: proves threshold and temperature travel with exports."""
  return model_dir_lib.Decision(threshold=0.42, policy='youden', temperature=1.5,
                                split='validation')


@pytest.fixture(scope='session')
def model_dir(tmp_path_factory, tiny_model, decision):
  return write_model_dir(tmp_path_factory.mktemp('model_dir'), tiny_model, decision)


@pytest.fixture(scope='session')
def helpers():
  """The module's helper functions, for tests (which cannot import conftest)."""
  return types.SimpleNamespace(xray_like=xray_like, build_tiny_model=build_tiny_model,
                               preprocessed=preprocessed, write_model_dir=write_model_dir)


@pytest.fixture(scope='session')
def folder_dataset(tmp_path_factory):
  """ROOT/{train,validation}/{covid,normal}/*.png, 12 + 10 images per class; COVID-19 images
  brighter, so the tiny model's scores carry some signal. Use as --dataset=folder:ROOT."""
  from PIL import Image
  root = tmp_path_factory.mktemp('folder_dataset')
  for split, count, seed in (('train', 12, 20), ('validation', 10, 30)):
    for label, name in enumerate(('normal', 'covid')):
      folder = root / split / name
      folder.mkdir(parents=True)
      for i, image in enumerate(xray_like(count, seed=seed + label)):
        if label:
          image = np.clip(image.astype(int) + 40, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f'{name}_{i:02d}.png')
  return str(root)
