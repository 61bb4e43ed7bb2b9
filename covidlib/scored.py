"""What one scoring pass returns: per-image arrays, with no TensorFlow in sight.

    from covidlib import scored
    s = scored.Scored(labels=np.array([1, 0]), scores=np.array([0.9, 0.2]),
                      metadata={'source': np.array(['a', 'b'], object)})
    covid = s.select(s.labels == 1)
    both = scored.concat([covid, s.select(s.labels == 0)])

`covidlib.scoring` fills it by running a model over a split, a folder or a file list once. Every
analysis (metrics, threshold, calibration, shift, shortcuts) takes its arrays. Fields per image:
label (1 = the positive class), the model's raw score P(positive), the penultimate features when
the model has covidlib's head (and, when asked for, the pooled features at every depth: `taps`),
the metadata ('filename', 'source', 'view', 'patient_id', 'age',
'sex' and, for some datasets, 'finding'), and the preprocessed images when they were kept (for
Grad-CAM and the report's grid).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from covidlib import errors


@dataclasses.dataclass
class Scored:
  """A model's answers on a set of images, one row per image."""
  labels: np.ndarray                      # (n,) int64, 1 = the positive class.
  scores: np.ndarray                      # (n,) float64, the model's raw P(positive).
  metadata: dict[str, np.ndarray]         # Per-image text (object) or numbers, e.g. 'source'.
  images: np.ndarray | None = None        # (n, S, S, C) float32 model inputs, if kept.
  features: np.ndarray | None = None      # (n, d) float32 penultimate features, if computed.
  # Pooled features at every tap of the network, shallow to deep (covidlib.models.feature_taps:
  # {layer name: (n, d_i) float32}, 'penultimate' last), if asked for.
  taps: dict[str, np.ndarray] | None = None

  def __len__(self) -> int:
    return int(self.labels.size)

  def select(self, mask: np.ndarray) -> 'Scored':
    return Scored(self.labels[mask], self.scores[mask],
                  {k: v[mask] for k, v in self.metadata.items()},
                  None if self.images is None else self.images[mask],
                  None if self.features is None else self.features[mask],
                  None if self.taps is None else {k: v[mask] for k, v in self.taps.items()})

  def column(self, key: str) -> np.ndarray:
    """A metadata column as an object array; '' for every image when it is absent."""
    return np.asarray(self.metadata.get(key, np.full(len(self), '', object)), dtype=object)


def concat(parts: Sequence[Scored]) -> Scored:
  """One Scored of the non-empty parts: the metadata keys they share, images and features when
  every part has them."""
  parts = [p for p in parts if len(p)]
  if not parts:
    raise errors.DataError('no images to concatenate')
  keys = set.intersection(*(set(p.metadata) for p in parts))
  with_images = all(p.images is not None for p in parts)
  with_features = all(p.features is not None for p in parts)
  with_taps = all(p.taps is not None and list(p.taps) == list(parts[0].taps) for p in parts)
  return Scored(np.concatenate([p.labels for p in parts]),
                np.concatenate([p.scores for p in parts]),
                {k: np.concatenate([p.metadata[k] for p in parts]) for k in keys},
                np.concatenate([p.images for p in parts]) if with_images else None,
                np.concatenate([p.features for p in parts]) if with_features else None,
                {k: np.concatenate([p.taps[k] for p in parts]) for k in parts[0].taps}
                if with_taps else None)


def as_text(values) -> np.ndarray:
  """bytes or anything else -> an object array of str (UTF-8, bad bytes replaced)."""
  return np.asarray([v.decode('utf-8', 'replace') if isinstance(v, bytes) else str(v)
                     for v in np.asarray(values).reshape(-1)], dtype=object)
