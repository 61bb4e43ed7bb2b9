"""TFLite conversion: float32, dynamic-range, float16 and full-integer int8 models.

    from exporters import tflite
    data = tflite.convert_tflite('exports/seed_cnn/saved_model', 'int8',
                                 representative_images=train_images)  # float32 (N, S, S, C)
    open('model_int8.tflite', 'wb').write(data)

(`covidlib-export` calls this for each `tflite_*` format.) Every variant takes float32 (1, S, S, C)
in [0, 1], the output of `covidlib.preprocess.preprocess`, and returns `probability` (1,), the
calibrated P(COVID-19); with `int8_io=True` the int8 variant takes and returns int8 tensors
(scale and zero point in the interpreter's input/output details), for integer-only accelerators.

Quantization types (names as in tensorflow/models' `convert_tflite_model`):
  fp32     no quantization.
  dynamic  int8 weights, float activations (dynamic-range quantization).
  fp16     float16 weights.
  int8     int8 weights and activations, calibrated on `representative_images`, which should be
           100-200 images of the TRAINING split through the one preprocessing function.

Labels and the operating point travel inside the file: entries `covidlib_labels` and
`covidlib_decision` of the flatbuffer's `metadata` table, defined (written and read, without
TensorFlow) by `covidlib.tflite_metadata`; `read_metadata` here is that module's.
The exporter also writes labels.txt and decision.json next to the .tflite files.
"""

from __future__ import annotations

import os
import tempfile
from typing import Iterable

import keras
import numpy as np
import tensorflow as tf

from covidlib import errors
from covidlib import model_dir as model_dir_lib
from covidlib import tflite_metadata
from exporters import saved_model as saved_model_lib
from exporters import serving

QUANT_TYPES = ('fp32', 'dynamic', 'fp16', 'int8')
LABELS_METADATA = tflite_metadata.LABELS
DECISION_METADATA = tflite_metadata.DECISION
OUTPUT = 'probability'
INPUT = 'images'


def _probability_saved_model(source: keras.Model | str, out_dir: str) -> tuple[int, int]:
  """Writes a one-signature SavedModel: images float32 (None, S, S, C) -> {'probability': (None,)}.

  Returns (S, C).
  """
  if isinstance(source, keras.Model):
    image_size, channels = serving.model_geometry(source)
    archive = keras.export.ExportArchive()
    archive.track(source)
    archive.add_endpoint(
        'serving_default',
        tf.function(lambda images: {OUTPUT: tf.reshape(source(images, training=False), [-1])}),
        input_signature=[tf.TensorSpec((None, image_size, image_size, channels), tf.float32,
                                       name=INPUT)])
    archive.write_out(out_dir, verbose=False)
    return image_size, channels
  loaded = tf.saved_model.load(source)
  try:
    signature = loaded.signatures[saved_model_lib.PREPROCESSED_SIGNATURE]
  except KeyError:
    raise errors.UsageError(
        f'SavedModel {source!r} has no {saved_model_lib.PREPROCESSED_SIGNATURE!r} signature: '
        'export it with exporters.saved_model') from None
  spec = signature.structured_input_signature[1][saved_model_lib.TENSOR_INPUT]
  module = tf.Module()
  module.loaded = loaded  # Tracks the variables.
  module.serve = tf.function(
      lambda images: {OUTPUT: signature(images=images)['probability']},
      input_signature=[tf.TensorSpec(spec.shape, tf.float32, name=INPUT)])
  tf.saved_model.save(module, out_dir, signatures={'serving_default': module.serve})
  return int(spec.shape[1]), int(spec.shape[3])


def _saved_model_decision(saved_model_dir: str) -> model_dir_lib.Decision:
  extra = os.path.join(saved_model_dir, 'assets.extra')
  return model_dir_lib.load_decision(extra)


def _check_source(source) -> None:
  if isinstance(source, keras.Model):
    return
  if not isinstance(source, (str, os.PathLike)):
    raise errors.UsageError(
        f'convert_tflite takes a keras.Model or a SavedModel folder, got {type(source).__name__}')
  path = os.fspath(source)
  if not os.path.isfile(os.path.join(path, 'saved_model.pb')):
    raise errors.UsageError(f'{path!r} is not a SavedModel folder (no saved_model.pb)')


