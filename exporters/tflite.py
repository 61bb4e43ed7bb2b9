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

`convert_tflite_uint8_image` makes the variant for devices (`tflite_uint8_image` in
covidlib-export): it takes the decoded gray image as it is, uint8 (1, H, W, 1) of any size, and
does the scaling and antialiased resize of `covidlib.preprocess` inside the graph with builtin
ops (the resize as two products with weight matrices computed from the run-time size), so an app
hands over the bitmap; `covidlib.edge` runs it without TensorFlow.

Labels and the operating point travel inside the file: entries `covidlib_labels` and
`covidlib_decision` of the flatbuffer's `metadata` table, defined (written and read, without
TensorFlow) by `covidlib.tflite_metadata`; `read_metadata` here is that module's.
A shift score (issues #10, #17) adds the entry `covidlib_shift` (shift.json of `covidlib.shift`:
{"threshold", "policy", "taps", ...}; in_distribution = shift_score <= threshold) and a second
output tensor `shift_score`.
The exporter also writes labels.txt and decision.json next to the .tflite files.

Shift score (`covidlib.shift`): when given one (or converting a SavedModel that returns one),
every variant has a second output `shift_score` (float32 (1,); int8 with int8_io): at each depth
the score reads (`covidlib.models.tap_model`: the per-channel mean and standard deviation of a
stage's output, and the penultimate features), the standardised squared Mahalanobis distance to
the nearest class mean, then the largest of them, all with ordinary ops (MEAN, SQRT,
FULLY_CONNECTED, SUB, MUL, SUM, MIN, PACK, MAX), in the same invocation as `probability`; the
uint8_image variant computes it on the image after its in-graph resize and scaling, i.e. on the
same tensor as the others. Find the outputs by name with the interpreter's signature runner
(`get_signature_runner().get_output_details()`); `probability` is output 0 for apps that read
outputs by position. The int8 variant carries the penultimate depth alone, with that depth's
own threshold (`int8_shift_model`: 8-bit activations do not carry the whitened features of the
earlier depths); its covidlib_shift entry says so ("taps": the penultimate only, "variant").
Its score is quantized on the calibration images' range, and large scores saturate at its top.
The training images alone all score below the threshold (the density was fitted on them), so a
far-out image would saturate below it and pass as in distribution; the converter therefore
appends to the calibration images SHIFT_ANCHORS inverted copies (1 - x) of them that score
above the threshold (checked with the float model), which stretches the range past it. The flag
then survives where the value does not (tests/exporters/test_shift_exports.py).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Iterable

import keras
import numpy as np
import tensorflow as tf

from covidlib import errors
from covidlib import model_dir as model_dir_lib
from covidlib import models
from covidlib import scoring
from covidlib import shift as shift_lib
from covidlib import tflite_metadata
from exporters import saved_model as saved_model_lib
from exporters import serving

QUANT_TYPES = ('fp32', 'dynamic', 'fp16', 'int8')
LABELS_METADATA = tflite_metadata.LABELS
DECISION_METADATA = tflite_metadata.DECISION
OUTPUT = 'probability'
INPUT = 'images'
SHIFT_METADATA = tflite_metadata.SHIFT
SHIFT_OUTPUT = 'shift_score'
SHIFT_ANCHORS = 2  # Out-of-distribution calibration images for int8 (see the module docstring).
INT8_SHIFT_NOTE = ('int8: the shift score of the penultimate depth alone, with its own threshold; '
                   '8-bit activations do not carry the whitened features of the earlier depths')


def _probability_saved_model(source: keras.Model | str, out_dir: str,
                             shift_model=None) -> tuple[int, int]:
  """Writes a one-signature SavedModel: images float32 (None, S, S, C) -> {'probability': (None,)}
  (and 'shift_score' (None,) with a shift model, or from a SavedModel that returns it).

  Returns (S, C).
  """
  if isinstance(source, keras.Model):
    image_size, channels = serving.model_geometry(source)
    archive = keras.export.ExportArchive()
    outputs = _outputs(source, shift_model, archive)
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


def _outputs(source: keras.Model, shift_model, archive):
  """images float32 (N, S, S, C) -> {'probability': (N,)} (and 'shift_score' (N,) with a shift
  model), in one forward pass; tracks the Keras models it calls in `archive`."""
  archive.track(source)
  if shift_model is None:
    return lambda images: {OUTPUT: tf.reshape(source(images, training=False), [-1])}
  with_features = models.tap_model(source, shift_model.tap_names, shift_model.feature_dims)
  archive.track(with_features)

  def outputs(images):
    probability, *features = with_features(images, training=False)
    return {OUTPUT: tf.reshape(probability, [-1]),
            SHIFT_OUTPUT: serving.shift_score_tf(shift_model, features)}
  return outputs


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
                   shift_model=None, class_names=tflite_metadata.CLASS_NAMES) -> bytes:
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
  if quant_type == 'int8':
    shift_model = int8_shift_model(shift_model)
  shift_entry = _shift_entry(source, shift_model, int8=quant_type == 'int8')

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
  entries = dict(tflite_metadata.covidlib_entries(decision, class_names=class_names))
  if shift_entry is not None:
    entries[SHIFT_METADATA] = shift_entry
    flatbuffer = _probability_first(flatbuffer)
  return embed_metadata(flatbuffer, entries)


