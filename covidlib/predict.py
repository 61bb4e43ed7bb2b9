"""One prediction API over every model format: .keras, SavedModel folder, .tflite.

    from covidlib import predict
    predictor = predict.Predictor('exports/seed_cnn/model_int8.tflite')
    for result in predictor.predict_files(['a.png', 'b.dcm', 'notes.txt']):
      print(result.path, result.probability, result.label, result.error)

(The `covidlib-predict` binary wraps this.) Files go through the one preprocessing function
(`covidlib.preprocess`; DICOM through `covidlib.dicom` first), so every backend sees the same
tensor. A file that cannot be read gives a result with `error` set, and the others are still
predicted. Label 1 = COVID-19; `label = probability >= threshold`, with the threshold and
temperature of the model's decision.json:

  model.keras / model_dir   decision.json next to model.keras; temperature applied here.
  SavedModel folder         its signatures return calibrated probabilities and labels.
  .tflite                   decision embedded in the file (`covidlib.tflite_metadata`), else a
                            decision.json beside it; the temperature is folded into the weights.
                            The uint8_image variant takes the decoded image (TensorFlow's
                            decoding here) and resizes it in its graph; it runs through
                            `covidlib.edge`.

Distribution shift (issues #10 and #17, `covidlib.shift`): when the model carries a shift score
(shift.npz and shift.json in the model_dir, scored here from the pooled features at several
depths of the same forward pass; the `shift_score` output of a SavedModel or .tflite export,
which computes the same score in its graph), every Prediction also has `shift_score` and
`in_distribution` (score <= the stored threshold);
both are None for a model without one. `on_shift='warn'` (default) still gives the label of a
flagged image; `on_shift='abstain'` gives it no label, and its `decision` is
'out_of_distribution'.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterable, Sequence

import numpy as np
import tensorflow as tf

from covidlib import calibration
from covidlib import dicom
from covidlib import edge
from covidlib import errors
from covidlib import model_dir as model_dir_lib
from covidlib import models
from covidlib import preprocess
from covidlib import results
from covidlib import shift as shift_lib
from covidlib import tflite_metadata

KERAS, SAVED_MODEL, TFLITE = 'keras', 'saved_model', 'tflite'
ON_SHIFT = ('warn', 'abstain')
OUT_OF_DISTRIBUTION = 'out_of_distribution'
_SHIFT_OUTPUT = edge.SHIFT_OUTPUT  # = exporters.saved_model.SHIFT_OUTPUT = exporters.tflite's.
_PREPROCESSED_SIGNATURE = 'serving_preprocessed'  # = exporters.saved_model.PREPROCESSED_SIGNATURE


Prediction = results.Prediction  # Shared with the TensorFlow-free edge route.


def detect_format(path: str | os.PathLike) -> str:
  """KERAS, SAVED_MODEL or TFLITE for a model path.

  Raises:
    UsageError: the path does not exist.
    ModelLoadError: it exists but is none of the supported model formats.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise errors.UsageError(f'model {path!r} does not exist')
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, 'saved_model.pb')):
      return SAVED_MODEL
    if os.path.isfile(os.path.join(path, model_dir_lib.MODEL)):
      return KERAS
    raise errors.ModelLoadError(
        f'{path}: folder holds neither saved_model.pb nor {model_dir_lib.MODEL}: not a model')
  if path.endswith('.keras'):
    return KERAS
  with open(path, 'rb') as f:
    head = f.read(8)
  if path.endswith('.tflite') or head[4:8] == b'TFL3':
    return TFLITE
  raise errors.ModelLoadError(
      f'{path}: not a model: expected a .keras file, a model_dir, a SavedModel folder or a '
      '.tflite file')


def read_image(path: str | os.PathLike, max_pixels: int = preprocess.DEFAULT_MAX_PIXELS
               ) -> np.ndarray:
  """Any supported file (PNG, JPEG, BMP, GIF, DICOM) -> uint8 (H, W, 1); InvalidImageError."""
  if dicom.is_dicom(path):
    return dicom.load_dicom(path)
  return preprocess.load_image(path, max_pixels=max_pixels)


