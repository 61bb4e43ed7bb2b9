"""Grad-CAM for covidlib's single-sigmoid models, overlays, and a coarse lung-focus score.

    from covidlib import explain, model_dir
    model = model_dir.load_model('runs/compact_resnet')
    heat = explain.grad_cam(model, x)                  # x float32 (S, S, C) in [0, 1] -> (S, S)
    explain.save_overlay('cam.png', x, heat)
    explain.lung_focus_score(heat)                     # share of the heat inside the lung fields

Grad-CAM (Selvaraju et al., 2017): with A the (h, w, K) output of the target layer and z the
model's logit for the class explained, w_k = mean over positions of dz/dA_k, heat =
ReLU(sum_k w_k A_k), resized bilinearly to the input size and divided by its maximum. We
differentiate the LOGIT (the 'logit' layer of covidlib models, or the input of a final sigmoid):
the probability saturates at exactly 1.0 in float32 for confident images, and its gradient would
then be 0 - an all-black map for the images one most wants to see. For target 'normal' the
logit's sign is flipped. An all-zero map (no positive evidence) stays all zero.

Target layer: by default the last layer with a 4-D output (batch, h, w, channels), i.e. the last
feature map before global pooling / flatten ('stage4_out' for compact_resnet, 'drop4' = the
pooled conv4 map for seed_cnn). Pass `layer_name` to choose another.

Lung-focus score: the share of the heat that falls inside two fixed ellipses standing for the
lung fields of a frontal (PA/AP) chest X-ray squeezed to a square (as `covidlib.preprocess` does):
centres (x, y) = (0.30, 0.48) and (0.70, 0.48), semi-axes 0.17 wide and 0.30 tall, in units of
image width and height (LUNG_ELLIPSES). They cover 32% of the image (`lung_region_share()`), so a
map spread evenly scores 0.32, and a score well under that means the heat sits mostly outside the
lungs: on borders, text markers, shoulders, the abdomen. LIMITS: this is a coarse shortcut alarm,
not a segmentation. It assumes a centred frontal film; lateral views, rotated, cropped or
paper-figure images with wide margins put the real lungs elsewhere; pediatric films show more
abdomen; heat inside the ellipses can still come from the heart or ribs. Read it over many images
(mean per source), never as a verdict on one.
"""

from __future__ import annotations

import io
import os
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw, ImageFont

from covidlib import errors
from covidlib import model_dir

# (centre x, centre y, semi-axis x, semi-axis y) in fractions of width and height.
LUNG_ELLIPSES = ((0.30, 0.48, 0.17, 0.30), (0.70, 0.48, 0.17, 0.30))
TARGETS = ('covid', 'normal')


def _four_d_layers(model: keras.Model) -> list[str]:
  names = []
  for layer in model.layers:
    if isinstance(layer, keras.layers.InputLayer):
      continue
    try:
      shape = layer.output.shape
    except (AttributeError, ValueError):  # A layer used twice has no single output.
      continue
    if len(shape) == 4:
      names.append(layer.name)
  return names


def find_target_layer(model: keras.Model) -> str:
  """The name of the last layer with a 4-D output (the last feature map before pooling)."""
  names = _four_d_layers(model)
  if not names:
    raise errors.UsageError(
        f'model {model.name!r} has no layer with a 4-D (batch, height, width, channels) output; '
        'Grad-CAM needs a convolutional feature map')
  return names[-1]


def _logit_tensor(model: keras.Model):
  """The symbolic pre-sigmoid output of `model`, and a note on how it was found."""
  try:
    return model.get_layer('logit').output
  except ValueError:
    pass
  last = model.layers[-1]
  activation = getattr(last, 'activation', None)
  if activation is keras.activations.sigmoid or getattr(activation, '__name__', '') == 'sigmoid':
    if isinstance(last, keras.layers.Activation):
      return last.input
    if isinstance(last, keras.layers.Dense):
      # Dense(1, sigmoid): rebuild its pre-activation from the same weights.
      return keras.ops.matmul(last.input, last.kernel) + (
          last.bias if last.use_bias else 0.0)
  raise errors.UsageError(
      f'model {model.name!r} has no layer named "logit" and does not end in a sigmoid: '
      'grad_cam explains single-sigmoid P(COVID-19) models')