def _representative(images, image_size: int, channels: int):
  """Validates calibration images; returns a generator factory for the converter."""
  if images is None:
    raise errors.UsageError(
        'quantization type int8 needs representative_images: 100-200 preprocessed images of '
        'the training split (covidlib-export: --dataset/--data_dir)')
  array = np.asarray(images, dtype=np.float32)
  want = (image_size, image_size, channels)
  if array.ndim != 4 or array.shape[1:] != want or not len(array):
    raise errors.UsageError(
        f'representative_images must be float32 (N, {image_size}, {image_size}, {channels}) '
        f'with N >= 1, got shape {array.shape}')
  if array.min() < 0.0 or array.max() > 1.0:
    raise errors.UsageError(
        'representative_images must be preprocessed to [0, 1] (covidlib.preprocess.preprocess), '
        f'got values in [{array.min():g}, {array.max():g}]')
  return lambda: ([image[np.newaxis]] for image in array)


def convert_tflite(source: keras.Model | str | os.PathLike, quant_type: str,
                   representative_images: Iterable[np.ndarray] | np.ndarray | None = None,
                   int8_io: bool = False,
                   decision: model_dir_lib.Decision | None = None) -> bytes:
  """Converts an inference model or a covidlib SavedModel to TFLite bytes.

  Args:
    source: a keras.Model (the inference model: float32 (S, S, C) -> sigmoid 'probability'), or
      a SavedModel folder written by `exporters.saved_model` (its `serving_preprocessed`
      signature is converted; it is already calibrated).
    quant_type: one of QUANT_TYPES.
    representative_images: for 'int8' only: float32 (N, S, S, C) in [0, 1].
    int8_io: for 'int8' only: int8 input and output tensors instead of float32.
    decision: the operating point. For a keras.Model its temperature is folded into the model
      (default: threshold 0.5, temperature 1); for a SavedModel the one stored in its
      assets.extra is used and this must be None.

  Returns:
    The .tflite flatbuffer, with labels and decision embedded (see `read_metadata`).

  Raises:
    UsageError: unsupported quant_type, int8 options for another type, missing or malformed
      representative images, a source that is neither a model nor a covidlib SavedModel.
  """
  if quant_type not in QUANT_TYPES:
    raise errors.UsageError(
        f'quantization type {quant_type!r} is not supported (supported: {", ".join(QUANT_TYPES)})')
  if int8_io and quant_type != 'int8':
    raise errors.UsageError(f'int8_io needs quantization type int8, not {quant_type!r}')
  if representative_images is not None and quant_type != 'int8':
    raise errors.UsageError(
        f'representative_images are only used by quantization type int8, not {quant_type!r}')
  _check_source(source)
  if isinstance(source, keras.Model):
    decision = decision or model_dir_lib.Decision()
    source = serving.serving_model(source, decision.temperature)
  else:
    if decision is not None:
      raise errors.UsageError('a SavedModel carries its own decision; pass decision=None')
    source = os.fspath(source)
    decision = _saved_model_decision(source)

  with tempfile.TemporaryDirectory(prefix='covidlib_tflite_') as tmp:
    size, channels = _probability_saved_model(source, tmp)
    converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
    if quant_type != 'fp32':
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quant_type == 'fp16':
      converter.target_spec.supported_types = [tf.float16]
    if quant_type == 'int8':
      converter.representative_dataset = _representative(representative_images, size, channels)
      converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
      if int8_io:
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    flatbuffer = converter.convert()
  return embed_metadata(flatbuffer, tflite_metadata.covidlib_entries(decision))


# The metadata format has one TensorFlow-free definition, shared with the edge route.
decision_json = tflite_metadata.decision_json
embed_metadata = tflite_metadata.embed_metadata
read_metadata = tflite_metadata.read_metadata
read_decision = tflite_metadata.read_decision
