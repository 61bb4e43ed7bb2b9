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

Labels and the operating point travel inside the file: two entries in the flatbuffer's
`metadata` table (the same mechanism the converter uses for its own `min_runtime_version` and
`CONVERSION_METADATA`), read back with `read_metadata`:
  covidlib_labels    labels.txt: 'normal\\ncovid\\n' (line index = label)
  covidlib_decision  decision.json: {"threshold", "temperature", "policy", "split",
                     "temperature_applied": true}: label = probability >= threshold; the
                     temperature is already folded into the model's weights.
  covidlib_shift     shift.json (only with a shift score, issue #10): {"threshold", "policy",
                     ...} of `covidlib.shift`; in_distribution = shift_score <= threshold.
The exporter also writes labels.txt and decision.json next to the .tflite files.

Shift score (`covidlib.shift`): when given one (or converting a SavedModel that returns one),
every variant has a second output `shift_score` (float32 (1,); int8 with int8_io), the squared
Mahalanobis distance computed from the penultimate features with ordinary ops (FULLY_CONNECTED,
SUB, MUL, SUM, MIN), in the same invocation as `probability`. Find the outputs by name with the
interpreter's signature runner (`get_signature_runner().get_output_details()`). The int8
variant's score is quantized on the calibration images' range, and large scores saturate at
its top. The training images alone all score below the threshold (the density was fitted on
them), so a far-out image would saturate below it and pass as in distribution; the converter
therefore appends to the calibration images SHIFT_ANCHORS inverted copies (1 - x) of them that
score above the threshold (checked with the float model), which stretches the range past it.
The flag then survives where the value does not (tests/exporters/test_shift_exports.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Iterable

import keras
import numpy as np
import tensorflow as tf

from covidlib import errors
from covidlib import model_dir as model_dir_lib
from exporters import saved_model as saved_model_lib
from exporters import serving

QUANT_TYPES = ('fp32', 'dynamic', 'fp16', 'int8')
LABELS_METADATA = 'covidlib_labels'
DECISION_METADATA = 'covidlib_decision'
OUTPUT = 'probability'
INPUT = 'images'
SHIFT_METADATA = 'covidlib_shift'
SHIFT_OUTPUT = 'shift_score'
SHIFT_ANCHORS = 2  # Out-of-distribution calibration images for int8 (see the module docstring).


def _probability_saved_model(source: keras.Model | str, out_dir: str,
                             shift_model=None) -> tuple[int, int]:
  """Writes a one-signature SavedModel: images float32 (None, S, S, C) -> {'probability': (None,)}
  (and 'shift_score' (None,) with a shift model, or from a SavedModel that returns it).

  Returns (S, C).
  """
  if isinstance(source, keras.Model):
    image_size, channels = serving.model_geometry(source)
    archive = keras.export.ExportArchive()
    archive.track(source)
    if shift_model is not None:
      from covidlib import shift as shift_lib

      with_features = shift_lib.feature_model(source)
      archive.track(with_features)

    def outputs(images):
      if shift_model is None:
        return {OUTPUT: tf.reshape(source(images, training=False), [-1])}
      probability, features = with_features(images, training=False)
      return {OUTPUT: tf.reshape(probability, [-1]),
              SHIFT_OUTPUT: shift_lib.score_tf(shift_model, features)}
    archive.add_endpoint(
        'serving_default', tf.function(outputs),
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
  with_shift = SHIFT_OUTPUT in signature.structured_outputs

  def outputs(images):
    result = signature(images=images)
    if with_shift:
      return {OUTPUT: result['probability'], SHIFT_OUTPUT: result[SHIFT_OUTPUT]}
    return {OUTPUT: result['probability']}
  module.serve = tf.function(
      outputs,
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
                   decision: model_dir_lib.Decision | None = None,
                   shift_model=None) -> bytes:
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
    shift_model: for a keras.Model: a covidlib.shift.ShiftModel with a threshold, to add the
      `shift_score` output and the covidlib_shift metadata entry. A SavedModel brings its own
      (assets.extra/shift.json) and this must be None.

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
    if shift_model is not None:
      raise errors.UsageError('a SavedModel carries its own shift score; pass shift_model=None')
    source = os.fspath(source)
    decision = _saved_model_decision(source)
  shift_entry = _shift_entry(source, shift_model)

  with tempfile.TemporaryDirectory(prefix='covidlib_tflite_') as tmp:
    size, channels = _probability_saved_model(source, tmp, shift_model)
    converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
    if quant_type != 'fp32':
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quant_type == 'fp16':
      converter.target_spec.supported_types = [tf.float16]
    if quant_type == 'int8':
      if shift_entry is not None:
        representative_images = _with_shift_anchors(
            source, np.asarray(representative_images, np.float32),
            json.loads(shift_entry)['threshold'], shift_model)
      converter.representative_dataset = _representative(representative_images, size, channels)
      converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
      if int8_io:
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    flatbuffer = converter.convert()
  entries = {
      LABELS_METADATA: saved_model_lib.labels_text().encode(),
      DECISION_METADATA: decision_json(decision).encode(),
  }
  if shift_entry is not None:
    entries[SHIFT_METADATA] = shift_entry
  return embed_metadata(flatbuffer, entries)


def _with_shift_anchors(source, images: np.ndarray, threshold: float, shift_model) -> np.ndarray:
  """`images` plus up to SHIFT_ANCHORS inverted copies scoring above the shift threshold."""
  if images.ndim != 4 or not len(images):
    return images  # _representative reports the problem.
  candidates = 1.0 - images[:8 * SHIFT_ANCHORS]
  if isinstance(source, keras.Model):
    from covidlib import shift as shift_lib

    scores = shift_model.score(shift_lib.penultimate_features(source, candidates))
  else:
    signature = tf.saved_model.load(source).signatures[saved_model_lib.PREPROCESSED_SIGNATURE]
    scores = signature(images=tf.constant(candidates))[SHIFT_OUTPUT].numpy()
  order = np.argsort(-scores)[:SHIFT_ANCHORS]
  chosen = order[scores[order] > threshold]
  if not chosen.size:
    import logging
    logging.getLogger(__name__).warning(
        'int8 shift score: no inverted calibration image scores above the threshold %g; far-out '
        'images may saturate below it', threshold)
  return np.concatenate([images, candidates[chosen]])


def _shift_entry(source, shift_model) -> bytes | None:
  """shift.json for the metadata: from the shift model, or the SavedModel's assets.extra."""
  from covidlib import shift as shift_lib

  if shift_model is not None:
    if shift_model.threshold is None:
      raise errors.UsageError('the shift model has no threshold: choose one before exporting')
    return shift_lib.info_json(shift_model).encode()
  if isinstance(source, str):
    path = os.path.join(source, 'assets.extra', shift_lib.SHIFT_JSON)
    if os.path.isfile(path):
      with open(path, 'rb') as f:
        return f.read()
  return None


def decision_json(decision: model_dir_lib.Decision) -> str:
  """decision.json as exported: the model_dir's fields plus temperature_applied = true."""
  data = dataclasses.asdict(decision)
  data['temperature_applied'] = True
  return json.dumps(data, indent=2, sort_keys=True) + '\n'


def embed_metadata(flatbuffer: bytes, entries: dict[str, bytes]) -> bytes:
  """Adds (or replaces) named entries of a .tflite flatbuffer's `metadata` table."""
  from ai_edge_litert import schema_py_generated as schema
  from ai_edge_litert.tools import flatbuffer_utils

  model = flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
  model.metadata = [m for m in (model.metadata or []) if m.name.decode() not in entries]
  for name, data in entries.items():
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(data, np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = name.encode()
    entry.buffer = len(model.buffers) - 1
    model.metadata.append(entry)
  return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def read_metadata(flatbuffer: bytes) -> dict[str, bytes]:
  """The `metadata` entries of a .tflite flatbuffer, by name (e.g. LABELS_METADATA)."""
  from ai_edge_litert import schema_py_generated as schema

  try:
    model = schema.Model.GetRootAs(flatbuffer, 0)
    entries = {}
    for i in range(model.MetadataLength()):
      entry = model.Metadata(i)
      buffer = model.Buffers(entry.Buffer())
      if buffer.Offset():  # Large models keep buffers after the flatbuffer, by offset.
        data = flatbuffer[buffer.Offset():buffer.Offset() + buffer.Size()]
      else:
        data = buffer.DataAsNumpy().tobytes() if buffer.DataLength() else b''
      entries[entry.Name().decode()] = bytes(data)
    return entries
  except Exception as e:  # A truncated or foreign file: flatbuffers raises assorted errors.
    raise errors.ModelLoadError(f'not a readable TFLite flatbuffer ({type(e).__name__}: {e})') \
        from None


def read_decision(flatbuffer: bytes) -> model_dir_lib.Decision | None:
  """The embedded operating point, or None if the file has none."""
  raw = read_metadata(flatbuffer).get(DECISION_METADATA)
  if raw is None:
    return None
  data = json.loads(raw)
  return model_dir_lib.Decision(threshold=float(data['threshold']), policy=str(data['policy']),
                                temperature=float(data.get('temperature', 1.0)),
                                split=str(data.get('split', '')))


def read_shift_threshold(flatbuffer: bytes) -> float | None:
  """The embedded shift threshold (covidlib_shift entry), or None if the file has none."""
  raw = read_metadata(flatbuffer).get(SHIFT_METADATA)
  if raw is None:
    return None
  threshold = json.loads(raw).get('threshold')
  return None if threshold is None else float(threshold)
