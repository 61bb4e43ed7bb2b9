"""How the prepared collections were made from their originals (the download route).

    from covidlib_tfds import originals
    nih = originals.prepare_nih(png_bytes, 'X-Ray Image DataSet/No_findings/00001280_004.png')
    more = originals.prepare_ieee8023(jpeg_bytes, 'images/SARS-...-day0.jpeg')

`../shared/data/nih_adult_normals/` and `ieee8023_more/` hold prepared copies of files of two
public GitHub repositories. A user without those folders downloads the repositories' archives
instead; these functions turn each original into the very pixels the prepared copy decodes to,
so both routes give identical examples:

- `gray_on_black`: decoded as libjpeg's and Pillow's default does it (JPEG with the accurate
  integer IDCT; TF's own default, the fast IDCT, differs by a few gray levels), colour channels
  composited on black where the file has alpha (`round(c * alpha / 255)`, exact in integers:
  `(c * alpha + 127) // 255`, a tie is impossible since 255 is odd), then converted to gray with
  Pillow's integer BT.601 luma, `(299 R + 587 G + 114 B) / 1000` as `(19595 R + 38470 G + 7471 B
  + 32768) >> 16`. Our copies were written by Pillow (20 of ieee8023_more's PNGs carry the
  source's iCCP colour profile, which Pillow copies and TF never writes), hence its decoder and
  luma. 16-bit files go through `covidlib.preprocess.decode_bytes` (v / 257, rounded).
  `decode_bytes` itself is not used for 8-bit files: it drops alpha, which would turn a
  transparent (black on screen) border white, and decodes JPEG with TF's fast IDCT.
- `prepare_nih`: gray on black, then halved by a 2 x 2 box average, the mean rounded half up
  (`(a + b + c + d + 2) // 4`): 1024 x 1024 -> 512 x 512.
- `prepare_ieee8023`: gray on black, then the longest side capped at 1024 px with
  `preprocess.resize_longest_side` (the same cap every covid_xray image gets).

Both results then go through the cap of `covid_xray_dataset_builder.decode_for_dataset`, a no-op
for them, exactly as the prepared PNGs do on the offline route.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from covidlib import errors
from covidlib import preprocess

MAX_SIDE = 1024  # As covid_xray_dataset_builder.MAX_SIDE.


def gray_on_black(contents: bytes, name: str) -> np.ndarray:
  """Gray uint8 (H, W, 1) of an encoded image, with any alpha composited on black.

  Raises:
    InvalidImageError: naming `name`, for a file that is not a decodable image.
  """
  gray = preprocess.decode_bytes(contents, name)  # Validates (and handles 16-bit files).
  if contents[:4] == b'\x89PNG' and contents[24:25] == b'\x10':  # IHDR bit depth 16.
    return gray  # 16-bit PNG: X-ray detector output, no alpha in our sources.
  if contents[:3] == b'\xff\xd8\xff':
    image = tf.io.decode_jpeg(contents, channels=0, dct_method='INTEGER_ACCURATE')
  else:
    image = tf.io.decode_image(contents, channels=0, dtype=tf.uint8, expand_animations=False)
  image = image.numpy().astype(np.uint32)
  channels = image.shape[-1]
  if channels in (2, 4):  # Alpha last: composite every colour channel on black.
    image = (image[..., :-1] * image[..., -1:] + 127) // 255
  if image.shape[-1] == 3:
    image = (image[..., :1] * 19595 + image[..., 1:2] * 38470 + image[..., 2:] * 7471
             + 32768) >> 16
  return image.astype(np.uint8)


def halve(image: np.ndarray, name: str) -> np.ndarray:
  """2 x 2 box average of a uint8 (H, W, 1) image with even sides, mean rounded half up.

  Raises:
    DataError: naming `name`, if a side is odd.
  """
  height, width = image.shape[:2]
  if height % 2 or width % 2:
    raise errors.DataError(f'{name}: {width} x {height} cannot be halved by 2 x 2 blocks '
                           '(odd side); not the pinned original?')
  blocks = image.astype(np.uint32).reshape(height // 2, 2, width // 2, 2, -1)
  return ((blocks.sum(axis=(1, 3)) + 2) // 4).astype(np.uint8)


def prepare_nih(contents: bytes, name: str) -> np.ndarray:
  """An NIH original (1024 x 1024 PNG) -> the 512 x 512 gray of nih_adult_normals/."""
  return halve(gray_on_black(contents, name), name)


def prepare_ieee8023(contents: bytes, name: str) -> np.ndarray:
  """An ieee8023 original -> the gray of ieee8023_more/, longest side at most 1024."""
  return preprocess.resize_longest_side(gray_on_black(contents, name), MAX_SIDE).numpy()
