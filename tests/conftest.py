"""Shared test setup: quiet TensorFlow, tiny generated images."""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')  # Tests never need an accelerator.

import io  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


def _encode(array: np.ndarray, fmt: str = 'PNG', mode: str | None = None) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array, mode).save(buffer, fmt)
  return buffer.getvalue()


@pytest.fixture
def encode():
  """`encode(array, fmt='PNG', mode=None) -> bytes`, with PIL as the reference encoder."""
  return _encode


@pytest.fixture
def gray_image() -> np.ndarray:
  """A 20 x 30 uint8 gray test image with structure (gradient plus noise)."""
  rs = np.random.RandomState(0)
  ramp = np.linspace(0, 200, 30)[None, :] + np.linspace(0, 50, 20)[:, None]
  return np.clip(ramp + rs.randint(0, 5, (20, 30)), 0, 255).astype(np.uint8)
