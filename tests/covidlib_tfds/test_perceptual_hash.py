"""Tests of the perceptual hash: copies match, different images do not."""

import io
import itertools

import numpy as np
import pytest
from PIL import Image

from covidlib_tfds import perceptual_hash as ph


def _film(seed: int, height: int = 120, width: int = 100) -> np.ndarray:
  """A gray 'film' with structure at several scales: a smooth field plus a few bars."""
  rs = np.random.RandomState(seed)
  coarse = Image.fromarray((rs.rand(6, 5) * 200).astype(np.uint8))
  field = np.asarray(coarse.resize((width, height), Image.BICUBIC), np.float64)
  for _ in range(4):
    row = rs.randint(0, height - 8)
    field[row:row + 4] += 40
  return np.clip(field + rs.normal(0, 2, field.shape), 0, 255).astype(np.uint8)


def _reencode(image: np.ndarray, fmt: str, size=None, **options) -> np.ndarray:
  pil = Image.fromarray(image)
  if size:
    pil = pil.resize(size, Image.BILINEAR)
  buffer = io.BytesIO()
  pil.save(buffer, fmt, **options)
  return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert('L'))


@pytest.mark.parametrize('transform', [
    lambda x: _reencode(x, 'JPEG', quality=50),
    lambda x: _reencode(x, 'PNG', size=(90, 108)),  # Resized to 90%.
    lambda x: _reencode(x, 'JPEG', size=(110, 132), quality=80),  # Enlarged 10%, re-encoded.
    lambda x: np.clip(x * 0.9 + 12, 0, 255).astype(np.uint8),  # Brightness and contrast.
], ids=['jpeg50', 'resized90', 'enlarged110_jpeg', 'brightness'])
def test_copies_are_near_duplicates(transform):
  original = _film(0)
  distance = ph.hamming(ph.image_hash(original), ph.image_hash(transform(original)))
  assert distance <= ph.NEAR_DUPLICATE_BITS
  assert ph.is_near_duplicate(ph.image_hash(original), ph.image_hash(transform(original)))


def test_different_images_are_not_near_duplicates():
  hashes = [ph.image_hash(_film(seed)) for seed in range(8)]
  distances = [ph.hamming(a, b) for a, b in itertools.combinations(hashes, 2)]
  assert min(distances) > ph.NEAR_DUPLICATE_BITS
  assert ph.near_duplicate_pairs(hashes) == []


def test_hash_has_512_bits_and_accepts_both_gray_shapes():
  image = _film(3)
  bits = ph.hash_bits(image)
  assert bits.shape == (ph.HASH_BITS,) == (512,) and bits.dtype == bool
  assert ph.image_hash(image) == ph.image_hash(image[..., None])
  assert ph.image_hash(image) == int(''.join('1' if b else '0' for b in bits), 2)


def test_hash_bits_are_gradient_signs_of_area_means():
  # A left-to-right ramp: every horizontal bit is set and no vertical bit is.
  ramp = np.tile(np.arange(64, dtype=np.uint8), (48, 1))
  bits = ph.hash_bits(ramp)
  assert bits[:256].all() and not bits[256:].any()
  assert ph.hamming(ph.image_hash(ramp), 0) == 256


def test_near_duplicate_pairs_matches_brute_force():
  rs = np.random.RandomState(1)
  base = int(rs.randint(0, 2**62))
  hashes = [base ^ (1 << int(b)) for b in rs.randint(0, 512, 6)] + [base ^ ((1 << 100) - 1)]
  expected = [(i, j, bin(hashes[i] ^ hashes[j]).count('1'))
              for i, j in itertools.combinations(range(len(hashes)), 2)
              if bin(hashes[i] ^ hashes[j]).count('1') <= 2]
  assert ph.near_duplicate_pairs(hashes, max_bits=2) == expected
  assert all(i < j for i, j, _ in expected) and (0, 6, 0) not in expected


@pytest.mark.parametrize('shape', [(0, 5), (4, 5, 3), (7,)])
def test_bad_shapes_are_refused(shape):
  with pytest.raises(ValueError, match='expected a non-empty gray image'):
    ph.image_hash(np.zeros(shape, np.uint8))