def _grad_model(model: keras.Model, layer_name: str | None) -> tuple[keras.Model, str]:
  if not isinstance(model, keras.Model):
    raise errors.UsageError(f'grad_cam needs a keras.Model, got {type(model).__name__}')
  if layer_name is None:
    layer_name = find_target_layer(model)
  candidates = _four_d_layers(model)
  if layer_name not in candidates:
    known = {layer.name for layer in model.layers}
    why = ('has no 4-D (batch, height, width, channels) output' if layer_name in known
           else 'is not a layer of the model')
    raise errors.UsageError(
        f'Grad-CAM target layer {layer_name!r} {why}; layers with a 4-D output: '
        + ', '.join(candidates[-8:]))
  try:
    inputs = model.inputs
  except (AttributeError, ValueError):
    inputs = None
  if not inputs:
    raise errors.UsageError(f'model {model.name!r} has no defined inputs (build it first)')
  outputs = [model.get_layer(layer_name).output, _logit_tensor(model)]
  return keras.Model(inputs, outputs), layer_name


def grad_cam_batch(model: keras.Model, images, layer_name: str | None = None,
                   target: str | Sequence[int] = 'covid') -> np.ndarray:
  """Grad-CAM maps of a batch of preprocessed images.

  Args:
    model: a covidlib inference model (or any functional model ending in a single sigmoid).
    images: float32 (B, S, S, C) in [0, 1], as the model takes them.
    layer_name: the feature map to explain; default `find_target_layer(model)`.
    target: 'covid' or 'normal' for the whole batch, or per image a label (1 = COVID-19,
      0 = normal), e.g. the predicted labels.

  Returns:
    float32 (B, S, S) in [0, 1]; each map scaled so its maximum is 1 (all zero if no heat).

  Raises:
    UsageError: an unknown or non-4-D `layer_name`, a model without a sigmoid output, a bad
      target.
  """
  grad_model, _ = _grad_model(model, layer_name)
  x = tf.convert_to_tensor(np.asarray(images, np.float32))
  if x.shape.rank != 4:
    raise errors.UsageError(f'images must be (batch, height, width, channels), got {x.shape}')
  if isinstance(target, str):
    if target not in TARGETS:
      raise errors.UsageError(f'target must be one of {TARGETS} or per-image labels, got '
                              f'{target!r}')
    sign = np.full(x.shape[0], 1.0 if target == 'covid' else -1.0, np.float32)
  else:
    labels = np.asarray(target).reshape(-1)
    if labels.size != x.shape[0] or not np.isin(labels, (0, 1)).all():
      raise errors.UsageError(
          f'target labels must be {x.shape[0]} values in {{0, 1}}, got {labels.tolist()[:8]}')
    sign = np.where(labels == 1, 1.0, -1.0).astype(np.float32)
  with tf.GradientTape() as tape:
    features, logit = grad_model(x, training=False)
    features = tf.cast(features, tf.float32)
    score = tf.reshape(tf.cast(logit, tf.float32), [-1]) * sign
  grads = tape.gradient(score, features)
  weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
  cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1, keepdims=True))
  cam = tf.image.resize(cam, x.shape[1:3], method='bilinear')[..., 0]
  peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
  cam = tf.math.divide_no_nan(cam, peak)
  return np.clip(cam.numpy(), 0.0, 1.0).astype(np.float32)


def grad_cam(model: keras.Model, image, layer_name: str | None = None,
             target: str = 'covid') -> np.ndarray:
  """Grad-CAM map (S, S) in [0, 1] of one preprocessed image (S, S, C); see grad_cam_batch."""
  image = np.asarray(image, np.float32)
  if image.ndim != 3:
    raise errors.UsageError(f'image must be (height, width, channels), got shape {image.shape}')
  return grad_cam_batch(model, image[None], layer_name, target)[0]


def lung_mask(height: int, width: int) -> np.ndarray:
  """bool (height, width): True inside the two LUNG_ELLIPSES (pixel centres)."""
  yy, xx = np.mgrid[0:height, 0:width]
  u = (xx + 0.5) / width
  v = (yy + 0.5) / height
  mask = np.zeros((height, width), bool)
  for cx, cy, rx, ry in LUNG_ELLIPSES:
    mask |= ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2 <= 1.0
  return mask


