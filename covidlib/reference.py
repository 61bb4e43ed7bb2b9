"""The reference of a model_dir: features of training-site films, kept as arrays (no images).

    from covidlib import reference
    ref = reference.from_arrays(taps, features, labels, scores, split='validation')
    reference.save(ref, 'runs/compact_resnet')          # reference.npz + reference.json
    ref = reference.load('runs/compact_resnet')         # UsageError if the model_dir has none
    ref.features[ref.taps.index('penultimate')]         # (n, d) of one depth

What `covidlib-site check` compares a new site's films with: the pooled features of up to
MAX_FILMS films of the training site at every tap of the network (`covidlib.models.feature_taps`:
several depths, shallow to deep, the penultimate features last), with their labels and the
model's P(positive). Written at the end of covidlib-train (`covidlib.shift_fit`);
`covidlib-fit-shift` adds it to an older model_dir. Films the weights were fitted on look more
familiar to the network than any new film, so the reference is drawn from the validation split
and from the training split only where validation has too few films (`split` says which).

Stored with no pickle:
  reference.npz   tap_0 ... tap_{k-1}: (n, d_i) float32, one per tap; labels (n,) int64;
                  scores (n,) float64
  reference.json  {"taps", "split", "n", "n_per_class", "feature_dims", "description"}

Privacy: pooled feature statistics only: no pixels, no file names, no patient ids.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

import numpy as np

from covidlib import errors
from covidlib import model_dir as md

REFERENCE_NPZ = 'reference.npz'
REFERENCE_JSON = 'reference.json'
MAX_FILMS = 500
DESCRIPTION = ('Pooled features (mean and standard deviation of each channel at several depths '
               'of the network, and the penultimate features) of training-site films, the '
               'reference a new site is compared with (covidlib-site check). No images.')


@dataclasses.dataclass(frozen=True)
class Reference:
  """Features of n training-site films at each tap, their labels and the model's scores."""
  taps: tuple[str, ...]
  features: tuple[np.ndarray, ...]  # One (n, d_i) float32 array per tap, in the order of taps.
  labels: np.ndarray                # (n,) int64.
  scores: np.ndarray                # (n,) float64 P(positive).
  split: str                        # Where the films came from: 'validation', 'validation+train'.

  @property
  def n(self) -> int:
    return int(self.labels.size)

  def info(self) -> dict:
    """reference.json's content."""
    return {'taps': list(self.taps), 'split': self.split, 'n': self.n,
            'n_per_class': np.bincount(self.labels, minlength=2)[:2].tolist(),
            'feature_dims': [int(f.shape[1]) for f in self.features],
            'description': DESCRIPTION}


def from_arrays(taps, features, labels, scores, *, split: str) -> Reference:
  """A Reference, checked: one (n, d) array per tap, n labels and n scores.

  Raises:
    UsageError: naming the array that does not fit.
  """
  taps = tuple(str(t) for t in taps)
  features = tuple(np.asarray(f, np.float32) for f in features)
  labels = np.asarray(labels).reshape(-1).astype(np.int64)
  scores = np.asarray(scores, np.float64).reshape(-1)
  if not taps or len(taps) != len(features):
    raise errors.UsageError(f'reference: {len(taps)} taps but {len(features)} feature arrays')
  for name, f in zip(taps, features):
    if f.ndim != 2 or f.shape[0] != labels.size:
      raise errors.UsageError(f'reference: tap {name!r} has features of shape {f.shape}; '
                              f'expected ({labels.size}, d)')
  if scores.size != labels.size:
    raise errors.UsageError(f'reference: {scores.size} scores for {labels.size} labels')
  return Reference(taps=taps, features=features, labels=labels, scores=scores, split=split)


def choose_films(labels, max_films: int = MAX_FILMS, seed: int = 0) -> np.ndarray:
  """Sorted indices of at most `max_films` films, drawn per class in proportion (seeded)."""
  labels = np.asarray(labels).reshape(-1)
  if labels.size <= max_films:
    return np.arange(labels.size)
  rng = np.random.default_rng(seed)
  chosen = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    k = max(1, int(round(max_films * members.size / labels.size)))
    chosen.append(rng.choice(members, size=min(k, members.size), replace=False))
  return np.sort(np.concatenate(chosen))[:max_films]


def save(reference: Reference, folder: str | os.PathLike) -> None:
  """Writes reference.npz and reference.json into `folder`, each atomically."""
  folder = os.fspath(folder)
  buffer = io.BytesIO()
  np.savez(buffer, labels=reference.labels, scores=reference.scores,
           **{f'tap_{i}': f for i, f in enumerate(reference.features)})
  md.write_bytes_atomic(os.path.join(folder, REFERENCE_NPZ), buffer.getvalue())
  md.write_json(os.path.join(folder, REFERENCE_JSON), reference.info())


def exists(folder: str | os.PathLike) -> bool:
  folder = os.fspath(folder)
  return all(os.path.isfile(os.path.join(folder, n)) for n in (REFERENCE_NPZ, REFERENCE_JSON))


def load(folder: str | os.PathLike) -> Reference:
  """The reference stored in `folder` (a model_dir).

  Raises:
    UsageError: the folder holds none (the message says how to add it).
    DataError: the files are malformed.
  """
  folder = os.fspath(folder)
  if not exists(folder):
    raise errors.UsageError(
        f'model_dir {folder!r} holds no reference of its training site ({REFERENCE_NPZ}): it was '
        f'trained by an older covidlib; add it with covidlib-fit-shift --model_dir={folder}')
  info = md.read_json(os.path.join(folder, REFERENCE_JSON))
  path = os.path.join(folder, REFERENCE_NPZ)
  try:
    taps = [str(t) for t in info['taps']]
    with np.load(path, allow_pickle=False) as arrays:
      features = [arrays[f'tap_{i}'] for i in range(len(taps))]
      labels, scores = arrays['labels'], arrays['scores']
    return from_arrays(taps, features, labels, scores, split=str(info.get('split', '')))
  except (KeyError, TypeError, ValueError, OSError, errors.UsageError) as e:
    raise errors.DataError(f'{path}: malformed reference ({type(e).__name__}: '
                           f'{str(e)[:200]})') from None


def remove(folder: str | os.PathLike) -> None:
  """Deletes reference.npz and reference.json (a reference of another model must not stay)."""
  for name in (REFERENCE_NPZ, REFERENCE_JSON):
    path = os.path.join(os.fspath(folder), name)
    if os.path.exists(path):
      os.remove(path)


def info_text(reference: Reference) -> str:
  return json.dumps(reference.info(), indent=2, sort_keys=True)
