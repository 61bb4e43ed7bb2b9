"""Predicting from a .tflite file with LiteRT, numpy and Pillow alone: no TensorFlow.

    from covidlib import edge
    predictor = edge.EdgePredictor('export/model_uint8_image.tflite')  # or model_int8.tflite
    for result in predictor.predict_files(['a.png', 'b.dcm', 'notes.txt']):
      print(result.path, result.probability, result.label, result.error)

(The `covidlib-predict-edge` binary wraps this; `pip install --no-deps covidlib` plus
`ai-edge-litert numpy pillow` [+ `pydicom`] is the whole install, see README "On a device".)
Importing this module imports no TensorFlow, Keras, absl or `exporters`: it is tested in a venv
where TensorFlow is not even installed (tests/covidlib/test_edge_venv.py).

Two kinds of model, told apart by their input tensor:
  uint8_image   `covidlib-export --formats=tflite_uint8_image`: takes the decoded gray image as
                it is, uint8 (1, H, W, 1) of any size; resize and scaling are inside the graph.
                The interpreter's input is resized to each image (`resize_tensor_input`).
  preprocessed  every other covidlib variant: float32 (or int8) (1, S, S, C) in [0, 1]; this
                module preprocesses with numpy, using the same weights as TensorFlow's
                `tf.image.resize(..., 'bilinear', antialias=True)` (covidlib.preprocess), so the
                tensor matches TensorFlow's to float rounding (~1e-7, far within one gray level).
Decoding uses Pillow and gives the same uint8 gray image as `covidlib.preprocess.decode_image`
(BT.601 luma for colour, alpha dropped, 16-bit scaled by 1/257, first GIF frame), pixel for pixel
on PNG and on gray and colour JPEG (libjpeg's fast IDCT and fancy chroma upsampling, as
TensorFlow runs them; see `_jpeg_rgb`); DICOM goes
through `covidlib.dicom`, which is numpy and pydicom only. The labels, threshold and temperature
come from the file's metadata (`covidlib.tflite_metadata`), else a decision.json beside it.

Out of distribution (`covidlib.shift`): a variant exported with a shift score, uint8_image
included, has a second output `shift_score`, found by its signature name, and the threshold in
its covidlib_shift metadata entry; each Prediction then has `shift_score` and `in_distribution`
(score <= threshold), computed in the same invocation as the probability. Both are None for a
model without a shift score (or without its threshold), as in `covidlib.predict`.

Batches overlap decoding and inference: files are read and preprocessed by a thread pool (Pillow
and numpy release the GIL) while the interpreter runs on the calling thread, in input order.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Iterable

import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError

from covidlib import dicom
from covidlib import errors
from covidlib import model_dir as model_dir_lib
from covidlib import results
from covidlib import tflite_metadata

Prediction = results.Prediction

# As covidlib.preprocess: the decompression-bomb limit and ITU-R BT.601 luma weights.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
_LUMA = np.asarray((0.2989, 0.5870, 0.1140), np.float32)
UINT8_IMAGE = 'uint8_image'
SHIFT_OUTPUT = 'shift_score'  # = exporters.tflite.SHIFT_OUTPUT.


# ------------------------------------------------------------------ Decoding (Pillow).

def _pixels(image) -> np.ndarray:
  """A loaded PIL image -> uint8 (H, W, 1), as covidlib.preprocess.decode_image gives it."""
  mode = image.mode
  if mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I'):  # 16-bit gray (PNG): v / 257, rounded.
    values = np.asarray(image, np.float32)
    gray = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
  elif mode in ('L', 'LA', '1'):
    gray = np.asarray(image.convert('L') if mode == '1' else image)
    gray = gray[..., 0] if gray.ndim == 3 else gray
  else:  # RGB, RGBA, P, PA, CMYK, YCbCr...: to RGB, then luma (alpha dropped).
    return _luma(np.asarray(image if mode == 'RGB' else image.convert('RGB')))
  return np.ascontiguousarray(gray, np.uint8)[..., np.newaxis]


def _luma(rgb: np.ndarray) -> np.ndarray:
  """uint8 (H, W, 3) -> uint8 (H, W, 1): BT.601 luma in float32, rounded half to even (as TF)."""
  gray = np.clip(np.round(rgb.astype(np.float32) @ _LUMA), 0, 255).astype(np.uint8)
  return np.ascontiguousarray(gray)[..., np.newaxis]


def decode_bytes(contents: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """PNG, JPEG, BMP or GIF bytes -> uint8 (H, W, 1); InvalidImageError naming `name`."""
  if not contents:
    raise errors.InvalidImageError(name, 'empty file (0 bytes)')
  try:
    image = Image.open(io.BytesIO(contents))
  except UnidentifiedImageError:
    raise errors.InvalidImageError(name, 'not a decodable image (Unknown image file format)') \
        from None
  except Image.DecompressionBombError as e:  # Pillow's own limit, 2 x MAX_IMAGE_PIXELS (179 MP).
    if max_pixels < 2 * (Image.MAX_IMAGE_PIXELS or 0):
      raise errors.InvalidImageError(
          name, f'image declares more pixels than the limit of {max_pixels}') from None
    raise errors.InvalidImageError(name, f'not a decodable image ({str(e)[:160]})') from None
  except (OSError, ValueError, SyntaxError) as e:
    raise errors.InvalidImageError(name, f'not a decodable image ({str(e)[:160]})') from None
  width, height = image.size
  if width * height > max_pixels:  # Checked on the header, before a pixel is decoded.
    raise errors.InvalidImageError(
        name, f'image declares more pixels than the limit of {max_pixels}')
  try:
    if image.format == 'JPEG' and image.mode == 'RGB' and _jpeg_is_ycc(image):
      gray = _luma(_jpeg_rgb(image))
    else:
      if image.format == 'JPEG':
        image.decoderconfig = (1, 1)  # (scale, draft): TensorFlow's fast IDCT; see _jpeg_rgb.
      image.load()  # The first frame of a GIF.
      gray = _pixels(image)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise errors.InvalidImageError(name, f'not a decodable image ({str(e)[:160]})') from None
  if min(gray.shape[:2]) < 1:
    raise errors.InvalidImageError(name, f'not a decodable image (empty, {width} x {height})')
  return gray


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Any supported file (PNG, JPEG, BMP, GIF, DICOM) -> uint8 (H, W, 1); InvalidImageError."""
  path = os.fspath(path)
  if dicom.is_dicom(path):
    return dicom.load_dicom(path)
  try:
    with open(path, 'rb') as f:
      contents = f.read()
  except FileNotFoundError:
    raise errors.InvalidImageError(path, 'no such file') from None
  except IsADirectoryError:
    raise errors.InvalidImageError(path, 'is a directory, not an image file') from None
  except OSError as e:
    raise errors.InvalidImageError(path, f'cannot read: {e.strerror}') from None
  return decode_bytes(contents, path, max_pixels=max_pixels)


