"""Images that are not frontal chest X-rays are flagged (issue #10), by a model trained a few
epochs on small synthetic "X-ray-like" films, through covidlib.predict as a user would run it.

    .venv/bin/python -m pytest tests/covidlib/test_shift_images.py -q

The real-data figures (NIH adults, pediatric normals, per-source ROC-AUC) are in
benchmarks/shift.py and BENCHMARKS.md; this test only proves the mechanism end to end.
"""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageDraw, ImageFont

from covidlib import predict
from covidlib import preprocess
from covidlib import shift
from covidlib import train

pytestmark = pytest.mark.slow  # Trains a model for 6 epochs (~30 s on 2 cores).

SIZE = 32
RAW = 64  # Side of the generated uint8 images before preprocessing.


def film(rs, covid: bool) -> np.ndarray:
  """A frontal-film caricature: dark tall lungs either side of a bright spine, ribs, noise;
  COVID-19 adds hazy opacities inside the lungs."""
  yy, xx = np.mgrid[0:RAW, 0:RAW] / RAW
  image = 170 + 40 * np.exp(-((xx - 0.5) ** 2) / 0.004)                      # Spine.
  for cx in (0.3 + rs.uniform(-0.03, 0.03), 0.7 + rs.uniform(-0.03, 0.03)):   # Lungs.
    image -= 110 * np.exp(-(((xx - cx) / 0.13) ** 2 + ((yy - 0.5) / 0.3) ** 2) ** 2)
  image += 12 * np.sin(yy * 2 * np.pi * rs.uniform(7, 9)) * (np.abs(xx - 0.5) > 0.08)  # Ribs.
  if covid:
    for _ in range(3):
      cx, cy = rs.choice([0.3, 0.7]) + rs.uniform(-0.08, 0.08), rs.uniform(0.3, 0.7)
      image += 60 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.006)
  image *= rs.uniform(0.9, 1.1)
  return np.clip(image + rs.normal(0, 5, image.shape), 0, 255).astype(np.uint8)


def _dataset(n: int, seed: int, batch: int = 16) -> tf.data.Dataset:
  rs = np.random.RandomState(seed)
  labels = (np.arange(n) % 2).astype(np.float32)
  x = np.stack([preprocess.preprocess(film(rs, bool(y))[..., None], SIZE, 1).numpy()
                for y in labels])
  return tf.data.Dataset.from_tensor_slices((x, labels)).batch(batch)


def photo(rs) -> np.ndarray:
  """A colour scene (sky, ground, coloured shapes), gray as covidlib decodes colour files."""
  yy, xx = np.mgrid[0:RAW, 0:RAW] / RAW
  rgb = np.zeros((RAW, RAW, 3))
  rgb[..., 2], rgb[..., 1] = 0.9 - 0.5 * yy, 0.6 - 0.2 * yy
  rgb[yy > rs.uniform(0.4, 0.7)] = rs.uniform(0.2, 0.6, 3)
  for _ in range(4):
    cy, cx, r = rs.rand(), rs.rand(), rs.uniform(0.05, 0.2)
    rgb[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rs.rand(3)
  rgb = (np.clip(rgb + rs.normal(0, 0.05, rgb.shape), 0, 1) * 255).astype(np.uint8)
  return np.asarray(Image.fromarray(rgb).convert('L'))


def text(rs) -> np.ndarray:
  image = Image.new('L', (RAW, RAW), 250)
  draw = ImageDraw.Draw(image)
  for row in range(6):
    draw.text((2, 2 + 10 * row), ''.join(rs.choice(list('ABCDEFXRAY0123 '), 10)), fill=10,
              font=ImageFont.load_default())
  return np.asarray(image)


KINDS = {
    'photo': photo,
    'rotated_film': lambda rs: np.rot90(film(rs, bool(rs.randint(2)))).copy(),
    'uniform_gray': lambda rs: np.full((RAW, RAW), rs.randint(0, 256), np.uint8),
    'text': text,
}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A compact_resnet trained 6 epochs on 128 synthetic films; train() fits the shift score."""
  model_dir = tmp_path_factory.mktemp('shift_images')
  config = train.make_config(model='compact_resnet', image_size=SIZE, batch_size=16, epochs=6,
                             dataset='in-memory', mixed_precision='off', seed=0)
  train.train(config, str(model_dir), train_data=_dataset(128, 0),
              validation_data=_dataset(64, 1))
  assert shift.load(model_dir) is not None
  return predict.Predictor(str(model_dir))


@pytest.mark.parametrize('kind', sorted(KINDS))
def test_non_xray_images_are_flagged(trained, kind):
  rs = np.random.RandomState(5)
  results = [trained.predict_array(KINDS[kind](rs), name=f'{kind}_{i}') for i in range(8)]
  flagged = [r.path for r in results if r.in_distribution is False]
  assert len(flagged) >= 7, f'{kind}: only {flagged} of 8 flagged'


def test_new_films_like_the_training_ones_are_rarely_flagged(trained):
  rs = np.random.RandomState(9)
  results = [trained.predict_array(film(rs, bool(i % 2))) for i in range(40)]
  assert sum(r.in_distribution is False for r in results) <= 4  # 10%.