def _probability_first(flatbuffer: bytes) -> bytes:
  """The flatbuffer with `probability` as output 0 of its subgraph.

  With a second output the converter may put `shift_score` first; apps that read outputs by
  position (Android `Interpreter.run`, iOS `output(at: 0)`) must still get P(COVID-19). The
  signature maps names to tensors, not to positions, so it stays as it is.
  """
  from ai_edge_litert.tools import flatbuffer_utils  # Optional (covidlib[litert]), as metadata.

  model = flatbuffer_utils.read_model_from_bytearray(bytearray(flatbuffer))
  names = {(m.name.decode() if isinstance(m.name, bytes) else m.name): m.tensorIndex
           for m in model.signatureDefs[0].outputs}
  subgraph = model.subgraphs[model.signatureDefs[0].subgraphIndex or 0]
  outputs = [int(i) for i in subgraph.outputs]
  index = names.get(OUTPUT)
  if index is None or index not in outputs or outputs[0] == index:
    return flatbuffer
  subgraph.outputs = [index] + [i for i in outputs if i != index]
  return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _with_shift_anchors(source, images: np.ndarray, threshold: float, shift_model) -> np.ndarray:
  """`images` plus up to SHIFT_ANCHORS inverted copies scoring above the shift threshold."""
  if images.ndim != 4 or not len(images):
    return images  # _representative reports the problem.
  candidates = 1.0 - images[:8 * SHIFT_ANCHORS]
  if isinstance(source, keras.Model):
    batches = tf.data.Dataset.from_tensor_slices(
        (candidates, np.zeros(len(candidates), np.int64))).batch(8 * SHIFT_ANCHORS)
    scores = shift_model.score(scoring.score_dataset(source, batches, taps=True).taps)
  else:
    signature = tf.saved_model.load(source).signatures[saved_model_lib.PREPROCESSED_SIGNATURE]
    scores = signature(images=tf.constant(candidates))[SHIFT_OUTPUT].numpy()
  order = np.argsort(-scores)[:SHIFT_ANCHORS]
  chosen = order[scores[order] > threshold]
  if not chosen.size:
    logging.getLogger(__name__).warning(
        'int8 shift score: no inverted calibration image scores above the threshold %g; far-out '
        'images may saturate below it', threshold)
  return np.concatenate([images, candidates[chosen]])


def int8_shift_model(shift_model):
  """The shift score the int8 variant carries: the deepest depth alone (the penultimate
  features), with its own threshold; a one-depth score as it is.

  Why: in the int8 file every activation is rounded to 8 bits, and the whitening of the earlier
  depths' pooled features (directions of tiny variance, which carry much of a site's signature)
  amplifies that rounding into errors of several standard deviations (measured on the same-site
  models: up to 22 at the first stage even with the score's own arithmetic in float; 0.4 at the
  penultimate features; benchmarks/shift.py), so the multi-depth flag would not survive.
  """
  if shift_model is None or len(shift_model.taps) == 1:
    return shift_model
  return shift_model.single_tap(shift_model.tap_names[-1])


