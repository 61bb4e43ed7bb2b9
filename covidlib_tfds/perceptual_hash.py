"""A perceptual hash for finding near-duplicate X-rays, in plain numpy.

    from covidlib_tfds import perceptual_hash
    a = perceptual_hash.image_hash(gray_a)   # gray_a: uint8 (H, W) or (H, W, 1)
    b = perceptual_hash.image_hash(gray_b)
    perceptual_hash.is_near_duplicate(a, b)  # Hamming distance <= NEAR_DUPLICATE_BITS

The hash is a 512-bit difference hash ("dHash"): shrink the gray image by exact area averaging
(ignoring the aspect ratio) to 16 x 17 and 17 x 16 thumbnails and keep one bit per pair of
neighbouring cells, "is the right (lower) cell brighter?". 256 horizontal + 256 vertical bits.
It survives re-encoding (JPEG <-> PNG, quality), resizing, brightness and contrast changes and a
caption burnt into a corner, which is what copies of one X-ray look like after passing through
several papers and web pages. It is not built for flips or rotations.

Why this hash, and not the common 64-bit DCT pHash: chest X-rays all share one coarse layout,
and 64 low-frequency bits cannot tell two children's films apart. Measured on the article's 283
images (covid_xray/README.md has the table): with the 64-bit pHash, films of two different
Kaggle patients came 2 bits apart, as close as true copies. With this 512-bit dHash, true copies
are 9-47 bits apart (47: the same film cropped 8% differently and captioned), re-encoded or 80%
resized copies at most 29, and the closest two films of different patients 77 bits apart.

The same hash and threshold serve the splitter (`covidlib_tfds.splitting`) and the leakage audit
(`covidlib_tfds.audit`), so a split the splitter made is one the audit finds clean.
"""

from __future__ import annotations

import functools

import numpy as np

_SIDE = 16  # Thumbnail side: 16 x 17 cells give 16 x 16 horizontal differences.
HASH_BITS = 2 * _SIDE * _SIDE  # 512.

# Two images whose hashes differ in at most this many of the 512 bits are near-duplicates.
# It sits in the measured gap between true copies (<= 47 bits) and different films (>= 77).
NEAR_DUPLICATE_BITS = 60


@functools.lru_cache(maxsize=256)
def _area_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) matrix: row i averages the input pixels under output cell i.

  Each input pixel is weighted by its overlap with the cell, so it works for shrinking and
  enlarging alike; every row sums to 1.
  """
  edges = np.linspace(0.0, size_in, size_out + 1)
  lo, hi = edges[:-1, None], edges[1:, None]
  pixel = np.arange(size_in)[None, :]
  overlap = np.clip(np.minimum(hi, pixel + 1) - np.maximum(lo, pixel), 0.0, None)
  return overlap / overlap.sum(axis=1, keepdims=True)


def _thumbnail(gray: np.ndarray, rows: int, cols: int) -> np.ndarray:
  thumb = _area_matrix(gray.shape[0], rows) @ gray @ _area_matrix(gray.shape[1], cols).T
  # Round away float noise, so cells that are equal (a flat border) compare equal: bit 0.
  return np.round(thumb, 4)


def _as_gray(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim != 2 or image.size == 0:
    raise ValueError(f'expected a non-empty gray image (H, W) or (H, W, 1), got shape '
                     f'{image.shape}')
  return image.astype(np.float64)


def hash_bits(image: np.ndarray) -> np.ndarray:
  """The hash as a bool vector of HASH_BITS bits."""
  gray = _as_gray(image)
  wide = _thumbnail(gray, _SIDE, _SIDE + 1)
  tall = _thumbnail(gray, _SIDE + 1, _SIDE)
  return np.concatenate([(wide[:, 1:] > wide[:, :-1]).ravel(),
                         (tall[1:, :] > tall[:-1, :]).ravel()])


def image_hash(image: np.ndarray) -> int:
  """The 512-bit perceptual hash of a gray image, as a non-negative Python int."""
  return int.from_bytes(np.packbits(hash_bits(image)).tobytes(), 'big')


def hamming(a: int, b: int) -> int:
  """Number of bits in which two hashes differ."""
  return (a ^ b).bit_count()


def is_near_duplicate(a: int, b: int, max_bits: int = NEAR_DUPLICATE_BITS) -> bool:
  return hamming(a, b) <= max_bits


def _popcounts(rows: np.ndarray) -> np.ndarray:
  """Set bits per row of a uint64 (n, words) array."""
  if hasattr(np, 'bitwise_count'):  # numpy >= 2.0.
    return np.bitwise_count(rows).sum(axis=1, dtype=np.int64)
  return np.unpackbits(rows.view(np.uint8), axis=1).sum(axis=1, dtype=np.int64)


def near_duplicate_pairs(hashes: list[int],
                         max_bits: int = NEAR_DUPLICATE_BITS) -> list[tuple[int, int, int]]:
  """Every pair (i, j, distance) with i < j of hashes at most `max_bits` apart, sorted.

  Compares all pairs, one row of them at a time in numpy (the hashes as 64-bit words, XOR,
  popcount): 10,000 images are 50M comparisons in about a second, with memory for one row. A
  dataset of millions of images would want multi-index hashing instead.
  """
  if not hashes:
    return []
  words = HASH_BITS // 64
  table = np.frombuffer(b''.join(int(h).to_bytes(HASH_BITS // 8, 'big') for h in hashes),
                        dtype='>u8').reshape(len(hashes), words).astype(np.uint64)
  pairs = []
  for i in range(len(hashes) - 1):
    distances = _popcounts(table[i + 1:] ^ table[i])
    for offset in np.flatnonzero(distances <= max_bits):
      pairs.append((i, i + 1 + int(offset), int(distances[offset])))
  return pairs