def _graph_functions(max_pixels: int, image_size: int, channels: int):
  """(decode, preprocess): `covidlib.preprocess`'s two steps as tf.functions.

  The same ops, traced once: a file then costs two graph calls instead of ~60 eager op
  dispatches (about a third less time per image on our 2-core VM). Every path of a Predictor
  (files, DICOM pixels, arrays) preprocesses through the same graph, so they agree exactly.
  """
  decode = tf.function(lambda contents: preprocess.decode_image(contents, max_pixels),
                       input_signature=[tf.TensorSpec([], tf.string)])
  prepare = tf.function(lambda gray: preprocess.preprocess(gray, image_size, channels),
                        input_signature=[tf.TensorSpec([None, None, 1], tf.uint8)])
  return decode, prepare


class Predictor:
  """Loads a model once and predicts images with its stored operating point.

  Attributes:
    path, format (KERAS / SAVED_MODEL / TFLITE), image_size, channels, decision.
  """

  def __init__(self, path: str | os.PathLike, *, num_threads: int | None = None,
               max_pixels: int = preprocess.DEFAULT_MAX_PIXELS, on_shift: str = 'warn'):
    """Args:
      path: a .keras file, a model_dir, a SavedModel folder or a .tflite file.
      num_threads: TFLite interpreter threads (None: LiteRT's default).
      max_pixels: decompression-bomb limit for image files.
      on_shift: 'warn' (label every image, flag the out-of-distribution ones) or 'abstain'
        (no label for them: decision 'out_of_distribution').

    Raises:
      UsageError: path missing, bad on_shift. ModelLoadError: not a loadable model.
    """
    if on_shift not in ON_SHIFT:
      raise errors.UsageError(f'on_shift must be one of {", ".join(ON_SHIFT)}, got {on_shift!r}')
    self.on_shift = on_shift
    self.class_names: tuple[str, ...] = results.CLASS_NAMES  # Label 0, label 1.
    self.shift_threshold: float | None = None
    # The depths the shift score reads ('penultimate' alone for issue 10's score and the int8
    # TFLite variant), from shift.json or the file's metadata; None without a score.
    self.shift_taps: tuple[str, ...] | None = None
    self._run_shift = None  # images -> (P, shift scores), set by _load_shift when available.
    self._shift_tap_scores = None  # Keras: images -> (n, k) scores of each depth.
    self._shift_model = None
    self.path = os.fspath(path)
    self._edge = None  # An edge.EdgePredictor for the uint8_image TFLite variant.
    self.format = detect_format(self.path)
    self.max_pixels = max_pixels
    loader = {KERAS: self._load_keras, SAVED_MODEL: self._load_saved_model,
              TFLITE: self._load_tflite}[self.format]
    loader(num_threads)
    self._decode_graph, self._preprocess_graph = _graph_functions(
        self.max_pixels, self.image_size, self.channels)
    self._load_shift()

  # --- Backends: each sets image_size, channels, decision and self._run(float batch) -> P.

  def _load_keras(self, num_threads):
    del num_threads
    self.model = model_dir_lib.load_model(self.path)
    folder = self.path if os.path.isdir(self.path) else os.path.dirname(self.path)
    self.decision = model_dir_lib.load_decision(folder)
    if os.path.isfile(os.path.join(folder, model_dir_lib.CONFIG)):
      self.class_names = model_dir_lib.class_names(
          model_dir_lib.read_json(os.path.join(folder, model_dir_lib.CONFIG)))
    self.image_size, self.channels = _geometry(tuple(self.model.input_shape), self.path)

    def run(images):
      p = np.asarray(self.model(images, training=False), np.float32).reshape(-1)
      if self.decision.temperature == 1.0:
        return p  # Bit-exact with the model; calibration's round trip through logits is not.
      return calibration.apply_temperature(p, self.decision.temperature).astype(np.float32)
    self._run = run

  def _load_saved_model(self, num_threads):
    del num_threads
    try:
      loaded = tf.saved_model.load(self.path)
      signature = loaded.signatures[_PREPROCESSED_SIGNATURE]
    except KeyError:
      raise errors.ModelLoadError(
          f'{self.path}: SavedModel has no {_PREPROCESSED_SIGNATURE!r} signature: not exported '
          'by covidlib-export') from None
    except Exception as e:  # Corrupt protobuf, missing variables, ...
      raise errors.ModelLoadError(
          f'{self.path}: not a loadable SavedModel ({type(e).__name__}: {str(e)[:200]})') \
          from None
    self._loaded = loaded  # Keeps the variables alive.
    spec = next(iter(signature.structured_input_signature[1].values()))
    self.image_size, self.channels = _geometry(tuple(spec.shape), self.path)
    # The graph holds threshold and temperature; decision.json in assets.extra documents them.
    extra = os.path.join(self.path, 'assets.extra')
    self.decision = model_dir_lib.load_decision(extra)
    labels_path = os.path.join(extra, 'labels.txt')  # exporters.saved_model.LABELS_FILE
    if os.path.isfile(labels_path):
      with open(labels_path, encoding='utf-8') as f:
        names = tuple(line.strip() for line in f if line.strip())
      if len(names) == 2:
        self.class_names = names
    # The graph's threshold is the one its `label` output uses: it wins over the file.
    probe = signature(images=tf.zeros((1, self.image_size, self.image_size, self.channels)))
    threshold = float(probe['threshold'].numpy().reshape(-1)[0])
    if abs(threshold - self.decision.threshold) > 1e-6:
      self.decision = dataclasses.replace(self.decision, threshold=threshold,
                                          policy=f'from the SavedModel graph ({threshold:g})')

    def run(images):
      outputs = signature(images=tf.constant(images, tf.float32))
      return outputs['probability'].numpy().reshape(-1)
    self._run = run

  def _load_tflite(self, num_threads):
    try:
      from ai_edge_litert.interpreter import Interpreter  # Optional (covidlib[litert]).
    except ImportError:
      raise errors.ModelLoadError(
          f"{self.path}: running .tflite models needs ai-edge-litert: pip install "
          "'covidlib[litert]'") from None
    with open(self.path, 'rb') as f:
      content = f.read()
    try:
      interpreter = Interpreter(model_content=content, num_threads=num_threads)
      interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as e:
      raise errors.ModelLoadError(
          f'{self.path}: not a loadable TFLite model ({str(e).splitlines()[0][:200]})') from None
    self.interpreter = interpreter
    self.decision = _tflite_decision(content, self.path)
    try:
      self.class_names = (tflite_metadata.read_model_info(content).labels
                          or results.CLASS_NAMES)
    except errors.CovidlibError:
      pass  # Foreign metadata: covidlib's names, as for the decision.
    self._shift_output = None
    if _tflite_input_kind(content) == edge.UINT8_IMAGE:
      # Takes the decoded image as it is; the run-time resize of its input lives in covidlib.edge.
      self._edge = edge.EdgePredictor(self.path, num_threads=num_threads,
                                      max_pixels=self.max_pixels)
      self.image_size, self.channels = self._edge.image_size, self._edge.channels
      self.shift_threshold = self._edge.shift_threshold
      return
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    outputs, self._shift_output = edge.split_outputs(interpreter, outputs)
    if len(inputs) != 1 or len(outputs) != 1:
      raise errors.ModelLoadError(
          f'{self.path}: expected one input and one output, found {len(inputs)} and '
          f'{len(outputs)}: not a covidlib TFLite export')
    self._input, self._output = inputs[0], outputs[0]
    self._tflite_content = content
    self.image_size, self.channels = _geometry(tuple(self._input['shape']), self.path)

    def run(images):
      results = []
      for image in images:
        interpreter.set_tensor(self._input['index'], _quantize(image[np.newaxis], self._input))
        interpreter.invoke()
        results.append(_dequantize(interpreter.get_tensor(self._output['index']),
                                   self._output).reshape(-1)[0])
      return np.asarray(results, np.float32)
    self._run = run

  # --- Public API.

  @property
  def takes_uint8_image(self) -> bool:
    """True for the tflite uint8_image variant: decoded images of any size, no preprocessing."""
    return self._edge is not None

  def predict_preprocessed(self, images: np.ndarray) -> np.ndarray:
    """float32 (N, S, S, C) in [0, 1] -> calibrated P(COVID-19), float32 (N,)."""
    if self._edge is not None:
      raise errors.UsageError(
          f'{self.path} takes decoded uint8 images of any size (the uint8_image variant), not '
          'preprocessed ones: use predict_files or predict_array')
    images = np.asarray(images, np.float32)
    want = (self.image_size, self.image_size, self.channels)
    if images.ndim != 4 or images.shape[1:] != want:
      raise errors.UsageError(
          f'expected preprocessed images of shape (N, {want[0]}, {want[1]}, {want[2]}), got '
          f'{images.shape}')
    if not len(images):
      return np.zeros((0,), np.float32)
    return np.asarray(self._run(images), np.float32)

  def _preprocess(self, gray: np.ndarray) -> np.ndarray:
    if self._edge is not None:
      return gray
    return self._preprocess_graph(gray).numpy()

  def _read(self, path: str) -> np.ndarray:
    """`read_image(path)` with the decode graph; a file it refuses is read again eagerly by
    `read_image`, which raises the InvalidImageError naming it (the same message as ever)."""
    if not dicom.is_dicom(path):
      try:
        with open(path, 'rb') as f:
          contents = f.read()
        if contents:
          return self._decode_graph(tf.constant(contents)).numpy()
      except (OSError, tf.errors.InvalidArgumentError, tf.errors.UnknownError):
        pass
    return read_image(path, self.max_pixels)

  # --- Distribution shift (issue #10): one more output of the same forward pass.

  @property
  def has_shift(self) -> bool:
    return self._run_shift is not None or (self._edge is not None and self._edge.has_shift)

  def _load_shift(self) -> None:
    """Sets shift_threshold and _run_shift when the model carries a shift score."""
    if self.format == KERAS:
      folder = self.path if os.path.isdir(self.path) else os.path.dirname(self.path)
      fitted = shift_lib.load(folder)
      if fitted is None or fitted.threshold is None:
        return
      try:
        extractor = models.tap_model(self.model, fitted.tap_names, fitted.feature_dims)
      except errors.UsageError as e:
        raise errors.ModelLoadError(
            f'{os.path.join(folder, shift_lib.SHIFT_NPZ)}: fitted on another model ({e}); refit '
            f'it with covidlib-fit-shift --model_dir={folder}') from None
      temperature = self.decision.temperature

      def features_of(images):
        p, *features = extractor(images, training=False)
        p = np.asarray(p, np.float32).reshape(-1)
        return p, [np.asarray(f, np.float32).reshape(len(p), -1) for f in features]

      def run(images):
        p, features = features_of(images)
        if temperature != 1.0:
          p = calibration.apply_temperature(p, temperature).astype(np.float32)
        return p, fitted.score(features)
      self.shift_threshold, self._run_shift = float(fitted.threshold), run
      self.shift_taps, self._shift_model = fitted.tap_names, fitted
      self._shift_tap_scores = lambda images: fitted.tap_scores(features_of(images)[1])
    elif self.format == SAVED_MODEL:
      signature = self._loaded.signatures[_PREPROCESSED_SIGNATURE]
      if _SHIFT_OUTPUT not in signature.structured_outputs:
        return
      probe = signature(images=tf.zeros((1, self.image_size, self.image_size, self.channels)))
      self.shift_threshold = float(probe['shift_threshold'].numpy().reshape(-1)[0])
      info_path = os.path.join(self.path, 'assets.extra', shift_lib.SHIFT_JSON)
      if os.path.isfile(info_path):
        self.shift_taps = _shift_taps(model_dir_lib.read_json(info_path))

      def run(images):
        outputs = signature(images=tf.constant(images, tf.float32))
        return (outputs['probability'].numpy().reshape(-1),
                outputs[_SHIFT_OUTPUT].numpy().reshape(-1).astype(np.float64))
      self._run_shift = run
    elif self.format == TFLITE and self._shift_output is not None:
      threshold = _tflite_shift_threshold(self._tflite_content)
      if threshold is None:
        return
      interpreter = self.interpreter

      def run(images):
        p, scores = [], []
        for image in images:
          interpreter.set_tensor(self._input['index'], _quantize(image[np.newaxis], self._input))
          interpreter.invoke()
          p.append(_dequantize(interpreter.get_tensor(self._output['index']),
                               self._output).reshape(-1)[0])
          scores.append(_dequantize(interpreter.get_tensor(self._shift_output['index']),
                                    self._shift_output).reshape(-1)[0])
        return np.asarray(p, np.float32), np.asarray(scores, np.float64)
      self.shift_threshold, self._run_shift = threshold, run
      self.shift_taps = _tflite_shift_taps(self._tflite_content)
    elif self._edge is not None and self._edge.has_shift:
      with open(self.path, 'rb') as f:
        self.shift_taps = _tflite_shift_taps(f.read())

  def shift_scores_at(self, images: np.ndarray, tap: str) -> tuple[np.ndarray, float]:
    """The Keras model's shift scores of one depth alone and that depth's own threshold (what
    the int8 TFLite variant carries, exporters.tflite.int8_shift_model), for preprocessed
    images.

    Raises:
      UsageError: not a Keras model with a shift score, or no such depth.
    """
    if self._shift_tap_scores is None:
      raise errors.UsageError(f'{self.path}: the scores of one depth need a Keras model with a '
                              'shift score')
    single = self._shift_model.single_tap(tap)
    k = self.shift_taps.index(tap)
    return (self._shift_tap_scores(np.asarray(images, np.float32))[:, k],
            float(single.threshold))

  def predict_preprocessed_with_shift(self, images: np.ndarray
                                      ) -> tuple[np.ndarray, np.ndarray | None]:
    """Like predict_preprocessed, plus the shift scores (float64 (N,), None without a score)."""
    if self._run_shift is None:
      return self.predict_preprocessed(images), None
    images = np.asarray(images, np.float32)
    self.predict_preprocessed(images[:0])  # Validates the shape only.
    if not len(images):
      return np.zeros((0,), np.float32), np.zeros((0,), np.float64)
    p, scores = self._run_shift(np.asarray(images, np.float32))
    return np.asarray(p, np.float32), np.asarray(scores, np.float64)

  def _result(self, path: str, probability: float, shift_score: float | None = None
              ) -> Prediction:
    probability = float(probability)
    label = int(probability >= self.decision.threshold)
    if shift_score is None:
      return Prediction(path, probability, label, float(self.decision.threshold),
                        class_names=self.class_names)
    inside = bool(shift_score <= self.shift_threshold)
    abstain = not inside and self.on_shift == 'abstain'
    return Prediction(path, probability, None if abstain else label,
                      float(self.decision.threshold), shift_score=float(shift_score),
                      in_distribution=inside, abstained=abstain, class_names=self.class_names)

  def predict_array(self, image: np.ndarray, name: str = '<array>') -> Prediction:
    """Predicts one uint8 gray image, (H, W) or (H, W, 1)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
        image.ndim == 3 and image.shape[-1] != 1):
      raise errors.UsageError(
          f'predict_array takes a uint8 gray image (H, W) or (H, W, 1), got {image.dtype} '
          f'{image.shape}')
    if image.ndim == 2:
      image = image[..., np.newaxis]
    p, scores = self._predict_batch([self._preprocess(image)])
    return self._result(name, p[0], None if scores is None else scores[0])

  def _predict_batch(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """P(COVID-19) and the shift scores (None without a shift score) of `_preprocess`ed images."""
    if self._edge is not None:  # Images of their own sizes: one at a time.
      pairs = [self._edge.run_with_shift(self._edge.prepare(x)) for x in images]
      scores = np.asarray([s for _, s in pairs], np.float64) if self._edge.has_shift else None
      return np.asarray([p for p, _ in pairs], np.float32), scores
    if not self.has_shift:
      return self.predict_preprocessed(np.stack(images)), None
    return self.predict_preprocessed_with_shift(np.stack(images))

  def predict_files(self, paths: Iterable[str | os.PathLike], batch_size: int = 16,
                    workers: int | None = None) -> list[Prediction]:
    """One Prediction per path, in order; unreadable files get `error` and no probability.

    Files are decoded and preprocessed by `workers` threads (default: the CPU count; 0: on this
    thread) ahead of inference, which runs here in batches of `batch_size`.
    """
    if batch_size < 1:
      raise errors.UsageError(f'batch_size must be >= 1, got {batch_size}')
    paths = [os.fspath(p) for p in paths]
    out: list[Prediction | None] = [None] * len(paths)
    pending: list[tuple[int, np.ndarray]] = []

    def flush():
      if pending:
        probabilities, scores = self._predict_batch([x for _, x in pending])
        for k, ((i, _), p) in enumerate(zip(pending, probabilities)):
          out[i] = self._result(paths[i], p, None if scores is None else scores[k])
        pending.clear()

    def load(path):
      return self._preprocess(self._read(path))

    for i, (x, error) in enumerate(results.map_ordered(load, paths, workers)):
      if error is not None:
        out[i] = Prediction(paths[i], None, None, float(self.decision.threshold), error.reason)
      else:
        pending.append((i, x))
      if len(pending) >= batch_size:
        flush()
    flush()
    return out


def _geometry(shape: Sequence, path: str) -> tuple[int, int]:
  if len(shape) != 4 or shape[1] != shape[2] or shape[3] not in (1, 3) or not shape[1]:
    raise errors.ModelLoadError(
        f'{path}: model input shape {shape} is not (N, S, S, 1 or 3): not a covidlib model')
  return int(shape[1]), int(shape[3])


def _tflite_decision(content: bytes, path: str) -> model_dir_lib.Decision:
  """The decision embedded by covidlib-export, else decision.json beside the file, else 0.5."""
  try:
    embedded = tflite_metadata.read_decision(content)  # The metadata format's one definition.
  except (errors.CovidlibError, KeyError, ValueError, TypeError):
    embedded = None  # A foreign or damaged metadata entry: fall back to the sidecar.
  if embedded is not None:
    return embedded
  return model_dir_lib.load_decision(os.path.dirname(os.path.abspath(path)))


def _tflite_input_kind(content: bytes) -> str | None:
  """'uint8_image' for the any-size variant, else None (float or int8 preprocessed input)."""
  try:
    return (tflite_metadata.read_model_info(content).input or {}).get('kind')
  except errors.CovidlibError:
    return None


# Shared with the TensorFlow-free edge route.
_quantize = edge.quantize
_dequantize = edge.dequantize


def _shift_taps(info: dict) -> tuple[str, ...]:
  """The depths a shift.json's score reads (issue 10's format: the penultimate features)."""
  taps = info.get('taps')
  if not taps:
    return (shift_lib.PENULTIMATE,)
  return tuple(str(t.get('name', '')) if isinstance(t, dict) else str(t) for t in taps)


def _tflite_shift_taps(content: bytes) -> tuple[str, ...] | None:
  """The depths of the embedded shift score (metadata entry covidlib_shift), or None."""
  try:
    entry = tflite_metadata.read_model_info(content).extra.get('shift')
  except errors.CovidlibError:
    return None
  return _shift_taps(entry) if isinstance(entry, dict) else None


def _tflite_shift_threshold(content: bytes) -> float | None:
  """The shift threshold embedded by covidlib-export (metadata entry covidlib_shift), or None."""
  try:
    return tflite_metadata.read_shift_threshold(content)
  except (errors.CovidlibError, KeyError, ValueError, TypeError):
    return None