# JPEG, as TensorFlow decodes it. TensorFlow runs libjpeg with the fast integer IDCT
# (JDCT_IFAST) and fancy (triangle) chroma upsampling; Pillow runs the accurate IDCT, which makes
# 47% of the pixels of our gray JPEG X-rays differ by up to 20 levels. Pillow's draft flag
# selects JDCT_IFAST (giving TensorFlow's pixels exactly on gray JPEGs) but also turns fancy
# upsampling off. So colour JPEGs are decoded to raw YCbCr in draft mode (fast IDCT, chroma
# replicated), the chroma planes are taken back to their coded resolution, upsampled with
# libjpeg's fancy filters (jdsample.c) and converted with libjpeg's fixed-point YCbCr -> RGB
# (jdcolor.c). Measured on the 283 images of covid_xray_seed: all 102 colour JPEGs give
# TensorFlow's RGB bit for bit, as do all gray JPEGs and PNGs.

_SCALE, _HALF = 16, 1 << 15
_X = np.arange(256, dtype=np.int64) - 128
_CR_R = (int(1.40200 * (1 << _SCALE) + 0.5) * _X + _HALF) >> _SCALE
_CB_B = (int(1.77200 * (1 << _SCALE) + 0.5) * _X + _HALF) >> _SCALE
_CR_G = -int(0.71414 * (1 << _SCALE) + 0.5) * _X
_CB_G = -int(0.34414 * (1 << _SCALE) + 0.5) * _X + _HALF


