"""The one scoring pass: a model over a split, a folder or a file list, once, into arrays.

    from covidlib import model_dir, scoring
    config = model_dir.load_config('runs/compact_resnet')
    model = model_dir.load_model('runs/compact_resnet')
    dataset, description = scoring.load_split(config, 'test')
    scored = scoring.score_dataset(model, dataset, keep_images=True)
    scored.scores, scored.labels, scored.features, scored.metadata['source']

Every figure of covidlib-evaluate, the shift score's fit and the cross-validation's fold scores
come from here: no other module runs a model over a dataset. A model with covidlib's head (a
'logit' Dense, see `covidlib.models.feature_model`) gives its output and its penultimate features
in the same forward pass, so the features cost nothing extra; any other model gives scores only.

The datasets are preprocessed exactly as the model was trained (`covidlib.data`, the one
preprocessing function), in order, with the metadata of `covidlib.data.METADATA_KEYS`.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import tensorflow as tf

from covidlib import data
from covidlib import errors
from covidlib import models
from covidlib import scored as scored_lib
from covidlib.scored import Scored


def split_location(config: dict, split: str,
                   dataset: str | None = None) -> tuple[str, str | None]:
  """(dataset, folder): the dataset to read (default: the config's) and, for a 'folder:ROOT'
  dataset, its split folder ROOT/<split> (None for a TFDS dataset).

  Raises:
    UsageError: no dataset named anywhere, or a split folder that does not exist.
  """
  dataset = dataset or config.get('dataset')
  if not dataset:
    raise errors.UsageError('no dataset given and the model_dir config names none')
  if not dataset.startswith('folder:'):
    return dataset, None
  root = os.path.join(dataset[len('folder:'):], split)
  if not os.path.isdir(root):
    raise errors.UsageError(f'split folder {root!r} does not exist (dataset {dataset!r})')
  return dataset, root


def load_split(config: dict, split: str, *, dataset: str | None = None,
               data_dir: str | None = None, folder: str | None = None,
               batch_size: int = 32, cache: bool = True) -> tuple[tf.data.Dataset, str]:
  """The dataset to score, preprocessed as the model was trained; and a description.

  Args:
    config: the model_dir's config.json (image_size, channels, dataset, data_dir).
    split: a split name of the dataset.
    dataset: 'name/config' of a TFDS dataset or 'folder:ROOT' (ROOT/<split>/{covid,normal});
      default: the one the model was trained on.
    data_dir: TFDS data_dir; default: the training one.
    folder: ROOT/{covid,normal}/* to score instead of a dataset (split is then ignored).
    cache: keep decoded images in memory between iterations (a single pass needs no cache).
  """
  common = dict(image_size=int(config['image_size']), channels=int(config.get('channels', 1)),
                batch_size=batch_size, cache=cache)
  if folder:
    if not os.path.isdir(folder):
      raise errors.UsageError(f'folder {folder!r} does not exist or is not a directory')
    return data.load_folder(folder, with_metadata=True, **common), f'folder {folder}'
  dataset, root = split_location(config, split, dataset)
  if root is not None:
    return data.load_folder(root, with_metadata=True, **common), f'folder {root}'
  data_dir = data_dir or config.get('data_dir')
  return (data.load_tfds(dataset, split, data_dir=data_dir, with_metadata=True, **common),
          f'{dataset} split {split}')


def _forward(model, features: bool, taps: bool = False):
  """images -> (scores, features or None[, {tap: pooled features}]) for one batch."""
  if taps:
    extractor = models.tap_model(model)  # UsageError naming the model without covidlib's head.
    names = models.feature_taps(model)

    def run_taps(images):
      p, *pooled = extractor(images, training=False)
      pooled = {n: np.asarray(f, np.float32) for n, f in zip(names, pooled)}
      return p, pooled[models.PENULTIMATE_TAP], pooled
    return run_taps
  if features and models.has_feature_layer(model):
    extractor = models.feature_model(model)

    def run(images):
      p, f = extractor(images, training=False)
      return p, np.asarray(f, np.float32).reshape(int(f.shape[0]), -1)
    return run
  return lambda images: (model(images, training=False), None)


def score_dataset(model, dataset: tf.data.Dataset, *, keep_images: bool = False,
                  features: bool = True, taps: bool = False) -> Scored:
  """Runs `model` once over a batched dataset of (image, label) or (image, label, metadata).

  Args:
    model: a Keras model (or any callable images -> P(positive), then without features).
    keep_images: keep the preprocessed images (Grad-CAM, the report's grid).
    features: also return the penultimate features when the model has covidlib's head.
    taps: also return the pooled features at every tap (`covidlib.models.tap_model`), in the
      same forward pass; the model must have covidlib's head.

  Raises:
    UsageError: elements that are not batched (image, label[, metadata]).
    DataError: the dataset holds no example.
  """
  run = _forward(model, features, taps)
  labels, scores, images, feats = [], [], [], []
  tap_parts: dict[str, list] = {}
  metadata: dict[str, list] = {}
  for element in dataset:
    if not isinstance(element, (tuple, list)) or len(element) not in (2, 3):
      raise errors.UsageError(
          'evaluation data must yield (image, label) or (image, label, metadata) batches')
    image, label = element[0], element[1]
    if image.shape.rank != 4:
      raise errors.UsageError(
          f'evaluation data must be batched (batch, height, width, channels), got {image.shape}')
    p, f, *pooled = run(image)
    for name, value in (pooled[0] if pooled else {}).items():
      tap_parts.setdefault(name, []).append(value)
    scores.append(np.asarray(p, np.float64).reshape(-1))
    labels.append(np.asarray(label).reshape(-1).astype(np.int64))
    if f is not None:
      feats.append(f)
    if keep_images:
      images.append(np.asarray(image, np.float32))
    if len(element) == 3:
      for key, value in element[2].items():
        metadata.setdefault(key, []).append(np.asarray(value).reshape(-1))
  if not labels:
    raise errors.DataError('the evaluation data holds no examples')
  return Scored(labels=np.concatenate(labels), scores=np.concatenate(scores),
                metadata=_metadata(metadata),
                images=np.concatenate(images) if keep_images else None,
                features=np.concatenate(feats) if feats else None,
                taps={k: np.concatenate(v) for k, v in tap_parts.items()} if taps else None)


def _metadata(parts: dict[str, list]) -> dict[str, np.ndarray]:
  meta = {}
  for key, values in parts.items():
    values = np.concatenate(values)
    meta[key] = values if values.dtype.kind in 'iuf' else scored_lib.as_text(values)
  return meta


def read_dataset(dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray, dict]:
  """(images float32 (n, S, S, C), labels int64 (n,), metadata) of a batched dataset, no model.

  For callers that hold images in memory (cross-validation, export calibration).

  Raises:
    DataError: the dataset holds no example.
  """
  images, labels, metadata = [], [], {}
  for element in dataset:
    images.append(np.asarray(element[0], np.float32))
    labels.append(np.asarray(element[1]).reshape(-1).astype(np.int64))
    if len(element) > 2:
      for key, value in element[2].items():
        metadata.setdefault(key, []).append(np.asarray(value).reshape(-1))
  if not images:
    raise errors.DataError('the data holds no examples')
  return np.concatenate(images), np.concatenate(labels), _metadata(metadata)


def score_images(model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
  """(n,) float64 P(positive) of preprocessed images (n, S, S, C), `batch_size` at a time."""
  if not len(images):
    return np.zeros(0)
  return np.concatenate([np.asarray(model(images[i:i + batch_size], training=False),
                                    np.float64).reshape(-1)
                         for i in range(0, len(images), batch_size)])


def penultimate_features(model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
  """(n, d) float32 penultimate features (the input of 'logit') of preprocessed images."""
  extractor = models.feature_model(model)
  dim = int(models.feature_layer(model).input.shape[-1])
  parts = [np.zeros((0, dim), np.float32)]
  for i in range(0, len(images), batch_size):
    _, f = extractor(np.asarray(images[i:i + batch_size], np.float32), training=False)
    parts.append(np.asarray(f, np.float32).reshape(-1, dim))
  return np.concatenate(parts)


def score_every_split(model, config: dict, dataset: str, data_dir: str | None, *,
                      batch_size: int = 32, keep_images: bool = True,
                      taps: bool = False) -> Scored:
  """The model's answers on every split of a built TFDS dataset, with 'finding' metadata (and
  the pooled features at every tap with `taps`, as score_dataset)."""
  builder = data.builder(dataset, data_dir)
  parts = []
  for split in sorted(builder.info.splits.keys()):
    ds = data.load_tfds(dataset, split, data_dir=data_dir, image_size=int(config['image_size']),
                        channels=int(config.get('channels', 1)), batch_size=batch_size,
                        with_metadata=True, cache=False)
    part = score_dataset(model, ds, keep_images=keep_images, taps=taps)
    part.metadata['finding'] = data.column(dataset, split, 'finding', data_dir)
    parts.append(part)
  return scored_lib.concat(parts)


def score_files(model, paths: Sequence[str], labels: Sequence[int], config: dict, *,
                batch_size: int = 32, keep_images: bool = False, taps: bool = False) -> Scored:
  """The model's answers on a list of labelled image files (metadata: 'filename')."""
  ds = data.load_files(paths, labels, image_size=int(config['image_size']),
                       channels=int(config.get('channels', 1)), batch_size=batch_size,
                       with_metadata=True, cache=False)
  return score_dataset(model, ds, keep_images=keep_images, taps=taps)