def _shift_entry(source, shift_model, int8: bool = False) -> bytes | None:
  """shift.json for the metadata: from the shift model, or the SavedModel's assets.extra."""
  if shift_model is not None:
    if shift_model.threshold is None:
      raise errors.UsageError('the shift model has no threshold: choose one before exporting')
    info = shift_model.info()
    if int8 and shift_model.format > 1:
      info['variant'] = INT8_SHIFT_NOTE
    return (json.dumps(info, indent=2, sort_keys=True) + '\n').encode()
  if isinstance(source, str):
    path = os.path.join(source, 'assets.extra', shift_lib.SHIFT_JSON)
    if os.path.isfile(path):
      with open(path, 'rb') as f:
        content = f.read()
      if int8 and len(json.loads(content).get('taps') or [None]) > 1:
        raise errors.UsageError(
            f'{source}: its shift score reads several depths, which int8 cannot carry: convert '
            'the int8 variant from the Keras model (covidlib-export does)')
      return content
  return None


# ------------------------------------------------------------------ The any-size uint8 variant.

UINT8_IMAGE_INPUT = 'image'
UINT8_IMAGE_QUANT_TYPES = ('fp32', 'dynamic')


def _resize_matrix(in_size: tf.Tensor, out_size: int) -> tf.Tensor:
  """float32 (out_size, in_size): `tf.image.resize(..., 'bilinear', antialias=True)` along one
  axis as a dense matrix, built from the input's run-time size with TFLite builtin ops.

  The same triangle weights as TensorFlow's ScaleAndTranslate kernel (and
  `covidlib.edge.resize_spans`): output i samples the input at (i + 0.5) / scale with a triangle
  of radius max(1 / scale, 1), weights normalised to sum 1. That kernel itself is not a TFLite
  op; a product with this matrix is (BatchMatMul).
  """
  in_f = tf.cast(in_size, tf.float32)
  scale = tf.constant(float(out_size), tf.float32) / in_f
  inv_scale = 1.0 / scale
  inv_kernel_scale = 1.0 / tf.maximum(inv_scale, 1.0)
  sample = (tf.range(out_size, dtype=tf.float32) + 0.5) * inv_scale
  source = tf.cast(tf.range(in_size), tf.float32) + 0.5
  weights = tf.nn.relu(1.0 - tf.abs((source[tf.newaxis, :] - sample[:, tf.newaxis])
                                    * inv_kernel_scale))
  return weights * (1.0 / tf.reduce_sum(weights, axis=1, keepdims=True))


def preprocess_in_graph(image: tf.Tensor, image_size: int, channels: int) -> tf.Tensor:
  """uint8 (1, H, W, 1) -> float32 (1, S, S, C): covidlib.preprocess.preprocess in builtin ops."""
  x = tf.cast(image[0, :, :, 0], tf.float32) / 255.0
  shape = tf.shape(x)
  x = tf.matmul(tf.matmul(_resize_matrix(shape[0], image_size), x),
                _resize_matrix(shape[1], image_size), transpose_b=True)
  x = tf.clip_by_value(x, 0.0, 1.0)[tf.newaxis, :, :, tf.newaxis]
  return tf.concat([x] * channels, axis=-1) if channels > 1 else x