def _jpeg_is_ycc(image) -> bool:
  """A 3-component YCbCr JPEG whose chroma subsampling _jpeg_rgb reproduces."""
  layers = getattr(image, 'layer', None) or []
  if len(layers) != 3 or image.info.get('adobe_transform') == 0:  # 0: RGB-coded, not YCbCr.
    return False
  hmax, vmax = max(l[1] for l in layers), max(l[2] for l in layers)
  return all((hmax // l[1], vmax // l[2]) in ((1, 1), (2, 1), (2, 2)) and
             hmax % l[1] == 0 and vmax % l[2] == 0 for l in layers[1:])


def _fancy_h2v1(plane: np.ndarray, width: int) -> np.ndarray:
  """libjpeg's h2v1_fancy_upsample: each pixel 3/4 itself, 1/4 its horizontal neighbour."""
  c = plane.astype(np.int32)
  out = np.empty((c.shape[0], 2 * c.shape[1]), np.int32)
  left = np.concatenate([c[:, :1], c[:, :-1]], axis=1)
  right = np.concatenate([c[:, 1:], c[:, -1:]], axis=1)
  out[:, 0::2] = (c * 3 + left + 1) >> 2
  out[:, 1::2] = (c * 3 + right + 2) >> 2
  out[:, 0], out[:, -1] = c[:, 0], c[:, -1]
  return out[:, :width]


def _fancy_h2v2(plane: np.ndarray, height: int, width: int) -> np.ndarray:
  """libjpeg's h2v2_fancy_upsample: a triangle filter (9/16, 3/16, 3/16, 1/16)."""
  c = plane.astype(np.int32)
  out = np.empty((2 * c.shape[0], 2 * c.shape[1]), np.int32)
  for v, other in ((0, np.concatenate([c[:1], c[:-1]])), (1, np.concatenate([c[1:], c[-1:]]))):
    col = c * 3 + other
    if c.shape[1] == 1:
      out[v::2, 0], out[v::2, 1] = (col[:, 0] * 4 + 8) >> 4, (col[:, 0] * 4 + 7) >> 4
      continue
    last = np.concatenate([col[:, :1], col[:, :-1]], axis=1)
    following = np.concatenate([col[:, 1:], col[:, -1:]], axis=1)
    even, odd = (col * 3 + last + 8) >> 4, (col * 3 + following + 7) >> 4
    even[:, 0], odd[:, -1] = (col[:, 0] * 4 + 8) >> 4, (col[:, -1] * 4 + 7) >> 4
    out[v::2, 0::2], out[v::2, 1::2] = even, odd
  return out[:height, :width]


def _jpeg_rgb(image) -> np.ndarray:
  """uint8 (H, W, 3): a YCbCr JPEG decoded as TensorFlow (libjpeg-turbo) decodes it."""
  layers = image.layer
  hmax, vmax = max(l[1] for l in layers), max(l[2] for l in layers)
  image.draft('YCbCr', image.size)  # Raw YCbCr out: no colour conversion by libjpeg.
  image.decoderconfig = (1, 1)  # (scale, draft): fast IDCT, chroma replicated.
  image.load()
  ycc = np.asarray(image)
  height, width = ycc.shape[:2]
  planes = [ycc[..., 0].astype(np.int64)]
  for k, (_, h, v, _) in enumerate(layers[1:], start=1):
    fh, fv = hmax // h, vmax // v
    coded = ycc[..., k][::fv, ::fh]
    if (fh, fv) == (1, 1):
      planes.append(ycc[..., k].astype(np.int64))
    elif (fh, fv) == (2, 1):
      planes.append(_fancy_h2v1(coded, width).astype(np.int64))
    else:
      planes.append(_fancy_h2v2(coded, height, width).astype(np.int64))
  y, cb, cr = planes
  rgb = np.stack([y + _CR_R[cr], y + ((_CB_G[cb] + _CR_G[cr]) >> _SCALE), y + _CB_B[cb]], -1)
  return np.clip(rgb, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------ Preprocessing (numpy).

def resize_spans(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """TensorFlow's antialiased bilinear ('triangle') resampling along one axis.

  The weights of `tf.image.resize(..., method='bilinear', antialias=True)`, i.e. of the
  ScaleAndTranslate kernel (tensorflow/core/kernels/image/scale_and_translate_op.cc) with
  scale = out / in and no translation: output pixel i samples the input at (i + 0.5) / scale
  with a triangle of radius max(1 / scale, 1) input pixels, weights normalised to sum 1.

  Returns:
    (starts int64 (out,), weights float32 (out, k)): output i = sum_t weights[i, t] *
    input[starts[i] + t], with k the span; weights past the end of the input are 0.
  """
  scale = np.float32(out_size) / np.float32(in_size)
  inv_scale = np.float32(1.0) / scale
  kernel_scale = max(inv_scale, np.float32(1.0))
  inv_kernel_scale = np.float32(1.0) / kernel_scale
  span = min(2 * int(np.ceil(kernel_scale)) + 1, in_size)
  sample = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * inv_scale
  starts = np.clip(np.ceil(sample - kernel_scale - np.float32(0.5)), 0, in_size - 1)
  ends = np.clip(np.floor(sample + kernel_scale - np.float32(0.5)), 0, in_size - 1) + 1
  starts, ends = starts.astype(np.int64), ends.astype(np.int64)
  source = starts[:, None] + np.arange(span)[None, :]
  position = source.astype(np.float32) + np.float32(0.5) - sample[:, None]
  weights = np.maximum(np.float32(0.0),
                       np.float32(1.0) - np.abs(position * inv_kernel_scale)).astype(np.float32)
  weights[source >= ends[:, None]] = 0.0
  total = weights.sum(axis=1, dtype=np.float32, keepdims=True)
  weights = weights * (np.float32(1.0) / np.where(total > 0, total, np.float32(1.0)))
  return starts, weights.astype(np.float32)


def _resize_axis0(x: np.ndarray, out_size: int) -> np.ndarray:
  """Resamples float32 (H, W) along axis 0 to (out_size, W), a span tap at a time."""
  starts, weights = resize_spans(x.shape[0], out_size)
  last = x.shape[0] - 1
  out = np.zeros((out_size, x.shape[1]), np.float32)
  for t in range(weights.shape[1]):
    out += weights[:, t, None] * x[np.minimum(starts + t, last)]
  return out


def preprocess(gray: np.ndarray, image_size: int, channels: int = 1) -> np.ndarray:
  """uint8 (H, W) or (H, W, 1) -> float32 (image_size, image_size, channels) in [0, 1].

  numpy's `covidlib.preprocess.preprocess`: scale to [0, 1], antialiased bilinear resize to a
  square (aspect ratio not kept), clip, repeat to 3 channels when the model wants them.
  """
  if channels not in (1, 3):
    raise errors.UsageError(f'channels must be 1 or 3, got {channels!r}')
  gray = np.asarray(gray)
  if gray.ndim == 3:
    gray = gray[..., 0]
  x = gray.astype(np.float32) / np.float32(255.0)
  x = _resize_axis0(x, image_size)
  x = _resize_axis0(np.ascontiguousarray(x.T), image_size).T
  x = np.clip(x, 0.0, 1.0)[..., np.newaxis]
  if channels == 3:
    x = np.concatenate([x, x, x], axis=-1)
  return np.ascontiguousarray(x, np.float32)


# ------------------------------------------------------------------ The predictor.

def quantize(x: np.ndarray, detail: dict) -> np.ndarray:
  """Float input -> the tensor's dtype with its scale and zero point (float32: as is)."""
  if detail['dtype'] == np.float32:
    return x.astype(np.float32)
  scale, zero_point = detail['quantization']
  info = np.iinfo(detail['dtype'])
  return np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(detail['dtype'])


def dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
  """A quantized output tensor -> float32 (float32: as is)."""
  if detail['dtype'] == np.float32:
    return y.astype(np.float32)
  scale, zero_point = detail['quantization']
  return ((y.astype(np.float32) - zero_point) * scale).astype(np.float32)


def split_outputs(interpreter, outputs: list[dict]) -> tuple[list[dict], dict | None]:
  """(the other outputs, the `shift_score` output or None), by the signature's output names."""
  if len(outputs) < 2:
    return outputs, None
  try:
    named = interpreter.get_signature_runner().get_output_details()
  except (ValueError, KeyError, RuntimeError):
    return outputs, None
  if SHIFT_OUTPUT not in named:
    return outputs, None
  index = named[SHIFT_OUTPUT]['index']
  shift_output = next((o for o in outputs if o['index'] == index), None)
  return [o for o in outputs if o['index'] != index], shift_output


def _shift_threshold(info: tflite_metadata.ModelInfo, path: str) -> float | None:
  """The covidlib_shift entry's threshold, or None without one."""
  entry = info.extra.get('shift')
  threshold = entry.get('threshold') if isinstance(entry, dict) else None
  if threshold is None:
    return None
  try:
    return float(threshold)
  except (TypeError, ValueError):
    raise errors.ModelLoadError(
        f'{path}: malformed covidlib metadata in the TFLite file (shift threshold '
        f'{threshold!r} is not a number)') from None


class EdgePredictor:
  """A .tflite model, its stored operating point, and TensorFlow-free preprocessing.

  Attributes:
    path, kind (UINT8_IMAGE or 'preprocessed'), image_size, channels, decision, labels,
    shift_threshold (None for a model without a shift score).
  """

  def __init__(self, path: str | os.PathLike, *, num_threads: int | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS):
    """Args:
      path: a covidlib .tflite file.
      num_threads: interpreter threads (None: LiteRT's default).
      max_pixels: decompression-bomb limit for image files.

    Raises:
      UsageError: path missing. ModelLoadError: not a loadable covidlib TFLite model, or
        ai-edge-litert missing.
    """
    self.path = os.fspath(path)
    self.max_pixels = max_pixels
    if not os.path.exists(self.path):
      raise errors.UsageError(f'model {self.path!r} does not exist')
    if os.path.isdir(self.path):
      raise errors.ModelLoadError(
          f'{self.path}: a folder: the edge route runs .tflite files only (covidlib-predict '
          'runs .keras, model_dir and SavedModel folders)')
    try:
      from ai_edge_litert.interpreter import Interpreter  # Optional (covidlib[edge]).
    except ImportError:
      raise errors.ModelLoadError(
          f"{self.path}: running .tflite models needs ai-edge-litert: pip install "
          "'covidlib[edge]'") from None
    with open(self.path, 'rb') as f:
      content = f.read()
    if content[4:8] != b'TFL3':
      raise errors.ModelLoadError(
          f'{self.path}: not a .tflite file (no TFL3 identifier): the edge route runs .tflite '
          'files only')
    try:
      self.interpreter = Interpreter(model_content=content, num_threads=num_threads)
      self.interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as e:
      raise errors.ModelLoadError(
          f'{self.path}: not a loadable TFLite model ({str(e).splitlines()[0][:200]})') from None
    try:
      info = tflite_metadata.read_model_info(content)
    except errors.ModelLoadError as e:
      raise errors.ModelLoadError(f'{self.path}: {e}') from None
    self.labels = info.labels or tflite_metadata.CLASS_NAMES
    self.decision = info.decision or model_dir_lib.load_decision(
        os.path.dirname(os.path.abspath(self.path)))
    inputs = self.interpreter.get_input_details()
    outputs, shift_output = split_outputs(self.interpreter,
                                          self.interpreter.get_output_details())
    if len(inputs) != 1 or len(outputs) != 1:
      raise errors.ModelLoadError(
          f'{self.path}: expected one input and one output, found {len(inputs)} and '
          f'{len(outputs)}: not a covidlib TFLite export')
    self._input, self._output = inputs[0], outputs[0]
    threshold = _shift_threshold(info, self.path)
    self._shift_output = shift_output if threshold is not None else None
    self.shift_threshold = threshold if shift_output is not None else None
    signature = tuple(int(d) for d in self._input.get('shape_signature', self._input['shape']))
    if (info.input or {}).get('kind') == UINT8_IMAGE:
      if self._input['dtype'] != np.uint8 or len(signature) != 4 or signature[3] != 1:
        raise errors.ModelLoadError(
            f'{self.path}: metadata says {UINT8_IMAGE} but the input is '
            f'{np.dtype(self._input["dtype"]).name} {signature}')
      self.kind = UINT8_IMAGE
      self.image_size = int(info.input['image_size'])
      self.channels = int(info.input['channels'])
      self._shape = None  # The (H, W) the interpreter is allocated for.
    else:
      shape = tuple(int(d) for d in self._input['shape'])
      if len(shape) != 4 or shape[1] != shape[2] or shape[3] not in (1, 3) or shape[1] < 1:
        raise errors.ModelLoadError(
            f'{self.path}: model input shape {shape} is not (N, S, S, 1 or 3): not a covidlib '
            'model')
      self.kind = 'preprocessed'
      self.image_size, self.channels = shape[1], shape[3]

  def prepare(self, gray: np.ndarray) -> np.ndarray:
    """What the interpreter takes for one decoded image (thread-safe; runs in the pool)."""
    if self.kind == UINT8_IMAGE:
      return np.ascontiguousarray(gray.reshape(1, gray.shape[0], gray.shape[1], 1), np.uint8)
    return quantize(preprocess(gray, self.image_size, self.channels)[np.newaxis], self._input)

  @property
  def has_shift(self) -> bool:
    """True when the model returns a shift score and carries its threshold."""
    return self.shift_threshold is not None

  def run(self, prepared: np.ndarray) -> float:
    """P(COVID-19) for one `prepare`d input (not thread-safe: one interpreter)."""
    return self.run_with_shift(prepared)[0]

  def run_with_shift(self, prepared: np.ndarray) -> tuple[float, float | None]:
    """(P(COVID-19), shift score or None) for one `prepare`d input, in one invocation."""
    interpreter = self.interpreter
    if self.kind == UINT8_IMAGE and prepared.shape[1:3] != self._shape:
      interpreter.resize_tensor_input(self._input['index'], list(prepared.shape), strict=False)
      interpreter.allocate_tensors()
      self._shape = prepared.shape[1:3]
    interpreter.set_tensor(self._input['index'], prepared)
    interpreter.invoke()
    probability = float(dequantize(interpreter.get_tensor(self._output['index']),
                                   self._output).reshape(-1)[0])
    if self._shift_output is None:
      return probability, None
    return probability, float(dequantize(interpreter.get_tensor(self._shift_output['index']),
                                         self._shift_output).reshape(-1)[0])

  def _result(self, path: str, probability: float, shift_score: float | None = None
              ) -> Prediction:
    result = results.prediction(path, probability, self.decision.threshold, self.labels)
    if shift_score is None:
      return result
    return dataclasses.replace(result, shift_score=float(shift_score),
                               in_distribution=bool(shift_score <= self.shift_threshold))

  def predict_array(self, image: np.ndarray, name: str = '<array>') -> Prediction:
    """Predicts one uint8 gray image, (H, W) or (H, W, 1)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
        image.ndim == 3 and image.shape[-1] != 1) or min(image.shape[:2]) < 1:
      raise errors.UsageError(
          f'predict_array takes a uint8 gray image (H, W) or (H, W, 1), got {image.dtype} '
          f'{image.shape}')
    if image.ndim == 2:
      image = image[..., np.newaxis]
    return self._result(name, *self.run_with_shift(self.prepare(image)))

  def predict_files(self, paths: Iterable[str | os.PathLike], workers: int | None = None
                    ) -> list[Prediction]:
    """One Prediction per path, in order; unreadable files get `error` and no probability.

    Args:
      paths: image or DICOM files.
      workers: decoding threads (default: the CPU count); 0 decodes on the calling thread.
    """
    paths = [os.fspath(p) for p in paths]

    def load(path):
      return self.prepare(read_image(path, self.max_pixels))

    out = []
    for path, (prepared, error) in zip(paths, results.map_ordered(load, paths, workers)):
      if error is not None:
        out.append(Prediction(path, None, None, float(self.decision.threshold), error.reason))
      else:
        out.append(self._result(path, *self.run_with_shift(prepared)))
    return out