def lung_region_share(height: int = 224, width: int = 224) -> float:
  """The fraction of the image the lung ellipses cover: the score of a uniform heatmap."""
  return float(lung_mask(height, width).mean())


def lung_focus_score(heatmap) -> float | None:
  """sum(heat inside the lung ellipses) / sum(heat); None for an all-zero map.

  See the module docstring for the region and the limits of this score.
  """
  heat = np.asarray(heatmap, np.float64)
  if heat.ndim != 2:
    raise errors.UsageError(f'heatmap must be 2-D (height, width), got shape {heat.shape}')
  if np.any(heat < 0):
    raise errors.UsageError('heatmap must be non-negative')
  total = heat.sum()
  if total <= 0:
    return None
  return float(heat[lung_mask(*heat.shape)].sum() / total)


def _colormap(heat: np.ndarray) -> np.ndarray:
  """A jet-like colormap: 0 blue -> cyan -> yellow -> 1 bright red; (H, W) -> (H, W, 3)."""
  h = np.clip(heat, 0, 1)[..., None]
  r = np.clip(4 * h - 1.5, 0, 1)
  g = np.clip(1.5 - np.abs(4 * h - 2), 0, 1)
  b = np.clip(1.5 - np.abs(4 * h - 1), 0, 1)
  return np.concatenate([r, g, b], axis=-1)


def overlay(image, heatmap, alpha: float = 0.5) -> np.ndarray:
  """The gray image with the heat painted on it: uint8 RGB (S, S, 3).

  Cold regions stay gray; colour opacity grows with the heat up to `alpha`.
  """
  image = np.asarray(image, np.float32)
  if image.ndim == 3:
    image = image[..., 0]  # 3-channel inputs repeat one gray channel.
  heat = np.asarray(heatmap, np.float32)
  if image.shape != heat.shape:
    raise errors.UsageError(f'image {image.shape} and heatmap {heat.shape} differ in size')
  gray = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=-1)
  a = alpha * heat[..., None]
  return np.round(255 * ((1 - a) * gray + a * _colormap(heat))).astype(np.uint8)


def _png_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, 'PNG')
  return buffer.getvalue()


def save_overlay(path: str | os.PathLike, image, heatmap, alpha: float = 0.5) -> None:
  """Writes overlay(image, heatmap) as a PNG, atomically."""
  model_dir.write_bytes_atomic(path, _png_bytes(overlay(image, heatmap, alpha)))


def save_grid(path: str | os.PathLike, images: Sequence, heatmaps: Sequence,
              captions: Sequence[str], columns: int = 4, cell: int = 224) -> None:
  """Writes a PNG grid of overlays, each with its caption (lines split on '\\n') underneath."""
  if not len(images) == len(heatmaps) == len(captions):
    raise errors.UsageError(f'grid needs as many images ({len(images)}), heatmaps '
                            f'({len(heatmaps)}) and captions ({len(captions)})')
  if not len(images):
    raise errors.UsageError('grid needs at least one image')
  font = ImageFont.load_default()
  lines = max(len(c.split('\n')) for c in captions)
  caption_h = 4 + 12 * lines
  columns = min(columns, len(images))
  rows = -(-len(images) // columns)
  sheet = Image.new('RGB', (columns * (cell + 4) + 4, rows * (cell + caption_h + 4) + 4),
                    'white')
  draw = ImageDraw.Draw(sheet)
  for i, (image, heat, caption) in enumerate(zip(images, heatmaps, captions)):
    x0 = 4 + (i % columns) * (cell + 4)
    y0 = 4 + (i // columns) * (cell + caption_h + 4)
    tile = Image.fromarray(overlay(image, heat)).resize((cell, cell), Image.BILINEAR)
    sheet.paste(tile, (x0, y0))
    for j, line in enumerate(caption.split('\n')):
      draw.text((x0 + 2, y0 + cell + 2 + 12 * j), line[:40], fill='black', font=font)
  buffer = io.BytesIO()
  sheet.save(buffer, 'PNG')
  model_dir.write_bytes_atomic(path, buffer.getvalue())