def uint8_image_input(image_size: int, channels: int, shift: bool = False) -> dict:
  """The `covidlib_input` metadata of the uint8_image variant (what an app must hand over);
  with `shift`, it also names the second output, `shift_score`."""
  described = {
      'kind': 'uint8_image', 'signature': 'serving_default', 'name': UINT8_IMAGE_INPUT,
      'dtype': 'uint8',
      'shape': [1, -1, -1, 1], 'layout': 'NHWC', 'image_size': image_size,
      'channels': channels,
      'pixels': 'the decoded image as displayed, one 8-bit gray channel (0 = black), any '
                'height and width; colour as BT.601 luma round(0.2989 R + 0.5870 G + 0.1140 B)',
      'in_graph': f'x / 255, antialiased bilinear resize to {image_size} x {image_size} '
                  '(aspect ratio not kept), clip to [0, 1]',
      'output': {'name': OUTPUT, 'dtype': 'float32', 'shape': [1],
                 'meaning': 'calibrated P(COVID-19); label = probability >= threshold'},
  }
  if shift:
    described['shift_output'] = {
        'name': SHIFT_OUTPUT, 'dtype': 'float32', 'shape': [1],
        'meaning': 'out-of-distribution score of the preprocessed image (covidlib.shift); '
                   f'in_distribution = shift_score <= the threshold of {SHIFT_METADATA}'}
  return described


def convert_tflite_uint8_image(model: keras.Model, quant_type: str = 'dynamic',
                               decision: model_dir_lib.Decision | None = None,
                               shift_model=None,
                               class_names=tflite_metadata.CLASS_NAMES) -> bytes:
  """A .tflite that takes the decoded gray image as it is: uint8 (1, H, W, 1), any H and W.

  Scaling and the antialiased resize of `covidlib.preprocess` run inside the graph, so an app
  hands over the bitmap. Full-integer int8 is not offered: the resize runs on the image's
  run-time size, which int8 calibration cannot cover; 'dynamic' (int8 weights, float
  activations) gives the small file.

  Args:
    model: the inference model (float32 (S, S, C) in [0, 1] -> sigmoid 'probability').
    quant_type: one of UINT8_IMAGE_QUANT_TYPES.
    decision: the operating point; its temperature is folded into the model.
    shift_model: a covidlib.shift.ShiftModel with a threshold, to add the `shift_score`
      output (computed on the image after the in-graph resize and scaling, as every other
      variant computes it on its input) and the covidlib_shift metadata entry; None: neither.

  Returns:
    The .tflite flatbuffer with labels, decision and the input description embedded
    (`covidlib.tflite_metadata`: covidlib_input kind 'uint8_image'), and covidlib_shift with a
    shift model.

  Raises:
    UsageError: another quant_type, a model that is not a covidlib inference model, or a
      shift model without a threshold.
  """
  if quant_type not in UINT8_IMAGE_QUANT_TYPES:
    raise errors.UsageError(
        f'quantization type {quant_type!r} is not supported for the uint8_image variant '
        f'(supported: {", ".join(UINT8_IMAGE_QUANT_TYPES)})')
  if not isinstance(model, keras.Model):
    raise errors.UsageError(
        f'convert_tflite_uint8_image takes a keras.Model, got {type(model).__name__}')
  decision = decision or model_dir_lib.Decision()
  image_size, channels = serving.model_geometry(model)
  source = serving.serving_model(model, decision.temperature)
  shift_entry = _shift_entry(source, shift_model)

  with tempfile.TemporaryDirectory(prefix='covidlib_tflite_') as tmp:
    archive = keras.export.ExportArchive()
    outputs = _outputs(source, shift_model, archive)

    def serve(image):
      return outputs(preprocess_in_graph(image, image_size, channels))
    archive.add_endpoint(
        'serving_default', tf.function(serve),
        input_signature=[tf.TensorSpec((1, None, None, 1), tf.uint8, name=UINT8_IMAGE_INPUT)])
    archive.write_out(tmp, verbose=False)
    converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
    if quant_type == 'dynamic':
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
    flatbuffer = converter.convert()
  entries = tflite_metadata.covidlib_entries(
      decision, uint8_image_input(image_size, channels, shift=shift_entry is not None),
      class_names=class_names)
  if shift_entry is not None:
    entries[SHIFT_METADATA] = shift_entry
    flatbuffer = _probability_first(flatbuffer)
  return embed_metadata(flatbuffer, entries)


# The metadata format has one TensorFlow-free definition, shared with the edge route.
decision_json = tflite_metadata.decision_json
embed_metadata = tflite_metadata.embed_metadata
read_metadata = tflite_metadata.read_metadata
read_decision = tflite_metadata.read_decision
read_shift_threshold = tflite_metadata.read_shift_threshold
