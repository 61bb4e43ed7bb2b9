"""SavedModel export: encoded image bytes in, calibrated P(COVID-19) and a decision out.

    from exporters import saved_model
    saved_model.export_saved_model('runs/seed_cnn', 'exports/seed_cnn/saved_model')

(`covidlib-export` calls this.) Two signatures, both returning `probability` (float32, P(COVID-19)
after the stored temperature), `label` (int32, 1 = COVID-19 when probability >= threshold) and
`threshold` (float32), one value per image:

  serving_default       image_bytes: tf.string (None,), encoded PNG, JPEG, BMP or GIF files (any
                        bit depth; gray, RGB or RGBA). covidlib's one preprocessing function
                        (`decode_image` + `preprocess`) runs inside the graph, per image.
  serving_preprocessed  images: float32 (None, S, S, C) in [0, 1], already preprocessed.

When the model_dir holds a shift score (shift.npz + shift.json, `covidlib.shift`, issues #10
and #17), both signatures also return `shift_score` (float32: at several depths of the network,
the squared Mahalanobis distance of the image's pooled features to the nearest class of the
training images, standardised on the validation images, and the largest of them; computed
in-graph from the same forward pass), `in_distribution` (bool, shift_score <= the shift
threshold) and `shift_threshold` (float32); assets.extra/shift.json documents the score.

It loads with `tf.saved_model.load` alone (no covidlib, no Keras needed) and follows TF Serving's
REST conventions: the input name ends in `_bytes`, so TF Serving base64-decodes `{"b64": ...}`:

    curl -d '{"instances": [{"b64": "'"$(base64 -w0 xray.png)"'"}]}' \\
      http://localhost:8501/v1/models/covidlib:predict
    -> {"predictions": [{"probability": 0.93, "label": 1, "threshold": 0.5}]}

A batch holding a file that is not a decodable image (or one declaring more than
`covidlib.preprocess.DEFAULT_MAX_PIXELS` pixels) fails that request with InvalidArgumentError
naming the problem; the server process lives on. No augmentation is inside.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from typing import Sequence

import keras
import tensorflow as tf

import covidlib
from covidlib import model_dir as model_dir_lib
from covidlib import models
from covidlib import preprocess
from covidlib import shift as shift_lib
from exporters import serving

BYTES_INPUT = 'image_bytes'
TENSOR_INPUT = 'images'
DEFAULT_SIGNATURE = 'serving_default'
PREPROCESSED_SIGNATURE = 'serving_preprocessed'
LABELS_FILE = 'labels.txt'
SHIFT_OUTPUT = 'shift_score'


def labels_text(class_names=covidlib.CLASS_NAMES) -> str:
  """labels.txt: one class name per line, line index = label (0 normal, 1 covid unless the
  model_dir's config.json names its own classes)."""
  return ''.join(f'{name}\n' for name in class_names)


def _outputs(probability: tf.Tensor, threshold: float) -> dict[str, tf.Tensor]:
  probability = tf.reshape(tf.cast(probability, tf.float32), [-1])
  threshold = tf.constant(threshold, tf.float32)
  return {
      'probability': probability,
      'label': tf.cast(probability >= threshold, tf.int32),
      'threshold': tf.fill(tf.shape(probability), threshold),  # Per row: TF Serving's row format.
  }


def _shift_outputs(features: list[tf.Tensor], shift_model) -> dict[str, tf.Tensor]:
  score = serving.shift_score_tf(shift_model, features)
  threshold = tf.constant(shift_model.threshold, tf.float32)
  return {SHIFT_OUTPUT: score, 'in_distribution': score <= threshold,
          'shift_threshold': tf.fill(tf.shape(score), threshold)}


def build_archive(model: keras.Model, decision: model_dir_lib.Decision,
                  max_pixels: int = preprocess.DEFAULT_MAX_PIXELS,
                  shift_model=None) -> keras.export.ExportArchive:
  """The ExportArchive of `model` (the inference model) under `decision`, not yet written.

  With `shift_model` (a covidlib.shift.ShiftModel with a threshold) the signatures also return
  shift_score, in_distribution and shift_threshold.
  """
  image_size, channels = serving.model_geometry(model)
  calibrated = serving.serving_model(model, decision.temperature)
  threshold = float(decision.threshold)

  archive = keras.export.ExportArchive()
  archive.track(calibrated)
  if shift_model is not None:
    with_features = models.tap_model(calibrated, shift_model.tap_names,
                                     shift_model.feature_dims)
    archive.track(with_features)

  def from_tensors(images):
    if shift_model is None:
      return _outputs(calibrated(images, training=False), threshold)
    probability, *features = with_features(images, training=False)
    return {**_outputs(probability, threshold), **_shift_outputs(features, shift_model)}

  def from_bytes(image_bytes):
    def one(contents):
      return preprocess.preprocess(preprocess.decode_image(contents, max_pixels=max_pixels),
                                   image_size, channels)
    images = tf.map_fn(one, image_bytes,
                       fn_output_signature=tf.TensorSpec((image_size, image_size, channels),
                                                         tf.float32))
    return from_tensors(images)

  # Named arguments become the signature's input names (TF Serving's JSON keys).
  archive.add_endpoint(
      DEFAULT_SIGNATURE, tf.function(lambda image_bytes: from_bytes(image_bytes)),
      input_signature=[tf.TensorSpec((None,), tf.string, name=BYTES_INPUT)])
  archive.add_endpoint(
      PREPROCESSED_SIGNATURE, tf.function(lambda images: from_tensors(images)),
      input_signature=[tf.TensorSpec((None, image_size, image_size, channels), tf.float32,
                                     name=TENSOR_INPUT)])
  return archive


def export_saved_model(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                       model: keras.Model | None = None,
                       max_pixels: int = preprocess.DEFAULT_MAX_PIXELS) -> str:
  """Writes the SavedModel of a model_dir's model.keras (and decision.json) to `out_dir`.

  Args:
    model_dir: a finished training run (config.json, model.keras, optional decision.json).
    out_dir: where the SavedModel goes; must not exist yet (covidlib-export builds into a
      temporary folder and renames it).
    model: the already loaded model.keras, to skip loading it again.
    max_pixels: the decompression-bomb limit of the bytes signature.

  Returns:
    `out_dir`. Besides the SavedModel it holds assets.extra/{labels.txt,decision.json}, and
    shift.json when the model_dir has a shift score.

  Raises:
    UsageError: model_dir is not a finished run, or `out_dir` exists.
    ModelLoadError: model.keras does not load (safely).
  """
  model_dir = model_dir_lib.check_model_dir(model_dir)
  out_dir = os.fspath(out_dir)
  if os.path.exists(out_dir):
    raise covidlib.errors.UsageError(f'SavedModel output {out_dir!r} already exists')
  config = model_dir_lib.load_config(model_dir)
  decision = model_dir_lib.load_decision(model_dir)
  if model is None:
    model = model_dir_lib.load_model(model_dir)
  serving.check_geometry(model, config)
  shift_model = shift_lib.load(model_dir)
  if shift_model is not None and shift_model.threshold is None:
    shift_model = None
  archive = build_archive(model, decision, max_pixels=max_pixels, shift_model=shift_model)
  try:
    archive.write_out(out_dir, verbose=False)
    extra = os.path.join(out_dir, 'assets.extra')  # Read by TF Serving's warmup; ignored here.
    model_dir_lib.write_bytes_atomic(os.path.join(extra, LABELS_FILE),
                                     labels_text(model_dir_lib.class_names(config)).encode())
    model_dir_lib.save_decision(extra, decision)
    if shift_model is not None:
      model_dir_lib.write_bytes_atomic(os.path.join(extra, shift_lib.SHIFT_JSON),
                                       shift_lib.info_json(shift_model).encode())
  except BaseException:
    shutil.rmtree(out_dir, ignore_errors=True)
    raise
  return out_dir


def rest_request(images: Sequence[bytes]) -> str:
  """The TF Serving REST body for encoded images: {"instances": [{"b64": ...}, ...]}."""
  return json.dumps({'instances': [{'b64': base64.b64encode(b).decode('ascii')}
                                   for b in images]})
